"""Large groups' storage, before the send path uses it (issue 14 step 1): the TimelineStore
next to write diffusion into members' inboxes, no clients.

    python bench/timeline.py [--storage embedded|production] [--messages N] [--members M]
                             [--quick]

For one group of M members (default 10,000), N messages (default 20,000) in batches of 256,
as the persister writes them:
- `timeline`: TimelineStore.append + the history row of each message (what a large group's
  message costs: independent of M);
- `forward_pull`: the whole timeline paged forward, 200 per page within the 128 KiB budget,
  as a member catching up would;
- `write_diffusion`: the same group's messages into every member's inbox + the history, as
  today, on N // 100 messages (it writes M entries per message);
- production: Redis bytes per timeline message (MEMORY USAGE of the group's keys / N).

Reports messages/s and CPU microseconds per message (this process, Redis, HBase), and a
final JSON line. Production storage needs `scripts/services start` first.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import uuid
from typing import Any

import servers  # noqa: F401  (first: puts the repository root on sys.path)
from persist import Meter, drop_production_data

from twisted.internet import task
from twisted.internet.defer import Deferred

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto.records import HISTORY_RECORD_BYTES
from improto_server.app import make_backend
from improto_server.config import Config
from improto_server.ids import IdGenerator
from improto_server.model import ConvKey, PersistJob
from tests.support import services

BATCH = 256
PAGE = 200
GROUP = 77


def group_jobs(n: int, members: tuple[int, ...], inboxes: bool) -> list[PersistJob]:
    ids = IdGenerator(node=1)
    out = []
    for i in range(n):
        msg_id, now = ids.next()
        sender = members[i % len(members)]
        m = Message(msg_id, now, sender, "bench", ConvKind.GROUP, GROUP, ContentType.TEXT,
                    uuid.uuid4().bytes, b"x" * 100)  # fmt: skip
        out.append(PersistJob(m, members if inboxes else ()))
    return out


async def run(reactor: Any, storage: str, n: int, members: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        prefix = f"benchtl{uuid.uuid4().hex[:8]}"
        config = Config(
            data_dir=tmp, storage=storage, key_prefix=prefix, hbase_table=f"{prefix}_t",
            **services.config_fields(),
        )  # fmt: skip
        backend = make_backend(config, reactor)
        await backend.start()
        out: dict[str, Any] = {"members": members}
        everyone = tuple(range(10_000, 10_000 + members))
        key = ConvKey.group(GROUP)

        jobs = group_jobs(n, everyone, inboxes=False)
        meter = Meter()
        for i in range(0, n, BATCH):
            batch = jobs[i : i + BATCH]
            await backend.timeline.append(batch)
            await backend.history.append_many([(key, j) for j in batch])
        out["timeline"] = meter.result(n, 1) | {"messages": n}
        del out["timeline"]["inbox_entries_per_s"]

        meter = Meter()
        seq, pages, received, size = 0, 0, 0, 0
        while True:
            page = await backend.timeline.after(GROUP, seq, PAGE, HISTORY_RECORD_BYTES)
            pages += 1
            received += len(page.records)
            size += sum(len(r) for r in page.records)
            seq = page.first_seq + len(page.records) - 1
            if not page.has_more:
                break
        out["forward_pull"] = meter.result(received, 1) | {
            "messages": received, "pages": pages, "record_bytes": size,
        }  # fmt: skip
        del out["forward_pull"]["inbox_entries_per_s"]
        if received != n:
            raise SystemExit(f"forward pull returned {received} of {n} messages")

        if storage == "production":
            used = 0
            for k in (f"{prefix}:tl:{{g{GROUP}}}", f"{prefix}:tl:{{g{GROUP}}}:ix"):
                used += int(await backend.redis.execute_command("MEMORY", "USAGE", k) or 0)
            out["redis_bytes_per_message"] = round(used / n, 1)

        small = max(n // 100, 1)
        diffused = group_jobs(small, everyone, inboxes=True)
        meter = Meter()
        for i in range(0, small, BATCH):
            batch = diffused[i : i + BATCH]
            await backend.inbox.append_many(batch)
            await backend.history.append_many([(key, j) for j in batch])
        out["write_diffusion"] = meter.result(small, members) | {"messages": small}
        if storage == "production":
            await drop_production_data(backend, config)
        await backend.close()
        return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--storage", choices=["embedded", "production"], default="embedded")
    p.add_argument("--messages", type=int, default=None)
    p.add_argument("--members", type=int, default=10_000)
    p.add_argument("--quick", action="store_true", help="small counts, for smoke runs")
    args = p.parse_args()
    n = args.messages or (2_000 if args.quick else 20_000)

    async def go(reactor: Any) -> None:
        result = await run(reactor, args.storage, n, args.members)
        print(json.dumps({
            "bench": "timeline", "storage": args.storage, "batch": BATCH,
            "python": platform.python_version(), "cpus": os.cpu_count(), **result,
        }))  # fmt: skip

    task.react(lambda r: Deferred.fromCoroutine(go(r)))


if __name__ == "__main__":
    main()
