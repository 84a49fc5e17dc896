"""1 vs N gateway worker processes on production storage (`imserver --workers N`), same run.

    python bench/workers.py [--workers 2] [--quick] [--rounds 1]

Both layouts have one persister process: "1" is a `--role gateway` process plus a `--role
persister` process (bench/relay.py's production layout), "N" is `imserver --workers N` (a
supervisor, N gateway workers on one SO_REUSEPORT port, one persister). Each is driven by
bench/relay.py's open-loop 1:1 relay (loadgen.py processes, 150-byte messages, every push
acknowledged, latency = arrival minus *scheduled* send): a rising ladder of rates, the best
step with p99 < 50 ms and nothing lost is the sustained throughput; plus one fixed-rate step
(2,000 msg/s, the issue's CPU-per-message rate) for p50/p99 and server CPU per message
(every process of the server, supervisor included; Redis/RabbitMQ/HBase apart). With
--rounds R the layouts alternate R times (1, N, 1, N...), so drift on a shared machine
shows. Prints a final JSON line with both results and the N/1 ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import relay
import servers

RATES = [1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000, 10000, 12000, 14000, 17000, 20000]
FIXED = 2000.0


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def start(n: int) -> servers.ServerHandle:
    if n == 1:
        return servers.start_improto("production", split=True)
    handle = servers.start_improto("production", extra=["--workers", str(n)])
    deadline = time.monotonic() + 60
    want = f"all {n + 1} processes ready"
    while want not in handle.log_tail(400):
        if time.monotonic() > deadline:
            handle.stop()
            raise RuntimeError(f"workers not ready:\n{handle.log_tail()}")
        time.sleep(0.1)
    handle.helper_pids.extend(children(handle.pid))  # counted in cpu_s()
    return handle


def measure(n: int, *, quick: bool, loadgens: int, pairs: int, log: Any) -> dict[str, Any]:
    servers.raise_nofile()
    handle = start(n)
    run: relay.Run | None = None
    try:
        run = relay.Run(handle, "improto", "relay", loadgens, pairs=pairs, members=0)
        seconds, grace = (1.5, 1.0) if quick else (4.0, 2.0)
        rates = RATES[::2] if quick else RATES
        log(f"gateways={n}: {run.conns} connections, setup {run.setup_s} s")
        out = relay.ladder(run, rates, seconds, grace, FIXED, lambda s: log(f"[{n}]{s}"))
        out.update({"gateways": n, "processes": 1 + len(handle.helper_pids),
                    "connections": run.conns,
                    "fixed_per_process": per_process(run, handle, n, seconds, grace)})  # fmt: skip
        log(f"[{n}] per process at {FIXED:.0f}/s: {out['fixed_per_process']}")
        return out
    finally:
        if run is not None:
            run.close()
        handle.stop()


def roles(handle: servers.ServerHandle, n: int) -> dict[int, str]:
    """pid -> what it is (the supervisor's log names its children)."""
    if n == 1:
        return {handle.pid: "gateway", **dict.fromkeys(handle.helper_pids, "persister")}
    found = {handle.pid: "supervisor"}
    for m in re.finditer(r"started (worker \d+|persister|notifier) \(pid (\d+)\)",
                         handle.log_tail(400)):  # fmt: skip
        found[int(m.group(2))] = m.group(1)
    return found


def per_process(run: relay.Run, handle: servers.ServerHandle, n: int, seconds: float,
                grace: float) -> dict[str, Any]:  # fmt: skip
    """One more fixed-rate step: CPU per message of each server process, and its share of
    one core over the step."""
    names = roles(handle, n)
    relay.wait_idle(handle)
    t0, cpu0 = time.monotonic(), {pid: servers.cpu_seconds([pid]) for pid in names}
    step = run.step(FIXED, seconds, grace)
    wall = time.monotonic() - t0
    count = step["messages"]
    out: dict[str, Any] = {"ok": step["ok"], "p50_ms": step["p50_ms"], "p99_ms": step["p99_ms"]}
    for pid, name in names.items():
        used = servers.cpu_seconds([pid]) - cpu0[pid]
        out[name] = {"cpu_us_per_msg": round(used / count * 1e6, 1),
                     "core_share": round(used / wall, 2)}  # fmt: skip
    return out


def summary(r: dict[str, Any]) -> dict[str, Any]:
    best, fixed = r["max_sustained"] or {}, r["fixed"] or {}
    return {
        "gateways": r["gateways"],
        "processes": r["processes"],
        "max_sustained_msg_s": best.get("rate"),
        "max_sustained_p50_ms": best.get("p50_ms"),
        "max_sustained_p99_ms": best.get("p99_ms"),
        "max_sustained_server_cpu_us_per_msg": best.get("server_cpu_us_per_msg"),
        "saturated_at": r["saturated_at"],
        "fixed_rate": FIXED,
        "fixed_ok": fixed.get("ok"),
        "fixed_p50_ms": fixed.get("p50_ms"),
        "fixed_p99_ms": fixed.get("p99_ms"),
        "fixed_server_cpu_us_per_msg": fixed.get("server_cpu_us_per_msg"),
        "fixed_services_cpu_us_per_msg": fixed.get("services_cpu_us_per_msg"),
        "fixed_generator_cpu_us_per_msg": fixed.get("generator_cpu_us_per_msg"),
        "fixed_per_process": r["fixed_per_process"],
    }


def ratio(a: Any, b: Any) -> float | None:
    return (
        round(a / b, 2) if isinstance(a, int | float) and isinstance(b, int | float) and b else None
    )


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in
                  Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "?")  # fmt: skip
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=servers.REPO).stdout.strip()  # fmt: skip
    return {"commit": commit, "nproc": os.cpu_count(), "cpu": model,
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=2, help="N, the layout compared with 1")
    ap.add_argument("--quick", action="store_true", help="fewer, shorter steps, 200 pairs")
    ap.add_argument("--rounds", type=int, default=1, help="alternate the layouts this often")
    ap.add_argument("--pairs", type=int, default=None, help="sender/receiver pairs (1000)")
    ap.add_argument("--loadgens", type=int, default=2, help="loadgen.py processes (2)")
    args = ap.parse_args()

    def log(s: str) -> None:
        print(s, file=sys.stderr, flush=True)

    pairs = args.pairs or (200 if args.quick else 1000)
    before = machine()
    rounds: list[dict[str, Any]] = []
    for _ in range(args.rounds):
        one = summary(measure(1, quick=args.quick, loadgens=args.loadgens, pairs=pairs, log=log))
        many = summary(measure(args.workers, quick=args.quick, loadgens=args.loadgens,
                               pairs=pairs, log=log))  # fmt: skip
        ratios = {
            "throughput": ratio(many["max_sustained_msg_s"], one["max_sustained_msg_s"]),
            "fixed_p50": ratio(many["fixed_p50_ms"], one["fixed_p50_ms"]),
            "fixed_p99": ratio(many["fixed_p99_ms"], one["fixed_p99_ms"]),
            "fixed_server_cpu_per_msg": ratio(many["fixed_server_cpu_us_per_msg"],
                                              one["fixed_server_cpu_us_per_msg"]),
        }  # fmt: skip
        log(f"round: 1 -> {one}\n       {args.workers} -> {many}\n       ratios {ratios}")
        rounds.append({"one": one, "many": many, "ratios": ratios})
    result = {
        "bench": "workers", "workers": args.workers, "quick": args.quick, "pairs": pairs,
        "loadgens": args.loadgens, "machine": before,
        "loadavg_after": Path("/proc/loadavg").read_text().split()[:3], "rounds": rounds,
    }  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    main()
