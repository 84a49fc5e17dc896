"""The Redis inbox and group stores beyond the contract suite: redelivery under concurrency,
hash tags, expiry of the keys, binary safety, bounded trimming, and differential runs
against the embedded SQLite stores.

Needs Redis (tests/support/services.py: skipped if absent, failing under CI). Each test uses
its own key prefix and deletes its keys afterwards.
"""

from __future__ import annotations

import functools
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto.limits import MAX_GROUPS_PER_USER, U64_MAX
from improto.records import message_of
from improto_server.config import InboxCaps
from improto_server.embedded.backend import SQLiteBackend
from improto_server.model import (
    MAX_TARGETS_PER_USER,
    InboxIds,
    InboxRecords,
    LimitExceeded,
    PersistJob,
    PushTarget,
)
from improto_server.production import redis_devices, redis_inbox
from improto_server.production.redis_connection import LuaScript, connect, gather
from improto_server.production.redis_devices import RedisDevices
from improto_server.production.redis_groups import SCRIPTS as GROUP_SCRIPTS
from improto_server.production.redis_groups import RedisGroups
from improto_server.production.redis_inbox import SCRIPTS as INBOX_SCRIPTS
from improto_server.production.redis_inbox import RedisInbox, behind_key
from improto_server.production.redis_slots import key_slot
from tests.contract.pages import ANY_SIZE
from tests.support import services
from tests.support.clock import DAY_MS, INBOX_RETENTION_MS, START_MS, FakeClock
from tests.support.services import needs

RETENTION_MS = INBOX_RETENTION_MS


@dataclass
class Env:
    redis: Any
    prefix: str
    clock: FakeClock
    inbox: RedisInbox
    groups: RedisGroups

    def keys(self) -> list[bytes]:
        return sorted(services.redis_keys(self.prefix))

    def command(self, *args: Any) -> Deferred[Any]:
        return self.redis.execute_command(*args)


@pytest.fixture
@needs("redis")
def env() -> Iterator[Env]:
    prefix = f"improto-test-stores:{uuid.uuid4().hex}"
    redis = connect(services.REDIS.host, services.REDIS.port)
    clock = FakeClock()
    inbox = RedisInbox(redis, prefix, clock, RETENTION_MS)
    groups = RedisGroups(redis, prefix)
    pytest_twisted.blockon(inbox.start())
    pytest_twisted.blockon(groups.start())
    try:
        yield Env(redis, prefix, clock, inbox, groups)
    finally:
        pytest_twisted.blockon(redis.disconnect())
        services.delete_redis_prefix(prefix)


@pytest.fixture
def sqlite(env: Env, tmp_path: Path) -> Iterator[SQLiteBackend]:
    """An embedded backend on the same fake clock, for differential runs."""
    backend = SQLiteBackend(
        tmp_path / "ref.sqlite3", now_ms=env.clock, inbox_retention_ms=RETENTION_MS
    )
    pytest_twisted.blockon(backend.start())
    try:
        yield backend
    finally:
        pytest_twisted.blockon(backend.close())


_ids = iter(range(1_000_000, 10**9))


def message(*, body: bytes = b"hello", content_type: int = ContentType.TEXT, **kw: Any) -> Message:
    mid = next(_ids)
    fields: dict[str, Any] = {
        "msg_id": mid,
        "server_time": START_MS,
        "sender_id": 1,
        "sender_device": "phone-1",
        "conv_kind": ConvKind.USER,
        "conv_id": 2,
        "content_type": content_type,
        "client_msg_id": mid.to_bytes(16, "big"),
        "body": body,
    }
    fields.update(kw)
    return Message(**fields)


def job(*users: int, **kw: Any) -> PersistJob:
    return PersistJob(message(**kw), users)


async def entries(inbox: Any, user: int) -> list[tuple[int, int]]:
    page = await inbox.page(user, 0, 1000, ANY_SIZE)
    assert not page.has_more
    return [(c, message_of(r).msg_id) for c, r in zip(page.cursors, page.records, strict=True)]


async def same_position(stores: tuple[Any, Any], user: int, device: str, cursor: int,
                        step: int) -> None:  # fmt: skip
    """Both inboxes (Redis, SQLite) advance one device's position, and read it back, alike."""
    got = [await s.advance(user, device, cursor) for s in stores]
    assert got[0] == got[1], step
    got = [await s.position(user, device) for s in stores]
    assert got[0] == got[1], step


def same_entries(ids: InboxIds, page: InboxRecords) -> bool:
    """`ids` lists what `page` (read right after it, on a budget holding everything) holds."""
    got = (page.start, page.cursors, tuple(message_of(r).msg_id for r in page.records))
    return (ids.start, ids.cursors, ids.msg_ids) == got and (ids.has_more, ids.gap) == (
        page.has_more, page.gap)  # fmt: skip


# --------------------------------------------------------------------------- inbox


@pytest_twisted.ensureDeferred
async def test_redelivery_writes_one_entry_per_user_even_concurrently(env):
    j = job(1, 2, 3, 2)
    await gather(env.inbox.append(j) for _ in range(8))  # redelivered while still running
    await env.inbox.append(j)
    for user in (1, 2, 3):
        assert await entries(env.inbox, user) == [(1, j.message.msg_id)]
    # No cursor was burnt by the duplicates.
    later = job(1)
    await env.inbox.append(later)
    assert await entries(env.inbox, 1) == [(1, j.message.msg_id), (2, later.message.msg_id)]


@pytest_twisted.ensureDeferred
async def test_the_behind_set_names_the_users_an_append_gave_an_entry(env):
    """Conversation lists fold what this set names: every user that got an entry joins it
    (one SADD per script call); a redelivery that adds nothing adds nobody."""
    behind = behind_key(env.prefix, 0, False)
    j = job(1, 2, 3, 2**63, U64_MAX)
    await env.inbox.append_many([j, job(4)])
    members = {int(u) for u in await env.command("SMEMBERS", behind)}
    assert members == {1, 2, 3, 2**63, U64_MAX, 4}
    await env.command("DEL", behind)
    await env.inbox.append(j)
    assert not await env.command("EXISTS", behind)
    await env.inbox.append(PersistJob(j.message, (*j.inbox_users, 5)))  # one more receiver
    assert await env.command("SMEMBERS", behind) == [b"5"]


@pytest_twisted.ensureDeferred
async def test_concurrent_appends_get_distinct_gap_free_cursors(env):
    jobs = [job(5) for _ in range(50)]
    await gather(env.inbox.append(j) for j in jobs)
    got = await entries(env.inbox, 5)
    assert [c for c, _ in got] == list(range(1, 51))
    assert sorted(mid for _, mid in got) == sorted(j.message.msg_id for j in jobs)


@pytest_twisted.ensureDeferred
async def test_hundred_member_group(env):
    members = tuple(range(100, 200))
    first, second = job(*members), job(*members)
    await env.inbox.append(first)
    await gather([env.inbox.append(second), env.inbox.append(first), env.inbox.append(second)])
    for user in members:
        assert await entries(env.inbox, user) == [
            (1, first.message.msg_id),
            (2, second.message.msg_id),
        ]


@pytest_twisted.ensureDeferred
async def test_cluster_mode_splits_batches_by_slot_with_the_same_result(env):
    """The same batches through cluster=True (one script per slot) and the default (one
    script for all) end in identical inboxes; each script call spans one slot."""
    calls: list[list[str]] = []
    clustered = RedisInbox(env.redis, env.prefix + ":c", env.clock, RETENTION_MS, cluster=True)
    original = clustered._append_call

    def spy(users, entries, records, head):  # type: ignore[no-untyped-def]
        calls.append([clustered.keys(u)[0] for u in users])
        calls[-1].append(behind_key(env.prefix + ":c", users[0], True))
        return original(users, entries, records, head)

    clustered._append_call = spy  # type: ignore[method-assign]
    members = tuple(range(300, 340))
    batches = [[job(*members), job(1, 2), job(2, 3, 300)], [job(1, *members), job(7)]]
    for batch in batches:
        await env.inbox.append_many(batch)
        await clustered.append_many(batch)
    for user in (1, 2, 3, 7, *members):
        assert await entries(clustered, user) == await entries(env.inbox, user) != []
        # the behind set of the user's slot names it (the call's last key, in its slot)
        assert await env.command("SISMEMBER", behind_key(env.prefix + ":c", user, True), user)
    assert len(calls) > 2 and all(len({key_slot(k) for k in keys}) == 1 for keys in calls)


def _tag(key: bytes) -> bytes:
    start = key.index(b"{")
    return key[start + 1 : key.index(b"}", start)]


@pytest_twisted.ensureDeferred
async def test_keys_of_one_user_share_one_hash_tag(env):
    users = (7, 2**63, U64_MAX)
    await env.inbox.append(job(*users))
    env.clock.now += RETENTION_MS + 1
    await env.inbox.append(job(*users))  # trims in passing, too
    for user in users:
        await env.inbox.advance(user, "phone", 1)
        await env.inbox.page(user, 0, 10, ANY_SIZE)
    gid = await env.groups.create(7, "team", users, 1)
    await env.groups.remove(gid, (2**63,))

    by_tag: dict[bytes, set[bytes]] = {}
    behind = behind_key(env.prefix, 0, False).encode()  # not per user: no tag (single Redis)
    assert {int(u) for u in await env.command("SMEMBERS", behind)} == set(users)
    for key in env.keys():
        assert key.startswith(env.prefix.encode() + b":")
        if key != behind:
            by_tag.setdefault(_tag(key), set()).add(key)
    # the group's keys under its own tag, each member's group hash under the member's
    assert set(by_tag) == {b"u%d" % u for u in users} | {b"g%d" % gid, b"layout"}
    for user in users:
        names = {k.removeprefix(env.prefix.encode()) for k in by_tag[b"u%d" % user]}
        inbox = {b":inbox:{u%d}:%s" % (user, n) for n in (b"meta", b"ent", b"age", b"rec")}
        inbox |= {b":inbox:{u%d}:%s" % (user, n) for n in (b"pos", b"dev")}
        in_groups = {b":groups:{u%d}" % user} if user != 2**63 else set()  # it left: gone
        assert names == inbox | in_groups
    for keys in by_tag.values():
        assert len({key_slot(k) for k in keys}) == 1  # one cluster slot per user / per group


@pytest_twisted.ensureDeferred
async def test_only_the_cursor_counter_never_expires(env):
    await env.inbox.append(job(9))
    await env.inbox.advance(9, "phone", 1)
    meta, ent, age, rec, pos, dev = env.inbox.keys(9)
    assert await env.command("PTTL", meta) == -1  # cursors must never go back
    ttl = RETENTION_MS + redis_inbox.DAY_MS
    behind = behind_key(env.prefix, 9, False)  # expires with the entries it names
    for key in (ent, age, rec, pos, dev, behind):
        assert ttl - 60_000 < await env.command("PTTL", key) <= ttl


@pytest_twisted.ensureDeferred
async def test_cursors_continue_after_the_inbox_keys_expired(env):
    # Real-time TTL of 300 ms (no margin); the injected clock is not moved at all, so only
    # the vanished keys tell the store that the entries went.
    inbox = RedisInbox(env.redis, env.prefix, env.clock, 300, ttl_margin_ms=0)
    old = [job(4) for _ in range(3)]
    for j in old:
        await inbox.append(j)
    await inbox.advance(4, "phone", 2)
    meta, ent, *_ = inbox.keys(4)
    for _ in range(200):
        if not await env.command("EXISTS", ent):
            break
        await deferLater(reactor, 0.01, lambda: None)
    else:
        raise AssertionError("the entry keys did not expire")
    assert await env.command("HGET", meta, "seq") == b"3"

    # Nothing is served, everything counts as removed, and the counter went on.
    assert (await inbox.page(4, 0, 10, ANY_SIZE)).gap
    new = job(4)
    await inbox.append(new)
    page = await inbox.page(4, 0, 10, ANY_SIZE)
    assert page.cursors == (4,) and message_of(page.records[0]) == new.message
    assert page.gap and not (await inbox.page(4, 3, 10, ANY_SIZE)).gap
    # The position expired with the entries it covered: a RESUME pull starts at 0 and misses
    # nothing (cursors 1..3 are gone), it only sees the gap.
    assert await inbox.position(4, "phone") == 0


@pytest_twisted.ensureDeferred
async def test_binary_and_unicode_fields_round_trip(env):
    bodies = [
        b"",
        b"\x00",
        b"\xff\xfe\x00\xc3\x28 not utf-8 \x80\r\n",
        bytes(range(256)) * 255,  # 65280 bytes, near the 65535 maximum
        b"\x00" * 65_535,
    ]
    jobs = [
        job(3, body=body, content_type=7, sender_device="t\u00e9l\u00e9phone-\u2713")
        for body in bodies
    ]
    jobs.append(job(3, client_msg_id=b"\x00\r\n*$-+:" + bytes(8), sender_id=U64_MAX))
    for j in jobs:
        await env.inbox.append(j)
    page = await env.inbox.page(3, 0, 100, ANY_SIZE)
    assert [message_of(r) for r in page.records] == [j.message for j in jobs]

    name = "\u00e9quipe \u2713 \U0001f600"
    gid = await env.groups.create(U64_MAX, name, (2**63,), U64_MAX)
    info = await env.groups.info(gid)
    assert (info.name, info.owner_id, info.members) == (name, U64_MAX, (2**63, U64_MAX))
    assert await env.groups.since(gid, 2**63) == U64_MAX
    assert await env.groups.groups_of(U64_MAX) == ((gid, name),)


@pytest_twisted.ensureDeferred
async def test_an_expired_backlog_is_trimmed_in_bounded_steps(env, monkeypatch):
    monkeypatch.setattr(redis_inbox, "PAGE_TRIM", 3)
    monkeypatch.setattr(redis_inbox, "APPEND_TRIM", 1)
    old = [job(6) for _ in range(10)]
    for j in old:
        await env.inbox.append(j)
    env.clock.now += RETENTION_MS + 1
    new = [job(6) for _ in range(2)]
    for j in new:
        await env.inbox.append(j)  # each removes one expired entry in passing
    _, ent, age, rec, *_ = env.inbox.keys(6)
    assert await env.command("ZCARD", age) == 10

    page = await env.inbox.page(6, 0, 10, ANY_SIZE)  # three bounded script calls, then the page
    assert [message_of(r).msg_id for r in page.records] == [j.message.msg_id for j in new]
    assert page.gap and not page.has_more
    assert (await env.inbox.page(6, 9, 10, ANY_SIZE)).gap
    assert not (await env.inbox.page(6, 10, 10, ANY_SIZE)).gap
    for key in (ent, age):
        assert await env.command("ZCARD", key) == 2
    assert await env.command("HLEN", rec) == 2


@pytest_twisted.ensureDeferred
async def test_ids_read_only_and_count_untrimmed_expired_entries_as_removed(env):
    old = [job(8) for _ in range(3)]
    for j in old:
        await env.inbox.append(j)
    env.clock.now += RETENTION_MS // 2
    new = [job(8) for _ in range(3)]
    for j in new:
        await env.inbox.append(j)
    env.clock.now += RETENTION_MS // 2 + 1  # the old ones expired; nothing trimmed them yet
    _, ent, age, rec, *_ = env.inbox.keys(8)
    ids = await env.inbox.ids(8, 1, 2)
    assert ids == InboxIds(1, (4, 5), tuple(j.message.msg_id for j in new[:2]), True, True)
    assert not (await env.inbox.ids(8, 3, 10)).gap  # the expired ones are all at or below 3
    assert [await env.command("ZCARD", k) for k in (ent, age)] == [6, 6]  # nothing removed
    assert await env.command("HLEN", rec) == 6
    assert same_entries(await env.inbox.ids(8, 1, 2), await env.inbox.page(8, 1, 2, ANY_SIZE))
    assert await env.command("ZCARD", ent) == 3  # the page trimmed them


@pytest_twisted.ensureDeferred
async def test_ids_of_entries_beyond_the_entry_cap_and_after_the_keys_expired(env):
    for _ in range(5):
        await env.inbox.append(job(9))
    env.inbox.caps = InboxCaps(max_entries=2, max_bytes=InboxCaps().max_bytes)  # lowered
    ids = await env.inbox.ids(9, 0, 10)
    assert (ids.start, ids.cursors, ids.has_more, ids.gap) == (0, (4, 5), False, True)
    assert not (await env.inbox.ids(9, 3, 10)).gap
    assert same_entries(ids, await env.inbox.page(9, 0, 10, ANY_SIZE))
    _, ent, age, rec, *_ = env.inbox.keys(9)
    await env.command("DEL", ent, age, rec)  # as their TTL does to an idle inbox
    assert await env.inbox.ids(9, 2, 10) == InboxIds(2, (), (), False, True)
    assert await env.inbox.ids(9, 10, 10) == InboxIds(5, (), (), False, False)  # clamped


@pytest_twisted.ensureDeferred
async def test_sweep_trims_every_inbox_under_the_prefix_only(env):
    other = RedisInbox(env.redis, env.prefix + "-other", env.clock, RETENTION_MS)
    try:
        for user in (1, 2, U64_MAX):
            await env.inbox.append(job(user))
            await env.inbox.append(job(user))
        await other.append(job(1))
        env.clock.now += RETENTION_MS + 1
        assert await env.inbox.sweep() == 6
        assert await env.inbox.sweep() == 0
        _, ent, *_ = env.inbox.keys(1)
        assert not await env.command("EXISTS", ent)
        assert await other.sweep() == 1
    finally:
        services.delete_redis_prefix(env.prefix + "-other")


# --------------------------------------------------------------------------- devices


@pytest_twisted.ensureDeferred
async def test_device_keys_share_the_user_tag_and_never_expire(env):
    """push, reg and revoked of a user sit in the user's slot (beside its inbox); none has a
    TTL (docs/SERVICES.md); the scripts keep push and reg on the same devices."""
    devices = RedisDevices(env.redis, env.prefix, env.clock, max_targets=3)
    await devices.start()
    shas = [s.sha for s in redis_devices.SCRIPTS]
    assert await env.command("SCRIPT", "EXISTS", *shas) == [1] * len(shas)
    users = (7, 2**63, U64_MAX)
    for user in users:
        for name in ("a", "b", "c", "d"):  # one more than the cap
            await devices.set_target(user, name, PushTarget("fcm", "t" + name, False))
            env.clock.advance(1)
        await devices.revoke(user, 5)
        await env.inbox.advance(user, "phone", 1)
    by_tag: dict[bytes, set[bytes]] = {}
    for key in env.keys():
        by_tag.setdefault(_tag(key), set()).add(key)
    for user in users:
        keys = by_tag[b"u%d" % user]
        assert len({key_slot(k) for k in keys}) == 1
        push, reg, revoked = (k.encode() for k in devices.keys(user))
        assert {push, reg, revoked} <= keys
        for key in (push, reg, revoked):
            assert await env.command("PTTL", key) == -1
        assert sorted(await env.command("HKEYS", push)) == [b"b", b"c", b"d"]
        assert await env.command("ZRANGE", reg, 0, -1) == [b"b", b"c", b"d"]
        assert await env.command("HGET", push, "b") == b"0fcm\x00tb"  # the documented form
        await devices.remove_target(user, "c", "tc")
        assert await env.command("ZRANGE", reg, 0, -1) == [b"b", b"d"]


@pytest_twisted.ensureDeferred
async def test_device_targets_split_by_slot_in_bounded_calls(env, monkeypatch):
    """cluster=True reads each slot's users apart, at most TARGETS_USERS per script call,
    with the same answer as one Redis; the cap is the port's."""
    calls: list[list[str]] = []
    script = redis_devices._TARGETS

    def spy(redis: Any, keys: list[str], args: list[Any]) -> Deferred[Any]:
        calls.append(list(keys))
        return script(redis, keys, args)

    monkeypatch.setattr(redis_devices, "_TARGETS", spy)
    plain = RedisDevices(env.redis, env.prefix, env.clock)
    clustered = RedisDevices(env.redis, env.prefix, env.clock, cluster=True)
    assert plain.max_targets == MAX_TARGETS_PER_USER
    users = list(range(1, 400, 2))
    for user in users[::3]:
        await plain.set_target(user, "phone", PushTarget("apns", f"t{user}", True))
    calls.clear()
    expected = await plain.targets(users)
    assert len(calls) == -(-len(users) // redis_devices.TARGETS_USERS)
    assert sorted(expected) == users[::3]
    calls.clear()
    got = await clustered.targets(users)
    assert got == expected and list(got) == list(expected)
    assert len(calls) > len(users) // redis_devices.TARGETS_USERS
    assert all(len({key_slot(k) for k in keys}) == 1 for keys in calls)
    assert all(len(keys) <= redis_devices.TARGETS_USERS for keys in calls)


@pytest_twisted.ensureDeferred
async def test_an_unknown_script_falls_back_to_eval(env):
    # A nonce makes the source (and its SHA1) new to the server: EVALSHA says NOSCRIPT.
    script = LuaScript(f"-- {uuid.uuid4().hex}\nreturn {{KEYS[1], ARGV[1]}}")
    assert await env.command("SCRIPT", "EXISTS", script.sha) == [0]
    key = f"{env.prefix}:x"
    assert await script(env.redis, [key], [b"\x00\xff"]) == [key.encode(), b"\x00\xff"]
    assert await env.command("SCRIPT", "EXISTS", script.sha) == [1]  # EVAL cached it
    shas = [s.sha for s in (*INBOX_SCRIPTS, *GROUP_SCRIPTS)]
    assert await env.command("SCRIPT", "EXISTS", *shas) == [1] * len(shas)  # loaded at start


@pytest_twisted.ensureDeferred
async def test_a_decoding_connection_is_refused():
    import txredisapi

    pool = txredisapi.lazyConnectionPool(
        services.REDIS.host, services.REDIS.port, poolsize=1
    )  # charset utf-8
    try:
        with pytest.raises(ValueError, match="charset=None"):
            RedisInbox(pool, "improto-test-stores:unused", FakeClock(), RETENTION_MS)
        with pytest.raises(ValueError, match="charset=None"):
            RedisGroups(pool, "improto-test-stores:unused")
    finally:
        await pool.disconnect()


@pytest_twisted.ensureDeferred
async def test_inbox_matches_the_embedded_store(env, sqlite):
    """A random run of appends, redeliveries, clock moves (also backwards), pages, sweeps and
    position updates gives the same answers from Redis as from SQLite."""
    rng = random.Random(20261127)
    users = (1, 2, 3, 2**63, U64_MAX)
    done: list[tuple[PersistJob, int]] = []  # jobs with when they were first appended
    stores = (env.inbox, sqlite.inbox)
    for step in range(400):
        op = rng.random()
        if op < 0.35 or not done:
            j = job(*rng.sample(users, rng.randint(1, 3)))
            done.append((j, env.clock.now))
            for store in stores:
                await store.append(j)
        elif op < 0.45:
            # Redelivery (maybe reaching one more user) of a job that has not expired: what
            # becomes of an expired one depends on when each store removed it.
            j, at = rng.choice(done)
            if env.clock.now - at < RETENTION_MS // 2:
                j = PersistJob(j.message, (*j.inbox_users, rng.choice(users)))
                for store in stores:
                    await store.append(j)
        elif op < 0.55:
            delta = rng.choice([1, 1000, DAY_MS, RETENTION_MS // 3, -3_600_000])
            if delta < 0:
                # An entry that expired stays removed in Redis when the clock steps back, but
                # SQLite serves it again until a sweep: sweep both first.
                await env.inbox.sweep()
                await sqlite.sweep()
            env.clock.now += delta
        elif op < 0.58:
            await env.inbox.sweep()
            await sqlite.sweep()
        elif op < 0.70:
            user, device = rng.choice(users), rng.choice(["a", "b"])
            cursor = rng.choice([0, 1, rng.randint(0, 40), 10**6, U64_MAX])
            await same_position(stores, user, device, cursor, step)
        else:
            user = rng.choice(users)
            start = rng.choice([0, rng.randint(0, 40), 2**63, U64_MAX])
            limit = rng.choice([0, 1, 3, 10, 200])
            redis_ids, sqlite_ids = [await s.ids(user, start, limit) for s in stores]
            assert redis_ids == sqlite_ids, step
            redis_page, sqlite_page = [await s.page(user, start, limit, ANY_SIZE) for s in stores]
            assert redis_page == sqlite_page, step
            assert same_entries(redis_ids, redis_page), step


@pytest_twisted.ensureDeferred
async def test_groups_match_the_embedded_store(env, sqlite):
    rng = random.Random(42)
    people = (1, 2, 3, 4, 5, 2**63, U64_MAX)
    gids: list[int] = []
    stores = (env.groups, sqlite.groups)
    for store in stores:  # group ids are random: the same draws in both, so they agree
        store.new_id = functools.partial(random.Random(7).randint, 1, 2**63 - 1)

    async def both(name: str, *args: Any) -> Any:
        results = []
        for store in stores:
            try:
                results.append(("ok", await getattr(store, name)(*args)))
            except (LookupError, LimitExceeded) as e:  # GroupNotFound
                results.append(("raised", type(e)))
        assert results[0] == results[1], (name, args)
        return results[0][1]

    for _ in range(300):
        op = rng.random()
        gid = rng.choice([*gids, 0, 999, U64_MAX]) if gids else 1
        some = tuple(rng.sample(people, rng.randint(1, 4)))
        if op < 0.15 or not gids:
            new = await both("create", rng.choice(people), f"g{len(gids)}", some, next(_ids))
            if isinstance(new, int):
                gids.append(new)
        elif op < 0.4:
            await both("add", gid, some, next(_ids))
        elif op < 0.65:
            await both("remove", gid, some)
        elif op < 0.8:
            await both("info", gid)
        elif op < 0.9:
            await both("since", gid, rng.choice(people))
        else:
            await both("groups_of", rng.choice(people))


@pytest_twisted.ensureDeferred
async def test_the_groups_per_user_limit_holds_under_concurrency(env):
    user = 77
    await gather(env.groups.create(user, f"g{i}", (), 1) for i in range(MAX_GROUPS_PER_USER - 1))
    a = await env.groups.create(1, "a", (), 1)
    b = await env.groups.create(2, "b", (), 1)
    outcomes = await gather(
        Deferred.fromCoroutine(_outcome(env.groups.add(gid, (user, 3), 5))) for gid in (a, b)
    )
    # Both try to make `user` join a 500th group at once: exactly one wins, the other
    # writes nothing (not even bystander 3's membership).
    assert sorted(outcomes, key=str) == sorted([(3, user), LimitExceeded], key=str)
    won = outcomes.index((3, user))
    winner, loser = (a, b) if won == 0 else (b, a)
    assert len(await env.groups.groups_of(user)) == MAX_GROUPS_PER_USER
    assert len((await env.groups.info(loser)).members) == 1  # only its creator
    assert await env.groups.groups_of(3) == ((winner, "ab"[won]),)


async def _outcome(d: Deferred[Any]) -> Any:
    try:
        return await d
    except LimitExceeded:
        return LimitExceeded


@pytest_twisted.ensureDeferred
async def test_caps_and_byte_budgets_match_the_embedded_store(env, sqlite):
    """Random appends of assorted sizes under small caps, pages on assorted byte budgets, and
    device positions past the per-user bound: Redis answers as SQLite does."""
    rng = random.Random(12)
    caps = InboxCaps(max_entries=30, max_bytes=200_000)
    stores = (env.inbox, sqlite.inbox)
    for store in stores:
        store.caps = caps
    users = (1, 2, 3)
    for step in range(300):
        op = rng.random()
        if op < 0.45:
            body = b"b" * rng.choice([0, 100, 5000, 30_000, 65_535])
            j = job(*rng.sample(users, rng.randint(1, 3)), body=body)
            batch = [j] + [job(rng.choice(users)) for _ in range(rng.choice([0, 0, 0, 8]))]
            for store in stores:
                await store.append_many(batch)
        elif op < 0.52:
            env.clock.now += rng.choice([1000, DAY_MS, RETENTION_MS // 2])
        elif op < 0.55:
            await env.inbox.sweep()
            await sqlite.sweep()
        elif op < 0.70:
            user, device = rng.choice(users), f"d{rng.randint(0, 70)}"
            cursor = rng.choice([1, rng.randint(0, 400), U64_MAX])
            await same_position(stores, user, device, cursor, step)
        else:
            user = rng.choice(users)
            start = rng.choice([0, rng.randint(0, 400), U64_MAX])
            limit = rng.choice([1, 3, 200])
            budget = rng.choice([1, 6000, 70_000, 131_072 - 4000, ANY_SIZE])
            ids = [await s.ids(user, start, limit) for s in stores]
            assert ids[0] == ids[1], step
            pages = [await s.page(user, start, limit, budget) for s in stores]
            assert pages[0] == pages[1], step
            assert len(pages[0].records) <= 1 or sum(map(len, pages[0].records)) <= budget
