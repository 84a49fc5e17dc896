"""Start the servers the benchmarks compare, as child processes on 127.0.0.1 free ports.

    improto (our server), mosquitto (the MQTT peer, run from a temp config, not the system
    service) and the bare relay (bench/bare_relay.py, the physical limit).

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
import subprocess
import sys
import tempfile
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
