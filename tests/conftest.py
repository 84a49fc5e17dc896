"""Shared fixtures and the missing-service policy (tests/support/services.py)."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from tests.support import services
from tests.support.server import TEST_SECRET, ServerHandle, start_server


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests needing services through a fixture (`@needs` on it) get the marker too, so that
    `-m services` (scripts/test) selects them."""
    for item in items:
        names = services.marks_of(item)
        if names and not any(True for _ in item.iter_markers(services.MARKER)):
            item.add_marker(pytest.mark.services(*sorted(names)))


def pytest_collection_finish(session: pytest.Session) -> None:
    """With IMPROTO_SERVICES_NEEDED=<file> (scripts/test, with --collect-only): write there the
    services the selected tests need, one a line (an empty file: none)."""
    out = os.environ.get("IMPROTO_SERVICES_NEEDED")
    if out:
        names = set().union(*(services.marks_of(item) for item in session.items))
        Path(out).write_text("".join(f"{name}\n" for name in sorted(names)))


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before any fixture of the test: its services are up, or it skips (fails under CI)."""
    names = services.marks_of(item)
    if names:
        services.require(*sorted(names))


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerHandle]]:
    """A factory: `server_process(secret, *flags)`; every server started is stopped after."""
    started: list[ServerHandle] = []

    def start(secret: str = TEST_SECRET, *extra: str) -> ServerHandle:
        sub = tmp_path / f"server{len(started)}"
        sub.mkdir()
        server = start_server(sub, secret, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def logs() -> Iterator[list[str]]:
    """The text of every twisted.logger event while the test runs."""
    lines: list[str] = []

    def observe(event: LogEvent) -> None:
        lines.append(formatEvent(event) or "")

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)
