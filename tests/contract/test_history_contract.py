"""HistoryStore contract: newest-first paging by msg_id, bounds, idempotency, retention."""

from __future__ import annotations

import random

import pytest_twisted

from improto.enums import ConvKind
from improto.limits import U64_MAX
from improto_server.model import ConvKey, HistoryRecords, PersistJob
from tests.contract.pages import ANY_SIZE, format_one, ids, messages

PORT = "history"
DM = ConvKey.direct(1, 2)


async def fill(backend, jobs, key: ConvKey, msg_ids) -> list:
    out = []
    for mid in msg_ids:
        job = jobs.job(msg_id=mid)
        await backend.history.append(key, job)
        out.append(job)
    return out


@pytest_twisted.ensureDeferred
async def test_empty_conversation(backend):
    assert await backend.history.page(DM, 0, 20, 0, ANY_SIZE) == HistoryRecords((), False)


@pytest_twisted.ensureDeferred
async def test_pages_newest_first_with_before_id(backend, jobs):
    appended = await fill(backend, jobs, DM, range(101, 126))  # 25 messages, one millisecond
    first = await backend.history.page(DM, 0, 10, 0, ANY_SIZE)
    assert ids(first) == list(range(125, 115, -1)) and first.has_more
    assert messages(first) == [j.message for j in reversed(appended[15:])]  # whole records
    second = await backend.history.page(DM, ids(first)[-1], 10, 0, ANY_SIZE)
    assert ids(second) == list(range(115, 105, -1)) and second.has_more
    third = await backend.history.page(DM, ids(second)[-1], 10, 0, ANY_SIZE)
    assert ids(third) == list(range(105, 100, -1)) and not third.has_more
    assert await backend.history.page(DM, 101, 10, 0, ANY_SIZE) == HistoryRecords((), False)


@pytest_twisted.ensureDeferred
async def test_has_more_is_exact_at_the_boundary(backend, jobs):
    await fill(backend, jobs, DM, range(1, 11))
    exactly = await backend.history.page(DM, 0, 10, 0, ANY_SIZE)
    assert len(exactly.records) == 10 and not exactly.has_more
    short = await backend.history.page(DM, 0, 9, 0, ANY_SIZE)
    assert ids(short) == list(range(10, 1, -1)) and short.has_more
    bounded = await backend.history.page(DM, 6, 5, 0, ANY_SIZE)  # exactly 1..5 remain below 6
    assert ids(bounded) == [5, 4, 3, 2, 1] and not bounded.has_more


@pytest_twisted.ensureDeferred
async def test_min_id_is_an_inclusive_lower_bound(backend, jobs):
    await fill(backend, jobs, DM, range(1, 21))
    page = await backend.history.page(DM, 0, 100, 15, ANY_SIZE)
    assert ids(page) == [20, 19, 18, 17, 16, 15] and not page.has_more
    page = await backend.history.page(DM, 18, 2, 15, ANY_SIZE)
    assert ids(page) == [17, 16] and page.has_more  # 15 is still in range
    page = await backend.history.page(DM, 16, 2, 15, ANY_SIZE)
    assert ids(page) == [15] and not page.has_more  # 14 and below are not
    assert await backend.history.page(DM, 10, 5, 15, ANY_SIZE) == HistoryRecords((), False)


@pytest_twisted.ensureDeferred
async def test_conversations_are_separate(backend, jobs):
    await fill(backend, jobs, DM, [1, 4])
    await fill(backend, jobs, ConvKey.direct(1, 3), [2])
    await fill(backend, jobs, ConvKey.group(1), [3])
    await fill(backend, jobs, ConvKey.group(2), [5])
    assert ids(await backend.history.page(ConvKey.direct(2, 1), 0, 10, 0, ANY_SIZE)) == [4, 1]
    assert ids(await backend.history.page(ConvKey.direct(3, 1), 0, 10, 0, ANY_SIZE)) == [2]
    assert ids(await backend.history.page(ConvKey.group(1), 0, 10, 0, ANY_SIZE)) == [3]
    # A group and a user with the same number are different conversations.
    assert ids(await backend.history.page(ConvKey(ConvKind.USER, 1, 1), 0, 10, 0, ANY_SIZE)) == []


@pytest_twisted.ensureDeferred
async def test_append_is_idempotent(backend, jobs):
    job = jobs.job(msg_id=7)
    for _ in range(3):
        await backend.history.append(DM, job)
    page = await backend.history.page(DM, 0, 10, 0, ANY_SIZE)
    assert messages(page) == [job.message] and not page.has_more


@pytest_twisted.ensureDeferred
async def test_ids_near_the_top_of_u64_order_as_unsigned(backend, jobs):
    top = [1, 2**62, 2**63 - 1, 2**63, 2**63 + 1, U64_MAX - 1, U64_MAX]
    shuffled = list(top)
    random.Random(4).shuffle(shuffled)
    appended = {j.message.msg_id: j.message for j in await fill(backend, jobs, DM, shuffled)}
    newest_first = sorted(top, reverse=True)

    page = await backend.history.page(DM, 0, 100, 0, ANY_SIZE)
    assert ids(page) == newest_first
    assert messages(page) == [appended[i] for i in newest_first]
    top = await backend.history.page(DM, U64_MAX, 3, 0, ANY_SIZE)
    assert ids(top) == [U64_MAX - 1, 2**63 + 1, 2**63]
    assert ids(await backend.history.page(DM, 2**63, 10, 0, ANY_SIZE)) == [2**63 - 1, 2**62, 1]
    assert ids(await backend.history.page(DM, 0, 10, 2**63, ANY_SIZE)) == newest_first[:4]
    assert ids(await backend.history.page(DM, 0, 10, U64_MAX, ANY_SIZE)) == [U64_MAX]
    high = await backend.history.page(DM, 0, 2, 0, ANY_SIZE)
    assert ids(high) == [U64_MAX, U64_MAX - 1] and high.has_more


@pytest_twisted.ensureDeferred
async def test_records_keep_every_field(backend, jobs):
    msg = jobs.message(
        msg_id=U64_MAX,
        sender=U64_MAX - 5,
        conv_kind=ConvKind.GROUP,
        conv_id=2**63 + 9,
        body="héllo \u2603".encode(),
        server_time=2**63 + 123,
        client_msg_id=bytes(range(16)),
    )
    key = ConvKey.of_message(msg)
    await backend.history.append(key, PersistJob(msg, ()))
    page = await backend.history.page(key, 0, 10, 0, ANY_SIZE)
    assert messages(page) == [msg]


@pytest_twisted.ensureDeferred
async def test_messages_older_than_the_retention_are_not_served(backend, jobs):
    await fill(backend, jobs, DM, [1, 2, 3])
    backend.advance(86_400_000)
    await fill(backend, jobs, DM, [4, 5])
    backend.advance(backend.history_retention_ms - 86_400_000)  # `old` is exactly 180 days old
    assert ids(await backend.history.page(DM, 0, 10, 0, ANY_SIZE)) == [5, 4, 3, 2, 1]

    backend.advance(1)
    for phase in ("before sweep", "after sweep"):
        if phase == "after sweep":
            await backend.sweep()
        page = await backend.history.page(DM, 0, 10, 0, ANY_SIZE)
        assert ids(page) == [5, 4] and not page.has_more, phase
        short = await backend.history.page(DM, 0, 1, 0, ANY_SIZE)
        assert ids(short) == [5] and short.has_more, phase
        below = await backend.history.page(DM, 4, 10, 0, ANY_SIZE)
        assert below == HistoryRecords((), False), phase


@pytest_twisted.ensureDeferred
async def test_history_survives_a_restart(backend, jobs):
    await fill(backend, jobs, DM, [10, 20])
    await backend.restart()
    assert ids(await backend.history.page(DM, 0, 10, 0, ANY_SIZE)) == [20, 10]


@pytest_twisted.ensureDeferred
async def test_append_many_stores_each_once_across_conversations(backend, jobs):
    group = ConvKey.group(9)
    batch = []
    for i in range(40):
        key = DM if i % 3 else group
        batch.append((key, jobs.job(msg_id=1000 + i)))
        if i % 7 == 0:
            backend.advance(1)  # several server_times in one batch
    await backend.history.append(DM, batch[1][1])  # one was written before: a redelivery
    await backend.history.append_many(batch)
    await backend.history.append_many(batch[5:])  # redelivered again, partly
    for key in (DM, group):
        page = await backend.history.page(key, 0, 100, 0, ANY_SIZE)
        expected = [j.message for k, j in batch if k == key][::-1]
        assert messages(page) == expected and not page.has_more


@pytest_twisted.ensureDeferred
async def test_messages_stored_in_an_older_format_read_back(backend, jobs):
    # Cells an older server wrote (storage format 1) next to new ones (format 2).
    old, new = jobs.job(msg_id=21), jobs.job(msg_id=22)
    await backend.history.append(DM, format_one(old))
    await backend.history.append_many([(DM, new)])
    page = await backend.history.page(DM, 0, 20, 0, ANY_SIZE)
    assert messages(page) == [new.message, old.message]
    assert list(page.records) == [new.record, old.record]


@pytest_twisted.ensureDeferred
async def test_a_page_holds_the_records_that_fit_its_byte_budget(backend, jobs):
    appended = []
    for i in range(5):
        job = jobs.job(msg_id=10 + i, body=bytes([i]) * (1000 + 500 * i))
        await backend.history.append(DM, job)
        appended.append(job)
    newest = appended[::-1]
    sizes = [len(j.record) for j in newest]
    for budget, n in [
        (sizes[0] + sizes[1], 2),
        (sizes[0] + sizes[1] - 1, 1),
        (1, 1),  # at least one, even larger than the budget
        (sum(sizes), 5),
    ]:
        page = await backend.history.page(DM, 0, 10, 0, budget)
        assert list(page.records) == [j.record for j in newest[:n]], budget
        assert page.has_more == (n < 5), budget
    assert ids(await backend.history.page(DM, 0, 2, 0, sum(sizes))) == [14, 13]
    bounded = await backend.history.page(DM, 13, 10, 11, sizes[2] + sizes[3])  # 12 and 11
    assert ids(bounded) == [12, 11] and not bounded.has_more
    # Records of an older storage format count their exact size too.
    old = [format_one(jobs.job(msg_id=20 + i, body=b"x" * 2000)) for i in range(2)]
    for job in old:
        await backend.history.append(DM, job)
    both = 2 * len(old[0].record)
    assert ids(await backend.history.page(DM, 0, 10, 0, both)) == [21, 20]
    assert ids(await backend.history.page(DM, 0, 10, 0, both - 1)) == [21]
