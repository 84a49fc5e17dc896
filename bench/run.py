"""Every benchmark scenario, improto next to Mosquitto and the physical limits, in one run.

    python bench/run.py [--quick] [--only relay,fanout,sync,closed,idle,redis] [--render]

Runs, one after the other on this machine (each starts and stops its own servers):
  relay   scenario 1: online 1:1 relay, 1000 pairs (bench/relay.py), with the light-load
          steps (latency at 1,000 msg/s, CPU per message at 2,000 msg/s)
  fanout  scenario 4: one sender, 500 online group members (bench/relay.py)
  sync    scenarios 2 and 3: offline drain of 10,000 messages, history pages (bench/sync_pull.py;
          ejabberd's drain: bench/xmpp_wire.py)
  closed  the closed loop: pairs x messages in flight, 100 x 10 and 20 x 1 (bench/relay.py)
  idle    scenario 5: idle authenticated connections, memory each (bench/idle.py)
  redis   redis-benchmark on a private redis-server: request/response limits (bench/redis_limit.py)
The peers: Mosquitto (MQTT) and ejabberd (XMPP, Debian's package, two configurations:
`archive` = offline store + mod_mam on SQLite, `routing` = no archive; bench/ejabberd/).
The full run installs ejabberd when it is missing; --quick only uses it when it is there
(its rows say "ejabberd not installed" otherwise).
Each scenario's result goes to bench/results/<name>.json; the table (also
bench/results/table.md) is printed at the end, then a final JSON line with everything.
Production storage needs Redis, RabbitMQ and HBase: `scripts/services start` (run.py calls
it). --quick: fewer and shorter steps, smaller counts; about 3 minutes. --render runs
nothing: it prints (and writes) the table of the last saved results of every scenario.
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


EJABBERD_MISSING = "ejabberd not installed"


def _ejabberd_cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    """Full: both configurations. Quick: the routing one (the archive's ladder is slow)."""
    configs = ["routing"] if quick else ["archive", "routing"]
    return [(f"ejabberd/{c}", {"target": "ejabberd", "config": c}) for c in configs]


def _skip(kw: dict[str, Any], quick: bool) -> str | None:
    """Why a case is not run: --quick uses ejabberd only when it is installed."""
    if kw.get("target") == "ejabberd" and quick and not servers.ejabberd_installed():
        return EJABBERD_MISSING
    return None


def _relay_cases(quick: bool) -> list[tuple[str, dict[str, Any]]]:
    cases = [
        ("improto/memory", {"target": "improto", "storage": "memory"}),
        ("improto/production", {"target": "improto", "storage": "production"}),
        ("mosquitto/persistence", {"target": "mosquitto", "persistence": True}),
        *_ejabberd_cases(quick),
        ("bare", {"target": "bare"}),
    ]
    if not quick:
        cases[1:1] = [("improto/embedded", {"target": "improto", "storage": "embedded"})]
        cases[4:4] = [("mosquitto/memory", {"target": "mosquitto", "persistence": False})]
    return cases


def _run_cases(scenario: str, cases: list[tuple[str, dict[str, Any]]],
               quick: bool) -> dict[str, Any]:  # fmt: skip
    out: dict[str, Any] = {}
    for name, kw in cases:
        why = _skip(kw, quick)
        out[name] = ({"skipped": why} if why else
                     relay.run(scenario=scenario, quick=quick, log=log, **kw))  # fmt: skip
    return out


def scenario_relay(quick: bool) -> dict[str, Any]:
    return _run_cases("relay", _relay_cases(quick), quick)


def scenario_closed(quick: bool) -> dict[str, Any]:
    """relay.CLOSED_CASES for each target; quick: improto memory, Mosquitto, ejabberd."""
    if quick:
        cases = [c for c in _relay_cases(quick) if c[0] in
                 ("improto/memory", "mosquitto/persistence", "ejabberd/routing")]  # fmt: skip
    else:
        cases = _relay_cases(quick)
    return _run_cases("closed", cases, quick)


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
    import xmpp_wire

    cases = [("improto", "embedded"), ("improto", "production"), ("mosquitto", None)]
    if not quick:
        cases.insert(1, ("improto", "memory"))
    cases += [("ejabberd", kw["config"]) for _, kw in _ejabberd_cases(quick)]
    out: dict[str, Any] = {}
    for target, storage in cases:
        name = f"{target}-{storage}" if storage else target
        log(f"  sync: {name}")
        if target == "ejabberd":  # storage: the configuration
            why = _skip({"target": target}, quick)
            # summary() and the table take an "error" row as one not measured
            out[name] = {"error": why, "skipped": why} if why else xmpp_wire.run(storage, quick)
        else:
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
    "closed": scenario_closed,
    "idle": scenario_idle,
    "redis": scenario_redis,
}


MOSQUITTO_REF = "mosquitto/persistence"  # the peer the ratios are to


def _light_rows(res: dict[str, Any]) -> list[str]:
    from bench_table import _f, _ratio

    def cell(r: dict[str, Any], rate: str) -> dict[str, Any]:
        return (r.get("light") or {}).get(rate) or {}

    ref = cell(res.get(MOSQUITTO_REF, {}), "2000").get("server_cpu_us_per_msg")
    rows = ["| target | 1,000 msg/s: p50 / p99 ms | 2,000 msg/s: p50 / p99 ms | server CPU "
            "µs/msg at 2,000/s | CPU vs Mosquitto |", "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in res.items():
        if name == "meta":
            continue
        if "skipped" in r:
            rows.append(f"| {name} | {r['skipped']} | | | |")
            continue
        lo, hi = cell(r, "1000"), cell(r, "2000")
        lat = [f"{_f(c.get('p50_ms'), 2)} / {_f(c.get('p99_ms'), 2)}"
               + ("" if c.get("ok") else (" (not run)" if "skipped" in c else " (failed)"))
               for c in (lo, hi)]  # fmt: skip
        cpu = hi.get("server_cpu_us_per_msg")
        rows.append(f"| {name} | {lat[0]} | {lat[1]} | {_f(cpu, 1)} | {_ratio(cpu, ref)} |")
    return rows


def _closed_rows(res: dict[str, Any]) -> list[str]:
    from bench_table import _f, _ratio

    rows = ["| target | pairs x in flight | ok | msg/s | p50 / p99 ms | server CPU µs/msg | "
            "rate vs Mosquitto | CPU vs Mosquitto |",
            "|---|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    ref = res.get(MOSQUITTO_REF, {}).get("cases") or {}
    for name, r in res.items():
        if name == "meta":
            continue
        if "skipped" in r:
            rows.append(f"| {name} | {r['skipped']} | | | | | | |")
            continue
        for case, c in (r.get("cases") or {}).items():
            m = ref.get(case) or {}
            cpu = c.get("server_cpu_us_per_msg")
            rows.append(
                f"| {name} | {case} | {'yes' if c.get('ok') else 'NO'} | {_f(c.get('rate'), 0)} "
                f"| {_f(c.get('p50_ms'), 2)} / {_f(c.get('p99_ms'), 2)} | {_f(cpu, 1)} | "
                f"{_ratio(c.get('rate'), m.get('rate'))} | "
                f"{_ratio(cpu, m.get('server_cpu_us_per_msg'))} |"
            )
    return rows


def peers_section(report: dict[str, Any]) -> str:
    """The light-load and closed-loop tables (bench_table renders the others)."""
    results = report["results"]
    out: list[str] = []
    if "relay" in results:
        note = (
            ""
            if "ejabberd/archive" not in results["relay"]
            else " ejabberd/archive saturates below them (its ladder: 100-4,000 msg/s, no "
            "fixed-rate step), so they are not run there."
        )
        out += ["## 1b. Light load: open loop, 1000 pairs",
                "The relay ladder's steps at 1,000 msg/s (latency: arrival minus scheduled "
                "send) and 2,000 msg/s (server CPU over the step and its drain, per message)."
                + note, "", *_light_rows(results["relay"]), ""]  # fmt: skip
    if "closed" in results:
        out += ["## 1c. Closed loop, 1:1",
                "Each sender keeps N messages in flight and sends the next one when one is "
                "both delivered to its receiver and acknowledged to it (SEND_ACK, PUBACK, "
                "XEP-0198 `<a h/>`); rate = deliveries in the sending window / its length; "
                "latency = arrival minus actual send; CPU over the window and the drain, per "
                "delivered message.", "", *_closed_rows(results["closed"]), ""]  # fmt: skip
    return "\n".join(out) + ("\n" if out else "")


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


def render_saved(quick: bool) -> int:
    """The table (and table.md) of the scenarios' last saved results, e.g. after runs made
    with different --only subsets."""
    import bench_table

    suffix = "-quick" if quick else ""
    report: dict[str, Any] = {"machine": machine(), "quick": quick, "results": {},
                              "failed": {}}  # fmt: skip
    for name in SCENARIOS:
        path = RESULTS / f"{name}{suffix}.json"
        if path.exists():
            report["results"][name] = json.loads(path.read_text())
    report["seconds"] = round(sum(r["meta"]["seconds"] for r in report["results"].values()), 1)
    text = bench_table.render(report) + peers_section(report)
    (RESULTS / f"table{suffix}.md").write_text(text)
    print(text)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small and short: about 3 minutes")
    ap.add_argument("--only", help="comma-separated subset of " + ",".join(SCENARIOS))
    ap.add_argument("--render", action="store_true",
                    help="run nothing: the table of the saved bench/results/*.json")  # fmt: skip
    a = ap.parse_args()
    if a.render:
        return render_saved(a.quick)
    names = a.only.split(",") if a.only else list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        ap.error(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    servers.raise_nofile()
    RESULTS.mkdir(exist_ok=True)
    if any(n in names for n in ("relay", "fanout", "sync", "closed")):
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

    text = bench_table.render(report) + peers_section(report)
    suffix = "-quick" if a.quick else ""
    (RESULTS / f"table{suffix}.md").write_text(text)
    print(text)
    print(json.dumps(report))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
