"""Persistence path throughput: accept -> queue -> persister -> inbox + history + conversation
lists, no clients.

    python bench/persist.py [--storage embedded|production] [--messages N] [--quick]
                            [--no-conversations | --ab ROUNDS] [--case NAME]

For 1:1 messages (spread over --pairs conversations) and for a 100-member group, three
phases of N messages each: `accept` (jobs accepted through the queue, many in flight as
gateways do, nothing consuming), `drain` (the persister, in this process, starts on that full
queue: the persistence path alone, until every job is in the inboxes and the history and
the inboxes are folded into the conversation lists), `end_to_end` (accept and persist at
once, as one `--role all` process does). Reports messages/s, inbox entries/s, and CPU
microseconds per message of this process and of the storage services (Redis, RabbitMQ,
HBase JVMs, read from /proc). Prints a final JSON line. `--no-conversations` leaves the
conversation lists out (the persister as it was before them: the before/after comparison of
issue 13); the JSON says which ran. `--ab ROUNDS` runs both, alternating within this one
process (with lists, then without, ROUNDS times, each on fresh keys), and reports each
phase's median messages/s of both, their ratio, and the median of the per-round ratios (the
machine is shared and noisy: ratios over interleaved rounds, not of two runs minutes
apart). Production storage needs `scripts/services start` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import servers  # noqa: F401  (first: puts the repository root on sys.path)

from twisted.internet import defer, protocol, task, threads
from twisted.internet.defer import Deferred

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.app import make_backend
from improto_server.config import Config
from improto_server.ids import IdGenerator
from improto_server.model import PersistJob
from improto_server.persister import MAX_BATCH, Persister
from improto_server.production.redis_cluster import scan_targets
from tests.support import services

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


class Load:
    """Jobs as gateways make them: 1:1 over `pairs` conversations, or one group."""

    def __init__(self, group_size: int, pairs: int) -> None:
        self.ids = IdGenerator(node=1)
        self.group_size = group_size
        self.pairs = pairs
        self.members = tuple(range(10_000, 10_000 + group_size))
        self.body = b"x" * 100
        self.n = 0

    def job(self) -> tuple[PersistJob, bytes]:
        msg_id, now = self.ids.next()
        cmid = uuid.uuid4().bytes
        self.n += 1
        if self.group_size > 2:
            sender, kind, conv, inboxes = self.members[0], ConvKind.GROUP, 99, self.members
        else:
            pair = self.n % self.pairs
            sender, conv = 20_000 + 2 * pair, 20_001 + 2 * pair
            kind, inboxes = ConvKind.USER, (sender, conv)
        m = Message(msg_id, now, sender, "bench", kind, conv, ContentType.TEXT, cmid, self.body)
        return PersistJob(m, inboxes), cmid


class Meter:
    """Wall time and CPU (this process and each service) of one phase."""

    def __init__(self) -> None:
        self.cpu, self.svc, self.t = own_cpu(), service_cpu(), time.perf_counter()

    def result(self, n: int, group_size: int) -> dict[str, Any]:
        elapsed = time.perf_counter() - self.t
        cpu, svc = own_cpu() - self.cpu, service_cpu()
        used = {k: svc[k] - self.svc[k] for k in svc}
        per_msg = {k: round(v / n * 1e6, 1) for k, v in used.items() if v > 0}
        return {
            "seconds": round(elapsed, 3),
            "messages_per_s": round(n / elapsed),
            "inbox_entries_per_s": round(n * group_size / elapsed),
            "cpu_us_per_msg": {"bench_process": round(cpu / n * 1e6, 1), **per_msg},
        }


async def wait_persisted(reactor: Any, persister: Persister, target: int) -> None:
    """Until `target` jobs are in the inboxes and the history, and the conversation lists
    are folded (at once rather than FOLD_DELAY_S later: the work, not the timer, counts)."""
    while persister.persisted < target:
        await task.deferLater(reactor, 0.005, lambda: None)
    if persister.conversations is not None:
        await persister.fold_now()


def make_persister(backend: Any, max_batch: int, conversations: bool) -> Persister:
    lists = backend.conversations if conversations else None
    return Persister(backend.queue, backend.inbox, backend.history, lists, max_batch=max_batch)


async def run_case(reactor: Any, config: Config, group_size: int, n: int, pairs: int,
                   in_flight: int, max_batch: int, conversations: bool
                   ) -> dict[str, Any]:  # fmt: skip
    """Three phases of n messages: accept alone (nothing consumes), drain alone (the
    persister starts on the full queue), then both at once (as `--role all` runs)."""
    backend = make_backend(config, reactor)
    await backend.start()
    persister = make_persister(backend, max_batch, conversations)
    load = Load(group_size, pairs)
    sem = defer.DeferredSemaphore(in_flight)

    async def accept_all() -> None:
        await defer.gatherResults([sem.run(backend.queue.accept, *load.job()) for _ in range(n)])

    out: dict[str, Any] = {"group_size": group_size, "messages": n}
    meter = Meter()
    await accept_all()
    out["accept"] = meter.result(n, group_size)
    meter = Meter()
    persister.start()
    await wait_persisted(reactor, persister, n)
    out["drain"] = meter.result(n, group_size)
    batches = persister.batches
    meter = Meter()
    await accept_all()
    await wait_persisted(reactor, persister, 2 * n)
    out["end_to_end"] = meter.result(n, group_size)
    out["end_to_end"]["mean_batch"] = round(n / max(1, persister.batches - batches), 1)
    if config.storage == "production":
        await drop_production_data(backend, config)
    await backend.close()
    return out


class _Child(protocol.ProcessProtocol):
    """A persister worker process: reads its progress lines ("persisted N", "cpu S")."""

    def __init__(self) -> None:
        self.persisted = 0
        self.cpu = 0.0
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._buf = b""

    def outReceived(self, data: bytes) -> None:
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            word, _, value = line.decode().partition(" ")
            if word == "ready" and not self.ready.called:
                self.ready.callback(None)
            elif word == "persisted":
                self.persisted = int(value)
            elif word == "cpu":
                self.cpu = float(value)

    def errReceived(self, data: bytes) -> None:
        sys.stderr.write(data.decode(errors="replace"))

    def processEnded(self, reason: Any) -> None:
        self.ended.callback(None)


async def run_split(reactor: Any, config: Config, group_size: int, n: int, pairs: int,
                    in_flight: int, max_batch: int, conversations: bool
                    ) -> dict[str, Any]:  # fmt: skip
    """Accept in this process while a persister process writes (as separate --role gateway
    and --role persister processes run): two Python processes, one per core."""
    backend = make_backend(config, reactor)
    await backend.start()
    child = _Child()
    args = [sys.executable, __file__, "--worker", json.dumps(
        {"config": asdict(config), "n": n, "max_batch": max_batch,
         "conversations": conversations}
    )]  # fmt: skip
    reactor.spawnProcess(child, sys.executable, args, env=os.environ)
    await child.ready
    load = Load(group_size, pairs)
    sem = defer.DeferredSemaphore(in_flight)
    meter = Meter()
    await defer.gatherResults([sem.run(backend.queue.accept, *load.job()) for _ in range(n)])
    while child.persisted < n:
        await task.deferLater(reactor, 0.005, lambda: None)
    out = meter.result(n, group_size)
    await child.ended
    out["cpu_us_per_msg"]["persister_process"] = round(child.cpu / n * 1e6, 1)
    await drop_production_data(backend, config)
    await backend.close()
    return out


async def worker(reactor: Any, spec: dict[str, Any]) -> None:
    """The persister process of run_split: prints its progress on stdout."""
    config = Config(**spec["config"])
    backend = make_backend(config, reactor)
    await backend.start()
    persister = make_persister(backend, spec["max_batch"], spec["conversations"])
    persister.start()
    cpu0 = own_cpu()
    print("ready", flush=True)
    last = -1
    while persister.persisted < spec["n"]:
        if persister.persisted != last:
            last = persister.persisted
            print(f"persisted {last}", flush=True)
        await task.deferLater(reactor, 0.005, lambda: None)
    await wait_persisted(reactor, persister, spec["n"])
    print(f"cpu {own_cpu() - cpu0}", flush=True)
    print(f"persisted {persister.persisted}", flush=True)
    await backend.close()


async def drop_production_data(backend: Any, config: Config) -> None:
    """Delete what a case stored in the services: its Redis keys, queues and HBase table."""
    nodes = scan_targets(backend.redis)  # a Redis Cluster: SCAN each master
    one = len(nodes) > 1 or nodes[0] is not backend.redis  # keys of one call share a slot
    for node in nodes:
        cursor: bytes = b"0"
        while True:
            cursor, keys = await node.execute_command(
                "SCAN", cursor, "MATCH", f"{config.key_prefix}:*", "COUNT", 1000
            )
            step = 1 if one else 1000
            for i in range(0, len(keys), step):
                await node.execute_command("UNLINK", *keys[i : i + step])
            if cursor == b"0":
                break
    names = backend.queue.names

    def drop_blocking() -> None:
        import happybase
        import pika

        conn = pika.BlockingConnection(pika.URLParameters(config.amqp))
        ch = conn.channel()
        for queue in (*names.partitions, names.dead_queue, backend.notify_queue.name):
            ch.queue_delete(queue)
        ch.exchange_delete(names.dead_exchange)
        conn.close()
        host, _, port = config.hbase.rpartition(":")
        hbase = happybase.Connection(host or config.hbase, int(port or 9090))
        hbase.delete_table(config.hbase_table, disable=True)
        hbase.close()

    await threads.deferToThread(drop_blocking)


def ab_summary(
    rounds: list[tuple[bool, dict[str, Any]]], names: tuple[str, str] = ("with_lists", "without")
) -> dict[str, Any]:
    """Per phase: the median messages/s of the A rounds (True: with the lists, or on the
    cluster) and of the B rounds, their ratio, the median of the rounds' own ratios (each A
    round / the B run next to it: the machine's slow drift cancels within a pair), and every
    round's figure (in run order)."""
    a_name, b_name = names
    out: dict[str, Any] = {}
    for phase in ("accept", "drain", "end_to_end", "two_processes"):
        with_ = [r[phase]["messages_per_s"] for lists, r in rounds if lists and phase in r]
        without = [r[phase]["messages_per_s"] for lists, r in rounds if not lists and phase in r]
        if not with_ or not without:
            continue
        a, b = statistics.median(with_), statistics.median(without)
        paired = [x / y for x, y in zip(with_, without, strict=False)]
        out[phase] = {
            a_name: a, b_name: b, "ratio": round(a / b, 3),
            "paired_ratio": round(statistics.median(paired), 3),
            f"rounds_{a_name}": with_, f"rounds_{b_name}": without,
        }  # fmt: skip
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--storage", choices=["embedded", "production"], default="embedded")
    p.add_argument("--messages", type=int, default=None, help="1:1 messages (group: a tenth)")
    p.add_argument("--in-flight", type=int, default=500, help="accepts in flight at once")
    p.add_argument("--pairs", type=int, default=1000, help="1:1 conversations used")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH, help="persister batch size")
    p.add_argument("--partitions", type=int, default=1, help="persist queues (production)")
    p.add_argument("--quick", action="store_true", help="small counts, for smoke runs")
    p.add_argument(
        "--no-conversations",
        action="store_true",
        help="do not write the conversation lists (the persister before them)",
    )
    p.add_argument(
        "--ab", type=int, default=0, metavar="ROUNDS",
        help="with and without the lists, alternating ROUNDS times: medians and their ratio",
    )  # fmt: skip
    p.add_argument(
        "--case", choices=["one_to_one", "group_100"], action="append",
        help="run only this case (repeatable; default both)",
    )  # fmt: skip
    p.add_argument(
        "--redis-cluster", metavar="HOST:PORT[,...]",
        help="production: a Redis Cluster's seed nodes instead of the single Redis",
    )  # fmt: skip
    p.add_argument(
        "--cluster-ab", type=int, default=0, metavar="ROUNDS",
        help="production: on the Redis Cluster (--redis-cluster, default scripts/services' "
        "127.0.0.1:7000) and on the single Redis, alternating ROUNDS times",
    )  # fmt: skip
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: the persister process
    args = p.parse_args()
    if args.worker:
        spec = json.loads(args.worker)
        task.react(lambda r: Deferred.fromCoroutine(worker(r, spec)))
        return
    n = args.messages or (2000 if args.quick else 20000)
    if args.ab and args.no_conversations:
        p.error("--ab runs both: leave out --no-conversations")

    if args.cluster_ab and (args.ab or args.storage != "production"):
        p.error("--cluster-ab needs --storage production and runs with the lists (no --ab)")
    seeds = args.redis_cluster or str(services.REDIS_CLUSTER)
    # (lists, on the cluster) of each run, in order
    variants: list[tuple[bool, bool]]
    if args.cluster_ab:
        variants = [(True, True), (True, False)] * args.cluster_ab
    elif args.ab:
        variants = [(True, False), (False, False)] * args.ab
    else:
        variants = [(not args.no_conversations, bool(args.redis_cluster))]

    async def run_variant(tmp: str, name: str, size: int, count: int, lists: bool,
                          prefix: str, cluster: bool) -> dict[str, Any]:  # fmt: skip
        config = Config(
            data_dir=str(Path(tmp) / prefix / name),
            storage=args.storage,
            key_prefix=f"{prefix}{name}",
            hbase_table=f"{prefix}_{name}",
            queue_partitions=args.partitions,
            **services.config_fields(),
            redis_cluster=seeds if cluster else "",
        )
        out = await run_case(
            reactor_ref[0], config, size, count, args.pairs, args.in_flight, args.max_batch,
            lists,
        )  # fmt: skip
        if args.storage == "production":
            split = replace(
                config, key_prefix=config.key_prefix + "s", hbase_table=config.hbase_table + "_s"
            )
            out["two_processes"] = await run_split(
                reactor_ref[0], split, size, count, args.pairs, args.in_flight,
                args.max_batch, lists,
            )  # fmt: skip
        return out

    reactor_ref: list[Any] = []

    async def run(reactor: Any) -> None:
        reactor_ref.append(reactor)
        results: dict[str, Any] = {}
        with tempfile.TemporaryDirectory() as tmp:
            for name, size, count in (("one_to_one", 2, n), ("group_100", 100, max(n // 10, 1))):
                if args.case and name not in args.case:
                    continue
                rounds: list[tuple[bool, dict[str, Any]]] = []
                for lists, cluster in variants:
                    prefix = f"bench{uuid.uuid4().hex[:8]}"
                    out = await run_variant(tmp, name, size, count, lists, prefix, cluster)
                    rounds.append((cluster if args.cluster_ab else lists, out))
                    line = {name: out, "conversations": lists, "cluster": cluster}
                    print(json.dumps(line), file=sys.stderr)
                if args.cluster_ab:
                    results[name] = ab_summary(rounds, ("cluster", "single"))
                else:
                    results[name] = ab_summary(rounds) if args.ab else rounds[0][1]
        summary = {
            "bench": "persist",
            "storage": args.storage,
            "in_flight": args.in_flight,
            "pairs": args.pairs,
            "max_batch": args.max_batch,
            "partitions": args.partitions,
            "conversations": "ab" if args.ab else variants[0][0],
            "redis": "cluster-ab"
            if args.cluster_ab
            else ("cluster" if variants[0][1] else "single"),
            "rounds": args.ab or args.cluster_ab or 1,
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            **results,
        }
        print(json.dumps(summary))

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
