"""Shared fixtures: our server as a real subprocess on a loopback port."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from serverproc import ServerProcess, start_server


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """A factory: `server_process(secret, *flags)`; every server started is stopped after."""
    started: list[ServerProcess] = []

    def start(secret: str = "test-secret-0123456789abcdef0123456789", *extra: str
              ) -> ServerProcess:  # fmt: skip
        sub = tmp_path / f"server{len(started)}"
        sub.mkdir()
        server = start_server(sub, secret, *extra)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
