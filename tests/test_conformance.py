"""Run the black-box conformance suite (improto.conformance) against our own server process."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from improto.conformance.runner import load_checks, run
from tests.support.ports import LOOPBACK, free_port
from tests.support.server import storage_server

SECRET = "conformance-test-secret-0123456789abcdef0123456789"
# The server's large_group_threshold (its TOML config), told to the suite: a group of 21
# members is large, small again at 18. Above every group of the other checks (at most 6
# members; groups.limit_members_per_group's 10,000 are large here as at the default 500).
LARGE_THRESHOLD = 20


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("production", marks=pytest.mark.services)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, int]]:
    """Our server as a subprocess in each storage mode, with short timeouts so the idle
    checks run. Production mode uses the services of scripts/services under a fresh prefix.
    A push gateway is configured so that the server enables PUSH (its checks need only the
    registrations: the gateway's port is closed, so notifications are retried, then
    dropped, in the server's log; tests/test_notifier.py checks real deliveries). The
    large-group threshold is set low (TOML `large_group_threshold`) so that the large-group
    checks use groups of LARGE_THRESHOLD + 1 members."""
    tmp = Path(tmp_path_factory.mktemp("imserver"))
    config = tmp / "conformance.toml"
    config.write_text(f"large_group_threshold = {LARGE_THRESHOLD}\n")
    with storage_server(
        request.param,
        tmp,
        SECRET,
        "conformance",
        "--config",
        str(config),
        "--idle-timeout",
        "5",
        "--heartbeat",
        "2",
        "--push-gateway",
        f"http://{LOOPBACK}:{free_port()}/_matrix/push/v1/notify",
    ) as proc:
        yield LOOPBACK, proc.port


def test_suite_passes(server: tuple[str, int]) -> None:
    host, port = server
    out = io.StringIO()
    report = run(host, port, SECRET, out=out, large_threshold=LARGE_THRESHOLD)
    lines = out.getvalue().splitlines()
    assert lines[-1] == report.summary
    assert len(report.passed) + len(report.failed) + len(report.skipped) == len(load_checks())
    # our server enables every post-v1 feature and the suite knows its large-group
    # threshold: none of those checks may skip
    post_v1 = ("ext.", "large.")
    assert not [name for name, _ in report.skipped if name.startswith(post_v1)], report.skipped
    failures = "\n".join(f"FAIL {name}: {reason}" for name, reason in report.failed)
    if report.failed:
        pytest.fail(f"{report.summary} in {report.seconds:.1f}s\n{failures}", pytrace=False)


def _cli(*args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "improto.conformance", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )


def test_cli_all_pass_last_line(server: tuple[str, int]) -> None:
    """The CLI prints one line per check and `N passed, 0 failed` last (a quick subset)."""
    host, port = server
    wanted = [n for n in load_checks() if n.startswith("send.")]
    r = _cli("--server", f"{host}:{port}", "--jwt-secret", SECRET, "--only", "send.")
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == f"{len(wanted)} passed, 0 failed", r.stdout + r.stderr
    assert r.returncode == 0
    assert [ln.split()[1] for ln in lines[:-1]] == wanted


def test_cli_large_group_threshold(server: tuple[str, int]) -> None:
    """Without --large-group-threshold the checks that need a large group are SKIP lines
    ("not run"), counted before the summary, never passed; with it they run and pass."""
    host, port = server
    base = ("--server", f"{host}:{port}", "--jwt-secret", SECRET, "--only", "large.")
    needing = {"large.push_not_inbox", "large.timeline_pages", "large.crossing_to_small"}
    r = _cli(*base)
    lines = r.stdout.strip().splitlines()
    skipped = {ln.split()[1].rstrip(":") for ln in lines if ln.startswith("SKIP ")}
    assert needing <= skipped, r.stdout + r.stderr
    assert all("not run" in ln for ln in lines if ln.startswith("SKIP ")), r.stdout
    assert lines[-2] == f"{len(skipped)} not run (SKIP above)", r.stdout
    wanted = [n for n in load_checks() if n.startswith("large.")]
    assert lines[-1] == f"{len(wanted) - len(skipped)} passed, 0 failed", r.stdout
    r = _cli(*base, "--large-group-threshold", str(LARGE_THRESHOLD))
    lines = r.stdout.strip().splitlines()
    assert lines[-1] == f"{len(wanted)} passed, 0 failed", r.stdout + r.stderr
    assert r.returncode == 0
    assert _cli(*base, "--large-group-threshold", "0").returncode == 2


def test_cli_failure_exit_code(server: tuple[str, int]) -> None:
    """A failing check (wrong secret: login refused) gives FAIL lines and exit status 1."""
    host, port = server
    r = _cli("--server", f"{host}:{port}", "--jwt-secret", "wrong", "--only", "hello_ok_fields")
    lines = r.stdout.strip().splitlines()
    assert lines[0].startswith("FAIL session.hello_ok_fields: "), r.stdout
    assert lines[-1] == "0 passed, 1 failed"
    assert r.returncode == 1


def test_cli_usage_and_unreachable() -> None:
    assert _cli().returncode == 2  # --server and --jwt-secret missing
    assert _cli("--server", "nohostport", "--jwt-secret", "s").returncode == 2
    r = _cli("--server", f"{LOOPBACK}:{free_port()}", "--jwt-secret", "s", timeout=30)
    assert r.returncode == 2 and "cannot connect" in r.stderr
    listed = _cli("--list")
    assert listed.returncode == 0
    assert len(listed.stdout.splitlines()) == len(load_checks()) >= 100
