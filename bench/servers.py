"""Start the servers the benchmarks compare, as child processes on 127.0.0.1 free ports.

    improto (our server), mosquitto (the MQTT peer, run from a temp config, not the system
    service), ejabberd (the XMPP peer, the same way) and the bare relay (bench/bare_relay.py,
    the physical limit).

The process handle, free ports and the service addresses are the tests' (tests/support, one
copy for both). Imports: bench scripts run as `python bench/x.py` (bench/ first on sys.path)
and import this module first; it puts the repository root on sys.path once, so tests.support
(and improto's packages) import as normal packages. Every child gets a high RLIMIT_NOFILE and
PR_SET_PDEATHSIG(SIGKILL), so it dies with the bench process even on a crash; handles still
open at exit are stopped by an atexit hook. The death signal follows the *thread* that
started the child: start servers from the main thread.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import sqlite3
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))  # after bench/: bench's own modules come first

from tests.support import server  # noqa: E402
from tests.support.ports import LOOPBACK as HOST  # noqa: E402
from tests.support.ports import free_port  # noqa: E402
from tests.support.server import ServerHandle, cpu_seconds, die_with_parent, spawn  # noqa: E402

__all__ = ["HOST", "ServerHandle", "cpu_seconds", "free_port"]

NOFILE = 1_048_576
MOSQUITTO = "/usr/sbin/mosquitto"
UNLIMITED = BENCH_DIR / "unlimited.toml"  # limits raised: benchmarks measure speed
MOSQUITTO_QUEUE = 200_000  # max_queued_messages: per-client queue limit, raised from 1000


def raise_nofile(n: int = NOFILE) -> int:
    """Raise this process's RLIMIT_NOFILE to n (the hard limit too, as root); the soft limit now."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    with contextlib.suppress(OSError):
        n = min(n, int(Path("/proc/sys/fs/nr_open").read_text()))
    for limits in ((n, max(n, hard)), (min(n, hard), hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            break
        except (ValueError, OSError):
            continue
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _child_setup() -> None:
    """In the child before exec: many sockets allowed, and die with the parent."""
    raise_nofile()
    die_with_parent()


def start_improto(
    storage: str = "embedded",
    *,
    extra: Sequence[str] = (),
    key_prefix: str | None = None,
    hbase_table: str | None = None,
    split: bool = False,
) -> ServerHandle:
    """`imserver` with a temp data dir and a random secret (tests.support.server.start_improto:
    fresh production names unless given, `split` gateway + persister processes), with the
    rate limits of bench/unlimited.toml unless `extra` names a --config."""
    if "--config" not in extra:
        extra = ["--config", str(UNLIMITED), *extra]
    return server.start_improto(
        *extra, storage=storage, key_prefix=key_prefix, hbase_table=hbase_table, split=split,
        preexec=_child_setup,
    )  # fmt: skip


def _install_mosquitto() -> None:
    if not Path(MOSQUITTO).exists():
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        cmd = ["apt-get", "install", "-y", "--no-install-recommends", "mosquitto"]
        if subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env).returncode != 0:
            # a fresh machine may have no package lists yet
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)


def mosquitto_config(port: int, persistence: bool, data_dir: Path) -> str:
    """The broker config: defaults except the per-client queue limit, raised."""
    lines = [
        # As root it would switch to the `mosquitto` user, and a credential change clears the
        # parent-death signal that stops it with the bench: stay root (loopback-only broker).
        "user root",
        f"listener {port} {HOST}",
        "allow_anonymous true",
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {data_dir}/",
        f"max_queued_messages {MOSQUITTO_QUEUE}",
        "log_dest stderr",
    ]
    return "\n".join(lines) + "\n"


def start_mosquitto(persistence: bool) -> ServerHandle:
    """`mosquitto -c <temp conf>` (not the system service), QoS limits at their defaults except
    max_queued_messages."""
    _install_mosquitto()
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-mosquitto-"))
    data_dir = tmpdir / "data"
    data_dir.mkdir()
    port = free_port()
    conf = tmpdir / "mosquitto.conf"
    conf.write_text(mosquitto_config(port, persistence, data_dir))
    return _spawn("mosquitto", [MOSQUITTO, "-c", str(conf)], tmpdir, port)


EJABBERD_SQL = Path("/usr/share/ejabberd/sql/lite.sql")  # the package's SQLite schema
EJABBERD_LIBS = "/usr/lib/x86_64-linux-gnu"  # ERL_LIBS of Debian's ejabberdctl
EJABBERD_NODE = "ejabberd-bench@localhost"
EJABBERD_CONFIGS = ("archive", "routing")
EJABBERD_TEMPLATES = BENCH_DIR / "ejabberd"  # <config>.yml, string.Template


# Where Debian's package puts ejabberdctl; BENCH_EJABBERDCTL=/nonexistent makes a machine
# with it look like one without (bench/run.py --quick then skips the ejabberd rows).
EJABBERDCTL = Path(os.environ.get("BENCH_EJABBERDCTL", "/usr/sbin/ejabberdctl"))


def ejabberd_installed() -> bool:
    """Debian's ejabberd and its SQLite driver (only suggested by the package) are there."""
    return EJABBERDCTL.exists() and any(Path("/usr/lib/erlang/lib").glob("p1_sqlite3-*"))


def install_ejabberd() -> None:
    """apt-get install them when missing. Debian's policy-rc.d (exit 101 here) keeps the
    packaged service from starting; where there is none and it started, the packaged node is
    stopped with its own ejabberdctl (not epmd, which RabbitMQ's node uses too)."""
    if ejabberd_installed():
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    cmd = ["apt-get", "install", "-y", "--no-install-recommends", "ejabberd",
           "erlang-p1-sqlite3"]  # fmt: skip
    if subprocess.run(cmd, stdout=subprocess.DEVNULL, env=env).returncode != 0:
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, env=env)
    status = subprocess.run(["ejabberdctl", "status"], capture_output=True, env=env)
    if status.returncode == 0:  # the packaged node is running: stop it (it is not ours)
        subprocess.run(["ejabberdctl", "stop"], capture_output=True, env=env)
    if not ejabberd_installed():
        raise RuntimeError(f"ejabberd installed, but {EJABBERDCTL} or p1_sqlite3 is missing")


def ejabberd_config(config: str, port: int, db: Path) -> str:
    """bench/ejabberd/<config>.yml filled in. Both: accounts in SQLite (auth_method sql,
    plain passwords: rows inserted before start), loopback c2s without STARTTLS, no shaper,
    backlog and cache sizes raised, offline store limit raised from 100 to 200,000 (as
    Mosquitto's queue). archive: every module on SQL (SQLite), mod_mam `default: always`
    (both archives of a 1:1 message). routing: mnesia for the modules, no mod_mam."""
    if config not in EJABBERD_CONFIGS:
        raise ValueError(f"ejabberd config {config!r} not in {EJABBERD_CONFIGS}")
    template = string.Template((EJABBERD_TEMPLATES / f"{config}.yml").read_text())
    return template.substitute(port=port, host=HOST, sqlite_db=db)


def ejabberd_register(db: Path, users: range) -> None:
    """Accounts u<id> / pw<id> as rows of the SQL `users` table (ejabberdctl register starts
    a VM per call, ~0.7 s; the rows are what `register` writes with plain passwords)."""
    import xmpp_wire

    con = sqlite3.connect(db)
    try:
        con.executemany(
            "INSERT OR IGNORE INTO users (username, password) VALUES (?, ?)",
            ((xmpp_wire.jid_user(u), xmpp_wire.password(u)) for u in users),
        )
        con.commit()
    finally:
        con.close()


def start_ejabberd(config: str = "routing", users: range = range(1, 5001)) -> ServerHandle:
    """ejabberd 23.01 in the foreground from a temp dir (Debian's policy-rc.d keeps the
    packaged service from starting; we would not use its config anyway): `erl` directly as
    ejabberdctl's `foreground` runs it, node EJABBERD_NODE, its distribution on a fixed free
    port on 127.0.0.1 without epmd (RabbitMQ's epmd stays untouched). `erl` execs beam.smp, so
    the handle's pid is the VM's; SIGTERM is a clean init:stop(). Stopping also checks that
    no process of this VM is left."""
    install_ejabberd()
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-ejabberd-"))
    db = tmpdir / "ejabberd.db"
    con = sqlite3.connect(db)
    con.executescript(EJABBERD_SQL.read_text())
    con.close()
    ejabberd_register(db, users)
    port, dist = free_port(), free_port()
    conf = tmpdir / "ejabberd.yml"
    conf.write_text(ejabberd_config(config, port, db))
    env = {
        "ERL_LIBS": EJABBERD_LIBS,
        "EJABBERD_CONFIG_PATH": str(conf),
        "EJABBERD_LOG_PATH": str(tmpdir / "ejabberd.log"),
        "ERL_CRASH_DUMP": str(tmpdir / "erl_crash.dump"),
        "ERL_MAX_PORTS": "1048576",  # one port per connection; ejabberdctl's 32000 is less
        "HOME": str(tmpdir),  # the VM's .erlang.cookie goes here, not into /root
    }
    cmd = ["env", *(f"{k}={v}" for k, v in env.items()),
           "erl", "-sname", EJABBERD_NODE, "-noinput", "+K", "true", "+P", "2000000",
           *os.environ.get("BENCH_EJABBERD_ERL_FLAGS", "").split(),
           "-erl_epmd_port", str(dist), "-start_epmd", "false",
           "-kernel", "inet_dist_use_interface", "{127,0,0,1}",
           "-mnesia", "dir", f'"{tmpdir / "spool"}"', "-s", "ejabberd"]  # fmt: skip
    handle = _spawn("ejabberd", cmd, tmpdir, port)
    handle.data_dir = tmpdir
    # erl_child_setup (and any port program) are the VM's children: counted, and checked
    handle.helper_pids = _children(handle.pid)
    vm = handle.pid
    handle.on_stop.insert(0, lambda: _reap(vm, handle.helper_pids))
    try:
        _wait_for_login(port, users.start)
    except BaseException:
        handle.stop()
        raise
    return handle


def _wait_for_login(port: int, user_id: int, timeout: float = 60.0) -> None:
    """ejabberd listens before its SQL pool is up: a login meanwhile crashes its session
    (the accounts are in SQL) and the client waits on a dead stream. One login that
    succeeds says it is ready."""
    import xmpp_wire

    deadline = time.monotonic() + timeout
    while True:
        try:
            xmpp_wire.BlockingClient(HOST, port, user_id, "ready", timeout=5.0,
                                     presence=False).close()  # fmt: skip
            return
        except (OSError, xmpp_wire.XmppError) as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ejabberd on port {port}: no login in {timeout} s") from e
            time.sleep(0.25)


def _children(pid: int) -> list[int]:
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _reap(vm: int, helpers: list[int]) -> None:
    """After the VM has exited: its helpers exit with it; one still there is killed, by pid."""
    deadline = time.monotonic() + 5.0
    left = helpers
    while left and time.monotonic() < deadline:
        left = [p for p in left if _ppid(p) == vm or _comm(p) == "erl_child_setup"]
        time.sleep(0.05)
    for p in left:
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _ppid(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def start_bare_relay() -> ServerHandle:
    """bench/bare_relay.py: the length-prefixed relay without codec or storage."""
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-bare-"))
    port = free_port()
    cmd = [sys.executable, str(BENCH_DIR / "bare_relay.py"), "--port", str(port)]
    return _spawn("bare", cmd, tmpdir, port)


def _spawn(name: str, cmd: list[str], tmpdir: Path, port: int) -> ServerHandle:
    return spawn(name, cmd, tmpdir, port, own_workdir=True, preexec=_child_setup)


def mint_token(secret: str, user_id: int, device: str) -> str:
    from improto.tokens import mint

    return mint(secret, user_id, device, ttl_s=86400.0)
