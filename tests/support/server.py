"""A server as a child process on a loopback port: imserver for tests and benchmarks, and
the benchmarks' other servers (bench/servers.py starts those through `spawn`).

Every handle still running at interpreter exit is stopped by an atexit hook. With
`die_with_parent` as its preexec (bench's default) a child is also killed if this process
dies: the death signal follows the *thread* that started it, so start it from the main one.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import services
from tests.support.ports import LOOPBACK, free_port

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
TEST_SECRET = "test-secret-0123456789abcdef0123456789"
_TICK = os.sysconf("SC_CLK_TCK")
_PR_SET_PDEATHSIG = 1
_live: list[ServerHandle] = []


class ServerStartError(RuntimeError):
    """The server exited, or did not accept connections in time (the message has its log)."""


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
    port: int
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = LOOPBACK
    secret: str | None = None  # improto: the JWT secret to mint tokens with
    log: Path | None = None
    data_dir: Path | None = None
    tmpdir: Path | None = field(default=None, repr=False)  # ours: deleted by stop()
    on_stop: list[Callable[[], object]] = field(default_factory=list, repr=False)
    # more processes of the same server (improto's separate persister): counted in cpu_s()
    helper_pids: list[int] = field(default_factory=list)
    pid: int = 0
    returncode: int | None = None

    def __post_init__(self) -> None:
        if self.proc is not None and not self.pid:
            self.pid = self.proc.pid

    @property
    def endpoint(self) -> str:
        """A Twisted client endpoint string for it."""
        return f"tcp:host={self.host}:port={self.port}"

    def rss_kib(self) -> int:
        """VmRSS of the server process, KiB."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise ProcessLookupError(f"{self.name} pid {self.pid} has no VmRSS (exited?)")

    def cpu_s(self) -> float:
        """utime + stime of the server process (and its helper processes), seconds."""
        return cpu_seconds([self.pid, *self.helper_pids])

    def log_tail(self, lines: int = 40) -> str:
        if self.log is None:
            return ""
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server output)"

    def stop(self) -> int | None:
        """SIGTERM, wait (SIGKILL after 10 s), run cleanups, delete our temp dir; idempotent.
        Returns the exit status (None if never started)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            self.returncode = terminate(proc)
        cleanups, self.on_stop = self.on_stop, []
        for cleanup in cleanups:
            with contextlib.suppress(Exception):
                cleanup()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        if self in _live:
            _live.remove(self)
        return self.returncode


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        handle.stop()


def terminate(proc: subprocess.Popen[bytes]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def die_with_parent() -> None:
    """In a child before exec: SIGKILL when the parent (thread) dies."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def popen(
    cmd: Sequence[str], log: Path, preexec: Callable[[], None] | None = None
) -> subprocess.Popen[bytes]:
    """Run cmd from the repository root, output to `log` (appended)."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            list(cmd), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            preexec_fn=preexec, cwd=REPO,
        )  # fmt: skip


def wait_listening(handle: ServerHandle, timeout: float = START_TIMEOUT_S) -> None:
    """Until the handle's port accepts; stop it and raise ServerStartError if it exits first
    or the time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        proc = handle.proc
        if proc is not None and proc.poll() is not None:
            code = proc.returncode
            handle.stop()
            raise ServerStartError(f"{handle.name} exited with {code}:\n{handle.log_tail()}")
        try:
            socket.create_connection((handle.host, handle.port), timeout=0.5).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                tail = handle.log_tail()
                handle.stop()
                raise ServerStartError(
                    f"{handle.name} not accepting on {handle.port} after {timeout:.0f}s:\n{tail}"
                ) from None
            time.sleep(0.05)


def spawn(
    name: str,
    cmd: Sequence[str],
    workdir: Path,
    port: int,
    *,
    own_workdir: bool = False,
    preexec: Callable[[], None] | None = die_with_parent,
    **fields: object,
) -> ServerHandle:
    """Run cmd with output to workdir/server.log, register it, wait for its port.
    `own_workdir`: the handle deletes workdir when stopped."""
    log = workdir / "server.log"
    proc = popen(cmd, log, preexec)
    handle = ServerHandle(
        name,
        port,
        proc,
        log=log,
        tmpdir=workdir if own_workdir else None,
        **fields,  # type: ignore[arg-type]
    )
    _live.append(handle)
    wait_listening(handle)
    return handle


def _flag(args: Sequence[str], name: str) -> str | None:
    args = list(args)
    return args[args.index(name) + 1] if name in args[:-1] else None


# Flags of one process that a split run's persister must not share with its gateway: the
# gateway's own (--role, and --listen, which cmd has already), and the names that identify a
# process (its gateway id, its node id for ids).
_GATEWAY_ONLY = ("--listen", "--role", "--gateway-id", "--node-id")


def _without(args: Sequence[str], names: Sequence[str]) -> list[str]:
    """args minus the flags `names` and their values (`--flag value` or `--flag=value`)."""
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in names:
            skip = True
        elif not any(arg.startswith(f"{name}=") for name in names):
            out.append(arg)
    return out


def start_improto(
    *extra: str,
    workdir: Path | None = None,
    secret: str | None = None,
    storage: str | None = None,
    key_prefix: str | None = None,
    hbase_table: str | None = None,
    split: bool = False,
    preexec: Callable[[], None] | None = die_with_parent,
) -> ServerHandle:
    """`python -m improto_server` on a free loopback port; returns once it accepts.

    Data goes to workdir/data (default: a fresh temp dir, deleted on stop); the secret is
    random unless given. Production storage (`storage=` or a `--storage` flag in `extra`)
    talks to the services of tests.support.services; a run given neither key prefix nor
    table gets fresh ones, deleted from the services on stop. `split` (production): a
    `--role gateway` process plus a `--role persister` process, as a deployment runs them,
    instead of one `--role all` process."""
    own = workdir is None
    workdir = Path(tempfile.mkdtemp(prefix="improto-server-")) if workdir is None else workdir
    port, secret = free_port(), secret or secrets.token_hex(16)
    cmd = [
        sys.executable, "-m", "improto_server",
        "--listen", f"tcp:{port}:interface={LOOPBACK}",
        "--data-dir", str(workdir / "data"), "--jwt-secret", secret,
    ]  # fmt: skip
    if storage is not None:
        cmd += ["--storage", storage]
    production = (storage or _flag(extra, "--storage")) == "production"
    purge: Callable[[], object] | None = None
    if production:
        cmd += services.server_flags()
        prefix_flag, table_flag = _flag(extra, "--key-prefix"), _flag(extra, "--hbase-table")
        fresh = not (key_prefix or hbase_table or prefix_flag or table_flag)
        run_id = uuid.uuid4().hex[:12]
        key_prefix, hbase_table = key_prefix or f"run{run_id}", hbase_table or f"run_{run_id}"
        if prefix_flag is None:
            cmd += ["--key-prefix", key_prefix]
        if table_flag is None:
            cmd += ["--hbase-table", hbase_table]
        if fresh:
            partitions = int(_flag(extra, "--queue-partitions") or 1)
            purge = functools.partial(services.purge, key_prefix, hbase_table, partitions)
    gateway = ["--role", "gateway"] if split and production else []
    handle = spawn(
        "improto", [*cmd, *extra, *gateway], workdir, port, own_workdir=own, preexec=preexec,
        secret=secret, data_dir=workdir / "data",
    )  # fmt: skip
    if gateway:
        # the same settings (a --config, limits, retention) as the gateway, but its own role
        own_flags = [*cmd, *_without(extra, _GATEWAY_ONLY), "--role", "persister"]
        persister = popen(own_flags, workdir / "persister.log", preexec)
        handle.helper_pids.append(persister.pid)
        handle.on_stop.append(lambda: terminate(persister))
    if purge is not None:
        handle.on_stop.append(purge)
    return handle


def start_server(tmp: Path, secret: str = TEST_SECRET, *extra: str) -> ServerHandle:
    """imserver with its data under `tmp` (a test's temp dir, kept) and the given secret."""
    return start_improto(*extra, workdir=tmp, secret=secret)


@contextlib.contextmanager
def storage_server(
    storage: str, tmp: Path, secret: str, name: str, *extra: str
) -> Iterator[ServerHandle]:
    """start_server on `storage`: "embedded", or "production" on the services of
    scripts/services under a fresh key prefix and HBase table named after `name` (removed
    afterwards), so tests sharing the services never see each other's data."""
    flags = list(extra)
    prefix = table = ""
    if storage == "production":
        run = uuid.uuid4().hex[:10]
        prefix, table = f"{name}{run}", f"{name}_{run}"
        flags += ["--storage", "production", "--key-prefix", prefix, "--hbase-table", table]
    proc = start_server(tmp, secret, *flags)
    try:
        yield proc
    finally:
        proc.stop()
        if prefix:
            services.purge(prefix, table)
