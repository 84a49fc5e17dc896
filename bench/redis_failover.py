"""The pause a Redis Cluster failover causes, as ClusterRedis sees it.

    python bench/redis_failover.py [--quick] [--kills N] [--rate R]

Writes SETs through `ClusterRedis` at a steady rate (one every 1/R s, keys over every slot)
against the cluster of `scripts/services start redis-cluster` (IMPROTO_REDIS_CLUSTER_PORT
moves it), kills a master with `scripts/services redis-cluster-kill-master --no-wait`
N times (restarting it as a replica after each failover) and reports, per kill: the pause
(the longest a write took: one to the killed master's slots waits for the promotion), the
longest time in which no write at all completed, the writes that failed (sent on the dying
connection: ConnectionError), and the writes that only waited more than a second (retried by
ClusterRedis until the replica took over). Final line: JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import re
import subprocess
import sys
import time
from typing import Any

import servers  # noqa: F401  (first: puts the repository root on sys.path)

from twisted.internet import defer, task

from improto_server.production.redis_cluster import ClusterRedis
from tests.support import services

SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "scripts", "services")


def services_cmd(*args: str) -> str:
    done = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"scripts/services {' '.join(args)}: {done.stdout}{done.stderr}")
    return done.stdout + done.stderr


async def one_kill(reactor: Any, client: ClusterRedis, rate: float, settle_s: float) -> dict:
    ok_times: list[float] = []
    latencies: list[float] = []
    failed = 0
    slow = 0  # writes that took over a second (waited out the failover)
    stop = False
    n = 0

    async def write(i: int) -> None:
        nonlocal failed, slow
        t0 = time.monotonic()
        try:
            await client.execute_command("SET", f"benchfailover:{{k{i % 4096}}}", b"x")
        except Exception:
            failed += 1
            return
        t1 = time.monotonic()
        ok_times.append(t1)
        latencies.append(t1 - t0)
        if t1 - t0 > 1.0:
            slow += 1

    pending: list[defer.Deferred[None]] = []

    async def writer() -> None:
        nonlocal n
        while not stop:
            pending.append(defer.Deferred.fromCoroutine(write(n)))
            n += 1
            await task.deferLater(reactor, 1 / rate, lambda: None)

    loop = defer.Deferred.fromCoroutine(writer())
    await task.deferLater(reactor, 1.0, lambda: None)
    t_kill = time.monotonic()
    out = await defer.Deferred.fromCoroutine(_kill_in_thread(reactor))
    await task.deferLater(reactor, settle_s, lambda: None)
    stop = True
    await loop
    await defer.DeferredList(pending)
    after = sorted(t for t in ok_times if t >= t_kill)
    points = [t_kill, *after]
    gap = max((b - a for a, b in itertools.pairwise(points)), default=None)
    port = re.search(r"killed master 127\.0\.0\.1:(\d+)", out)
    assert port is not None, out
    await defer.Deferred.fromCoroutine(_restart_in_thread(reactor, port.group(1)))
    return {
        "killed": int(port.group(1)),
        # the killed master's slots: their writes wait for the promotion (the pause)
        "pause_s": round(max(latencies), 2) if latencies else None,
        # the cluster as a whole: the longest time without any write completing
        "longest_gap_s": round(gap, 2) if gap is not None else None,
        "writes": n,
        "failed": failed,
        "waited_over_1s": slow,
    }


async def _kill_in_thread(reactor: Any) -> str:
    from twisted.internet import threads

    return await threads.deferToThread(services_cmd, "redis-cluster-kill-master", "--no-wait")


async def _restart_in_thread(reactor: Any, port: str) -> None:
    from twisted.internet import threads

    await threads.deferToThread(services_cmd, "redis-cluster-restart", port)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one kill")
    p.add_argument("--kills", type=int, help="masters killed, one after another (default 3)")
    p.add_argument("--rate", type=float, default=200.0, help="writes per second")
    args = p.parse_args()
    kills = args.kills or (1 if args.quick else 3)
    services_cmd("start", "redis-cluster")

    async def run(reactor: Any) -> None:
        client = ClusterRedis([str(services.REDIS_CLUSTER)], reactor)
        await client.start()
        rounds = []
        try:
            for _ in range(kills):
                r = await one_kill(reactor, client, args.rate, settle_s=8.0)
                print(json.dumps(r), file=sys.stderr)
                rounds.append(r)
        finally:
            await client.disconnect()
            services.delete_cluster_prefix("benchfailover")
        pauses = [r["pause_s"] for r in rounds if r["pause_s"] is not None]
        print(json.dumps({
            "bench": "redis_failover", "rate": args.rate, "kills": rounds,
            "pause_s_max": max(pauses, default=None),
            "failed_total": sum(r["failed"] for r in rounds),
            "python": platform.python_version(), "cpus": os.cpu_count(),
        }))  # fmt: skip

    task.react(lambda r: defer.Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
