"""TimelineStore on Redis and HBase: the large groups' timelines (docs/design/large-groups.md).

Redis (production/redis_timeline.py) numbers the messages and says how far each timeline is
written (done); HBase holds the records, in the history table, one row per seq:

    salt ‖ "t:<group_id>" ‖ 0x00 ‖ be64(seq)

with the history's salt function and cells (m:v the stored record, m:t server_time, m:s the
MESSAGE record's size), so the table's family TTL and the history's read-side retention
filter apply to them as to history rows; "t:" keys fall apart from "g:" and "u:" ones. A
forward scan from after_seq + 1 returns a page in seq order.

An append is three steps: one script assigns the seqs of the batch's groups, the rows are
written, then a second script moves each group's done to the batch's highest seq of it. So
done only covers written rows, and a failed write leaves done where it was: the retried batch
gets the same seqs (the index keeps them) and writes the same rows again. Appends touching
one group run one after the other in this process (two at once would let the later one's
done cover the earlier one's rows before they are written); across processes one persister
writes a group (its partition's), as the design has it.

A page reads done first, then scans the rows after_seq + 1 .. done: it never sees a seq
being written. Rows past retention are skipped by the scan's filter; a page stops before a
gap, so its records are consecutive seqs (the next page starts after the gap).

heads() reads Redis only: the record of seq done is kept in the group's hash (one record per
group), so the heads of a user's large groups cost one script call, not an HBase get each;
past retention (by the injected clock, as the rows) it is left out of the head.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from twisted.internet.defer import Deferred, DeferredLock

from improto.enums import ConvKind
from improto.limits import U64_MAX
from improto.records import record_of_stored
from improto_server.deferreds import as_deferred
from improto_server.model import TIMELINE_INDEX, PersistJob, TimelineHead, TimelineRecords
from improto_server.ports import TIMELINE_JOIN_PROBE
from improto_server.production.hbase_history import HBaseHistory, key_prefix
from improto_server.production.redis_connection import RedisClient
from improto_server.production.redis_timeline import DAY_MS, RedisTimelines, Settled


def timeline_prefix(group_id: int) -> bytes:
    """The first bytes of every timeline row of the group."""
    if not 0 <= group_id <= U64_MAX:
        raise ValueError(f"{group_id} is not an unsigned 64-bit value")
    return key_prefix(f"t:{group_id}")


def timeline_row(group_id: int, seq: int) -> bytes:
    return timeline_prefix(group_id) + seq.to_bytes(8, "big")


def seq_of(row: bytes) -> int:
    return int.from_bytes(row[-8:], "big")


class ProductionTimeline:
    """TimelineStore over RedisTimelines and the history's HBase table (its thread pool and
    retention); `start()` loads the scripts, the history is started and closed by its owner."""

    def __init__(
        self,
        redis: RedisClient,
        history: HBaseHistory,
        prefix: str,
        *,
        ttl_margin_ms: int = DAY_MS,
        cluster: bool = False,
        index_size: int = TIMELINE_INDEX,
    ) -> None:
        self.history = history
        self.redis = RedisTimelines(
            redis,
            prefix,
            history.retention_ms,
            ttl_margin_ms=ttl_margin_ms,
            cluster=cluster,
            index_size=index_size,
        )
        self._locks: dict[int, DeferredLock] = {}  # groups with an append running

    def start(self) -> Deferred[None]:
        return self.redis.start()

    # ------------------------------------------------------------------ writes

    @as_deferred
    async def append(self, jobs: Sequence[PersistJob]) -> list[int]:
        by_group: dict[int, list[int]] = {}  # group -> indexes into jobs, in order
        for i, job in enumerate(jobs):
            m = job.message
            if m.conv_kind != ConvKind.GROUP:
                raise ValueError(f"message {m.msg_id} is not a group message")
            if m.conv_id not in by_group:
                timeline_prefix(m.conv_id)  # refuse a bad id before any seq is assigned
            by_group.setdefault(m.conv_id, []).append(i)
        # Sorted, so two appends never wait for each other's locks crosswise.
        locks = [self._locks.setdefault(g, DeferredLock()) for g in sorted(by_group)]
        for lock in locks:
            await lock.acquire()
        try:
            return await self._append(jobs, by_group)
        finally:
            for group, lock in zip(sorted(by_group), locks, strict=True):
                lock.release()
                if not lock.locked:  # nobody waits for it
                    del self._locks[group]

    async def _append(
        self, jobs: Sequence[PersistJob], by_group: dict[int, list[int]]
    ) -> list[int]:
        msg_ids = {g: [jobs[i].message.msg_id for i in idx] for g, idx in by_group.items()}
        assigned = await self.redis.assign(msg_ids)
        seqs = [0] * len(jobs)
        rows: dict[bytes, PersistJob] = {}  # a job twice in the batch: one row
        top: dict[int, tuple[int, PersistJob]] = {}
        for group, idx in by_group.items():
            for i, seq in zip(idx, assigned[group], strict=True):
                seqs[i] = seq
                rows[timeline_row(group, seq)] = jobs[i]
                if seq > top.get(group, (0, jobs[i]))[0]:
                    top[group] = (seq, jobs[i])
        if rows:
            await self.history.put_rows(rows.items())
        await self.redis.settle(
            {
                g: Settled(seq, job.message.msg_id, job.stored_record)
                for g, (seq, job) in top.items()
            }
        )
        return seqs

    # ------------------------------------------------------------------ reads

    @as_deferred
    async def after(
        self, group_id: int, after_seq: int, limit: int, max_bytes: int
    ) -> TimelineRecords:
        after_seq = max(0, after_seq)
        done = await self.redis.done(group_id)
        if after_seq >= done:
            return TimelineRecords(after_seq + 1, (), False, done)
        prefix = timeline_prefix(group_id)
        start = prefix + (after_seq + 1).to_bytes(8, "big")
        stop = prefix + (done + 1).to_bytes(8, "big")  # seqs up to done
        page = await self.history.scan(start, stop, limit, max_bytes, consecutive=True)
        first = seq_of(page.keys[0]) if page.keys else after_seq + 1
        return TimelineRecords(first, page.records, page.has_more, done)

    @as_deferred
    async def heads(self, group_ids: Sequence[int]) -> dict[int, TimelineHead]:
        """A head whose record is past retention keeps done and its msg_id, without the
        record (as after() no longer serves it)."""
        heads = await self.redis.heads(group_ids)
        cutoff = self.history.now_ms() - self.history.retention_ms
        out = {}
        for group, head in heads.items():
            last = None if head.stored is None else _record(head.stored)
            if last is not None and _server_time(last) < cutoff:
                last = None
            out[group] = TimelineHead(head.done, head.last_msg_id, last)
        return out

    def rank(self, group_id: int, msg_id: int) -> Deferred[int]:
        return self.redis.rank(group_id, msg_id)

    def join_floor(self, group_id: int, since_id: int) -> Deferred[int | None]:
        return self.redis.join_floor(group_id, since_id, TIMELINE_JOIN_PROBE)


_SERVER_TIME = struct.Struct(">8xQ")  # a MESSAGE record starts msg_id u64, server_time u64


def _server_time(record: bytes) -> int:
    return int(_SERVER_TIME.unpack_from(record)[0])


def _record(stored: bytes) -> bytes:
    try:
        return record_of_stored(stored)
    except ValueError as e:
        raise RuntimeError(f"timeline head: {e}") from None
