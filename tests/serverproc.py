"""Our server as a real subprocess on a loopback port (used by tests/conftest.py)."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

START_TIMEOUT = 20.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    port: int
    secret: str
    data_dir: Path
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def endpoint(self) -> str:
        return f"tcp:host=127.0.0.1:port={self.port}"

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server output)"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_server(tmp: Path, secret: str, *extra: str) -> ServerProcess:
    """`python -m improto_server` on a free 127.0.0.1 port; waits until it accepts."""
    port = free_port()
    log = tmp / "server.log"
    cmd = [
        sys.executable, "-m", "improto_server",
        "--listen", f"tcp:{port}:interface=127.0.0.1",
        "--data-dir", str(tmp / "data"),
        "--jwt-secret", secret,
        *extra,
    ]  # fmt: skip
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    server = ServerProcess(port, secret, tmp / "data", log, proc)
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode}:\n{server.log_tail()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                pytest.fail(f"server not accepting on {port}:\n{server.log_tail()}")
            time.sleep(0.1)
