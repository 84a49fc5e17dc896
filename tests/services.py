"""The real services of production mode, for tests: reachability (fail under CI, else skip)
and cleanup of what one test run created under its own prefix."""

from __future__ import annotations

import os
import socket

import pytest

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


def _redis(*args: str | bytes) -> object:
    """One command over a fresh blocking connection (enough for cleanup)."""
    with socket.create_connection(REDIS, timeout=5) as s:
        out = [b"*%d\r\n" % len(args)]
        for a in args:
            data = a if isinstance(a, bytes) else a.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        s.sendall(b"".join(out))
        f = s.makefile("rb")
        return _read(f)


def _read(f) -> object:  # type: ignore[no-untyped-def]
    line = f.readline()[:-2]
    kind, rest = line[:1], line[1:]
    if kind == b"*":
        return [_read(f) for _ in range(int(rest))]
    if kind == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2]
    if kind == b"-":
        raise RuntimeError(rest.decode())
    return rest


def cleanup(prefix: str, hbase_table: str) -> None:
    """Delete the Redis keys, queues and HBase table of one run (best effort)."""
    cursor = b"0"
    while True:
        cursor, keys = _redis("SCAN", cursor, "MATCH", prefix + ":*", "COUNT", "1000")  # type: ignore[misc]
        if keys:
            _redis("DEL", *keys)
        if cursor == b"0":
            break
    try:
        import pika

        conn = pika.BlockingConnection(pika.ConnectionParameters(*RABBITMQ))
        ch = conn.channel()
        for name in (f"{prefix}.persist.0", f"{prefix}.persist.dead"):
            ch.queue_delete(name)
        ch.exchange_delete(f"{prefix}.persist.dlx")
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
