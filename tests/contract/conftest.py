"""Fixtures for the storage contract suite.

Each test module names the port it checks (`PORT = "inbox"`, ...); its tests run once per row
of that port in backends.ROWS: the SQLite adapter, the port's service adapter (the other
ports on SQLite), and the production composition. So each (port, backend) pair runs once.
A row on services carries the `services` marker: skipped without them, failed under CI.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_twisted

from twisted.internet.defer import Deferred

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.model import PersistJob
from improto_server.ports import GroupStore, HistoryStore, InboxStore, PersistQueue
from tests.contract.backends import FACTORIES, NEEDS, ROWS, Factory
from tests.support.clock import HISTORY_RETENTION_MS, INBOX_RETENTION_MS, FakeClock
from tests.support.waiting import eventually


class Backend(Protocol):
    queue: PersistQueue
    inbox: InboxStore
    history: HistoryStore
    groups: GroupStore

    def start(self) -> Deferred[None]: ...
    def close(self) -> Deferred[None]: ...
    def sweep(self) -> Deferred[dict[str, int]]: ...


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend" not in metafunc.fixturenames:
        return
    port = metafunc.module.PORT
    rows = [
        pytest.param(row, id=row, marks=[pytest.mark.services(*NEEDS[row])] if NEEDS[row] else [])
        for row in ROWS[port]
    ]
    metafunc.parametrize("backend", rows, indirect=True)


class Harness:
    """What a contract test sees: the ports of the current backend instance, the clock, and
    a restart that reopens the same data."""

    inbox_retention_ms = INBOX_RETENTION_MS
    history_retention_ms = HISTORY_RETENTION_MS

    def __init__(self, factory: Factory, data_dir: Path, clock: FakeClock) -> None:
        self._factory = factory
        self._data_dir = data_dir
        self.clock = clock
        self.current: Backend = factory(data_dir, clock)

    queue = property(lambda self: self.current.queue)
    inbox = property(lambda self: self.current.inbox)
    history = property(lambda self: self.current.history)
    groups = property(lambda self: self.current.groups)

    def sweep(self) -> Deferred[dict[str, int]]:
        return self.current.sweep()

    def advance(self, ms: int) -> None:
        self.clock.advance(ms)

    def restart(self) -> Deferred[None]:
        """Close this instance and start a new one on the same data."""
        return Deferred.fromCoroutine(self._restart())

    async def _restart(self) -> None:
        await self.current.close()
        self.current = self._factory(self._data_dir, self.clock)
        await self.current.start()


@pytest.fixture
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(FACTORIES[request.param], tmp_path, FakeClock())
    pytest_twisted.blockon(harness.current.start())
    try:
        yield harness
    finally:
        pytest_twisted.blockon(harness.current.close())
        destroy = getattr(harness.current, "destroy", None)
        if destroy is not None:  # backends on shared services delete what the test made
            destroy()


@dataclass
class Jobs:
    """Builds valid messages/jobs with fresh increasing msg ids and the fake clock's time."""

    clock: FakeClock
    ids: Iterator[int]

    def message(
        self,
        *,
        msg_id: int | None = None,
        sender: int = 1,
        conv_kind: int = ConvKind.USER,
        conv_id: int = 2,
        body: bytes = b"hello",
        server_time: int | None = None,
        client_msg_id: bytes | None = None,
    ) -> Message:
        mid = next(self.ids) if msg_id is None else msg_id
        return Message(
            msg_id=mid,
            server_time=self.clock.now if server_time is None else server_time,
            sender_id=sender,
            sender_device="phone-1",
            conv_kind=conv_kind,
            conv_id=conv_id,
            content_type=ContentType.TEXT,
            client_msg_id=client_msg_id or mid.to_bytes(16, "big"),
            body=body,
        )

    def job(self, *inbox_users: int, **message: Any) -> PersistJob:
        """A job for `inbox_users` (default: sender 1 and receiver 2)."""
        return PersistJob(self.message(**message), inbox_users or (1, 2))


@pytest.fixture
def jobs(backend: Harness) -> Jobs:
    """Message/job builder whose server_time follows the backend's fake clock."""
    return Jobs(backend.clock, itertools.count(1_000_000))


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[None]]:
    """`await wait_for(check, timeout=...)`: poll `check` until it holds."""
    return eventually
