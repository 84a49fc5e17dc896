"""Wiring: storage backend, service, persister and listening endpoints for one process."""

from __future__ import annotations

import re
import resource
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IListeningPort, IProtocolFactory
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from improto.enums import CloseReason
from improto_server.api import make_api_site, make_ops_site
from improto_server.config import Config
from improto_server.deferreds import as_deferred
from improto_server.embedded.backend import SQLiteBackend
from improto_server.heap import freeze_startup_heap
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.notifier import Notifier, OnlineDevices
from improto_server.persister import Persister
from improto_server.ports import Backend, PushRouter
from improto_server.push_gateway import PushGatewayClient
from improto_server.rate_limits import RateLimits
from improto_server.reactor_types import IServerReactor
from improto_server.service import ChatService
from improto_server.session import Session, SessionFactory

log = Logger()
# How long a stopping server folds the lists its persister has pending before it closes.
STOP_FOLD_S = 5.0


def make_backend(config: Config, reactor: IServerReactor) -> Backend:
    """The storage backend the configuration names (production modules load only if used)."""
    if config.storage == "production":
        from improto_server.production.backend import ProductionBackend

        return ProductionBackend(config, reactor)
    if config.storage == "memory":
        path = ":memory:"  # one connection on one thread, so one private in-RAM database
    else:
        data = Path(config.data_dir)
        data.mkdir(parents=True, exist_ok=True)
        path = str(data / "improto.sqlite3")
    return SQLiteBackend(
        path,
        reactor=reactor,
        inbox_retention_ms=config.inbox_retention_ms,
        history_retention_ms=config.history_retention_ms,
        inbox_caps=config.inbox_caps,
        large_group_threshold=config.large_group_threshold,
    )


class Server:
    """One server process: storage backend, plus the gateway and/or the persister (--role)."""

    def __init__(
        self,
        config: Config,
        reactor: IServerReactor,
        *,
        listen: Callable[[str, IProtocolFactory], Deferred[IListeningPort]] | None = None,
    ) -> None:
        self.config = config
        # how a `listen` endpoint is opened (a --workers child: on a socket it was given)
        self._listen = listen or (lambda d, f: serverFromString(reactor, d).listen(f))
        self.reactor = reactor
        self.hub = Hub()
        self.ports: list[IListeningPort] = []
        self.backend: Backend | None = None
        self.router: PushRouter | None = None
        self._sweeper: LoopingCall | None = None
        self.notifier: Notifier | None = None
        self.api_port: IListeningPort | None = None  # the server API / health and metrics

    async def start(self) -> None:
        config = self.config
        config.check()
        self.backend = b = make_backend(config, self.reactor)
        await b.start()
        pushing = config.push_gateway is not None
        if config.role in ("all", "persister"):
            self.persister = Persister(
                b.queue, b.inbox, b.history, b.conversations, clock=self.reactor,
                notify=b.notify_queue if pushing else None, timeline=b.timeline,
                replicated=_replication_barrier(b),
            )  # fmt: skip
            self.persister.start()
            self._sweeper = LoopingCall(self._sweep)
            self._sweeper.clock = self.reactor
            self._sweeper.start(config.sweep_interval_s, now=False)
        if config.role in ("persister", "notifier"):
            if config.role == "notifier":
                self._start_notifier(b, _Presence(b, config, self.reactor))
            if config.api_key is not None:
                await self._listen_api(make_ops_site(b, self.reactor))
            log.info("{role} running ({storage} storage)", role=config.role,
                     storage=config.storage)  # fmt: skip
            freeze_startup_heap()
            return
        self.router = b.push_router()
        await self.router.start(self.hub)
        if pushing and config.role == "all":  # --role gateway: connections only
            self._start_notifier(b, self.router)
        node = config.node_id if config.node_id is not None else (self.router.node or 0)
        log.info("gateway node {node}", node=node)
        self.service = ChatService(
            IdGenerator(node), b.queue, b.inbox, b.history, b.groups, self.hub, self.router,
            limits=RateLimits(config, self.reactor), conversations=b.conversations,
            read_receipts=config.read_receipts, devices=b.devices,
            push_platforms=config.push_platforms if pushing else (),
            # every role's backend has the notify queue started: --role gateway puts its
            # devices' overdue acks there for the notifier process
            notify_queue=b.notify_queue if pushing else None, timeline=b.timeline,
        )  # fmt: skip
        self.factory = SessionFactory(
            config, self.service, self.hub, self.reactor, config.secret(), self.router
        )
        raise_open_file_limit()
        for desc in config.listen:
            desc = with_backlog(desc, config.listen_backlog)
            port = await self._listen(desc, self.factory)
            self.ports.append(port)
            log.info("listening on {desc} ({addr})", desc=desc, addr=port.getHost())
        if config.api_key is not None:
            await self._listen_api(
                make_api_site(self.service, self.router, b.devices, b, config.api_key, self.reactor)
            )
        self._log_hint()
        freeze_startup_heap()

    def _start_notifier(self, b: Backend, online: OnlineDevices) -> None:
        config = self.config
        assert config.push_gateway is not None
        gateway = PushGatewayClient(
            config.push_gateway, self.reactor, timeout_s=config.push_timeout_s,
            retries=config.push_retries, max_connections=config.push_max_in_flight,
        )  # fmt: skip
        self.notifier = Notifier(
            b.notify_queue, b.devices, online, b.conversations, gateway, self.reactor,
            interval_s=config.push_interval_s, max_in_flight=config.push_max_in_flight,
            max_pending=config.push_max_pending,
        )  # fmt: skip
        self.notifier.start()
        log.info("notifications to {url}", url=config.push_gateway)

    async def _listen_api(self, site: Any) -> None:
        port = await serverFromString(self.reactor, self.config.api_listen).listen(site)
        self.api_port = port
        log.info("server API on {desc} ({addr})", desc=self.config.api_listen,
                 addr=port.getHost())  # fmt: skip

    def _log_hint(self) -> None:
        """Tell a developer how to log in: the README's walkthrough starts from this line."""
        if not self.ports:
            return
        host = self.ports[0].getHost()
        where = getattr(host, "host", "127.0.0.1")
        if where in ("0.0.0.0", "::", ""):
            where = "127.0.0.1"
        scheme = "ssl" if self.config.listen[0].startswith("ssl:") else "tcp"
        secret = "" if self.config.jwt_secret else f" --data-dir {self.config.data_dir}"
        log.info(
            "ready. A token: imserver token USER --device DEVICE{secret}. A client: imclient "
            "--server {scheme}:host={where}:port={port} --user USER --device DEVICE{secret}"
            "{jwt}",
            secret=secret,
            scheme=scheme,
            where=where,
            port=getattr(host, "port", "?"),
            jwt=" --jwt-secret SECRET" if self.config.jwt_secret else "",
        )

    def _sweep(self) -> Deferred[Any] | None:
        if self.backend is None:
            return None
        d = self.backend.sweep()
        d.addCallback(lambda counts: log.info("retention sweep: {counts}", counts=counts))
        d.addErrback(lambda f: log.failure("retention sweep failed", f))
        return d

    async def stop(self) -> None:
        """Stop listening, tell clients we are shutting down, then close storage."""
        if self._sweeper is not None and self._sweeper.running:
            self._sweeper.stop()
        ports = self.ports + ([self.api_port] if self.api_port is not None else [])
        await DeferredList([Deferred.fromCoroutine(_stop(p)) for p in ports])
        self.ports.clear()
        self.api_port = None
        for conn in self.hub.all():
            if isinstance(conn, Session):
                conn.close(CloseReason.SHUTDOWN, "server shutting down")
        service: ChatService | None = getattr(self, "service", None)
        if service is not None:
            await service.close()  # the group events still pending: one last attempt
        if self.router is not None:
            await self.router.close()
            self.router = None
        persister: Persister | None = getattr(self, "persister", None)
        if persister is not None:
            # The lists of what this persister wrote: now, else behind() at the next start.
            try:
                await persister.fold_now().addTimeout(STOP_FOLD_S, self.reactor)
            except Exception as e:  # e.g. the database closed by its own shutdown trigger
                log.info("lists left to fold at the next start ({why})", why=e)
            persister.stop()
        if self.notifier is not None and self.backend is not None:
            await self.backend.notify_queue.close()  # its batch in hand first, then requests
            await self.notifier.stop()
            self.notifier = None
        if self.backend is not None:
            await self.backend.close()
            self.backend = None

    def bound_ports(self) -> list[int]:
        """The TCP ports listened on (unix sockets have none)."""
        hosts = (p.getHost() for p in self.ports)
        return [h.port for h in hosts if isinstance(h, IPv4Address | IPv6Address)]


def with_backlog(desc: str, backlog: int) -> str:
    """A tcp/ssl endpoint description with `backlog=` added unless it sets its own (Twisted's
    default, 50, drops SYNs when many clients connect at once)."""
    parts = re.split(r"(?<!\\):", desc)
    if parts[0] not in ("tcp", "tcp6", "ssl") or any(p.startswith("backlog=") for p in parts):
        return desc
    return f"{desc}:backlog={backlog}"


def raise_open_file_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection is a descriptor) and
    log what it got; returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warn("could not raise the open-file limit to {hard}: {e}", hard=hard, e=e)
    log.info("open-file limit: {soft} (hard {hard})", soft=soft, hard=hard)
    return soft


async def _stop(port: IListeningPort) -> None:
    stopped = port.stopListening()
    if stopped is not None:
        await stopped


class _Presence:
    """online_devices for a notifier without a gateway in its process: Redis presence alone
    (--role notifier needs production storage)."""

    def __init__(self, backend: Backend, config: Config, reactor: IServerReactor) -> None:
        from improto_server.production.presence import Presence

        redis = getattr(backend, "redis")  # noqa: B009 (ProductionBackend's, not in the port)
        cluster = bool(getattr(backend, "redis_cluster", False))
        self._presence = Presence(redis, config.key_prefix, reactor=reactor, cluster=cluster)

    @as_deferred
    async def online_devices(self, user_ids: Sequence[int]) -> dict[int, set[str]]:
        found = await self._presence.lookup(user_ids)
        return {user: set(devices) for user, devices in found.items() if devices}


def _replication_barrier(backend: Backend) -> Callable[[], Deferred[None]] | None:
    """The persister's wait for Redis replicas (ProductionBackend's, if configured)."""
    barrier = getattr(backend, "replication_barrier", None)
    return None if barrier is None else barrier()
