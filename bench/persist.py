"""Persistence path throughput: accept -> queue -> persister -> inbox + history, no clients.

    python bench/persist.py [--storage embedded|production] [--messages N] [--quick]

For 1:1 messages and for a 100-member group, it accepts N jobs through the queue (many in
flight, as gateways do), runs the persister in the same process, and times until every job
is written to both stores. Reports messages/s, inbox entries/s, and CPU seconds per message
of this process and of the storage services (Redis, RabbitMQ, HBase JVMs) read from /proc.
Prints a final JSON line. Production storage needs `scripts/services start` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto.server.app import make_backend
from improto.server.config import Config
from improto.server.ids import IdGenerator
from improto.server.model import PersistJob
from improto.server.persister import Persister

_TICK = os.sysconf("SC_CLK_TCK")
_SERVICES = {
    "redis": lambda cmd: cmd.startswith("redis-server"),
    "rabbitmq": lambda cmd: "beam.smp" in cmd and "rabbit" in cmd,
    "hbase": lambda cmd: "java" in cmd and "org.apache.hadoop.hbase" in cmd,
}


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK  # utime + stime


def service_cpu() -> dict[str, float]:
    """CPU seconds used so far by each storage service's processes."""
    totals = dict.fromkeys(_SERVICES, 0.0)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            for name, match in _SERVICES.items():
                if match(cmd):
                    totals[name] += _cpu_seconds(int(entry.name))
        except OSError:
            continue
    return totals


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


async def run_case(reactor: Any, config: Config, group_size: int, n: int,
                   in_flight: int) -> dict[str, Any]:  # fmt: skip
    backend = make_backend(config, reactor)
    await backend.start()
    persister = Persister(backend.queue, backend.inbox, backend.history)
    persister.start()
    ids = IdGenerator(node=1)
    receivers = tuple(range(10_000, 10_000 + group_size))
    sender = receivers[0]
    conv_kind, conv_id = (ConvKind.GROUP, 99) if group_size > 2 else (ConvKind.USER, receivers[1])
    body = b"x" * 100

    def job() -> tuple[PersistJob, bytes]:
        msg_id, now = ids.next()
        cmid = uuid.uuid4().bytes
        m = Message(msg_id, now, sender, "bench", conv_kind, conv_id, ContentType.TEXT, cmid, body)
        return PersistJob(m, receivers), cmid

    cpu0, svc0, t0 = own_cpu(), service_cpu(), time.perf_counter()
    sem = defer.DeferredSemaphore(in_flight)
    await defer.gatherResults([sem.run(backend.queue.accept, *job()) for _ in range(n)])
    accepted_s = time.perf_counter() - t0
    while persister.persisted < n:
        await task.deferLater(reactor, 0.01, lambda: None)
    elapsed = time.perf_counter() - t0
    cpu1, svc1 = own_cpu(), service_cpu()
    await backend.close()
    services = {k: round((svc1[k] - svc0[k]) / n * 1e6, 1) for k in svc1 if svc1[k] - svc0[k] > 0}
    return {
        "group_size": group_size,
        "messages": n,
        "accept_s": round(accepted_s, 3),
        "total_s": round(elapsed, 3),
        "messages_per_s": round(n / elapsed),
        "inbox_entries_per_s": round(n * group_size / elapsed),
        "cpu_us_per_msg": {"bench_process": round((cpu1 - cpu0) / n * 1e6, 1), **services},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--storage", choices=["embedded", "production"], default="embedded")
    p.add_argument("--messages", type=int, default=None, help="1:1 messages (group: a tenth)")
    p.add_argument("--in-flight", type=int, default=500)
    p.add_argument("--quick", action="store_true", help="small counts, for smoke runs")
    args = p.parse_args()
    n = args.messages or (2000 if args.quick else 20000)

    async def run(reactor: Any) -> None:
        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            prefix = f"bench{uuid.uuid4().hex[:8]}"
            for name, size, count in (("one_to_one", 2, n), ("group_100", 100, max(n // 10, 1))):
                config = Config(
                    data_dir=str(Path(tmp) / name),
                    storage=args.storage,
                    key_prefix=f"{prefix}{name}",
                    hbase_table=f"{prefix}_{name}",
                )
                results[name] = await run_case(reactor, config, size, count, args.in_flight)
                print(json.dumps({name: results[name]}), file=sys.stderr)
        summary = {
            "bench": "persist",
            "storage": args.storage,
            "in_flight": args.in_flight,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            **results,
        }
        print(json.dumps(summary))

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
