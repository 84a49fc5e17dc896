"""Every benchmark scenario, improto next to Mosquitto and the physical limits, in one run.

    python bench/run.py [--quick] [--only relay,fanout,sync,idle,redis]

Runs, one after the other on this machine (each starts and stops its own servers):
  relay   scenario 1: online 1:1 relay, 1000 pairs (bench/relay.py)
  fanout  scenario 4: one sender, 500 online group members (bench/relay.py)
  sync    scenarios 2 and 3: offline drain of 10,000 messages, history pages (bench/sync_pull.py)
  idle    scenario 5: idle authenticated connections, memory each (bench/idle.py)
  redis   redis-benchmark on a private redis-server: request/response limits (bench/redis_limit.py)
Each scenario's result goes to bench/results/<name>.json; the table (also
bench/results/table.md) is printed at the end, then a final JSON line with everything.
Production storage needs Redis, RabbitMQ and HBase: `scripts/services start` (run.py calls
it). --quick: fewer and shorter steps, smaller counts; under 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import relay  # noqa: E402
import servers  # noqa: E402

RESULTS = HERE / "results"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _relay_cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    cases = [
        ("improto/memory", {"target": "improto", "storage": "memory"}),
        ("improto/production", {"target": "improto", "storage": "production"}),
        ("mosquitto/persistence", {"target": "mosquitto", "persistence": True}),
        ("bare", {"target": "bare"}),
    ]
    if not quick:
        cases[1:1] = [("improto/embedded", {"target": "improto", "storage": "embedded"})]
        cases[4:4] = [("mosquitto/memory", {"target": "mosquitto", "persistence": False})]
    return cases


def scenario_relay(quick: bool) -> dict[str, Any]:
    return {
        name: relay.run(scenario="relay", quick=quick, log=log, **kw)
        for name, kw in _relay_cases(quick)
    }


def scenario_fanout(quick: bool) -> dict[str, Any]:
    cases = [
        ("improto/memory", {"target": "improto", "storage": "memory"}),
        ("improto/production", {"target": "improto", "storage": "production"}),
        ("mosquitto/persistence", {"target": "mosquitto", "persistence": True}),
        ("bare", {"target": "bare"}),
    ]
    if quick:
        del cases[1]
    return {name: relay.run(scenario="fanout", quick=quick, log=log, **kw) for name, kw in cases}


def scenario_sync(quick: bool) -> dict[str, Any]:
    import sync_pull

    cases = [("improto", "embedded"), ("improto", "production"), ("mosquitto", None)]
    if not quick:
        cases.insert(1, ("improto", "memory"))
    out = {}
    for target, storage in cases:
        name = f"{target}-{storage}" if storage else target
        log(f"  sync: {name}")
        out[name] = sync_pull.run(target, storage, quick)
    return {"summary": sync_pull.summary(out), "results": out}


def scenario_idle(quick: bool) -> dict[str, Any]:
    import idle

    n = 2_000 if quick else 20_000
    out = {}
    for target in ("improto", "mosquitto", "bare"):
        log(f"  idle: {target} x {n}")
        out[target] = idle.run(target, n, quick)
    return out


def scenario_redis(quick: bool) -> dict[str, Any]:
    import redis_limit

    return redis_limit.run(quick)


SCENARIOS: dict[str, Callable[[bool], dict[str, Any]]] = {
    "relay": scenario_relay,
    "fanout": scenario_fanout,
    "sync": scenario_sync,
    "idle": scenario_idle,
    "redis": scenario_redis,
}


def machine() -> dict[str, Any]:
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE,
                                capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        commit = "?"
    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kib / 2**20, 1),
            "python": platform.python_version(), "kernel": platform.release(),
            "commit": commit, "date": now}  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small and short: under 3 minutes")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(SCENARIOS))
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    servers.raise_nofile()
    RESULTS.mkdir(exist_ok=True)
    if any(n in names for n in ("relay", "fanout", "sync")):
        subprocess.run(["bash", str(HERE.parent / "scripts" / "services"), "start"], check=True,
                       stdout=sys.stderr)  # fmt: skip
    report: dict[str, Any] = {"machine": machine(), "quick": a.quick, "results": {},
                              "failed": {}}  # fmt: skip
    started = time.monotonic()
    for name in names:
        log(f"== {name}")
        t = time.monotonic()
        try:
            res = SCENARIOS[name](a.quick)
        except Exception:
            report["failed"][name] = traceback.format_exc()
            log(report["failed"][name])
            continue
        res_meta = {"seconds": round(time.monotonic() - t, 1), "quick": a.quick}
        report["results"][name] = {"meta": res_meta, **res}
        suffix = "-quick" if a.quick else ""
        (RESULTS / f"{name}{suffix}.json").write_text(json.dumps(report["results"][name], indent=1))
    report["seconds"] = round(time.monotonic() - started, 1)
    import bench_table

    text = bench_table.render(report)
    suffix = "-quick" if a.quick else ""
    (RESULTS / f"table{suffix}.md").write_text(text)
    print(text)
    print(json.dumps(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
