"""embedded/database.py: a client's call waits for at most the transaction already running,
never for the background calls (persister rounds) queued before it."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

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


def _settled(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_inline_calls_run_on_the_reactor_thread_a_turn_later_urgent_first() -> None:
    clock = Clock()
    db = Database(":memory:", clock, inline=True)  # type: ignore[arg-type]
    assert _settled(db.open()) == [None]
    threads: list[str] = []

    def note(c: sqlite3.Connection, name: str) -> str:
        threads.append(threading.current_thread().name)
        c.execute("CREATE TABLE IF NOT EXISTS t (name TEXT)")
        c.execute("INSERT INTO t VALUES (?)", (name,))
        return name

    background = [_settled(db.call_background(note, f"background {i}")) for i in range(2)]
    urgent = _settled(db.call(note, "client"))
    assert (background, urgent) == ([[], []], [])  # never inside the caller's stack
    clock.advance(0)
    assert urgent == ["client"] and background == [["background 0"], ["background 1"]]
    assert threads == [threading.current_thread().name] * 3
    names = _settled(db.call(lambda c: [r[0] for r in c.execute("SELECT name FROM t")]))
    clock.advance(0)
    assert names == [["client", "background 0", "background 1"]]
    assert db._pool.started is False  # no thread was started for it


def test_inline_failure_rolls_back_and_close_runs_what_is_queued() -> None:
    clock = Clock()
    db = Database(":memory:", clock, inline=True)  # type: ignore[arg-type]
    db.open()

    def insert_then_fail(c: sqlite3.Connection) -> None:
        c.execute("CREATE TABLE t (x INTEGER)")
        raise ValueError("on purpose")

    failed = _settled(db.call(insert_then_fail))
    clock.advance(0)
    assert isinstance(failed[0], Failure) and failed[0].check(ValueError)
    rolled_back = _settled(
        db.call(
            lambda c: c.execute("SELECT count(*) FROM sqlite_master WHERE name = 't'").fetchone()
        )
    )
    queued = _settled(db.call_background(lambda c: "ran"))
    closed = _settled(db.close())  # before their turn came
    assert closed == [None] and queued == ["ran"]
    assert rolled_back == [(0,)]
    late = _settled(db.call(lambda c: None))
    assert isinstance(late[0], Failure) and "not open" in late[0].getErrorMessage()


def test_only_a_private_in_ram_database_runs_inline(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        Database(tmp_path / "file.sqlite3", Clock(), inline=True)  # type: ignore[arg-type]
