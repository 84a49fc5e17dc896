"""InboxStore contract: cursors, idempotent appends, paging, clamping, retention, positions."""

from __future__ import annotations

import pytest_twisted

from improto.limits import U64_MAX
from improto_server.config import InboxCaps
from improto_server.model import InboxIds, InboxRecords, PersistJob
from tests.contract.pages import ANY_SIZE, format_one, ids, messages

PORT = "inbox"

ALICE, BOB, CAROL = 1, 2, 3
BIG = U64_MAX  # user ids are u64: the largest must work like any other


async def pull_all(inbox, user: int, limit: int, start: int = 0) -> list[InboxRecords]:
    """Run the client's sync loop (spec 10.2) and return every page."""
    pages = []
    cursor = start
    while True:
        page = await inbox.page(user, cursor, limit, ANY_SIZE)
        pages.append(page)
        cursor = page.cursors[-1] if page.cursors else page.start
        if not page.has_more:
            return pages


def cursors(page: InboxRecords) -> list[int]:
    return list(page.cursors)


@pytest_twisted.ensureDeferred
async def test_empty_inbox(backend):
    assert await backend.inbox.page(ALICE, 0, 10, ANY_SIZE) == InboxRecords((), (), 0, False, False)


@pytest_twisted.ensureDeferred
async def test_cursors_strictly_increase_and_are_unique_per_user(backend, jobs):
    appended = [
        jobs.job(ALICE, BOB),
        jobs.job(ALICE),
        jobs.job(BOB, ALICE, CAROL),
        jobs.job(ALICE, BIG),
        jobs.job(BOB),
    ]
    for job in appended:
        await backend.inbox.append(job)
    for user in (ALICE, BOB, CAROL, BIG):
        page = await backend.inbox.page(user, 0, 100, ANY_SIZE)
        expected = [j.message for j in appended if user in j.inbox_users]
        assert messages(page) == expected  # full records, in append order
        cs = cursors(page)
        assert cs == sorted(set(cs))  # strictly increasing
        assert cs[0] >= 1  # 0 means "from the beginning" and is never an entry's cursor
        assert not page.has_more and not page.gap


@pytest_twisted.ensureDeferred
async def test_append_is_idempotent(backend, jobs):
    job = jobs.job(ALICE, BOB, ALICE)  # a repeated user still gets one entry
    await backend.inbox.append(job)
    before = await backend.inbox.page(ALICE, 0, 100, ANY_SIZE)
    assert ids(before) == [job.message.msg_id]

    await backend.inbox.append(job)  # the queue redelivered it
    assert await backend.inbox.page(ALICE, 0, 100, ANY_SIZE) == before
    assert ids(await backend.inbox.page(BOB, 0, 100, ANY_SIZE)) == [job.message.msg_id]

    # A later message lands after it: the redelivery did not burn or reuse a cursor.
    later = jobs.job(ALICE)
    await backend.inbox.append(later)
    page = await backend.inbox.page(ALICE, 0, 100, ANY_SIZE)
    assert ids(page) == [job.message.msg_id, later.message.msg_id]
    assert cursors(page)[1] > cursors(before)[0]


@pytest_twisted.ensureDeferred
async def test_redelivery_reaching_more_users_adds_only_the_missing_entries(backend, jobs):
    job = jobs.job(ALICE)
    await backend.inbox.append(job)
    first = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    await backend.inbox.append(PersistJob(job.message, (ALICE, BOB)))
    assert await backend.inbox.page(ALICE, 0, 10, ANY_SIZE) == first
    assert ids(await backend.inbox.page(BOB, 0, 10, ANY_SIZE)) == [job.message.msg_id]


@pytest_twisted.ensureDeferred
async def test_paging_through_equal_millisecond_messages(backend, jobs):
    # 25 messages share one server_time: paging must not depend on time at all.
    appended = [jobs.job(ALICE, BOB) for _ in range(25)]
    assert len({j.message.server_time for j in appended}) == 1
    for job in appended:
        await backend.inbox.append(job)

    pages = await pull_all(backend.inbox, ALICE, limit=10)
    assert [len(p.records) for p in pages] == [10, 10, 5]
    assert [p.has_more for p in pages] == [True, True, False]
    seen = [mid for p in pages for mid in ids(p)]
    assert seen == [j.message.msg_id for j in appended]  # no gap, no repeat, in order
    all_cursors = [c for p in pages for c in cursors(p)]
    assert all_cursors == sorted(set(all_cursors))
    assert not any(p.gap for p in pages)


@pytest_twisted.ensureDeferred
async def test_has_more_is_exact_at_the_boundary(backend, jobs):
    for _ in range(10):
        await backend.inbox.append(jobs.job(ALICE))
    exactly = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert len(exactly.records) == 10 and not exactly.has_more
    short = await backend.inbox.page(ALICE, 0, 9, ANY_SIZE)
    assert len(short.records) == 9 and short.has_more
    last = await backend.inbox.page(ALICE, cursors(short)[-1], 9, ANY_SIZE)
    assert ids(last) == ids(exactly)[9:] and not last.has_more
    after = await backend.inbox.page(ALICE, cursors(exactly)[-1], 9, ANY_SIZE)
    assert after == InboxRecords((), (), cursors(exactly)[-1], False, False)


@pytest_twisted.ensureDeferred
async def test_start_beyond_the_head_is_clamped(backend, jobs):
    for _ in range(3):
        await backend.inbox.append(jobs.job(ALICE))
    head = cursors(await backend.inbox.page(ALICE, 0, 10, ANY_SIZE))[-1]
    for start in (head + 1, head + 1000, 2**63, U64_MAX):
        page = await backend.inbox.page(ALICE, start, 10, ANY_SIZE)
        assert page == InboxRecords((), (), head, False, False)
    # Following the clamped start, the next message is not missed.
    new = jobs.job(ALICE)
    await backend.inbox.append(new)
    page = await backend.inbox.page(ALICE, head, 10, ANY_SIZE)
    assert ids(page) == [new.message.msg_id]
    # An inbox that never had entries clamps to 0.
    assert (await backend.inbox.page(CAROL, 12345, 10, ANY_SIZE)).start == 0


@pytest_twisted.ensureDeferred
async def test_expired_entries_are_not_served_and_the_gap_is_exact(backend, jobs):
    old = [jobs.job(ALICE) for _ in range(3)]
    for job in old:
        await backend.inbox.append(job)
    backend.advance(86_400_000)  # a day later
    recent = [jobs.job(ALICE) for _ in range(2)]
    for job in recent:
        await backend.inbox.append(job)
    everything = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    old_cursors = cursors(everything)[:3]

    backend.advance(backend.inbox_retention_ms - 86_400_000)  # `old` is exactly 7 days old
    still = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert ids(still) == ids(everything)  # still retained

    backend.advance(1)  # `old` is now past the retention
    for phase in ("before sweep", "after sweep", "after restart"):
        if phase == "after sweep":
            await backend.sweep()
        elif phase == "after restart":
            await backend.restart()
        page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
        assert ids(page) == [j.message.msg_id for j in recent], phase
        assert page.gap and not page.has_more, phase
        # Gap exactly when something after the start was removed.
        assert (await backend.inbox.page(ALICE, old_cursors[1], 10, ANY_SIZE)).gap, phase
        tail = await backend.inbox.page(ALICE, old_cursors[2], 10, ANY_SIZE)
        assert not tail.gap and ids(tail) == ids(page), phase
        # has_more counts only retained entries.
        first = await backend.inbox.page(ALICE, 0, 1, ANY_SIZE)
        assert ids(first) == [recent[0].message.msg_id] and first.has_more, phase

    # The cursor sequence continues above everything ever assigned.
    await backend.inbox.append(jobs.job(ALICE))
    assert cursors(await backend.inbox.page(ALICE, 0, 10, ANY_SIZE))[-1] > cursors(everything)[-1]


@pytest_twisted.ensureDeferred
async def test_retention_counts_from_when_the_entry_was_stored(backend, jobs):
    # A message accepted long ago but stored now (e.g. a delayed job) is kept 7 days.
    job = jobs.job(ALICE, server_time=backend.clock.now - 30 * 86_400_000)
    await backend.inbox.append(job)
    backend.advance(backend.inbox_retention_ms - 1)
    assert ids(await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)) == [job.message.msg_id]


@pytest_twisted.ensureDeferred
async def test_sweep_keeps_shared_messages_other_inboxes_still_use(backend, jobs):
    early = jobs.job(ALICE, BOB)
    await backend.inbox.append(early)
    backend.advance(backend.inbox_retention_ms + 1)
    # Redelivery after expiry of the same message to another user (stored later).
    await backend.inbox.append(PersistJob(early.message, (CAROL,)))
    await backend.sweep()
    assert ids(await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)) == []
    page = await backend.inbox.page(CAROL, 0, 10, ANY_SIZE)
    assert messages(page) == [early.message]


@pytest_twisted.ensureDeferred
async def test_positions_take_the_max_and_clamp_to_the_head(backend, jobs):
    inbox = backend.inbox
    assert await inbox.position(ALICE, "phone") == 0
    assert await inbox.advance(ALICE, "phone", 5) == 0  # no entries: head is 0
    for _ in range(4):
        await inbox.append(jobs.job(ALICE))
    head = cursors(await inbox.page(ALICE, 0, 10, ANY_SIZE))[-1]
    mid = cursors(await inbox.page(ALICE, 0, 10, ANY_SIZE))[1]

    assert await inbox.advance(ALICE, "phone", mid) == mid
    assert await inbox.advance(ALICE, "phone", mid - 1) == mid  # never moves back
    assert await inbox.position(ALICE, "phone") == mid
    assert await inbox.position(ALICE, "laptop") == 0  # per device
    assert await inbox.position(BOB, "phone") == 0  # per user
    assert await inbox.advance(ALICE, "phone", U64_MAX) == head  # clamped
    assert await inbox.advance(ALICE, "laptop", head + 100) == head
    await backend.restart()
    assert await backend.inbox.position(ALICE, "phone") == head  # durable


@pytest_twisted.ensureDeferred
async def test_large_fan_out(backend, jobs):
    members = tuple(range(10, 10_010))  # a full 10000-member group
    first, second = jobs.job(*members), jobs.job(*members)
    await backend.inbox.append(first)
    await backend.inbox.append(second)
    await backend.inbox.append(first)  # redelivered
    for user in (10, 5000, 10_009):
        page = await backend.inbox.page(user, 0, 10, ANY_SIZE)
        assert ids(page) == [first.message.msg_id, second.message.msg_id]


@pytest_twisted.ensureDeferred
async def test_append_many_keeps_batch_order_and_is_idempotent(backend, jobs):
    first = [jobs.job(ALICE, BOB), jobs.job(BOB, CAROL), jobs.job(ALICE, ALICE, CAROL)]
    await backend.inbox.append(first[0])  # already there: the batch is a partial redelivery
    second = [jobs.job(ALICE), jobs.job(CAROL, BIG)]
    await backend.inbox.append_many(first + second)
    await backend.inbox.append_many(first + second)  # a whole redelivered batch
    for user in (ALICE, BOB, CAROL, BIG):
        page = await backend.inbox.page(user, 0, 100, ANY_SIZE)
        expected = [j.message for j in first + second if user in j.inbox_users]
        assert messages(page) == expected  # once each, in batch order
        cs = cursors(page)
        assert cs == list(range(cs[0], cs[0] + len(cs)))  # consecutive: no cursor burnt
    await backend.inbox.append_many([])  # an empty batch is a no-op
    assert len((await backend.inbox.page(ALICE, 0, 100, ANY_SIZE)).records) == 3


@pytest_twisted.ensureDeferred
async def test_a_job_twice_in_one_batch_is_written_once(backend, jobs):
    """Two copies of one message can be queued (a re-published claim) and land in one batch."""
    j, other = jobs.job(ALICE, BOB), jobs.job(ALICE)
    await backend.inbox.append_many([j, j, other, j])
    page = await backend.inbox.page(ALICE, 0, 100, ANY_SIZE)
    assert ids(page) == [j.message.msg_id, other.message.msg_id]
    assert cursors(page) == [cursors(page)[0], cursors(page)[0] + 1]
    assert ids(await backend.inbox.page(BOB, 0, 100, ANY_SIZE)) == [j.message.msg_id]


@pytest_twisted.ensureDeferred
async def test_entries_stored_in_an_older_format_read_back(backend, jobs):
    # Entries an older server wrote (storage format 1) next to new ones (format 2): one page,
    # in cursor order, every record whole.
    old, new = jobs.job(ALICE, BOB, msg_id=11), jobs.job(ALICE, BOB, msg_id=12)
    await backend.inbox.append(format_one(old))
    await backend.inbox.append(new)
    page = await backend.inbox.page(BOB, 0, 10, ANY_SIZE)
    assert messages(page) == [old.message, new.message]
    assert list(page.records) == [old.record, new.record]


# --------------------------------------------------------------- byte budget and caps


def record_size(job: PersistJob) -> int:
    return len(job.record)


@pytest_twisted.ensureDeferred
async def test_a_page_holds_the_records_that_fit_its_byte_budget(backend, jobs):
    appended = [jobs.job(ALICE, body=bytes([i]) * (1000 + 500 * i)) for i in range(5)]
    for job in appended:
        await backend.inbox.append(job)
    sizes = [record_size(j) for j in appended]
    every = [j.message.msg_id for j in appended]
    for budget, n in [
        (sizes[0] + sizes[1], 2),  # exactly two
        (sizes[0] + sizes[1] - 1, 1),
        (1, 1),  # at least one, even larger than the budget
        (sum(sizes), 5),
    ]:
        page = await backend.inbox.page(ALICE, 0, 10, budget)
        assert ids(page) == every[:n], budget
        assert page.has_more == (n < 5), budget
        assert list(page.records) == [j.record for j in appended[:n]]
    # The limit still applies, and the loop on a tight budget visits each entry once.
    assert ids(await backend.inbox.page(ALICE, 0, 2, sum(sizes))) == every[:2]
    pages = []
    cursor = 0
    while True:
        page = await backend.inbox.page(ALICE, cursor, 10, max(sizes) + 1)
        pages.append(page)
        cursor = page.cursors[-1]
        if not page.has_more:
            break
    assert [mid for p in pages for mid in ids(p)] == every
    assert [len(p.records) for p in pages] == [2, 1, 1, 1]  # sizes 1061..3061 against 3062


@pytest_twisted.ensureDeferred
async def test_the_byte_budget_counts_records_of_an_older_storage_format_exactly(backend, jobs):
    old = [format_one(jobs.job(ALICE, body=b"x" * 2000)) for _ in range(2)]
    for job in old:
        await backend.inbox.append(job)
    size = record_size(old[0])
    assert ids(await backend.inbox.page(ALICE, 0, 10, 2 * size)) == [j.message.msg_id for j in old]
    assert len((await backend.inbox.page(ALICE, 0, 10, 2 * size - 1)).records) == 1


@pytest_twisted.ensureDeferred
async def test_the_entry_cap_trims_the_oldest_like_retention(backend, jobs):
    backend.inbox.caps = InboxCaps(max_entries=5)
    appended = [jobs.job(ALICE, BOB) for _ in range(8)]
    await backend.inbox.append_many(appended[:3])
    for job in appended[3:]:
        await backend.inbox.append(job)
    page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert ids(page) == [j.message.msg_id for j in appended[3:]]
    assert page.gap and not page.has_more
    first = cursors(page)[0]
    assert first == cursors(page)[-1] - 4  # cursors go on: nothing is renumbered
    # gap exactly when a removed cursor is above the start; paging stays exact.
    assert (await backend.inbox.page(ALICE, first - 2, 10, ANY_SIZE)).gap
    after = await backend.inbox.page(ALICE, first - 1, 2, ANY_SIZE)
    assert not after.gap and cursors(after) == [first, first + 1] and after.has_more
    assert len((await backend.inbox.page(BOB, 0, 10, ANY_SIZE)).records) == 5  # per user
    await backend.restart()
    assert ids(await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)) == ids(page)  # durable


@pytest_twisted.ensureDeferred
async def test_the_byte_cap_trims_the_oldest_like_retention(backend, jobs):
    cap = 131_072
    backend.inbox.caps = InboxCaps(max_bytes=cap)
    appended = [jobs.job(ALICE, body=bytes([i]) * 30_000) for i in range(6)]
    for job in appended:
        await backend.inbox.append(job)
        page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
        assert sum(map(len, page.records)) <= cap
    kept = cap // record_size(appended[0])  # 4 records of 30,061 bytes
    assert ids(page) == [j.message.msg_id for j in appended[-kept:]]
    assert page.gap and not page.has_more
    assert not (await backend.inbox.page(ALICE, cursors(page)[0] - 1, 10, ANY_SIZE)).gap
    # A larger entry pushes out as many old ones as it needs.
    big = jobs.job(ALICE, body=b"B" * 65_535)
    await backend.inbox.append(big)
    page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert ids(page) == [j.message.msg_id for j in appended[-2:]] + [big.message.msg_id]
    # Trimmed entries never come back, also after a sweep and a restart.
    await backend.sweep()
    await backend.restart()
    assert ids(await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)) == ids(page)


@pytest_twisted.ensureDeferred
async def test_a_batch_beyond_the_caps_keeps_what_appending_one_by_one_keeps(backend, jobs):
    """The caps apply to a batch as to its jobs appended one after the other: the oldest
    entries go, until the inbox is within both caps."""
    backend.inbox.caps = InboxCaps(max_bytes=131_072)
    appended = [jobs.job(ALICE, body=bytes([i]) * 30_000) for i in range(6)]
    big = jobs.job(ALICE, body=b"B" * 65_535)
    await backend.inbox.append_many([*appended, big])
    page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert ids(page) == [j.message.msg_id for j in appended[-2:]] + [big.message.msg_id]
    assert page.gap and cursors(page) == [5, 6, 7]
    backend.inbox.caps = InboxCaps(max_entries=5)
    more = [jobs.job(BOB, ALICE) for _ in range(8)]
    await backend.inbox.append_many(more)
    page = await backend.inbox.page(BOB, 0, 10, ANY_SIZE)
    assert ids(page) == [j.message.msg_id for j in more[3:]] and cursors(page)[0] == 4


@pytest_twisted.ensureDeferred
async def test_a_lowered_cap_applies_at_the_next_page(backend, jobs):
    appended = [jobs.job(ALICE) for _ in range(6)]
    await backend.inbox.append_many(appended)
    backend.inbox.caps = InboxCaps(max_entries=2)
    page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert ids(page) == [j.message.msg_id for j in appended[-2:]] and page.gap


@pytest_twisted.ensureDeferred
async def test_positions_are_kept_for_the_most_recently_advanced_devices(backend, jobs):
    inbox = backend.inbox
    for _ in range(3):
        await inbox.append(jobs.job(ALICE))
    devices = [f"device-{i}" for i in range(66)]
    for i, device in enumerate(devices):
        await inbox.advance(ALICE, device, 1 + i % 3)
        if i == 10:
            await inbox.advance(ALICE, devices[0], 3)  # used again: now among the latest
    kept = {d for d in devices if await inbox.position(ALICE, d)}
    # 64 kept: device-0 (re-advanced) and the 63 latest; device-1 and device-2 were dropped.
    assert kept == {devices[0], *devices[3:]}
    assert await inbox.position(ALICE, devices[1]) == 0  # RESUME reads from the oldest entry
    assert await inbox.position(ALICE, devices[0]) == 3
    assert await inbox.advance(ALICE, devices[1], 2) == 2  # a dropped device starts again
    assert await inbox.position(BOB, devices[0]) == 0


# ------------------------------------------------------------------- ids without records


@pytest_twisted.ensureDeferred
async def test_ids_are_what_a_page_would_return(backend, jobs):
    appended = [jobs.job(ALICE, BOB, body=b"x" * 5000) for _ in range(7)]
    await backend.inbox.append_many(appended)
    page = await backend.inbox.page(ALICE, 0, 100, ANY_SIZE)
    every = await backend.inbox.ids(ALICE, 0, 100)
    assert every == InboxIds(0, page.cursors, tuple(ids(page)), False, False)
    first = page.cursors[0]
    for start, limit in [(0, 3), (first, 3), (first + 3, 100), (first + 6, 1), (first + 4, 3)]:
        got = await backend.inbox.ids(ALICE, start, limit)
        expected = await backend.inbox.page(ALICE, start, limit, ANY_SIZE)
        assert (got.cursors, got.msg_ids) == (expected.cursors, tuple(ids(expected)))
        assert (got.start, got.has_more, got.gap) == (start, expected.has_more, False)
    # No byte budget: `limit` entries, however large their records.
    assert len((await backend.inbox.ids(ALICE, 0, 5)).cursors) == 5
    assert await backend.inbox.ids(ALICE, 0, 0) == InboxIds(0, (), (), True, False)
    assert await backend.inbox.ids(CAROL, 0, 10) == InboxIds(0, (), (), False, False)


@pytest_twisted.ensureDeferred
async def test_ids_clamp_the_start_to_the_head(backend, jobs):
    await backend.inbox.append_many([jobs.job(BIG) for _ in range(3)])
    head = (await backend.inbox.ids(BIG, 0, 10)).cursors[-1]
    for start in (head, head + 1, 2**63, U64_MAX):
        assert await backend.inbox.ids(BIG, start, 10) == InboxIds(head, (), (), False, False)
    assert (await backend.inbox.ids(CAROL, U64_MAX, 10)).start == 0


@pytest_twisted.ensureDeferred
async def test_ids_report_a_gap_and_remove_nothing(backend, jobs):
    old = [jobs.job(ALICE) for _ in range(3)]
    await backend.inbox.append_many(old)
    backend.advance(86_400_000)
    recent = [jobs.job(ALICE) for _ in range(2)]
    await backend.inbox.append_many(recent)
    cs = (await backend.inbox.ids(ALICE, 0, 10)).cursors
    backend.advance(backend.inbox_retention_ms - 86_400_000 + 1)  # `old` has expired
    for _ in range(2):  # reading twice: the first read removed nothing the second needs
        got = await backend.inbox.ids(ALICE, 0, 10)
        assert got.msg_ids == tuple(j.message.msg_id for j in recent) and got.gap
        assert got.cursors == cs[3:] and not got.has_more
        assert (await backend.inbox.ids(ALICE, cs[1], 10)).gap
        assert not (await backend.inbox.ids(ALICE, cs[2], 10)).gap
        assert (await backend.inbox.ids(ALICE, 0, 1)).has_more
    page = await backend.inbox.page(ALICE, 0, 10, ANY_SIZE)
    assert page.gap and tuple(ids(page)) == got.msg_ids
    # After the page (or a sweep) trimmed them, the ids say the same.
    await backend.sweep()
    assert await backend.inbox.ids(ALICE, 0, 10) == got
    # An entry cap lowered since the last append: what a page would keep, without trimming.
    backend.inbox.caps = InboxCaps(max_entries=1)
    capped = await backend.inbox.ids(ALICE, 0, 10)
    assert capped.cursors == cs[4:] and capped.gap
