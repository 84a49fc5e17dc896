"""The real services of production mode (Redis, RabbitMQ, HBase's Thrift1 server): where they
are, what to do when one is missing, and deleting what one run made in them.

Addresses come from the environment, read here and nowhere else, so two runs on one machine
can use services of their own:

    IMPROTO_REDIS  host:port   default 127.0.0.1:$IMPROTO_REDIS_PORT (6379)
    IMPROTO_AMQP   AMQP URL    default amqp://guest:guest@127.0.0.1:$IMPROTO_RABBITMQ_PORT/
    IMPROTO_HBASE  host:port   default 127.0.0.1:9090

(IMPROTO_REDIS_PORT and IMPROTO_RABBITMQ_PORT are the ports scripts/services starts them on.)

A test that needs services says so with the `services` marker (`@pytest.mark.services("redis")`;
no names: all three), or uses a fixture marked with `@needs(...)` (under its @pytest.fixture);
tests/conftest.py then checks them before the test's setup: a service that does not accept
connections skips the test, or fails it when CI is set. scripts/test
starts the services only when a selected test carries the marker.
"""

from __future__ import annotations

import contextlib
import os
import socket
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

MARKER = "services"
NAMES = ("redis", "rabbitmq", "hbase")


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def _host_port(value: str) -> Address:
    host, _, port = value.rpartition(":")
    return Address(host or "127.0.0.1", int(port))


_env = os.environ.get
REDIS = _host_port(_env("IMPROTO_REDIS") or f"127.0.0.1:{_env('IMPROTO_REDIS_PORT') or 6379}")
AMQP_URL = (
    _env("IMPROTO_AMQP")
    or f"amqp://guest:guest@127.0.0.1:{_env('IMPROTO_RABBITMQ_PORT') or 5672}/%2F"
)
_amqp = urllib.parse.urlsplit(AMQP_URL)
RABBITMQ = Address(_amqp.hostname or "127.0.0.1", _amqp.port or 5672)
HBASE = _host_port(_env("IMPROTO_HBASE") or "127.0.0.1:9090")
# A Redis Cluster (scripts/services start redis-cluster): its seed node. Not in NAMES: only
# the tests and contract rows that name it need it.
REDIS_CLUSTER = _host_port(
    _env("IMPROTO_REDIS_CLUSTER") or f"127.0.0.1:{_env('IMPROTO_REDIS_CLUSTER_PORT') or 7000}"
)
ADDRESSES = {"redis": REDIS, "rabbitmq": RABBITMQ, "hbase": HBASE, "redis-cluster": REDIS_CLUSTER}


def server_flags() -> list[str]:
    """imserver's flags that point production storage at these services."""
    return ["--redis", str(REDIS), "--amqp", AMQP_URL, "--hbase", str(HBASE)]


def config_fields() -> dict[str, str]:
    """The same as improto_server.config.Config fields."""
    return {"redis": str(REDIS), "amqp": AMQP_URL, "hbase": str(HBASE)}


# ------------------------------------------------------------------ the missing-service policy


def missing(names: Iterable[str]) -> list[str]:
    """Why each of these services does not accept connections (empty: all do)."""
    out = []
    for name in names:
        addr = ADDRESSES[name]
        try:
            socket.create_connection((addr.host, addr.port), timeout=1.0).close()
        except OSError as e:
            out.append(f"{name} at {addr} ({e})")
    return out


def require(*names: str) -> None:
    """Skip the calling test unless these services (default: all) accept connections; under
    CI (CI set) fail it instead."""
    import pytest

    gone = missing(names or NAMES)
    if not gone:
        return
    why = "services not reachable: " + "; ".join(gone)
    if os.environ.get("CI"):
        pytest.fail(why + " (CI is set: start them with scripts/services start)", pytrace=False)
    pytest.skip(why)


F = TypeVar("F", bound=Callable[..., Any])


def needs(*names: str) -> Callable[[F], F]:
    """`@needs("redis", ...)` (default: all three) on a fixture's function, under its
    @pytest.fixture: the tests using the fixture carry the `services` marker."""
    chosen = names or NAMES
    unknown = set(chosen) - set(ADDRESSES)
    assert not unknown, f"unknown services {unknown}"

    def mark(func: F) -> F:
        func.improto_services = chosen  # type: ignore[attr-defined]  # read by marks_of
        return func

    return mark


def marks_of(item: Any) -> set[str]:
    """The services a collected test needs: its markers' and its fixtures' (see `needs`)."""
    names: set[str] = set()
    for marker in item.iter_markers(MARKER):
        names.update(marker.args or NAMES)
    info = getattr(item, "_fixtureinfo", None)
    for defs in info.name2fixturedefs.values() if info else ():
        for fixturedef in defs:
            names.update(getattr(fixturedef.func, "improto_services", ()))
    return names


# ---------------------------------------------------------------------------- cleanup


class SyncRedis:
    """A minimal blocking RESP client for probing and cleanup, usable outside the reactor
    (e.g. at exit, after pytest-twisted stopped it)."""

    def __init__(self, addr: Address = REDIS, timeout: float = 5.0) -> None:
        self._sock = socket.create_connection((addr.host, addr.port), timeout=timeout)
        self._file = self._sock.makefile("rb")

    def __call__(self, *args: str | bytes | int) -> Any:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(out))
        return self._read()

    def _read(self) -> Any:
        line = self._file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("Redis closed the connection")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RuntimeError(f"Redis error: {rest.decode(errors='replace')}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            return None if n < 0 else self._file.read(n + 2)[:-2]
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self._read() for _ in range(n)]
        raise RuntimeError(f"unexpected Redis reply {line!r}")

    def pipeline(self, commands: list[tuple[str | bytes | int, ...]]) -> list[Any]:
        """Send every command, then read every reply (one round trip for them all)."""
        out = []
        for args in commands:
            out.append(b"*%d\r\n" % len(args))
            for arg in args:
                data = arg if isinstance(arg, bytes) else str(arg).encode()
                out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._sock.sendall(b"".join(out))
        return [self._read() for _ in commands]

    def scan(self, prefix: str) -> list[bytes]:
        """Every key under `prefix:`."""
        from improto_server.production.redis_connection import glob_escape

        found: list[bytes] = []
        cursor = b"0"
        while True:
            cursor, keys = self(
                "SCAN", cursor, "MATCH", glob_escape(prefix + ":") + "*", "COUNT", 1000
            )
            found.extend(keys)
            if cursor == b"0":
                return found

    def close(self) -> None:
        self._file.close()
        self._sock.close()


@contextlib.contextmanager
def sync_redis() -> Any:
    client = SyncRedis()
    try:
        yield client
    finally:
        client.close()


def redis_keys(prefix: str) -> list[bytes]:
    with sync_redis() as client:
        return client.scan(prefix)


def cluster_masters() -> list[Address]:
    """The masters of the Redis Cluster at REDIS_CLUSTER (CLUSTER SLOTS)."""
    client = SyncRedis(REDIS_CLUSTER)
    try:
        reply = client("CLUSTER", "SLOTS")
    finally:
        client.close()
    found = {(m[0].decode() or REDIS_CLUSTER.host, int(m[1])) for _s, _e, m, *_ in reply}
    return [Address(h, p) for h, p in sorted(found)]


def cluster_keys(prefix: str) -> list[bytes]:
    keys: list[bytes] = []
    for addr in cluster_masters():
        client = SyncRedis(addr)
        try:
            keys.extend(client.scan(prefix))
        finally:
            client.close()
    return keys


def delete_cluster_prefix(prefix: str) -> int:
    """delete_redis_prefix on every master of the cluster (DEL one key at a time: the keys
    of one call must share a slot)."""
    removed = 0
    for addr in cluster_masters():
        client = SyncRedis(addr)
        try:
            keys = client.scan(prefix)
            for i in range(0, len(keys), 1000):
                removed += sum(client.pipeline([("DEL", k) for k in keys[i : i + 1000]]))
        finally:
            client.close()
    return removed


def delete_redis_prefix(prefix: str) -> int:
    """SCAN + DEL of the keys under `prefix:` only (blocking); returns how many went."""
    with sync_redis() as client:
        keys = client.scan(prefix)
        return sum(client("DEL", *keys[i : i + 1000]) for i in range(0, len(keys), 1000))


def amqp_connection() -> Any:
    import pika

    return pika.BlockingConnection(pika.URLParameters(AMQP_URL))


def delete_queues(prefix: str, partitions: int = 1) -> None:
    """The persist queues, dead-letter queue and exchange, and push exchange of `prefix`."""
    conn = amqp_connection()
    try:
        ch = conn.channel()
        for i in range(partitions):
            ch.queue_delete(f"{prefix}.persist.{i}")
        ch.queue_delete(f"{prefix}.persist.dead")
        ch.exchange_delete(f"{prefix}.persist.dlx")
        ch.exchange_delete(f"{prefix}.push")
        ch.queue_delete(f"{prefix}.notify")  # production/rabbit_notify.py
    finally:
        conn.close()


def delete_queue_prefix(prefix: str, partitions: int = 1) -> None:
    """What a RabbitQueue under `prefix` made: its queues, exchanges and Redis dedup keys."""
    delete_queues(prefix, partitions)
    delete_redis_prefix(prefix)


def queued_messages(queues: Iterable[str]) -> int:
    """Ready messages in these queues."""
    conn = amqp_connection()
    try:
        ch = conn.channel()
        return sum(ch.queue_declare(q, passive=True).method.message_count for q in queues)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def hbase_connection() -> Any:
    import happybase

    return happybase.Connection(HBASE.host, HBASE.port, timeout=60_000)


def drop_hbase_tables(names: Iterable[str]) -> list[str]:
    """Disable and delete those of these tables that exist; returns them."""
    wanted = set(names)
    if not wanted:
        return []
    conn = hbase_connection()
    try:
        dropped = sorted(wanted & {t.decode() for t in conn.tables()})
        for name in dropped:
            conn.delete_table(name, disable=True)
        return dropped
    finally:
        conn.close()


def purge(prefix: str, hbase_table: str | None = None, partitions: int = 1) -> dict[str, Any]:
    """Delete one run's Redis keys, queues and HBase table, each on a best-effort basis; says
    what went and what failed."""
    out: dict[str, Any] = {}
    try:
        out["redis_keys"] = delete_redis_prefix(prefix)
    except Exception as e:
        out["redis_error"] = repr(e)
    try:
        delete_queues(prefix, partitions)
        out["queues"] = partitions + 1
    except Exception as e:
        out["rabbitmq_error"] = repr(e)
    if hbase_table:
        try:
            if drop_hbase_tables([hbase_table]):
                out["hbase_table"] = hbase_table
        except Exception as e:
            out["hbase_error"] = repr(e)
    return out
