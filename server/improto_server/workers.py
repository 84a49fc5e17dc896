"""`imserver --workers N`: N gateway processes on one host behind the same listening port.

The supervisor (the process started as `imserver --workers N`) binds one socket per worker
and per `listen` endpoint with SO_REUSEPORT, all on the same address and port, and starts
each worker as a fresh `python -m improto_server` with its sockets passed as descriptors
(`IMPROTO_WORKER` in its environment says which). The worker calls listen() and hands the
socket to `reactor.adoptStreamPort`; the kernel then spreads incoming connections over the
listening sockets of the group by a hash of the connection's addresses. A worker is an
ordinary `--role gateway` process: its own gateway id, message-id node, presence entries
and RabbitMQ routing queue, so presence and pushes across workers work exactly as across
gateways on different hosts (docs/ARCHITECTURE.md, "Several gateways").

Why one socket per worker rather than one shared socket: with a shared socket every worker
waits on the same accept queue and the kernel wakes whichever waits (in practice unevenly,
the busiest often winning), while SO_REUSEPORT gives each worker its own queue and an even
hash split; and a worker that dies takes its queue with it, so new connections go to the
others at once. Why the supervisor binds (rather than each worker): a busy port or a bad
address is reported once, before anything starts; `tcp:0` resolves to one port for all; and
only sockets of this supervisor's user can join the group (Linux requires the same UID).

With `--role all` the supervisor also starts one `--role persister` process, and one
`--role notifier` process when a push gateway is configured: the split a deployment runs.
Workers are refused with embedded or memory storage: their pushes are routed inside one
process (its Hub) and SQLite has one writer, so a second process would see neither.

Worker 0 starts first, the others once it is ready: it creates what is missing (the HBase
table, queues), which concurrent starts would race to create. Supervision: SIGTERM/SIGINT/
SIGHUP to the supervisor are forwarded (as SIGTERM) to every
child, which stops as one server does; the supervisor exits once they all have (SIGKILL to
those still running after STOP_TIMEOUT_S, or at a second signal). A child that fails before
it first reported ready stops everything (a configuration or service error, as one process
would exit). A child that exits later, for any reason but our stop, is restarted with
exponential backoff (RESTART_MIN_S doubling to RESTART_MAX_S, back to the minimum after
STABLE_S of running); its gateway id is new unless one is configured (`<id>-<index>`).
Children die with the supervisor (PR_SET_PDEATHSIG) and run in its own process group, so a
terminal's Ctrl-C reaches them once, through the supervisor.

The server API (`api_listen`, with an `api_key`) is per process, since its metrics are:
worker i serves it on the configured port + i, the persister on port + N, the notifier on
port + N + 1. Each child's log lines carry its name (`worker 0`, `persister`) in the text
format's [system] field and a `worker` key in JSON.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort, IProtocolFactory, IReactorSocket
from twisted.logger import ILogObserver, LogEvent, Logger

if TYPE_CHECKING:
    from improto_server.config import Config
    from improto_server.reactor_types import IServerReactor

log = Logger()

ENV = "IMPROTO_WORKER"  # "<kind>:<index>:<ready fd>:<listen fd>,<listen fd>..." (children)
MAX_WORKERS = 256
STOP_TIMEOUT_S = 30.0  # a stopping child folds for up to 5 s (app.STOP_FOLD_S), then closes
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
STABLE_S = 60.0  # a child that ran this long restarts after the minimum delay again
GATEWAY, PERSISTER, NOTIFIER = "gateway", "persister", "notifier"
_SHAREABLE = ("tcp", "tcp6", "ssl")
_PR_SET_PDEATHSIG = 1


# ---------------------------------------------------------------- settings


def _split(desc: str) -> list[str]:
    return re.split(r"(?<!\\):", desc)


def shift_port(desc: str, by: int) -> str:
    """A tcp/tcp6/ssl endpoint description with its port + `by` (port 0 stays 0: each process
    gets its own ephemeral port)."""
    parts = _split(desc)
    if parts[0] not in _SHAREABLE:
        raise ValueError(f"not a tcp, tcp6 or ssl endpoint: {desc!r}")
    for i, part in enumerate(parts[1:], 1):
        key, eq, value = part.rpartition("=")
        if (not eq and part.isdigit()) or key == "port":
            port = int(value)
            if port == 0 or by == 0:
                return desc
            if port + by > 65_535:
                raise ValueError(f"{desc!r}: port {port} + {by} is above 65535")
            parts[i] = f"port={port + by}" if eq else str(port + by)
            return ":".join(parts)
    raise ValueError(f"no port in endpoint {desc!r}")


def check(config: Config) -> None:
    """Config.check's part for `workers` (its range is checked there)."""
    n = config.workers
    if n == 1:
        return
    if config.storage != "production":
        raise ValueError(
            f"workers = {n} needs storage = production: {config.storage} storage routes pushes "
            "inside one process and has one SQLite writer, so a second process would not see "
            "the first one's connections or data. Run one process (workers = 1), or use "
            "--storage production (presence in Redis, routing over RabbitMQ)"
        )
    if config.role not in ("all", "gateway"):
        raise ValueError(
            f"workers applies to gateway processes (role all or gateway), not role "
            f"{config.role}: start more {config.role} processes separately"
        )
    for desc in config.listen:
        if _split(desc)[0] not in _SHAREABLE:
            raise ValueError(f"workers share tcp, tcp6 or ssl listeners only, not {desc!r}")
    if config.node_id is not None and config.node_id + n - 1 > 1023:
        raise ValueError(f"node_id {config.node_id} + workers {n} - 1 is above 1023")
    if config.api_key is not None:
        shift_port(config.api_listen, n + 1)  # the last process's API port must exist


def child_config(config: Config, kind: str, index: int) -> Config:
    """The settings of one child of a supervisor of `config.workers` workers."""
    n = config.workers
    if kind == GATEWAY:
        return replace(
            config, workers=1, role=GATEWAY,
            gateway_id=None if config.gateway_id is None else f"{config.gateway_id}-{index}",
            node_id=None if config.node_id is None else config.node_id + index,
            api_listen=shift_port(config.api_listen, index) if config.api_key else
            config.api_listen,
        )  # fmt: skip
    by = n if kind == PERSISTER else n + 1
    api = shift_port(config.api_listen, by) if config.api_key else config.api_listen
    return replace(config, workers=1, role=kind, api_listen=api)


@dataclass(frozen=True)
class Address:
    family: int
    host: str
    port: int
    backlog: int
    tls: Any = None  # the ssl endpoint's context factory


def address(desc: str, backlog: int) -> Address:
    """What to bind for a tcp/tcp6/ssl endpoint (its own backlog= wins over `backlog`)."""
    from twisted.internet.abstract import isIPv6Address
    from twisted.internet.endpoints import (
        SSL4ServerEndpoint,
        TCP4ServerEndpoint,
        TCP6ServerEndpoint,
        serverFromString,
    )

    from improto_server.app import with_backlog

    ep: Any = serverFromString(None, with_backlog(desc, backlog))  # only parsed, never run
    if not isinstance(ep, TCP4ServerEndpoint | TCP6ServerEndpoint | SSL4ServerEndpoint):
        raise ValueError(f"workers share tcp, tcp6 or ssl listeners only, not {desc!r}")
    host = ep._interface
    v6 = isinstance(ep, TCP6ServerEndpoint) or isIPv6Address(host)
    family = socket.AF_INET6 if v6 else socket.AF_INET
    tls = ep._sslContextFactory if isinstance(ep, SSL4ServerEndpoint) else None
    return Address(family, host or ("::" if v6 else ""), ep._port, ep._backlog, tls)


def bind(addr: Address, port: int) -> socket.socket:
    """A socket of the SO_REUSEPORT group on addr's host and `port`, bound, not listening."""
    s = socket.socket(addr.family, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as listenTCP: TIME_WAIT
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((addr.host, port))
    except BaseException:
        s.close()
        raise
    return s


def claim_port(addr: Address) -> int:
    """The port the group will use, refused if anything listens there already (a plain
    bind, without SO_REUSEPORT, fails where a group or any other listener exists)."""
    with socket.socket(addr.family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind((addr.host, addr.port))
        return int(probe.getsockname()[1])


# ---------------------------------------------------------------- in a child


@dataclass
class Child:
    """This process as a supervisor's child (from ENV)."""

    kind: str
    index: int
    ready_fd: int
    listen_fds: list[int]

    @property
    def label(self) -> str:
        return f"worker {self.index}" if self.kind == GATEWAY else self.kind

    def listener(
        self, reactor: IServerReactor, config: Config
    ) -> Callable[[str, IProtocolFactory], Deferred[IListeningPort]]:
        """Server's `listen`: the i-th listen endpoint on the i-th socket passed to us."""
        fds = iter(self.listen_fds)

        def listen(desc: str, factory: IProtocolFactory) -> Deferred[IListeningPort]:
            addr = address(desc, config.listen_backlog)
            sock = socket.socket(fileno=next(fds))
            sock.set_inheritable(False)
            sock.setblocking(False)
            sock.listen(addr.backlog)
            if addr.tls is not None:  # what reactor.listenSSL does over listenTCP
                from twisted.protocols.tls import TLSMemoryBIOFactory

                factory = TLSMemoryBIOFactory(addr.tls, False, factory)
            adopt = cast(IReactorSocket, reactor).adoptStreamPort
            port = adopt(sock.fileno(), sock.family, cast(Any, factory))  # it keeps a dup
            sock.close()
            return succeed(port)

        return listen

    def ready(self) -> None:
        """Tell the supervisor we serve; the pipe stays open: its end is our exit."""
        os.write(self.ready_fd, b"ready\n")


def from_env() -> Child | None:
    value = os.environ.pop(ENV, None)  # not inherited by anything this process starts
    if not value:
        return None
    kind, index, ready, fds = value.split(":")
    return Child(kind, int(index), int(ready), [int(f) for f in fds.split(",") if f])


def tagged(observer: ILogObserver, label: str, json: bool) -> ILogObserver:
    """`observer` with this child's name on every event: a `worker` key (JSON) or in the
    text format's [system] field."""

    def observe(event: LogEvent) -> None:
        if json:
            observer({**event, "worker": label})
            return
        ns, level = event.get("log_namespace", "-"), event.get("log_level")
        system = event.get("log_system") or f"{ns}#{level.name if level else '-'}"
        observer({**event, "log_system": f"{label} {system}"})

    return cast(ILogObserver, observe)


# ---------------------------------------------------------------- the supervisor


@dataclass
class _Proc:
    kind: str
    index: int
    proc: subprocess.Popen[bytes] | None = None
    ready_r: int = -1
    started: float = 0.0
    ready: bool = False
    failures: int = 0
    restart_at: float | None = None
    pids: list[int] = field(default_factory=list)  # every pid it had (for the logs)

    @property
    def label(self) -> str:
        return f"worker {self.index}" if self.kind == GATEWAY else self.kind


def _child_preexec() -> None:
    os.setpgid(0, 0)  # its own group: a terminal's SIGINT reaches it only through us
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str]) -> None:
        self.config = config
        self.argv = list(argv)
        self.addrs = [address(d, config.listen_backlog) for d in config.listen]
        self.ports: list[int] = []
        n = config.workers
        self.procs = [_Proc(GATEWAY, i) for i in range(n)]
        if config.role == "all":
            self.procs.append(_Proc(PERSISTER, 0))
            if config.push_gateway:
                self.procs.append(_Proc(NOTIFIER, 0))
        self.sel = selectors.DefaultSelector()
        self.stopping = False
        self.stop_deadline = 0.0
        self.all_ready = False
        self.failed = False

    # -- children

    def _spawn(self, p: _Proc) -> None:
        pairs = zip(self.addrs, self.ports, strict=True)
        socks = [bind(a, port) for a, port in pairs] if p.kind == GATEWAY else []
        ready_r, ready_w = os.pipe()
        fds = [s.fileno() for s in socks]
        env = dict(os.environ)
        env[ENV] = f"{p.kind}:{p.index}:{ready_w}:{','.join(map(str, fds))}"
        try:
            p.proc = subprocess.Popen(
                [sys.executable, "-m", "improto_server", *self.argv], env=env,
                pass_fds=[ready_w, *fds], stdin=subprocess.DEVNULL, preexec_fn=_child_preexec,
            )  # fmt: skip
        finally:
            os.close(ready_w)  # the child's now: EOF on ready_r is its exit
            for s in socks:
                s.close()  # the child holds them: a dead worker's queue goes with it
        p.ready_r, p.ready, p.started, p.restart_at = ready_r, False, time.monotonic(), None
        p.pids.append(p.proc.pid)
        self.sel.register(ready_r, selectors.EVENT_READ, p)
        log.info("started {label} (pid {pid})", label=p.label, pid=p.proc.pid)

    def _ready_or_exited(self, p: _Proc) -> None:
        data = b""
        with contextlib.suppress(BlockingIOError, InterruptedError):
            data = os.read(p.ready_r, 64)
        if data:
            if not p.ready:
                p.ready = True
                log.info("{label} ready (pid {pid})", label=p.label, pid=self._pid(p))
                for q in self.procs:  # the first one has created what was missing
                    if not q.pids and not self.stopping:
                        self._spawn(q)
                if not self.all_ready and all(q.ready for q in self.procs):
                    self.all_ready = True
                    log.info("all {n} processes ready; listening on {ports}",
                             n=len(self.procs), ports=self._where())  # fmt: skip
            return
        self.sel.unregister(p.ready_r)
        os.close(p.ready_r)
        assert p.proc is not None
        code = p.proc.wait()
        p.proc = None
        if self.stopping:
            log.info("{label} exited ({code})", label=p.label, code=code)
            self.failed = self.failed or code != 0
            return
        if not p.ready and not self.all_ready:
            log.critical("{label} exited with {code} before it was ready: stopping",
                         label=p.label, code=code)  # fmt: skip
            self.failed = True
            self.stop()
            return
        ran = time.monotonic() - p.started
        p.failures = 1 if ran >= STABLE_S else p.failures + 1
        delay = min(RESTART_MAX_S, RESTART_MIN_S * 2 ** (p.failures - 1))
        p.restart_at = time.monotonic() + delay
        log.warn("{label} exited with {code} after {ran:.1f} s: restarting in {delay:g} s",
                 label=p.label, code=code, ran=ran, delay=delay)  # fmt: skip

    def _pid(self, p: _Proc) -> int | None:
        return p.proc.pid if p.proc is not None else None

    def _where(self) -> str:
        return ", ".join(
            f"{a.host or '*'}:{port}" for a, port in zip(self.addrs, self.ports, strict=True)
        )

    def _restart_due(self) -> None:
        now = time.monotonic()
        for p in self.procs:
            if p.restart_at is not None and p.restart_at <= now and not self.stopping:
                try:
                    self._spawn(p)
                except OSError as e:  # e.g. the port taken while every worker was down
                    p.failures += 1
                    p.restart_at = now + min(RESTART_MAX_S, RESTART_MIN_S * 2**p.failures)
                    log.error("restarting {label} failed ({e}); again later", label=p.label,
                              e=e)  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if not self.stopping:
            self.stopping = True
            self.stop_deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self.procs:
            p.restart_at = None
            if p.proc is not None and p.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.proc.send_signal(sig)

    # -- the loop

    def run(self) -> int:
        try:
            self.ports = [claim_port(a) for a in self.addrs]
        except OSError as e:
            log.critical("cannot listen on {where}: {e}", where=self.config.listen, e=e)
            return 1
        self.config.secret()  # a generated JWT secret is written once, not raced by N children
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        old_wakeup = signal.set_wakeup_fd(wake_w)
        sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
        old = {s: signal.signal(s, lambda *_: None) for s in sigs}  # the wakeup fd tells
        self.sel.register(wake_r, selectors.EVENT_READ, None)
        log.info("{n} gateway workers on {where} (SO_REUSEPORT)", n=self.config.workers,
                 where=self._where())  # fmt: skip
        try:
            # The first child alone, the others once it is ready: it creates whatever is
            # missing (HBase table, queues), which concurrent starts would race to create.
            self._spawn(self.procs[0])
            while any(p.proc is not None for p in self.procs) or (
                not self.stopping and any(p.restart_at is not None for p in self.procs)
            ):
                for key, _ in self.sel.select(self._timeout()):
                    if key.data is None:
                        self._signals(wake_r)
                    else:
                        self._ready_or_exited(key.data)
                self._restart_due()
                if self.stopping and time.monotonic() > self.stop_deadline:
                    log.error("children still running {t:g} s after SIGTERM: SIGKILL",
                              t=STOP_TIMEOUT_S)  # fmt: skip
                    self.stop(signal.SIGKILL)
                    self.stop_deadline = float("inf")
        finally:
            for p in self.procs:
                if p.proc is not None and p.proc.poll() is None:
                    p.proc.kill()
                    p.proc.wait()
            signal.set_wakeup_fd(old_wakeup)
            for s, handler in old.items():
                signal.signal(s, handler)
            os.close(wake_r)
            os.close(wake_w)
        log.info("stopped")
        return 1 if self.failed else 0

    def _timeout(self) -> float | None:
        now = time.monotonic()
        due = [p.restart_at - now for p in self.procs if p.restart_at is not None]
        if self.stopping and self.stop_deadline != float("inf"):
            due.append(self.stop_deadline - now)
        return max(0.0, min(due)) if due else None

    def _signals(self, wake_r: int) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            got = os.read(wake_r, 64)
            if not got:
                return
            if self.stopping:  # a second signal: no more waiting
                log.warn("signal again while stopping: SIGKILL")
                self.stop(signal.SIGKILL)
                return
            log.info("signal {sig}: stopping", sig=signal.Signals(got[0]).name)
            self.stop()


def supervise(config: Config, argv: Sequence[str]) -> int:
    """Run `config.workers` gateway workers (and the persister/notifier of role all) until
    a signal stops them; the exit status (0: every child stopped cleanly)."""
    return Supervisor(config, argv).run()
