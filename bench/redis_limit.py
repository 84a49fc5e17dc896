"""Physical-limit figures from redis-benchmark: small request/response commands over loopback.

    python bench/redis_limit.py [--quick]

Starts its own redis-server on a free 127.0.0.1 port (no RDB, no AOF: nothing on disk; the
shared Redis on 6379 is never touched) and stops it afterwards. Runs, with 150-byte values and
random keys: SET, GET, LPUSH, LRANGE_100 with 1000 and with 50 clients (requests/s, p50/p99
latency from redis-benchmark's CSV), then SET, GET, LPUSH pipelined 16 deep with 50 clients.
Prints a final JSON line and writes it to bench/results/redis_limit.json. --quick: < 20 s.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import servers

VALUE_BYTES = 150
KEYSPACE = 100_000
TESTS = "set,get,lpush,lrange_100"
PIPELINE = 16
RESULTS = Path(__file__).resolve().parent / "results" / "redis_limit.json"
# (name, clients, pipeline, tests, requests quick, requests full)
RUNS = (
    ("c1000", 1000, 1, TESTS, 50_000, 300_000),
    ("c50", 50, 1, TESTS, 20_000, 200_000),
    ("c50_P16", 50, PIPELINE, "set,get,lpush", 200_000, 2_000_000),
)
_NAMES = {"LRANGE_100 (first 100 elements)": "LRANGE_100"}
_SKIP = {"LPUSH (needed to benchmark LRANGE)"}  # the fill before LRANGE, not a test


def _start_redis(tmpdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = servers.free_port()
    cmd = [
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no", "--dir", str(tmpdir), "--maxclients", "10000",
    ]  # fmt: skip
    with open(tmpdir / "redis.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return proc, port
        time.sleep(0.05)
    _stop(proc)
    tail = (tmpdir / "redis.log").read_text(errors="replace")[-2000:]
    raise RuntimeError(f"redis-server did not start on {port}:\n{tail}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def parse_csv(text: str) -> dict[str, dict[str, float]]:
    """redis-benchmark --csv rows by test name: rps and latencies in ms."""
    out: dict[str, dict[str, float]] = {}
    for row in csv.DictReader(io.StringIO(text)):
        name = row["test"]
        if name in _SKIP:
            continue
        out[_NAMES.get(name, name)] = {
            "rps": float(row["rps"]),
            "avg_ms": float(row["avg_latency_ms"]),
            "p50_ms": float(row["p50_latency_ms"]),
            "p99_ms": float(row["p99_latency_ms"]),
            "max_ms": float(row["max_latency_ms"]),
        }
    return out


def _bench(port: int, clients: int, pipeline: int, tests: str, requests: int) -> dict[str, Any]:
    cmd = [
        "redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients),
        "-n", str(requests), "-d", str(VALUE_BYTES), "-r", str(KEYSPACE),
        "-P", str(pipeline), "-t", tests, "--csv",
    ]  # fmt: skip
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True)
    return {
        "clients": clients,
        "pipeline": pipeline,
        "requests": requests,
        "elapsed_s": round(time.monotonic() - started, 2),
        "tests": parse_csv(done.stdout),
    }


def run(quick: bool) -> dict[str, Any]:
    """All runs against a private redis-server; the result dict (see module doc)."""
    servers.raise_nofile()
    started = time.monotonic()
    tmpdir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
    proc, port = _start_redis(tmpdir)
    try:
        runs = {
            name: _bench(port, clients, pipeline, tests, n_quick if quick else n_full)
            for name, clients, pipeline, tests, n_quick, n_full in RUNS
        }
    finally:
        _stop(proc)
        shutil.rmtree(tmpdir, ignore_errors=True)
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True)
    return {
        "scenario": "redis_limit",
        "quick": quick,
        "redis": version.stdout.split()[2].removeprefix("v="),
        "value_bytes": VALUE_BYTES,
        "keyspace": KEYSPACE,
        "runs": runs,
        "elapsed_s": round(time.monotonic() - started, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests, under 20 s")
    args = parser.parse_args()
    result = run(args.quick)
    for name, r in result["runs"].items():
        for test, t in r["tests"].items():
            print(f"{name:8} {test:11} {t['rps']:>11,.0f} req/s  p50 {t['p50_ms']:.3f} ms"
                  f"  p99 {t['p99_ms']:.3f} ms", file=sys.stderr)  # fmt: skip
    line = json.dumps(result)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
