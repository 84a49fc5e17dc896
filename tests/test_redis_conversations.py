"""The Redis conversation lists beyond the contract suite: hash tags, key expiry, versions
after the keys expired, Redis Cluster slots, bounded trimming, and a differential run against
the embedded SQLite store.

Needs Redis (tests/support/services.py: skipped if absent, failing under CI). Each test uses
its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto.limits import U64_MAX
from improto.records import conv_size, push_frame
from improto_server.embedded.backend import SQLiteBackend
from improto_server.model import ConvRows, PersistJob, StateJob
from improto_server.production import redis_conversations, redis_inbox
from improto_server.production.redis_connection import connect, gather
from improto_server.production.redis_conversations import NAMES, RedisConversations
from improto_server.production.redis_inbox import RedisInbox, behind_key
from improto_server.production.redis_slots import SLOTS, key_slot, slot_tag
from tests.contract.pages import ANY_SIZE
from tests.support import services
from tests.support.clock import (
    DAY_MS,
    HISTORY_RETENTION_MS,
    INBOX_RETENTION_MS,
    START_MS,
    FakeClock,
)
from tests.support.services import needs

RETENTION_MS = HISTORY_RETENTION_MS
USER, GROUP = ConvKind.USER, ConvKind.GROUP


@dataclass
class Env:
    redis: Any
    prefix: str
    clock: FakeClock
    convs: RedisConversations

    def keys(self) -> list[bytes]:
        return sorted(services.redis_keys(self.prefix))

    def command(self, *args: Any) -> Deferred[Any]:
        return self.redis.execute_command(*args)


@pytest.fixture
@needs("redis")
def env() -> Iterator[Env]:
    prefix = f"improto-test-convs:{uuid.uuid4().hex}"
    redis = connect(services.REDIS.host, services.REDIS.port)
    clock = FakeClock()
    convs = RedisConversations(redis, prefix, clock, RETENTION_MS)
    pytest_twisted.blockon(convs.start())
    try:
        yield Env(redis, prefix, clock, convs)
    finally:
        pytest_twisted.blockon(redis.disconnect())
        services.delete_redis_prefix(prefix)


@pytest.fixture
def sqlite(env: Env, tmp_path: Path) -> Iterator[SQLiteBackend]:
    """An embedded backend on the same fake clock, for differential runs."""
    backend = SQLiteBackend(
        tmp_path / "ref.sqlite3", now_ms=env.clock, history_retention_ms=RETENTION_MS
    )
    pytest_twisted.blockon(backend.start())
    try:
        yield backend
    finally:
        pytest_twisted.blockon(backend.close())


_ids = iter(range(1_000_000, 10**9))


def message(sender: int, kind: int, conv: int, msg_id: int | None = None) -> Message:
    mid = next(_ids) if msg_id is None else msg_id
    return Message(
        msg_id=mid,
        server_time=START_MS,
        sender_id=sender,
        sender_device="phone-1",
        conv_kind=kind,
        conv_id=conv,
        content_type=ContentType.TEXT,
        client_msg_id=mid.to_bytes(16, "big"),
        body=b"hello",
    )


def direct(sender: int, peer: int, msg_id: int | None = None) -> PersistJob:
    return PersistJob(message(sender, USER, peer, msg_id), tuple(dict.fromkeys((sender, peer))))


def group(sender: int, gid: int, members: tuple[int, ...]) -> PersistJob:
    return PersistJob(message(sender, GROUP, gid), members)


def mark(user: int, kind: int, conv: int, msg_id: int) -> StateJob:
    return StateJob(StateJob.MARK, user, kind, conv, msg_id)


async def every_row(convs: Any, user: int) -> ConvRows:
    return await convs.changes(user, 0, 1000, ANY_SIZE)


def _tag(key: bytes) -> bytes:
    start = key.index(b"{")
    return key[start + 1 : key.index(b"}", start)]


# --------------------------------------------------------------------------- keys


@pytest_twisted.ensureDeferred
async def test_keys_of_one_user_share_one_hash_tag(env):
    users = (7, 2**63, U64_MAX)
    await env.convs.record([direct(7, 2**63), direct(U64_MAX, 7), group(7, U64_MAX, users)])
    await env.convs.apply([mark(2**63, USER, 7, U64_MAX), mark(U64_MAX, GROUP, U64_MAX, 1)])
    await env.convs.by_activity(7, 0, 10, ANY_SIZE)

    by_tag: dict[bytes, set[bytes]] = {}
    for key in env.keys():
        assert key.startswith(env.prefix.encode() + b":conv:")
        by_tag.setdefault(_tag(key), set()).add(key)
    assert set(by_tag) == {b"u%d" % u for u in users}
    for user in users:
        names = {k.decode().rsplit(":", 1)[1] for k in by_tag[b"u%d" % user]}
        assert names <= set(NAMES) and {"meta", "rows", "ver", "act", "age"} <= names
        assert {k.decode() for k in by_tag[b"u%d" % user]} <= set(env.convs.keys(user))
    for keys in by_tag.values():
        assert len({key_slot(k) for k in keys}) == 1  # one cluster slot per user


@pytest_twisted.ensureDeferred
async def test_every_key_but_the_version_counter_expires_together(env):
    jobs = [direct(1, 2), direct(2, 1)]  # user 1 gets a tracked unread id
    await env.convs.record(jobs)
    meta, *rest = env.convs.keys(1)
    assert await env.command("PTTL", meta) == -1  # versions must never go back
    ttl = RETENTION_MS + redis_conversations.DAY_MS
    ttls = [await env.command("PTTL", key) for key in rest]
    assert all(ttl - 60_000 < t <= ttl for t in ttls), ttls
    assert max(ttls) - min(ttls) < 1000  # one deadline (set by the same script)

    # A change that changes nothing (a redelivery) does not extend the lists' life.
    await env.command("PEXPIRE", rest[0], 500_000)
    await env.convs.record(jobs)
    assert await env.command("PTTL", rest[0]) <= 500_000


@pytest_twisted.ensureDeferred
async def test_tracked_ids_replaced_at_once_keep_their_key_and_its_ttl(env):
    """A batch bringing more unread ids than are tracked replaces every tracked one: the
    tracked-id key must never be emptied and made again (it would have no TTL)."""
    env.convs.max_tracked = 5
    await env.convs.record([group(1, 40, (1, 2)) for _ in range(3)])
    unr = env.convs.keys(2)[NAMES.index("unr")]
    await env.command("PEXPIRE", unr, 500_000)
    await env.convs.record([group(1, 40, (1, 2)) for _ in range(6)])
    assert await env.command("ZCARD", unr) == 5
    assert 0 < await env.command("PTTL", unr) <= 500_000  # the same key, its deadline kept
    assert (await every_row(env.convs, 2)).convs[0].unread == 9


@pytest_twisted.ensureDeferred
async def test_versions_continue_after_the_keys_expired(env):
    # Real-time TTL of 300 ms (no margin); the injected clock does not move, so only the
    # vanished keys tell the store that the rows went.
    convs = RedisConversations(env.redis, env.prefix, env.clock, 300, ttl_margin_ms=0)
    for job in (direct(2, 1), direct(3, 1), direct(2, 1)):
        await convs.record([job])
    before = await every_row(convs, 1)
    assert (before.version, before.total_unread) == (3, 3)
    _, rows, *_ = convs.keys(1)
    for _ in range(200):
        if not await env.command("EXISTS", rows):
            break
        await deferLater(reactor, 0.01, lambda: None)
    else:
        raise AssertionError("the row keys did not expire")

    gone = await convs.by_activity(1, 0, 10, ANY_SIZE)
    assert gone == ConvRows(3, False, 0, ())  # no rows, no unread, the version kept
    await convs.record([direct(4, 1)])
    after = await every_row(convs, 1)
    assert [(c.conv_id, c.version, c.unread) for c in after.convs] == [(4, 4, 1)]
    assert after.total_unread == 1
    assert (await convs.changes(1, 3, 10, ANY_SIZE)).convs == after.convs


# --------------------------------------------------------------------------- cluster


@pytest_twisted.ensureDeferred
async def test_cluster_mode_splits_batches_by_slot_with_the_same_result(env):
    """The same batches through cluster=True (one script per slot) and the default (one
    script for all) end in identical lists; each script call spans one slot, and a 1:1 mark
    changes the reader's and the peer's slots in separate calls."""
    calls: list[list[str]] = []
    clustered = RedisConversations(env.redis, env.prefix + ":c", env.clock, RETENTION_MS,
                                   cluster=True)  # fmt: skip
    original = clustered._change_call

    def spy(users, *rest):  # type: ignore[no-untyped-def]
        calls.append([k for u in users for k in clustered.keys(u)])
        return original(users, *rest)

    clustered._change_call = spy  # type: ignore[method-assign]
    members = tuple(range(300, 340))
    first = [group(300, 9, members), direct(1, 2), direct(2, 3), direct(301, 1)]
    second = [group(1, 9, (1, *members)), direct(7, 7)]
    reading = mark(2, USER, 1, first[1].message.msg_id)
    others = [mark(301, GROUP, 9, 10**8), StateJob(StateJob.HIDE, 3, USER, 2, 10**8)]
    marked: list[list[str]] = []
    for store in (env.convs, clustered):
        await store.record(first)
        await store.record(second)
        n = len(calls)
        await store.apply([reading])
        marked = calls[n:]
        await store.apply(others)
    for user in (1, 2, 3, 7, *members):
        assert await every_row(clustered, user) == await every_row(env.convs, user)
    [peer_row] = [c for c in (await every_row(env.convs, 1)).convs if c.conv_id == 2]
    assert peer_row.peer_read_id == first[1].message.msg_id
    assert len(calls) > 2 and all(len({key_slot(k) for k in keys}) == 1 for keys in calls)
    # The 1:1 mark: one call for the reader (2), one for the peer (1).
    assert sorted(keys[0] for keys in marked) == [clustered.keys(u)[0] for u in (1, 2)]


# --------------------------------------------------------------------------- retention


@pytest_twisted.ensureDeferred
async def test_expired_rows_are_removed_in_bounded_steps(env, monkeypatch):
    monkeypatch.setattr(redis_conversations, "READ_TRIM", 3)
    monkeypatch.setattr(redis_conversations, "CHANGE_TRIM", 1)
    await env.convs.record([direct(peer, 5) for peer in range(100, 110)])
    env.clock.advance(RETENTION_MS + 1)
    fresh = direct(109, 5)
    await env.convs.record([fresh])  # removes one expired row, and the one it changes
    _, rows, *_, age = env.convs.keys(5)
    assert await env.command("ZCARD", age) == 9  # one new, eight left expired

    page = await env.convs.by_activity(5, 0, 100, ANY_SIZE)  # three bounded calls, then the page
    [row] = page.convs
    got = (row.conv_id, row.last_id, row.unread, page.total_unread)
    assert got == (109, fresh.message.msg_id, 1, 1)
    assert row.version == 11  # versions go on; the old row's state is gone (unread 1, not 2)
    assert await env.command("HLEN", rows) == 1 and await env.command("ZCARD", age) == 1


@pytest_twisted.ensureDeferred
async def test_read_positions_ignore_expired_rows_and_remove_nothing(env):
    await env.convs.apply([mark(5, USER, 6, 123), mark(5, GROUP, 2**63, U64_MAX)])
    wanted = [(USER, 6), (GROUP, 2**63), (USER, 7)]
    assert await env.convs.read_positions(5, wanted) == {(USER, 6): 123, (GROUP, 2**63): U64_MAX}
    env.clock.advance(RETENTION_MS + 1)
    assert await env.convs.read_positions(5, wanted) == {}
    _, rows, *_ = env.convs.keys(5)
    assert await env.command("HLEN", rows) == 2  # reads only: the next list read trims


@pytest_twisted.ensureDeferred
async def test_a_batch_gives_each_changed_row_one_version(env):
    batch = [direct(2, 1), direct(2, 1), direct(1, 2), direct(3, 1)]
    await env.convs.record(batch)
    rows = await every_row(env.convs, 1)
    assert sorted(c.version for c in rows.convs) == [1, 2] and rows.version == 2
    await env.convs.record(batch)  # redelivered: no change, no version
    assert await every_row(env.convs, 1) == rows


# --------------------------------------------------------------------------- vs SQLite


@pytest_twisted.ensureDeferred
async def test_conversations_match_the_embedded_store(env, sqlite, monkeypatch):
    """A random run of messages (1:1, groups, notes to self, redeliveries, out of order),
    marks, hides, clock moves and reads of both orders on assorted budgets gives the same
    answers from Redis as from SQLite (a small tracked-unread bound, so it is exceeded)."""
    monkeypatch.setattr(redis_conversations, "CHANGE_TRIM", 2)
    env.convs.max_tracked = 5
    monkeypatch.setattr("improto_server.embedded.conversations.MAX_UNREAD_TRACKED", 5)
    monkeypatch.setattr("improto_server.embedded.conversations._MAX_TRACKED_BYTES", 8 * 5)
    rng = random.Random(20261213)
    users = (1, 2, 3, 2**63, U64_MAX)
    groups = {11: users[:3], 2**64 - 2: users}
    stores = (env.convs, sqlite.conversations)
    sent: list[PersistJob] = []
    used: set[int] = set()
    for step in range(500):
        op = rng.random()
        if op < 0.4 or not sent:
            # One job per call: which of a batch's rows gets which version is each store's own.
            if sent and rng.random() < 0.2:
                j = rng.choice(sent)  # a redelivery
            elif rng.random() < 0.6:
                mid = next(_ids)
                if rng.random() < 0.2 and mid - 3 not in used:
                    mid -= 3  # out of order
                j = direct(rng.choice(users), rng.choice(users), mid)
            else:
                gid = rng.choice(list(groups))
                j = group(rng.choice(groups[gid]), gid, groups[gid])
            used.add(j.message.msg_id)
            sent.append(j)
            for store in stores:
                await store.record([j])
        elif op < 0.6:
            j = rng.choice(sent).message
            user = rng.choice(
                (j.conv_kind == GROUP and groups[j.conv_id]) or (j.sender_id, j.conv_id)
            )
            kind, conv = (GROUP, j.conv_id) if j.conv_kind == GROUP else (
                USER, j.conv_id if j.sender_id == user else j.sender_id)  # fmt: skip
            msg = j.msg_id + rng.choice([-1, 0, 0, 3])
            state = StateJob(
                rng.choice([StateJob.MARK, StateJob.MARK, StateJob.HIDE]), user, kind, conv, msg
            )
            for store in stores:
                await store.apply([state])
        elif op < 0.65:
            env.clock.advance(rng.choice([1000, DAY_MS, RETENTION_MS // 3]))
            await sqlite.sweep()  # SQLite removes expired rows at its sweep, Redis at once
        else:
            user = rng.choice(users)
            limit = rng.choice([1, 2, 5, 100])
            budget = rng.choice([1, conv_size(None) * 3, 400, ANY_SIZE])
            if rng.random() < 0.5:
                before = rng.choice([0, 0, rng.choice(sent).message.msg_id])
                pages = [await s.by_activity(user, before, limit, budget) for s in stores]
            else:
                since = rng.randint(0, 40)
                pages = [await s.changes(user, since, limit, budget) for s in stores]
            assert pages[0] == pages[1], step
            convs = [(c.conv_kind, c.conv_id) for c in pages[0].convs] + [(USER, 999)]
            positions = [await s.read_positions(user, convs) for s in stores]
            assert positions[0] == positions[1], step
    for user in users:
        assert await every_row(env.convs, user) == await every_row(sqlite.conversations, user)


@pytest_twisted.ensureDeferred
async def test_batches_beyond_the_tracked_bound_match_the_embedded_store(env, sqlite, monkeypatch):
    """A row given many pending ids in one call (fewer than, as many as and more than the
    tracked bound, on top of 0-5 tracked already), then one read mark at each position in
    turn, gives the same rows from Redis as from SQLite: the same ids stay tracked."""
    env.convs.max_tracked = 5
    monkeypatch.setattr("improto_server.embedded.conversations.MAX_UNREAD_TRACKED", 5)
    monkeypatch.setattr("improto_server.embedded.conversations._MAX_TRACKED_BYTES", 8 * 5)
    members = (1, 2, 3)
    stores = (env.convs, sqlite.conversations)
    gid = 1000
    for before in (0, 3, 5):
        for run in (2, 5, 6, 12):
            for at in range(before + run):
                gid += 1
                sent: list[PersistJob] = []
                for size in (before, run):
                    batch = [group(1, gid, members) for _ in range(size)]
                    sent += batch
                    for store in stores:
                        await store.record(batch)
                for store in stores:
                    await store.apply([mark(3, GROUP, gid, sent[at].message.msg_id)])
    got = await every_row(env.convs, 3)
    assert got == await every_row(sqlite.conversations, 3)
    unread = {c.unread for c in got.convs}
    assert 0 in unread and max(unread) == 5 + 12  # a mark below every tracked id: counts stay


# --------------------------------------------------------------------------- folds


def inbox_of(env: Env, prefix: str | None = None, *, cluster: bool = False) -> RedisInbox:
    """An inbox under the lists' prefix (or `prefix`): where fold reads the entries (its
    scripts not loaded: the first call of each EVALs it)."""
    return RedisInbox(env.redis, prefix or env.prefix, env.clock, INBOX_RETENTION_MS,
                      cluster=cluster)  # fmt: skip


def mixed_jobs(users: tuple[int, ...], gid: int, n: int, seed: int) -> list[PersistJob]:
    """1:1 messages (notes to self too), group messages and a redelivery, in one batch."""
    rng = random.Random(seed)
    jobs: list[PersistJob] = []
    for _ in range(n):
        if rng.random() < 0.6:
            jobs.append(direct(rng.choice(users), rng.choice(users)))
        else:
            jobs.append(group(rng.choice(users), gid, users))
    jobs.append(jobs[n // 2])  # redelivered in the same batch
    return jobs


async def fold_of(redis: Any, key: str) -> bytes | None:
    return await redis.execute_command("HGET", key, "fold")


async def behind_set(env: Env, key: str | None = None) -> set[int]:
    key = key or behind_key(env.prefix, 0, False)
    return {int(u) for u in await env.command("SMEMBERS", key)}


@pytest_twisted.ensureDeferred
async def test_fold_makes_the_rows_record_makes(env, monkeypatch):
    """The same batches, recorded under one prefix and appended then folded under another,
    give identical lists (versions, unread, tracked-id bounds, last records) per user: 1:1
    messages, a small group, and a 30-member group whose messages come partly out of msg_id
    order. The fold's change calls are bounded by their messages (CHANGE_ENTRIES), though a
    fold sends one op per row."""
    monkeypatch.setattr(redis_conversations, "CHANGE_ENTRIES", 50)
    users = (1, 2, 3, 2**63, U64_MAX)
    members = (*users[:3], *range(100, 127))
    everyone = list(dict.fromkeys(users + members))
    recorded = RedisConversations(env.redis, env.prefix + ":r", env.clock, RETENTION_MS,
                                  max_tracked=5)  # fmt: skip
    env.convs.max_tracked = 5
    calls: list[list[int]] = []  # each fold change call: its users' messages
    original = env.convs._change_call

    def spy(call_users: list[int], entries: dict[int, Any], *rest: Any) -> Any:
        if rest[-1] is not None:  # a fold's compare-and-set: a fold's call
            calls.append([sum(len(v.tokens) // 17 for _, _, v in entries[u]) for u in call_users])
        return original(call_users, entries, *rest)

    env.convs._change_call = spy  # type: ignore[method-assign]
    inbox = inbox_of(env)
    for seed in (1, 2):
        rng = random.Random(seed)
        batch = mixed_jobs(users, 2**64 - 2, 40, seed)
        for i in range(40):
            old = 500_000 + 100 * seed + i if i % 4 == 0 else None  # older than the rest
            batch.append(PersistJob(message(rng.choice(members), GROUP, 77, old), members))
        await recorded.record(batch)
        await inbox.append_many(batch)
        assert await env.convs.fold(everyone) == []
        reading = [mark(2, USER, 1, batch[3].message.msg_id), mark(3, GROUP, 2**64 - 2, 1),
                   mark(100, GROUP, 77, batch[-5].message.msg_id)]  # fmt: skip
        if seed == 1:  # 101 sees its row again on the next batch, 102 does not
            hide = StateJob.HIDE
            reading += [StateJob(hide, 101, GROUP, 77, batch[-1].message.msg_id),
                        StateJob(hide, 102, GROUP, 77, 10**12)]  # fmt: skip
        for store in (recorded, env.convs):
            await store.apply(reading)
        env.clock.advance(1000)
    for user in everyone:
        got = await every_row(env.convs, user)
        assert got == await every_row(recorded, user) and got.convs, user
        assert got.total_unread == sum(c.unread for c in got.convs if not c.hidden)
    rows = {u: (await every_row(env.convs, u)).convs for u in (101, 102)}
    assert [(c.conv_id, c.hidden) for c in rows[101] + rows[102]] == [(77, False), (77, True)]
    assert len(calls) > 2 and any(len(c) > 1 for c in calls)
    assert all(sum(c) <= 50 or len(c) == 1 for c in calls)  # a user's messages in one call


@pytest_twisted.ensureDeferred
async def test_fold_again_changes_nothing(env):
    inbox = inbox_of(env)
    await inbox.append_many([direct(1, 2), direct(2, 1), group(3, 9, (1, 2, 3))])
    assert await env.convs.fold([1, 2, 3]) == []
    before = [await every_row(env.convs, u) for u in (1, 2, 3)]
    meta = env.convs.keys(1)[0]
    assert await fold_of(env.redis, meta) == b"3"  # the inbox's seq
    assert await env.convs.fold([1, 2, 3, 1]) == []
    assert [await every_row(env.convs, u) for u in (1, 2, 3)] == before
    assert await fold_of(env.redis, meta) == b"3"


@pytest_twisted.ensureDeferred
async def test_a_legacy_inbox_entry_is_folded_in_the_current_format(env):
    inbox = inbox_of(env)
    j = direct(5, 6)
    await inbox.append(j)
    *_, rec, _, _ = inbox.keys(6)
    legacy = push_frame(j.record)[4:]  # a version-1 PUSH payload (format 1)
    await env.command("HSET", rec, str(j.message.msg_id), legacy)
    assert await env.convs.fold([6]) == []
    [row] = (await every_row(env.convs, 6)).convs
    assert (row.conv_id, row.unread, row.last) == (5, 1, j.record)
    _, _, last, *_ = env.convs.keys(6)
    assert await env.command("HGET", last, redis_conversations._field(USER, 5)) == j.stored_record


@pytest_twisted.ensureDeferred
async def test_legacy_and_current_entries_fold_as_record_makes(env, monkeypatch):
    """Entries in an older format among current ones, in a group and 1:1: the rows are the
    ones `record` makes; only a legacy record that becomes a row's last is shipped to the
    change script (once per call, though every member's row takes it), the others' are read
    there from the inbox."""
    members = (1, 2, 3)
    g1, g2, g3 = group(1, 9, members), group(2, 9, members), group(3, 9, members)
    d1, d2 = direct(4, 1), direct(1, 4)  # the legacy d1 is not the newest of its rows
    batch = [g1, d1, g2, g3, d2]
    recorded = RedisConversations(env.redis, env.prefix + ":r", env.clock, RETENTION_MS)
    await recorded.record(batch)
    inbox = inbox_of(env)
    await inbox.append_many(batch)
    for j in (g1, g3, d1):
        for user in j.inbox_users:
            *_, rec, _, _ = inbox.keys(user)
            await env.command("HSET", rec, str(j.message.msg_id), push_frame(j.record)[4:])
    shipped: list[list[Any]] = []
    original = redis_conversations._CHANGE

    def spy(redis: Any, keys: list[str], args: list[Any]) -> Deferred[Any]:
        shipped.append(args[7 : 7 + 2 * args[6]])  # the message table: (msg_id, record)s
        return original(redis, keys, args)

    monkeypatch.setattr(redis_conversations, "_CHANGE", spy)
    assert await env.convs.fold([1, 2, 3, 4]) == []
    assert shipped == [[f"{g3.message.msg_id:016x}", g3.stored_record]]
    for user in (1, 2, 3, 4):
        got = await every_row(env.convs, user)
        assert got == await every_row(recorded, user) and got.convs, user


@pytest_twisted.ensureDeferred
async def test_a_fold_whose_newest_record_left_the_inbox_reads_again(env):
    """An entry that is the newest of its row leaves the inbox (a cap trims the oldest)
    between the fold's read and its change: the change applies nothing of that user (it
    would have no last record for the row), and the fold reads again without it."""
    inbox = inbox_of(env)
    a, b = direct(1, 2), direct(3, 2)  # two rows of user 2; a the only message of its row
    await inbox.append_many([a, b])
    _, ent, age, rec, *_ = inbox.keys(2)
    original = env.convs._fold_read
    lost: list[int] = []

    async def trimmed(users: list[int]) -> Any:
        got = await original(users)
        if await env.command("HEXISTS", rec, str(a.message.msg_id)):
            for key in (ent, age):
                await env.command("ZREM", key, str(a.message.msg_id))
            await env.command("HDEL", rec, str(a.message.msg_id))
        return got

    env.convs._fold_read = lambda users: Deferred.fromCoroutine(trimmed(users))  # type: ignore[method-assign]
    change = env.convs._change

    def spy(*args: Any) -> Deferred[list[int]]:
        return change(*args).addCallback(lambda got: lost.extend(got) or got)

    env.convs._change = spy  # type: ignore[method-assign]
    assert await env.convs.fold([2]) == []
    assert lost == [2]  # the first change: a's record gone, nothing of 2 applied
    rows = await every_row(env.convs, 2)
    assert [(c.conv_id, c.unread, c.last_id) for c in rows.convs] == [(3, 1, b.message.msg_id)]
    assert rows.version == 1
    assert await fold_of(env.redis, env.convs.keys(2)[0]) == b"2"
    assert 2 not in await behind_set(env)


@pytest_twisted.ensureDeferred
async def test_concurrent_folds_of_one_user_apply_each_entry_once(env):
    """Two stores (two processes) fold the same users at once: both read before either
    applies, so for each user one compare-and-set wins and the other applies nothing (it
    reads again and finds nothing to do); the counts stay exact."""
    inbox = inbox_of(env)
    users = list(range(40, 50))
    await inbox.append_many([direct(7, u) for u in users for _ in range(3)])
    other = RedisConversations(env.redis, env.prefix, env.clock, RETENTION_MS)
    lost: list[int] = []
    for store in (env.convs, other):
        original = store._change

        def spy(*args: Any, _original: Any = original) -> Deferred[list[int]]:
            return _original(*args).addCallback(lambda got: lost.extend(got) or got)

        store._change = spy  # type: ignore[method-assign]
    assert await gather([env.convs.fold(users), other.fold(users)]) == [[], []]
    assert sorted(lost) == users  # each user lost exactly once, by one of the two
    for user in users:
        rows = await every_row(env.convs, user)
        assert [(c.conv_id, c.unread) for c in rows.convs] == [(7, 3)]
        assert rows.version == 1  # one change: the loser wrote no version
    assert not await behind_set(env) & set(users)


@pytest_twisted.ensureDeferred
async def test_a_stale_fold_loses_and_never_moves_the_fold_back(env):
    """A fold reads (fold 0, seq 2); before it applies, two more entries arrive and another
    fold takes the user to 4. The stale one's compare-and-set fails: the fold stays 4 (had
    it won, it would be 2 and entries 3, 4 would apply again), and its re-read applies
    nothing more."""
    inbox = inbox_of(env)
    sent = [direct(8, 9) for _ in range(4)]
    await inbox.append_many(sent[:2])
    other = RedisConversations(env.redis, env.prefix, env.clock, RETENTION_MS)
    original = env.convs._fold_read
    reads: list[dict[int, Any]] = []

    async def meanwhile(users: list[int]) -> Any:
        got = await original(users)
        if not reads:
            await inbox.append_many(sent[2:])
            assert await other.fold([9]) == []
        reads.append(got)
        return got

    env.convs._fold_read = lambda users: Deferred.fromCoroutine(meanwhile(users))  # type: ignore[method-assign]
    assert await env.convs.fold([9]) == []
    assert [(r[9].fold, r[9].seq, len(r[9].ids)) for r in reads] == [(0, 2, 2), (4, 4, 0)]
    assert await fold_of(env.redis, env.convs.keys(9)[0]) == b"4"
    [row] = (await every_row(env.convs, 9)).convs
    assert (row.unread, row.last_id, row.version) == (4, sent[-1].message.msg_id, 1)
    assert 9 not in await behind_set(env)


@pytest_twisted.ensureDeferred
async def test_a_user_losing_every_fold_is_returned_as_behind(env, monkeypatch):
    inbox = inbox_of(env)
    await inbox.append_many([direct(1, 2) for _ in range(5)])
    meta = env.convs.keys(2)[0]
    original = env.convs._fold_read

    async def always_beaten(users: list[int]) -> Any:
        got = await original(users)
        await env.command("HINCRBY", meta, "fold", 1)  # another fold wins after each read
        return got

    env.convs._fold_read = lambda users: Deferred.fromCoroutine(always_beaten(users))  # type: ignore[method-assign]
    assert await env.convs.fold([2]) == [2]  # read 1 + FOLD_RETRIES times, lost each time
    assert await fold_of(env.redis, meta) == b"%d" % (redis_conversations.FOLD_RETRIES + 1)
    assert (await every_row(env.convs, 2)).convs == ()  # nothing applied
    assert 2 in await behind_set(env)


@pytest_twisted.ensureDeferred
async def test_folds_are_bounded_per_user_and_per_read(env, monkeypatch):
    """FOLD_ENTRIES per user per call (the user comes back as behind, its fold at the last
    entry applied); a read stops after FOLD_READ entries and the users it left out are
    read by the next script call of the same fold."""
    monkeypatch.setattr(redis_conversations, "FOLD_ENTRIES", 3)
    monkeypatch.setattr(redis_conversations, "FOLD_READ", 4)
    monkeypatch.setattr(redis_conversations, "FOLD_USERS", 3)
    reads: list[list[int]] = []
    original = redis_conversations._FOLD_READ

    def spy(redis: Any, keys: list[str], args: list[Any]) -> Deferred[Any]:
        reads.append([int(_tag(k.encode())[1:]) for k in keys[::4]])
        return original(redis, keys, args)

    monkeypatch.setattr(redis_conversations, "_FOLD_READ", spy)
    inbox = inbox_of(env)
    heavy = [direct(1, 2) for _ in range(8)]
    light = [direct(3, u) for u in (4, 5, 6, 7) for _ in range(2)]
    await inbox.append_many(heavy + light)
    users = [1, 2, 3, 4, 5, 6, 7]
    assert sorted(await env.convs.fold(users)) == [1, 2, 3]  # 8 entries each for 1 and 2
    # 1's four entries (3, and 1 to see more) exhaust a read's budget: 2 and 3 are read by
    # later calls; 4 and 5 take a read's budget too
    assert reads == [[1, 2, 3], [4, 5, 6], [7], [2, 3, 6], [3, 6], [6]]
    assert await fold_of(env.redis, env.convs.keys(2)[0]) == b"3"
    assert (await every_row(env.convs, 2)).convs[0].unread == 3
    assert {1, 2, 3} <= await behind_set(env)
    assert not await behind_set(env) & {4, 5, 6, 7}
    assert sorted(await env.convs.fold(users)) == [1, 2, 3]  # 3 more: 6 of 8
    assert await env.convs.fold(users) == []
    assert (await every_row(env.convs, 2)).convs[0].unread == 8
    assert (await every_row(env.convs, 3)).convs[0].unread == 0  # its own messages
    assert await fold_of(env.redis, env.convs.keys(1)[0]) == b"8"
    assert not await behind_set(env)


@pytest_twisted.ensureDeferred
async def test_a_fold_read_copies_a_bounded_number_of_record_bytes(env, monkeypatch):
    """Large records: a read stops once it copied FOLD_READ_BYTES of them (at least one
    entry), the user comes back as behind with its fold at the last entry read, and folds
    again until the rows are those of every entry. Unbounded, one read of a user's 64 KiB
    messages blocked Redis for hundreds of ms (docs/BENCHMARKS.md, session 13)."""
    monkeypatch.setattr(redis_conversations, "FOLD_READ_BYTES", 3 * 10_000)
    reads: list[int] = []
    original = redis_conversations._FOLD_READ

    def spy(redis: Any, keys: list[str], args: list[Any]) -> Deferred[Any]:
        def count(reply: list[Any]) -> list[Any]:
            reads.append(int(reply[4]))  # the first user's n
            return reply

        return original(redis, keys, args).addCallback(count)

    monkeypatch.setattr(redis_conversations, "_FOLD_READ", spy)
    inbox = inbox_of(env)
    big = [direct(1, 2) for _ in range(7)]
    big = [PersistJob(replace(j.message, body=b"x" * 10_000), j.inbox_users) for j in big]
    await inbox.append_many(big)
    assert await env.convs.fold([2]) == [2]
    assert reads == [3] and await fold_of(env.redis, env.convs.keys(2)[0]) == b"3"
    assert (await every_row(env.convs, 2)).convs[0].unread == 3
    assert await env.convs.fold([2]) == [2]
    assert await env.convs.fold([2]) == []
    assert reads == [3, 3, 1]
    assert (await every_row(env.convs, 2)).convs[0].unread == 7
    assert await fold_of(env.redis, env.convs.keys(2)[0]) == b"7"


@pytest_twisted.ensureDeferred
async def test_the_behind_set_follows_appends_and_folds(env):
    """A user joins on an append that gives it an entry (not on a redelivery of one it
    holds), and leaves only when a fold reaches its inbox's seq: an entry appended between
    a fold's read and its change keeps it there. behind() reads the set."""
    inbox = inbox_of(env)
    key = behind_key(env.prefix, 0, False)
    j = direct(1, 2)
    await inbox.append(j)
    assert await behind_set(env) == {1, 2} == set(await env.convs.behind())
    ttl = INBOX_RETENTION_MS + redis_inbox.DAY_MS
    assert ttl - 60_000 < await env.command("PTTL", key) <= ttl  # goes with the entries
    assert await env.convs.fold([1]) == []
    assert await behind_set(env) == {2}
    await inbox.append(j)  # redelivered: no entry, 1 stays out
    assert await behind_set(env) == {2}

    original = env.convs._fold_read
    late = direct(3, 2)

    async def then_append(users: list[int]) -> Any:
        got = await original(users)
        if late.message.msg_id not in (await inbox.ids(2, 0, 10)).msg_ids:
            await inbox.append(late)  # after the read, before the change
        return got

    env.convs._fold_read = lambda users: Deferred.fromCoroutine(then_append(users))  # type: ignore[method-assign]
    assert await env.convs.fold([2]) == []
    assert await fold_of(env.redis, env.convs.keys(2)[0]) == b"1"  # the seq it read
    assert await behind_set(env) == {2, 3}  # 2 kept: cursor 2 is above its fold
    env.convs._fold_read = original  # type: ignore[method-assign]
    assert sorted(await env.convs.behind()) == [2, 3]
    assert await env.convs.fold(await env.convs.behind()) == []
    assert await behind_set(env) == set() and await env.convs.behind() == []
    assert [c.unread for c in (await every_row(env.convs, 2)).convs] == [1, 1]


@pytest_twisted.ensureDeferred
async def test_entries_gone_from_the_inbox_still_move_the_fold_to_the_seq(env):
    inbox = inbox_of(env)
    await inbox.append_many([direct(1, 2), direct(1, 2)])
    _, ent, age, rec, *_ = inbox.keys(2)
    await env.command("DEL", ent, age, rec)  # as the TTL of an idle inbox does
    assert await env.convs.fold([2]) == []
    assert await fold_of(env.redis, env.convs.keys(2)[0]) == b"2"
    assert (await every_row(env.convs, 2)).convs == ()
    assert await behind_set(env) == {1}


# --------------------------------------------------------------------------- folds, cluster


def test_every_slot_has_a_tag_of_its_own():
    tags = [slot_tag(s) for s in range(SLOTS)]
    assert len(set(tags)) == SLOTS
    assert all(key_slot(f"p:conv:behind:{{{t}}}") == s for s, t in enumerate(tags))
    for user in (0, 7, 2**63, U64_MAX):
        key = behind_key("p", user, True)
        assert key_slot(key) == key_slot(f"p:inbox:{{u{user}}}:meta") == key_slot(
            f"p:conv:{{u{user}}}:meta")  # fmt: skip
    assert behind_key("p", 7, False) == "p:conv:behind"


@pytest_twisted.ensureDeferred
async def test_cluster_mode_folds_per_slot_with_the_same_result(env, monkeypatch):
    """Appends and folds with cluster=True keep every script call on one slot (the behind
    set of that slot included), and give the lists the default mode gives."""
    calls: list[list[str]] = []
    named: list[tuple[str, list[str]]] = []
    for module, name in ((redis_inbox, "_APPEND"), (redis_conversations, "_CHANGE"),
                         (redis_conversations, "_FOLD_READ")):  # fmt: skip
        original = getattr(module, name)

        def spy(
            redis: Any, keys: list[str], args: list[Any], _original: Any = original,
            _name: str = name,
        ) -> Any:  # fmt: skip
            calls.append(keys)
            named.append((_name, keys))
            return _original(redis, keys, args)

        monkeypatch.setattr(module, name, spy)
    prefix = env.prefix + ":c"
    clustered = RedisConversations(env.redis, prefix, env.clock, RETENTION_MS, cluster=True)
    inboxes = (inbox_of(env), inbox_of(env, prefix, cluster=True))
    members = tuple(range(300, 340))
    batch = [group(300, 9, members), direct(1, 2), direct(2, 3), direct(301, 1), direct(7, 7)]
    users = [1, 2, 3, 7, *members]
    for inbox in inboxes:
        await inbox.append_many(batch)
    assert sorted(await clustered.behind()) == sorted(users)
    assert await clustered.fold(users) == [] == await env.convs.fold(users)
    for user in users:
        assert await every_row(clustered, user) == await every_row(env.convs, user)
    clustered_calls = [keys for keys in calls if keys[0].startswith(prefix + ":")]
    assert len(clustered_calls) > 8  # per slot (the default mode: one of each script)
    assert all(len({key_slot(k) for k in keys}) == 1 for keys in clustered_calls)
    # appends (4 keys per user) and fold changes (9 per user: the 7, inbox meta and rec) name
    # their slot's behind set
    mine = [(name, k) for name, k in named if k[0].startswith(prefix + ":")]
    appends = [k for name, k in mine if name == "_APPEND"]
    changes = [k for name, k in mine if name == "_CHANGE"]
    assert len(appends) > 4 and len(changes) > 4
    assert {len(k) % 4 for k in appends} == {1} == {len(k) % 9 for k in changes}
    assert all(keys[-1].startswith(prefix + ":conv:behind:{") for keys in appends + changes)
    assert await clustered.behind() == []
    assert await env.convs.behind() == []
