"""embedded/database.py: a client's call waits for at most the transaction already running,
never for the background calls (persister rounds) queued before it."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest_twisted

from twisted.internet import reactor

from improto_server.embedded.database import Database


@pytest_twisted.ensureDeferred
async def test_calls_overtake_waiting_background_calls(tmp_path: Path) -> None:
    db = Database(tmp_path / "lanes.sqlite3", reactor)
    await db.open()
    order: list[str] = []
    running, release = threading.Event(), threading.Event()

    def blocking(_: sqlite3.Connection) -> None:
        running.set()
        release.wait(10)
        order.append("running")

    def note(_: sqlite3.Connection, name: str) -> str:
        order.append(name)
        return name

    try:
        first = db.call_background(blocking)
        assert running.wait(10)  # the thread is inside the first transaction now
        queued = [db.call_background(note, f"background {i}") for i in range(3)]
        urgent = db.call(note, "client")
        release.set()
        await first
        assert await urgent == "client"
        for d in queued:
            await d
        assert order == ["running", "client", "background 0", "background 1", "background 2"]
    finally:
        release.set()
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_failing_call_fails_its_deferred_only(tmp_path: Path) -> None:
    db = Database(tmp_path / "lanes.sqlite3", reactor)
    await db.open()

    def boom(_: sqlite3.Connection) -> None:
        raise ValueError("on purpose")

    try:
        failed = db.call_background(boom)
        ok = db.call(lambda c: c.execute("SELECT 1").fetchone()[0])
        try:
            await failed
        except ValueError as e:
            assert str(e) == "on purpose"
        else:
            raise AssertionError("the failing call succeeded")
        assert await ok == 1
    finally:
        await db.close()
