"""Check registry and runner: one line per check, then `N passed, M failed` as the last line."""

from __future__ import annotations

import argparse
import importlib
import socket
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from improto.conformance.conn import Env
from improto.limits import MAX_GROUP_MEMBERS

CheckFn = Callable[[Env], str | None]

CHECK_MODULES = (
    "checks_session",
    "checks_framing",
    "checks_send",
    "checks_offline",
    "checks_history",
    "checks_groups",
    "checks_ids",
    "checks_ext",
    "checks_large",
)


class Skip(Exception):
    """Raised by a check that cannot run against this server configuration."""


@dataclass(frozen=True)
class Check:
    name: str
    fn: CheckFn
    doc: str


REGISTRY: dict[str, Check] = {}


def check(name: str) -> Callable[[CheckFn], CheckFn]:
    """Register a check; its docstring's first line (with the spec section) is its summary."""

    def register(fn: CheckFn) -> CheckFn:
        if name in REGISTRY:
            raise ValueError(f"duplicate check name {name!r}")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Check(name, fn, doc[0] if doc else "")
        return fn

    return register


def load_checks() -> dict[str, Check]:
    for mod in CHECK_MODULES:
        importlib.import_module(f"improto.conformance.{mod}")
    return REGISTRY


@dataclass
class Report:
    passed: list[str] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def summary(self) -> str:
        return f"{len(self.passed)} passed, {len(self.failed)} failed"


def _one_line(text: str, limit: int = 400) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def run_check(c: Check, env: Env) -> tuple[str, str]:
    """Run one check; return (status, detail) with status PASS, FAIL or SKIP."""
    try:
        note = c.fn(env)
        return "PASS", note or ""
    except Skip as e:
        return "SKIP", str(e)
    except AssertionError as e:
        if str(e):
            return "FAIL", str(e)
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "FAIL", f"assertion failed: {tb.line} ({Path(tb.filename).name}:{tb.lineno})"
    except TimeoutError as e:
        return "FAIL", f"timeout: {e}"
    except OSError as e:
        return "FAIL", f"socket error: {e!r}"
    except Exception as e:  # a bug in the check, or garbage from the server
        tb = traceback.extract_tb(e.__traceback__)[-1]
        return "FAIL", f"unexpected {type(e).__name__}: {e} (at {tb.name}:{tb.lineno})"
    finally:
        env.close_all()


def run(
    host: str,
    port: int,
    secret: str,
    only: str | None = None,
    out: TextIO | None = None,
    timeout: float = 5.0,
    large_threshold: int | None = None,
) -> Report:
    """Run the (filtered) checks sequentially, printing one line each and the summary last.
    `large_threshold`: the server's large-group threshold (spec 20.8); without it the checks
    that need a large group are SKIPped (not run), and a line before the summary counts the
    checks not run."""
    out = sys.stdout if out is None else out
    report = Report()
    start = time.monotonic()
    for c in load_checks().values():
        if only and only not in c.name:
            continue
        with warnings.catch_warnings():  # PyJWT warns about short test secrets
            warnings.simplefilter("ignore")
            status, detail = run_check(c, Env(host, port, secret, timeout, large_threshold))
        if status == "PASS":
            report.passed.append(c.name)
            line = f"PASS {c.name}" + (f" ({_one_line(detail)})" if detail else "")
        elif status == "SKIP":
            report.skipped.append((c.name, detail))
            line = f"SKIP {c.name}: {_one_line(detail)}"
        else:
            report.failed.append((c.name, detail))
            line = f"FAIL {c.name}: {_one_line(detail)}"
        print(line, file=out, flush=True)
    report.seconds = time.monotonic() - start
    if report.skipped:
        print(f"{len(report.skipped)} not run (SKIP above)", file=out, flush=True)
    print(report.summary, file=out, flush=True)
    return report


def parse_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--server must be HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m improto.conformance",
        description="Black-box conformance suite for servers of the improto protocol v1 "
        "(spec/PROTOCOL.md). Exit status: 0 all passed, 1 a check failed, "
        "2 usage error or server unreachable.",
    )
    p.add_argument("--server", metavar="HOST:PORT", help="the server under test")
    p.add_argument("--jwt-secret", metavar="S", help="HS256 secret of the server's login tokens")
    p.add_argument("--only", metavar="SUBSTR", help="run only checks whose name contains SUBSTR")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for a reply")
    p.add_argument(
        "--large-group-threshold",
        type=int,
        metavar="N",
        help="the server's large-group threshold (spec 20.8; the improto server's "
        "large_group_threshold, default 500): a group of more than N members is large. "
        "Without it the checks that need a large group are not run (SKIP)",
    )
    args = p.parse_args(argv)

    checks = load_checks()
    if args.list:
        for c in checks.values():
            if not args.only or args.only in c.name:
                print(f"{c.name}  {c.doc}")
        return 0
    n = args.large_group_threshold
    if n is not None and not 1 <= n <= MAX_GROUP_MEMBERS:
        print(f"error: --large-group-threshold must be 1..{MAX_GROUP_MEMBERS}", file=sys.stderr)
        return 2
    if not args.server or args.jwt_secret is None:
        p.print_usage(sys.stderr)
        print("error: --server and --jwt-secret are required", file=sys.stderr)
        return 2
    try:
        host, port = parse_address(args.server)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        socket.create_connection((host, port), timeout=args.timeout).close()
    except OSError as e:
        print(f"error: cannot connect to {host}:{port}: {e}", file=sys.stderr)
        return 2
    if args.only and not any(args.only in n for n in checks):
        print(f"error: no check name contains {args.only!r}", file=sys.stderr)
        return 2
    report = run(host, port, args.jwt_secret, args.only, timeout=args.timeout, large_threshold=n)
    return 1 if report.failed else 0
