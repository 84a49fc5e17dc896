"""The real services of production mode, for tests: reachability (fail under CI, else skip)
and cleanup of what one test run created under its own prefix."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest

from improto_server.production.redis_inbox import glob_escape

REDIS = ("127.0.0.1", 6379)
RABBITMQ = ("127.0.0.1", 5672)
HBASE = ("127.0.0.1", 9090)
SERVICES = {"redis": REDIS, "rabbitmq": RABBITMQ, "hbase": HBASE}


def require_services() -> None:
    """Skip when a service does not accept connections; under CI (CI set) fail instead."""
    missing = []
    for name, addr in SERVICES.items():
        try:
            socket.create_connection(addr, timeout=1.0).close()
        except OSError as e:
            missing.append(f"{name} at {addr[0]}:{addr[1]} ({e})")
    if missing:
        why = "production services not reachable: " + "; ".join(missing)
        if os.environ.get("CI"):
            pytest.fail(why + " (CI is set: start them with scripts/services start)")
        pytest.skip(why)


class SyncRedis:
    """A minimal blocking RESP client for probing and cleanup, usable outside the reactor
    (e.g. at exit, after pytest-twisted stopped it)."""

    def __init__(self, host: str = REDIS[0], port: int = REDIS[1], timeout: float = 2.0) -> None:
        self._sock = socket.create_connection((host, port), timeout=timeout)
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

    def delete_prefix(self, prefix: str) -> int:
        """SCAN + DEL of the keys under `prefix:` only; returns how many went."""
        cursor, deleted = b"0", 0
        while True:
            cursor, keys = self(
                "SCAN", cursor, "MATCH", glob_escape(prefix + ":") + "*", "COUNT", 1000
            )
            if keys:
                deleted += self("DEL", *keys)
            if cursor == b"0":
                return deleted

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def delete_redis_prefix(prefix: str) -> int:
    """SCAN + DEL of the keys under `prefix:` only (blocking; usable outside the reactor)."""
    client = SyncRedis()
    try:
        return client.delete_prefix(prefix)
    finally:
        client.close()


def cleanup(prefix: str, hbase_table: str) -> None:
    """Delete the Redis keys, queues and HBase table of one run (best effort)."""
    delete_redis_prefix(prefix)
    try:
        import pika

        conn = pika.BlockingConnection(pika.ConnectionParameters(*RABBITMQ))
        ch = conn.channel()
        for name in (f"{prefix}.persist.0", f"{prefix}.persist.dead"):
            ch.queue_delete(name)
        ch.exchange_delete(f"{prefix}.persist.dlx")
        ch.exchange_delete(f"{prefix}.push")
        conn.close()
    except Exception:
        pass
    try:
        import happybase

        hb = happybase.Connection(*HBASE)
        if hbase_table.encode() in hb.tables():
            hb.delete_table(hbase_table, disable=True)
        hb.close()
    except Exception:
        pass
