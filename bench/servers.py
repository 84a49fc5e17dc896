"""Start the servers the benchmarks compare, as child processes on 127.0.0.1 free ports.

    improto (our server), mosquitto (the MQTT peer, run from a temp config, not the system
    service) and the bare relay (bench/bare_relay.py, the physical limit).

Every child gets a high RLIMIT_NOFILE and PR_SET_PDEATHSIG(SIGKILL), so it dies with the bench
process even on a crash; handles still open at exit are stopped by an atexit hook. The death
signal follows the *thread* that started the child: start servers from the main thread.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
NOFILE = 1_048_576
MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_QUEUE = 200_000  # max_queued_messages: per-client queue limit, raised from 1000
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
_TICK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_live: list[ServerHandle] = []


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of these processes, seconds (one that has exited counts 0)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICK
    return total


@dataclass
class ServerHandle:
    name: str  # "improto" | "mosquitto" | "bare"
    host: str
    port: int
    pid: int
    secret: str | None = None  # improto: the JWT secret to mint tokens with
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    tmpdir: Path | None = field(default=None, repr=False)
    on_stop: list[Callable[[], object]] = field(default_factory=list, repr=False)
    # more processes of the same server (improto's separate persister): counted in cpu_s()
    helper_pids: list[int] = field(default_factory=list)

    def rss_kib(self) -> int:
        """VmRSS of the server process, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise ProcessLookupError(f"{self.name} pid {self.pid} has no VmRSS (exited?)")

    def cpu_s(self) -> float:
        """utime + stime of the server process (and its helper processes), seconds."""
        return cpu_seconds([self.pid, *self.helper_pids])

    def log_tail(self, lines: int = 30) -> str:
        if self.log is None:
            return ""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM, wait (SIGKILL after 10 s), run cleanups, delete the temp dir; idempotent."""
        proc, self.proc = self.proc, None
        if proc is not None:
            _terminate(proc)
        cleanups, self.on_stop = self.on_stop, []
        for cleanup in cleanups:
            with contextlib.suppress(Exception):
                cleanup()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        if self in _live:
            _live.remove(self)


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        handle.stop()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _wait_listening(handle: ServerHandle, timeout: float = START_TIMEOUT_S) -> None:
    deadline = time.monotonic() + timeout
    while True:
        proc = handle.proc
        if proc is not None and proc.poll() is not None:
            code = proc.returncode
            handle.stop()
            raise RuntimeError(f"{handle.name} exited with {code}:\n{handle.log_tail()}")
        try:
            socket.create_connection((HOST, handle.port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                tail = handle.log_tail()
                handle.stop()
                raise RuntimeError(
                    f"{handle.name} not accepting on {handle.port} after {timeout:.0f}s:\n{tail}"
                ) from None
            time.sleep(0.05)


def _spawn(name: str, cmd: list[str], tmpdir: Path, port: int, **kw: object) -> ServerHandle:
    """Run cmd with output to tmpdir/server.log, register it, wait for the port."""
    log = tmpdir / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_child_setup, cwd=REPO,
        )  # fmt: skip
    handle = ServerHandle(name, HOST, port, proc.pid, log=log, proc=proc, tmpdir=tmpdir, **kw)
    _live.append(handle)
    _wait_listening(handle)
    return handle


def start_improto(
    storage: str = "embedded",
    *,
    extra: Sequence[str] = (),
    key_prefix: str | None = None,
    hbase_table: str | None = None,
    split: bool = False,
) -> ServerHandle:
    """`imserver` with a temp data dir and a random secret. Production storage gets a fresh key
    prefix and HBase table unless given; fresh ones are deleted from the services on stop.
    `split` (production): a `--role gateway` process plus a `--role persister` process, as a
    deployment runs them (one core each), instead of one `--role all` process."""
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-improto-"))
    port, secret = free_port(), secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "improto_server",
        "--listen", f"tcp:{port}:interface={HOST}",
        "--data-dir", str(tmpdir / "data"), "--jwt-secret", secret, "--storage", storage,
    ]  # fmt: skip
    purge: Callable[[], object] | None = None
    if storage == "production":
        run_id = uuid.uuid4().hex[:12]
        fresh = key_prefix is None and hbase_table is None
        key_prefix = key_prefix or f"bench{run_id}"
        hbase_table = hbase_table or f"bench_{run_id}_history"
        cmd += ["--key-prefix", key_prefix, "--hbase-table", hbase_table]
        if fresh:
            purge = _purger(key_prefix, hbase_table, extra)
    if split and storage == "production":
        extra = [*extra, "--role", "gateway"]
    handle = _spawn("improto", [*cmd, *extra], tmpdir, port, secret=secret)
    if split and storage == "production":
        persister = _spawn_persister([*cmd, "--role", "persister"], tmpdir)
        handle.helper_pids.append(persister.pid)
        handle.on_stop.append(lambda: _terminate(persister))
    if purge is not None:
        handle.on_stop.append(purge)
    return handle


def _spawn_persister(cmd: list[str], tmpdir: Path) -> subprocess.Popen[bytes]:
    """The queue consumer: it listens on nothing, so there is no port to wait for."""
    with open(tmpdir / "persister.log", "wb") as out:
        return subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=_child_setup, cwd=REPO,
        )  # fmt: skip


def _terminate(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _purger(prefix: str, table: str, extra: Sequence[str]) -> Callable[[], object]:
    """Deletes a run's Redis keys, queues and HBase table (bench/chaos_faults.py's purge)."""
    args = list(extra)
    partitions = 1
    if "--queue-partitions" in args:
        partitions = int(args[args.index("--queue-partitions") + 1])

    def purge() -> object:
        import chaos_faults

        return chaos_faults.purge(prefix, table, partitions)

    return purge


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


def mint_token(secret: str, user_id: int, device: str) -> str:
    from improto.tokens import mint

    return mint(secret, user_id, device, ttl_s=86400.0)
