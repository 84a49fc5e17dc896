"""TimelineStore contract: per-group seqs from 1, redelivery keeping its seq (within a call
and across calls), forward pages (contiguous, limit, byte budget, has_more exact), heads,
rank with rising and out-of-order msg_ids, join floors (never above a member's first readable
seq, whatever the order), retention, concurrent appends, restarts, older storage formats,
u64 ids."""

from __future__ import annotations

import pytest_twisted

from twisted.internet.defer import gatherResults

from improto.enums import ConvKind
from improto.limits import U64_MAX
from improto_server.model import PersistJob, TimelineHead, TimelineRecords
from improto_server.ports import TIMELINE_JOIN_PROBE
from tests.contract.pages import ANY_SIZE, format_one

PORT = "timeline"

G1, G2, G3 = 41, 42, 43
HIGH = 2**63  # ids at and above 2**63 must order and compare like any other
DAY_MS = 86_400_000


def store(backend):
    return backend.current.timeline


def message(jobs, group: int = G1, **kw) -> PersistJob:
    """A large group's message: it reaches no inbox."""
    return PersistJob(jobs.message(conv_kind=ConvKind.GROUP, conv_id=group, **kw), ())


async def everything(timeline, group: int) -> TimelineRecords:
    return await timeline.after(group, 0, 1000, ANY_SIZE)


def page(first_seq: int, appended, has_more: bool, done: int) -> TimelineRecords:
    return TimelineRecords(first_seq, tuple(j.record for j in appended), has_more, done)


@pytest_twisted.ensureDeferred
async def test_a_group_without_a_timeline(backend):
    tl = store(backend)
    assert await tl.append([]) == []
    for group in (G1, HIGH, U64_MAX):
        assert await tl.after(group, 0, 10, ANY_SIZE) == TimelineRecords(1, (), False, 0)
        assert await tl.after(group, 7, 10, ANY_SIZE) == TimelineRecords(8, (), False, 0)
        assert await tl.rank(group, U64_MAX) == 0
    assert await tl.heads([G1, HIGH, U64_MAX]) == {}
    assert await tl.heads([]) == {}


@pytest_twisted.ensureDeferred
async def test_each_group_numbers_its_messages_from_one(backend, jobs):
    tl = store(backend)
    batch = [message(jobs, g) for g in (G1, G2, G1, G1, G2)]
    assert await tl.append(batch) == [1, 1, 2, 3, 2]
    more = [message(jobs, g) for g in (G2, G3, G1)]
    assert await tl.append(more) == [3, 1, 4]
    one = [batch[0], batch[2], batch[3], more[2]]
    two = [batch[1], batch[4], more[0]]
    assert await everything(tl, G1) == page(1, one, False, 4)
    assert await everything(tl, G2) == page(1, two, False, 3)
    assert await everything(tl, G3) == page(1, more[1:2], False, 1)


@pytest_twisted.ensureDeferred
async def test_a_redelivered_message_keeps_its_seq(backend, jobs):
    tl = store(backend)
    a, b, c = (message(jobs) for _ in range(3))
    # Within one call: the repeat gets the seq its first copy got, and is stored once.
    assert await tl.append([a, b, a, c, b]) == [1, 2, 1, 3, 2]
    assert await everything(tl, G1) == page(1, [a, b, c], False, 3)
    # Across calls, alone or next to new messages (of this group and another).
    assert await tl.append([b]) == [2]
    d, other = message(jobs), message(jobs, G2)
    assert await tl.append([c, d, other, a]) == [3, 4, 1, 1]
    assert await everything(tl, G1) == page(1, [a, b, c, d], False, 4)
    # A redelivered older message moves neither done nor the head.
    assert await tl.append([a, b]) == [1, 2]
    heads = await tl.heads([G1, G2])
    assert heads == {
        G1: TimelineHead(4, d.message.msg_id, d.record),
        G2: TimelineHead(1, other.message.msg_id, other.record),
    }
    # The same msg_id in another group is another message there.
    elsewhere = PersistJob(
        jobs.message(msg_id=a.message.msg_id, conv_kind=ConvKind.GROUP, conv_id=G3), ()
    )
    assert await tl.append([elsewhere]) == [1]


@pytest_twisted.ensureDeferred
async def test_pages_go_forward_with_exact_has_more(backend, jobs):
    tl = store(backend)
    appended = [message(jobs) for _ in range(10)]
    assert await tl.append(appended) == list(range(1, 11))
    assert await tl.after(G1, 0, 10, ANY_SIZE) == page(1, appended, False, 10)
    assert await tl.after(G1, 0, 9, ANY_SIZE) == page(1, appended[:9], True, 10)
    assert await tl.after(G1, 0, 3, ANY_SIZE) == page(1, appended[:3], True, 10)
    assert await tl.after(G1, 3, 3, ANY_SIZE) == page(4, appended[3:6], True, 10)
    assert await tl.after(G1, 5, 5, ANY_SIZE) == page(6, appended[5:], False, 10)
    assert await tl.after(G1, 5, 100, ANY_SIZE) == page(6, appended[5:], False, 10)
    assert await tl.after(G1, 9, 1, ANY_SIZE) == page(10, appended[9:], False, 10)
    assert await tl.after(G1, 8, 1, ANY_SIZE) == page(9, appended[8:9], True, 10)
    # At or past done: nothing, first_seq after_seq + 1 (also far above any seq).
    assert await tl.after(G1, 10, 10, ANY_SIZE) == TimelineRecords(11, (), False, 10)
    assert await tl.after(G1, 15, 10, ANY_SIZE) == TimelineRecords(16, (), False, 10)
    assert await tl.after(G1, HIGH, 10, ANY_SIZE) == TimelineRecords(HIGH + 1, (), False, 10)
    # Paging as a client does, one record at a time, reaches every seq once.
    seen, after = [], 0
    while True:
        got = await tl.after(G1, after, 1, ANY_SIZE)
        seen += got.records
        if not got.has_more:
            break
        after = got.first_seq + len(got.records) - 1
    assert seen == [j.record for j in appended]


@pytest_twisted.ensureDeferred
async def test_a_page_holds_the_records_that_fit_its_byte_budget(backend, jobs):
    tl = store(backend)
    appended = [message(jobs, body=bytes([i]) * (1000 + 500 * i)) for i in range(5)]
    await tl.append(appended)
    sizes = [len(j.record) for j in appended]
    for budget, n in [
        (sizes[0] + sizes[1], 2),
        (sizes[0] + sizes[1] - 1, 1),
        (1, 1),  # at least one, even larger than the budget
        (sum(sizes), 5),
        (sum(sizes) - 1, 4),
    ]:
        assert await tl.after(G1, 0, 10, budget) == page(1, appended[:n], n < 5, 5), budget
    # The limit and the budget together: whichever is smaller decides.
    assert await tl.after(G1, 0, 2, sum(sizes)) == page(1, appended[:2], True, 5)
    assert await tl.after(G1, 1, 3, sizes[1] + sizes[2]) == page(2, appended[1:3], True, 5)
    assert await tl.after(G1, 2, 10, sizes[3] + sizes[4]) == page(3, appended[2:4], True, 5)
    assert await tl.after(G1, 3, 10, sizes[3] + sizes[4]) == page(4, appended[3:], False, 5)
    # Records stored in an older storage format count their exact size too.
    old = [format_one(message(jobs, body=b"x" * 2000)) for _ in range(2)]
    await tl.append(old)
    both = 2 * len(old[0].record)
    assert await tl.after(G1, 5, 10, both) == page(6, old, False, 7)
    assert await tl.after(G1, 5, 10, both - 1) == page(6, old[:1], True, 7)


@pytest_twisted.ensureDeferred
async def test_records_stored_in_an_older_format_read_back(backend, jobs):
    tl = store(backend)
    old, new = format_one(message(jobs)), message(jobs)
    assert await tl.append([old, new]) == [1, 2]
    assert await everything(tl, G1) == page(1, [old, new], False, 2)
    newest_old = format_one(message(jobs))
    await tl.append([newest_old])
    head = (await tl.heads([G1]))[G1]
    assert head == TimelineHead(3, newest_old.message.msg_id, newest_old.record)


@pytest_twisted.ensureDeferred
async def test_records_keep_every_field(backend, jobs):
    tl = store(backend)
    for group in (HIGH, U64_MAX):
        full = PersistJob(
            jobs.message(
                msg_id=U64_MAX,
                sender=U64_MAX - 5,
                conv_kind=ConvKind.GROUP,
                conv_id=group,
                body="héllo \u2603".encode(),
                server_time=2**63 + 123,
                client_msg_id=bytes(range(16)),
            ),
            (),
        )
        assert await tl.append([full]) == [1]
        assert await everything(tl, group) == page(1, [full], False, 1)
        assert await tl.heads([group]) == {group: TimelineHead(1, U64_MAX, full.record)}


@pytest_twisted.ensureDeferred
async def test_heads_name_the_groups_with_a_timeline(backend, jobs):
    tl = store(backend)
    one = [message(jobs, G1) for _ in range(3)]
    high = [message(jobs, HIGH) for _ in range(2)]
    await tl.append([one[0], high[0], one[1], one[2], high[1]])
    expected = {
        G1: TimelineHead(3, one[2].message.msg_id, one[2].record),
        HIGH: TimelineHead(2, high[1].message.msg_id, high[1].record),
    }
    assert await tl.heads([G1, G2, HIGH, U64_MAX, G1]) == expected
    assert await tl.heads([HIGH]) == {HIGH: expected[HIGH]}
    late = message(jobs, G2)
    await tl.append([late])
    heads = await tl.heads([G2, G1])
    assert heads == {G1: expected[G1], G2: TimelineHead(1, late.message.msg_id, late.record)}


@pytest_twisted.ensureDeferred
async def test_rank_with_msg_ids_rising_with_seq(backend, jobs):
    tl = store(backend)
    msg_ids = [10, 20, 30, HIGH - 2, HIGH, U64_MAX - 1]  # none is another's + 1
    await tl.append([message(jobs, msg_id=m) for m in msg_ids])
    for seq, msg_id in enumerate(msg_ids, 1):
        assert await tl.rank(G1, msg_id) == seq  # the read mark's seq
        assert await tl.rank(G1, msg_id + 1) == seq  # between two messages: the one below
    assert await tl.rank(G1, 9) == 0
    assert await tl.rank(G1, 0) == 0
    assert await tl.rank(G1, U64_MAX) == 6
    assert await tl.rank(G2, U64_MAX) == 0  # per group


@pytest_twisted.ensureDeferred
async def test_rank_counts_when_msg_ids_do_not_rise_with_seq(backend, jobs):
    # Two gateways' clocks: seq order (the persister's) is not msg_id order.
    tl = store(backend)
    msg_ids = [100, 300, 200, HIGH + 5, 150, 400]  # seqs 1..6
    await tl.append([message(jobs, msg_id=m) for m in msg_ids])
    for mark in (0, 99, 100, 149, 150, 200, 250, 300, 399, 400, HIGH, HIGH + 5, U64_MAX):
        expected = sum(1 for m in msg_ids if m <= mark)
        assert await tl.rank(G1, mark) == expected, mark
    # So done - rank(read mark) is the unread count whatever the order: read up to 200,
    # unread are 300, HIGH + 5 and 400.
    assert 6 - await tl.rank(G1, 200) == 3


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_of_one_group_never_share_a_seq(backend, jobs):
    tl = store(backend)
    batches = [[message(jobs) for _ in range(5)] for _ in range(3)]
    shared = message(jobs)  # in two calls at once: still one message, one seq
    batches[0].append(shared)
    batches[2].insert(0, shared)
    results = await gatherResults([tl.append(b) for b in batches])
    seqs: dict[int, int] = {}  # msg_id -> seq
    by_seq: dict[int, PersistJob] = {}
    for batch, got in zip(batches, results, strict=True):
        for job, seq in zip(batch, got, strict=True):
            assert seqs.setdefault(job.message.msg_id, seq) == seq
            by_seq[seq] = job
    assert sorted(seqs.values()) == list(range(1, 17))
    # Each seq reads back as the message it was given to.
    assert await everything(tl, G1) == page(1, [by_seq[s] for s in range(1, 17)], False, 16)


@pytest_twisted.ensureDeferred
async def test_messages_older_than_the_retention_are_skipped(backend, jobs):
    tl = store(backend)
    old = [message(jobs) for _ in range(3)]
    await tl.append(old)
    backend.advance(DAY_MS)
    recent = [message(jobs) for _ in range(2)]
    await tl.append(recent)
    head = TimelineHead(5, recent[1].message.msg_id, recent[1].record)
    backend.advance(backend.history_retention_ms - DAY_MS)  # `old` is exactly 180 days old
    assert await everything(tl, G1) == page(1, old + recent, False, 5)

    backend.advance(1)
    for phase in ("before sweep", "after sweep", "after restart"):
        if phase == "after sweep":
            await backend.sweep()
        elif phase == "after restart":
            await backend.restart()
            tl = store(backend)
        assert await everything(tl, G1) == page(4, recent, False, 5), phase
        assert await tl.after(G1, 0, 1, ANY_SIZE) == page(4, recent[:1], True, 5), phase
        assert await tl.after(G1, 2, 10, ANY_SIZE) == page(4, recent, False, 5), phase
        assert await tl.after(G1, 4, 10, ANY_SIZE) == page(5, recent[1:], False, 5), phase
        assert await tl.heads([G1]) == {G1: head}, phase
        # Read marks among the retained messages rank as before.
        assert await tl.rank(G1, recent[0].message.msg_id) == 4, phase
        assert await tl.rank(G1, U64_MAX) == 5, phase

    backend.advance(DAY_MS)  # now everything is past the retention
    await backend.sweep()
    assert await everything(tl, G1) == TimelineRecords(1, (), False, 5)
    assert await tl.after(G1, 3, 10, ANY_SIZE) == TimelineRecords(4, (), False, 5)
    # The head stays (done, its msg_id), without a record that is no longer served.
    assert await tl.heads([G1]) == {G1: TimelineHead(5, recent[1].message.msg_id, None)}
    # The seqs go on: a reader's position stays valid.
    late = message(jobs)
    assert await tl.append([late]) == [6]
    assert await tl.after(G1, 5, 10, ANY_SIZE) == page(6, [late], False, 6)
    assert await everything(tl, G1) == page(6, [late], False, 6)


@pytest_twisted.ensureDeferred
async def test_retention_counts_from_server_time_as_the_history(backend, jobs):
    # A message accepted long ago but numbered now (a delayed job) goes with its history,
    # before the messages around it.
    tl = store(backend)
    first, last = message(jobs), message(jobs)
    delayed = message(jobs, server_time=backend.clock.now - 30 * DAY_MS)
    await tl.append([first, delayed, last])
    backend.advance(backend.history_retention_ms - 30 * DAY_MS)
    assert await everything(tl, G1) == page(1, [first, delayed, last], False, 3)
    backend.advance(1)
    for phase in ("before sweep", "after sweep"):
        if phase == "after sweep":
            await backend.sweep()
        # A page stays contiguous: it ends at the hole, the next one starts after it.
        assert await everything(tl, G1) == page(1, [first], True, 3), phase
        assert await tl.after(G1, 1, 10, ANY_SIZE) == page(3, [last], False, 3), phase
        assert await tl.after(G1, 2, 10, ANY_SIZE) == page(3, [last], False, 3), phase


@pytest_twisted.ensureDeferred
async def test_a_restart_keeps_the_timelines(backend, jobs):
    tl = store(backend)
    a, b = message(jobs, G1), message(jobs, G1)
    other = message(jobs, HIGH, msg_id=5)
    await tl.append([a, other, b])
    before = {
        "pages": (await everything(tl, G1), await everything(tl, HIGH)),
        "heads": await tl.heads([G1, HIGH]),
        "ranks": [await tl.rank(G1, j.message.msg_id) for j in (a, b)],
    }
    await backend.restart()
    tl = store(backend)
    after = {
        "pages": (await everything(tl, G1), await everything(tl, HIGH)),
        "heads": await tl.heads([G1, HIGH]),
        "ranks": [await tl.rank(G1, j.message.msg_id) for j in (a, b)],
    }
    assert after == before and before["ranks"] == [1, 2]
    # Redelivery after the restart keeps the seqs; new messages continue them.
    c = message(jobs, G1)
    assert await tl.append([b, c, other]) == [2, 3, 1]
    assert await everything(tl, G1) == page(1, [a, b, c], False, 3)


# ------------------------------------------------------------------------- join floors
# join_floor(group, since_id): the seqs a member who joined at since_id (it reads msg_id >=
# since_id) can skip. Never above the seq before its first readable message, which rank
# (since_id - 1) is when messages from before the join are numbered after it.


async def numbered(tl, jobs, group: int, msg_ids) -> list[PersistJob]:
    """Append messages with these msg_ids, numbered in this order (the persister's)."""
    appended = [message(jobs, group, msg_id=m) for m in msg_ids]
    done = (await tl.heads([group])).get(group)
    first = done.done + 1 if done else 1
    assert await tl.append(appended) == list(range(first, first + len(appended)))
    return appended


def true_floor(msg_ids, since: int) -> int:
    """The seqs (1, 2, ... in list order) before the first msg_id >= since (or all)."""
    return next((i for i, m in enumerate(msg_ids) if m >= since), len(msg_ids))


@pytest_twisted.ensureDeferred
async def test_join_floor_without_a_timeline_and_with_rising_msg_ids(backend, jobs):
    tl = store(backend)
    for since in (0, 1, HIGH, U64_MAX):
        assert await tl.join_floor(G1, since) == 0
    msg_ids = [10, 20, 30, HIGH - 2, HIGH, U64_MAX - 1]  # none is another's + 1
    await numbered(tl, jobs, G1, msg_ids)
    for seq, msg_id in enumerate(msg_ids, 1):
        assert await tl.join_floor(G1, msg_id) == seq - 1  # joined with this message
        assert await tl.join_floor(G1, msg_id + 1) == seq  # between: the next one reads
    assert await tl.join_floor(G1, 0) == 0
    assert await tl.join_floor(G1, 9) == 0
    assert await tl.join_floor(G1, U64_MAX) == 6  # nothing readable numbered yet
    assert await tl.join_floor(G2, 20) == 0  # per group


@pytest_twisted.ensureDeferred
async def test_join_floor_when_msg_ids_do_not_rise_with_seq(backend, jobs):
    tl = store(backend)
    join = 200
    cases = {
        # messages from before the join numbered after its event (seq 3): rank(199) is 4
        G1: [100, 120, join, 150, 190, 210, 220],
        # and one accepted just after the join numbered before its event (seq 4)
        G2: [100, 120, 205, join, 150, 190, 210],
        # the join event not in the timeline (the join made the group large, or the event
        # is not numbered yet): the first message after it
        G3: [100, 210, 150, 220],
        HIGH: [100, 120, join + 1, join, 150],
    }
    for group, msg_ids in cases.items():
        await numbered(tl, jobs, group, msg_ids)
    assert [await tl.join_floor(g, join) for g in cases] == [2, 2, 1, 2]
    for group, msg_ids in cases.items():
        for since in (1, 100, 101, 150, 199, join, join + 1, 215, 221):
            expected = true_floor(msg_ids, since)
            # exact here: at most TIMELINE_JOIN_PROBE messages from since_id on
            assert await tl.join_floor(group, since) == expected, (group, since)
            assert expected <= await tl.rank(group, since - 1), (group, since)
    # Nothing readable numbered yet: every seq so far can be skipped; the messages
    # numbered next, from before the join or after it, come above.
    await numbered(tl, jobs, U64_MAX, [100, 150])
    assert await tl.join_floor(U64_MAX, join) == 2
    await numbered(tl, jobs, U64_MAX, [120, join + 5, join, 190])
    assert await tl.join_floor(U64_MAX, join) == 3


@pytest_twisted.ensureDeferred
async def test_a_redelivery_keeps_its_seq_and_the_join_floor(backend, jobs):
    tl = store(backend)
    join = 200
    appended = await numbered(tl, jobs, G1, [100, join + 5, join, 150])
    assert await tl.join_floor(G1, join) == 1
    # The join event, a late message from before it and the early one after it, again
    # (a redelivered batch): same seqs, nothing added, the floor stays.
    assert await tl.append([appended[2], appended[3], appended[1]]) == [3, 4, 2]
    assert await tl.join_floor(G1, join) == 1
    assert (await tl.heads([G1]))[G1].done == 4
    await numbered(tl, jobs, G1, [join + 10, 160])
    assert await tl.join_floor(G1, join) == 1
    assert await tl.join_floor(G1, join + 6) == 4  # joined after them: seq 5 on
    await backend.restart()
    tl = store(backend)
    assert await tl.join_floor(G1, join) == 1
    assert await tl.append([appended[2]]) == [3]
    assert await tl.join_floor(G1, join) == 1


@pytest_twisted.ensureDeferred
async def test_join_floor_probes_a_bounded_number_of_messages(backend, jobs):
    """The documented limit: a message more than TIMELINE_JOIN_PROBE msg_ids above the join
    but numbered before all of them (a gateway's clock far ahead) is not seen; rank still
    bounds the floor, and the two together miss it only with a late message from before."""
    tl = store(backend)
    join, far = 1000, 100_000
    between = [join + i for i in range(TIMELINE_JOIN_PROBE)]  # the join event first
    for group, n in ((G1, TIMELINE_JOIN_PROBE - 1), (G2, TIMELINE_JOIN_PROBE)):
        await numbered(tl, jobs, group, [100, far, *between[:n], 150])
    assert await tl.join_floor(G1, join) == 1  # `far` (seq 2) is among the probed ones
    assert await tl.join_floor(G2, join) == 2  # it is not: rank(join - 1) = 2


@pytest_twisted.ensureDeferred
async def test_join_floor_is_never_too_high_below_an_index(backend, jobs):
    """A store that indexes only its newest msg_ids (Redis, TIMELINE_INDEX) cannot place a
    join older than all of them once it dropped some: None, never a guess that may skip the
    member's messages. SQLite keeps every msg_id: always exact."""
    tl = store(backend)
    index = getattr(tl, "redis", None)
    if index is not None:
        index.index_size = 4  # keeps the 4 highest msg_ids of each group
    msg_ids = [100 + i for i in range(8)]  # seqs 1..8; an index of 4 keeps 104..107
    await numbered(tl, jobs, G1, msg_ids)
    for since in (1, 101, 103, 104, 105, 107, 108):
        got = await tl.join_floor(G1, since)
        if got is None:  # only below the index
            assert index is not None and since < 104, since
        else:
            assert got == true_floor(msg_ids, since), since
    assert await tl.join_floor(G1, 104) == 4  # the lowest kept: all dropped ones are below
    assert await tl.join_floor(G1, 105) == 5
    # Out of seq order within the index: still exact.
    await numbered(tl, jobs, G2, [100, 101, 102, 110, 109, 108, 105])
    assert await tl.join_floor(G2, 108) == 3
    assert await tl.join_floor(G2, 109) == 3
