"""Contract backend "sqlite+hbase": the embedded SQLite backend with its history on HBase.

HBase's Thrift1 server is taken from IMPROTO_HBASE (host:port, default 127.0.0.1:9090). When it
is unreachable the tests skip, except under CI (CI set), where they fail.

Each test's data directory maps to its own table (`improto_test_<hash of the path>`), so a
restart reaches the same table. A closed backend's table cannot be dropped at once (a restart
may reopen it), so it is dropped when a backend for another directory is created, and at exit.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import socket
import sys
from pathlib import Path
from typing import Any

import happybase
import pytest

from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from improto_server.embedded.sqlite import SQLiteBackend
from improto_server.production.hbase_history import HBaseHistory

HOST, _, _PORT = os.environ.get("IMPROTO_HBASE", "127.0.0.1:9090").rpartition(":")
PORT = int(_PORT)
TABLE_PREFIX = "improto_test_"

_tables_seen: set[str] = set()  # tables made by this process (each dropped once stale)
_tables_closed: set[str] = set()  # their backends closed: drop unless reopened by a restart


def hbase_reachable() -> bool:
    try:
        socket.create_connection((HOST, PORT), timeout=2).close()
    except OSError:
        return False
    return True


def require_hbase() -> None:
    """Skip the calling test when HBase is down; under CI, fail it instead."""
    if hbase_reachable():
        return
    message = f"HBase Thrift server not reachable at {HOST}:{PORT}"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


def drop_tables(names: set[str] | list[str]) -> None:
    """Disable and delete the tables that exist (blocking: call it off the reactor)."""
    if not names:
        return
    conn = happybase.Connection(HOST, PORT, timeout=60_000)
    try:
        existing = {t.decode() for t in conn.tables()}
        for name in sorted(set(names) & existing):
            conn.delete_table(name, disable=True)
    finally:
        conn.close()


def _drop_closed_tables_at_exit() -> None:
    if _tables_closed and hbase_reachable():
        drop_tables(_tables_closed)


atexit.register(_drop_closed_tables_at_exit)


class SQLiteWithHBaseHistory:
    """SQLiteBackend for the queue, inboxes and groups; HBaseHistory for the history."""

    def __init__(self, sqlite: SQLiteBackend, history: HBaseHistory, stale: set[str]) -> None:
        self._sqlite = sqlite
        self.queue = sqlite.queue
        self.inbox = sqlite.inbox
        self.groups = sqlite.groups
        self.history = history
        self._stale = stale

    def start(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._start())

    async def _start(self) -> None:
        if self._stale:
            await deferToThread(drop_tables, self._stale)
        await self._sqlite.start()
        try:
            await self.history.start()
        except BaseException:
            await self._sqlite.close()
            raise

    def close(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._close())

    async def _close(self) -> None:
        try:
            await self.history.close()
        finally:
            await self._sqlite.close()
            _tables_closed.add(self.history.table_name)

    def sweep(self) -> Deferred[dict[str, int]]:
        # History retention is the HBase family TTL plus the read-side filter: nothing to do.
        return self._sqlite.sweep()


def _factory(data_dir: Path, clock: Any) -> SQLiteWithHBaseHistory:
    # The retentions are the contract conftest's; it is the module that defines the clock
    # (imported by pytest under a name shared with tests/conftest.py, so not importable here).
    contract = sys.modules[type(clock).__module__]
    require_hbase()
    table = TABLE_PREFIX + hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:20]
    _tables_closed.discard(table)  # a restart: keep it
    stale = set(_tables_closed)  # tables of finished tests
    _tables_closed.clear()
    if table not in _tables_seen:
        stale.add(table)  # a same-named table left behind by a killed run: start empty
        _tables_seen.add(table)
    sqlite = SQLiteBackend(
        data_dir / "improto.sqlite3",
        now_ms=clock,
        inbox_retention_ms=contract.INBOX_RETENTION_MS,
        history_retention_ms=contract.HISTORY_RETENTION_MS,
    )
    history = HBaseHistory(
        HOST,
        PORT,
        table,
        now_ms=clock,
        retention_ms=contract.HISTORY_RETENTION_MS,
        # The fake clock starts in 2025 and jumps days ahead: cells stamped with its times
        # would be expired by a TTL on HBase's real clock. Retention is the read filter here.
        family_ttl=False,
    )
    return SQLiteWithHBaseHistory(sqlite, history, stale)


def register(backends: dict[str, Any]) -> None:
    backends["sqlite+hbase"] = _factory
