"""Fixtures for the storage contract suite, run once per backend in `BACKENDS`.

To add a backend, register a factory: it gets a per-test data directory and the fake clock
and returns an unstarted object with `start()`, `close()`, `sweep()` and the four ports
(`queue`, `inbox`, `history`, `groups`). Calling the factory again with the same directory
must reach the same data (the restart tests rely on it), and the backend must read time
only from the clock it was given, with the retentions below.
"""

from __future__ import annotations

import importlib.util
import itertools
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.embedded.sqlite import SQLiteBackend
from improto_server.model import PersistJob
from improto_server.ports import GroupStore, HistoryStore, InboxStore, PersistQueue

DAY_MS = 86_400_000
INBOX_RETENTION_MS = 7 * DAY_MS
HISTORY_RETENTION_MS = 180 * DAY_MS
START_MS = 1_750_000_000_000  # the fake clock's start: a plausible wall-clock time


class FakeClock:
    """A millisecond clock that moves only when a test says so."""

    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms


class Backend(Protocol):
    queue: PersistQueue
    inbox: InboxStore
    history: HistoryStore
    groups: GroupStore

    def start(self) -> Deferred[None]: ...
    def close(self) -> Deferred[None]: ...
    def sweep(self) -> Deferred[dict[str, int]]: ...


BackendFactory = Callable[[Path, FakeClock], Backend]


def _sqlite(data_dir: Path, clock: FakeClock) -> Backend:
    return SQLiteBackend(
        data_dir / "improto.sqlite3",
        now_ms=clock,
        inbox_retention_ms=INBOX_RETENTION_MS,
        history_retention_ms=HISTORY_RETENTION_MS,
    )


BACKENDS: dict[str, BackendFactory] = {"sqlite": _sqlite}

# Other backends live in backend_*.py beside this file, each with `register(BACKENDS)`; a
# backend whose services are not reachable skips, except under CI (CI set), where it fails.
for _path in sorted(Path(__file__).parent.glob("backend_*.py")):
    _spec = importlib.util.spec_from_file_location(f"contract_{_path.stem}", _path)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)
    _module.register(BACKENDS)


class Harness:
    """What a contract test sees: the ports of the current backend instance, the clock, and
    a restart that reopens the same data."""

    inbox_retention_ms = INBOX_RETENTION_MS
    history_retention_ms = HISTORY_RETENTION_MS

    def __init__(self, factory: BackendFactory, data_dir: Path, clock: FakeClock) -> None:
        self._factory = factory
        self._data_dir = data_dir
        self.clock = clock
        self.current = factory(data_dir, clock)

    @property
    def queue(self) -> PersistQueue:
        return self.current.queue

    @property
    def inbox(self) -> InboxStore:
        return self.current.inbox

    @property
    def history(self) -> HistoryStore:
        return self.current.history

    @property
    def groups(self) -> GroupStore:
        return self.current.groups

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


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Harness]:
    harness = Harness(BACKENDS[request.param], tmp_path, FakeClock())
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


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait (on the real reactor) until `check()` holds; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await deferLater(reactor, 0.005, lambda: None)


@pytest.fixture
def wait_for() -> Callable[..., Awaitable[None]]:
    """`await wait_for(check, timeout=...)`: poll `check` until it holds."""
    return eventually
