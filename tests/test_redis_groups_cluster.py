"""RedisGroups spread over slots (production/redis_groups.py, issue 16): the reserve /
commit / confirm protocol between a group's slot and its members' slots, on the single Redis
and on the Redis Cluster.

The contract suite (tests/contract/test_groups_contract.py) checks the port; here: the keys'
slots, the limits under concurrency, and what each crash between two steps leaves and how a
later operation repairs it (the steps are called one by one, as a crashed server left them).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import pytest_twisted
import txredisapi

from twisted.internet import reactor
from twisted.internet.defer import Deferred

from improto.limits import MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER, U64_MAX
from improto_server.model import GroupInfo, LimitExceeded
from improto_server.production import redis_groups
from improto_server.production.redis_cluster import ClusterRedis
from improto_server.production.redis_connection import connect, gather
from improto_server.production.redis_groups import RESERVATION_MS, RedisGroups
from improto_server.production.redis_inbox import inbox_keys
from improto_server.production.redis_slots import key_slot
from tests.support import services
from tests.support.clock import FakeClock

CAP = MAX_GROUPS_PER_USER
THRESHOLD = 500


@dataclass
class Env:
    redis: Any
    prefix: str
    clock: FakeClock
    groups: RedisGroups
    cluster: bool

    def command(self, *args: Any) -> Deferred[Any]:
        return self.redis.execute_command(*args)

    def store(self) -> RedisGroups:
        """Another server on the same data and clock."""
        return RedisGroups(self.redis, self.prefix, now_ms=self.clock)


ROWS = [
    pytest.param("redis", marks=pytest.mark.services("redis")),
    pytest.param("redis-cluster", marks=pytest.mark.services("redis-cluster")),
]


@pytest.fixture(params=ROWS)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    prefix = f"improto-test-groups:{uuid.uuid4().hex}"
    cluster = request.param == "redis-cluster"
    if cluster:
        redis: Any = ClusterRedis([str(services.REDIS_CLUSTER)], reactor)  # type: ignore[arg-type]
        pytest_twisted.blockon(redis.start())
    else:
        redis = connect(services.REDIS.host, services.REDIS.port)
    clock = FakeClock()
    groups = RedisGroups(redis, prefix, now_ms=clock)
    pytest_twisted.blockon(groups.start())
    try:
        yield Env(redis, prefix, clock, groups, cluster)
    finally:
        pytest_twisted.blockon(redis.disconnect())
        if cluster:
            services.delete_cluster_prefix(prefix)
        else:
            services.delete_redis_prefix(prefix)


cluster_only = pytest.mark.parametrize("env", [ROWS[1]], indirect=True)


async def fill(env: Env, user: int, n: int) -> list[int]:
    """`user` in `n` groups of their own."""
    return list(await gather(env.groups.create(user, f"f{i}", (), 1) for i in range(n)))


async def raises(exc: type[BaseException], d: Deferred[Any]) -> None:
    with pytest.raises(exc):
        await d


async def outcome(d: Deferred[Any]) -> Any:
    try:
        return await d
    except LimitExceeded:
        return LimitExceeded


async def held(env: Env, user: int) -> tuple[dict[int, int], int]:
    """The user's group hash (gid -> join number) and how many reservations it holds."""
    hash_key, res_key = env.groups.user_keys(user)
    flat = await env.command("HGETALL", hash_key)
    entries = {int(flat[i]): int(flat[i + 1]) for i in range(0, len(flat), 2)}
    return entries, await env.command("ZCARD", res_key)


# ------------------------------------------------------------------------- slots


@cluster_only
@pytest_twisted.ensureDeferred
async def test_groups_spread_over_slots_and_masters(env: Env) -> None:
    g = env.groups
    gids = [await g.create(7, f"g{i}", (8, U64_MAX), 1) for i in range(24)]
    slots = []
    for gid in gids:
        keys = g.group_keys(gid)
        # The server's own hashing (CLUSTER KEYSLOT) agrees: one slot per group.
        found = {await env.command("CLUSTER", "KEYSLOT", k) for k in keys}
        assert found == {key_slot(keys[0])}
        slots.append(key_slot(keys[0]))
    assert len(set(slots)) >= 22  # 24 random ids: a collision or two at most
    owners = set()
    for start, end, master, *_ in await env.command("CLUSTER", "SLOTS"):
        owners |= {(master[0], master[1]) for s in slots if start <= s <= end}
    assert len(owners) >= 2  # on more than one shard (all 3 but with probability ~3^-23)
    # A user's group keys sit in the user's slot, beside the user's inbox.
    for user in (7, 8, U64_MAX):
        user_slots = {key_slot(k) for k in (*g.user_keys(user), *inbox_keys(env.prefix, user))}
        assert len(user_slots) == 1
        assert await env.command("CLUSTER", "KEYSLOT", g.user_keys(user)[0]) in user_slots


# ------------------------------------------------------------- limits, concurrency


@pytest_twisted.ensureDeferred
async def test_concurrent_joins_never_exceed_the_per_user_limit(env: Env) -> None:
    user, room = 77, 5
    await fill(env, user, CAP - room)
    others = [await env.groups.create(1000 + i, f"o{i}", (), 1) for i in range(15)]
    # 15 adds to different groups and 15 creates naming the user, all at once, each with
    # a bystander: exactly `room` of them get the user in; the others write nothing.
    adds = [env.groups.add(gid, (user, 2000 + i), 5) for i, gid in enumerate(others)]
    creates = [env.groups.create(3000 + i, f"c{i}", (user, 4000 + i), 5) for i in range(15)]
    results = await gather(Deferred.fromCoroutine(outcome(d)) for d in adds + creates)
    won = [r for r in results if r is not LimitExceeded]
    assert len(won) == room
    assert len(await env.groups.groups_of(user)) == CAP
    entries, reservations = await held(env, user)
    assert len(entries) == CAP and reservations == 0
    for i, (gid, result) in enumerate(zip(others, results[:15], strict=True)):
        members = (await env.groups.info(gid)).members
        assert members == ((user, 1000 + i, 2000 + i) if result != LimitExceeded else (1000 + i,))
        if result == LimitExceeded:
            assert await env.groups.groups_of(2000 + i) == ()
            assert await held(env, 2000 + i) == ({}, 0)  # its reservation given back
    for i, result in enumerate(results[15:]):
        assert len(await env.groups.groups_of(4000 + i)) == (result != LimitExceeded)
    # Still full: one more is refused, however it comes.
    await raises(LimitExceeded, env.groups.add(await env.groups.create(1, "x", (), 1), (user,), 9))


@pytest_twisted.ensureDeferred
async def test_concurrent_adds_to_one_group_count_it_once(env: Env) -> None:
    user = 5
    await fill(env, user, CAP - 1)
    gid = await env.groups.create(1, "one", (), 1)
    results = await gather(env.groups.add(gid, (user,), s) for s in (2, 3, 4))
    assert sorted(results) == [(), (), (user,)]  # one joins, the others find a member
    assert len(await env.groups.groups_of(user)) == CAP
    assert (await held(env, user))[1] == 0


@pytest_twisted.ensureDeferred
async def test_a_big_create_reserves_every_member(env: Env) -> None:
    """Members spread over many slots on the cluster (per-slot reserve and confirm calls),
    one refused member anywhere refuses the whole create."""
    crowd = tuple(range(10_000, 10_000 + 2_000))
    full = 11_000
    await fill(env, full, CAP)
    await raises(LimitExceeded, env.groups.create(1, "big", crowd, 1))
    for user in (10_000, 10_999, 11_999):
        assert await held(env, user) == ({}, 0)
    gid = await env.groups.create(1, "big", tuple(u for u in crowd if u != full), 1)
    assert len((await env.groups.info(gid)).members) == len(crowd)  # with the owner
    assert await env.groups.groups_of(11_999) == ((gid, "big"),)
    assert (await held(env, 11_999))[0] == {gid: len(crowd)}  # the last of 2,000 joins


# ----------------------------------------------------------- crashes between steps


@pytest_twisted.ensureDeferred
async def test_a_reservation_left_by_a_crash_expires_and_is_released(env: Env) -> None:
    """Crash after RESERVE: the place is held until the deadline, then resolved as not
    joined (by groups_of or by the next reserve that needs the place); the commit that
    comes too late is refused, so it cannot make a member past the limit."""
    g, user = env.groups, 9
    await fill(env, user, CAP - 1)
    other = await g.create(1, "other", (), 1)
    lost = redis_groups.random_group_id()
    token, deadline = "deadbeefdeadbeef", env.clock() + RESERVATION_MS
    await g.reserve(lost, [user], token, deadline)  # ... and the server died here

    assert len(await g.groups_of(user)) == CAP - 1  # not listed: not a member
    await raises(LimitExceeded, g.add(other, (user,), 2))  # but counted
    assert (await held(env, user))[1] == 1

    env.clock.advance(RESERVATION_MS)  # the deadline: the next reserve needing it frees it
    assert await g.add(other, (user,), 3) == (user,)
    entries, reservations = await held(env, user)
    assert reservations == 0 and len(entries) == CAP and lost not in entries
    # The crashed create's commit, arriving now, is refused: its reservation was voided.
    args = [b"late", 1, THRESHOLD, token, user]
    with pytest.raises(txredisapi.ResponseError, match="EXPIRED"):
        await redis_groups._CREATE(env.redis, g.group_keys(lost), args)
    assert await g.info(lost) is None
    void = g.group_keys(lost)[3]
    assert 0 < await env.command("PTTL", void) <= redis_groups.VOID_KEEP_MS  # not kept


@pytest_twisted.ensureDeferred
async def test_groups_of_resolves_an_expired_reservation(env: Env) -> None:
    g, user = env.groups, 10
    gid = await g.create(1, "team", (), 1)
    await g.reserve(gid, [user], "feedfacefeedface", env.clock() + RESERVATION_MS)
    env.clock.advance(RESERVATION_MS + 1)
    assert await g.groups_of(user) == ()
    assert await held(env, user) == ({}, 0)
    with pytest.raises(txredisapi.ResponseError, match="EXPIRED"):
        args = [2, MAX_GROUP_MEMBERS, THRESHOLD, "feedfacefeedface", user]
        await redis_groups._ADD(env.redis, g.group_keys(gid), args)
    assert (await g.info(gid)).members == (1,)


@pytest_twisted.ensureDeferred
async def test_a_member_left_unconfirmed_by_a_crash_is_listed_and_confirmed(env: Env) -> None:
    """Crash after COMMIT: the member's place is still a reservation: it counts, groups_of
    lists the group at once, and the resolution after the deadline makes it the entry."""
    g, user = env.groups, 11
    await fill(env, user, CAP - 1)
    gid = await g.create(1, "team", (), 1)
    token = "0123456789abcdef"
    await g.reserve(gid, [user], token, env.clock() + RESERVATION_MS)
    args = [7, MAX_GROUP_MEMBERS, THRESHOLD, token, user]
    assert await redis_groups._ADD(env.redis, g.group_keys(gid), args) == [b"%d" % user, 2]
    # ... the server died before CONFIRM.
    assert await g.since(gid, user) == 7
    entries, reservations = await held(env, user)
    assert gid not in entries and reservations == 1
    groups = await g.groups_of(user)  # listed from the group side, and the entry written
    assert (gid, "team") in groups and len(groups) == CAP
    entries, reservations = await held(env, user)
    assert entries[gid] == 2 and reservations == 1
    other = await g.create(2, "other", (), 1)
    await raises(LimitExceeded, g.add(other, (user,), 8))  # it counts

    env.clock.advance(RESERVATION_MS)
    await raises(LimitExceeded, g.add(other, (user,), 9))  # still, resolved
    entries, reservations = await held(env, user)
    assert entries[gid] == 2 and reservations == 0 and len(entries) == CAP
    assert (gid, "team") in await g.groups_of(user)
    await g.finish(gid, token, {user: 2})  # the confirm arriving late changes nothing
    assert await held(env, user) == (entries, 0)


@pytest_twisted.ensureDeferred
async def test_an_entry_left_by_a_crashed_removal_is_dropped(env: Env) -> None:
    """Crash after the group side of a removal: the user's hash still names the group:
    never listed, counted until the next check drops it (or a refused reserve does)."""
    g, user = env.groups, 12
    await fill(env, user, CAP - 1)
    gid = await g.create(1, "team", (user,), 1)
    keys = g.group_keys(gid)[:3]
    assert await redis_groups._REMOVE(env.redis, keys, [THRESHOLD, user]) == [b"%d" % user, b"2"]
    # ... the server died before the users' side.
    assert (await held(env, user))[0][gid] == 2
    other = await g.create(2, "other", (), 1)
    assert await g.add(other, (user,), 2) == (user,)  # refused, checked, freed, reserved
    entries, _ = await held(env, user)
    assert gid not in entries and other in entries and len(entries) == CAP

    g2, stale_user = env.store(), 13
    gid2 = await g2.create(1, "two", (stale_user,), 1)
    await redis_groups._REMOVE(env.redis, g2.group_keys(gid2)[:3], [THRESHOLD, stale_user])
    assert await g2.groups_of(stale_user) == ()  # not listed, and dropped
    assert await held(env, stale_user) == ({}, 0)


@pytest_twisted.ensureDeferred
async def test_a_late_unlink_keeps_a_newer_membership(env: Env) -> None:
    g, user = env.groups, 14
    gid = await g.create(1, "team", (user,), 1)
    removed = await redis_groups._REMOVE(env.redis, g.group_keys(gid)[:3], [THRESHOLD, user])
    assert removed == [b"%d" % user, b"2"]  # join number 2; its unlink is delayed
    assert await g.add(gid, (user,), 5) == (user,)  # joins again: number 3, confirmed
    await g.unlink(gid, {user: 2})  # the old removal's users' side, arriving now
    assert await held(env, user) == ({gid: 3}, 0)
    assert await g.groups_of(user) == ((gid, "team"),)
    assert await g.since(gid, user) == 5


@pytest_twisted.ensureDeferred
async def test_a_lost_commit_reply_keeps_the_reservations(env: Env, monkeypatch) -> None:
    """A commit whose reply never came may have run: its reservations stay (resolution
    decides), never released as if refused."""
    g, user = env.groups, 15
    gid = await g.create(1, "team", (), 1)
    real = redis_groups._ADD.__call__

    def lost(redis: Any, keys: Any, args: Any) -> Deferred[Any]:
        d = real(redis, keys, args)

        def drop(_: object) -> None:
            raise txredisapi.ConnectionError("connection lost")

        return d.addCallback(drop)

    monkeypatch.setattr(redis_groups, "_ADD", lost)
    with pytest.raises(txredisapi.ConnectionError):
        await g.add(gid, (user,), 2)
    monkeypatch.undo()
    assert (await held(env, user))[1] == 1  # kept
    assert await g.groups_of(user) == ((gid, "team"),)  # it did run
    env.clock.advance(RESERVATION_MS)
    assert await g.groups_of(user) == ((gid, "team"),)
    assert await held(env, user) == ({gid: 2}, 0)


# ------------------------------------------------------------------ the old layout


async def write_old_layout(env: Env) -> None:
    """Groups as the single-slot layout stored them (`P:{groups}:...`)."""
    base = f"{env.prefix}:{{groups}}:"
    rows = {
        1001: (b"alpha", 30, {30: 1, 20: 2, U64_MAX: 3}, b"0"),
        2**63 - 1: (b"beta", U64_MAX, {U64_MAX: 1, 20: 2}, None),  # from before the flag
    }
    for gid, (name, owner, joined, large) in rows.items():
        g = f"{base}g:{gid}"
        fields = [b"name", name, b"owner", owner, b"joins", len(joined)]
        await env.command("HSET", g, *fields, *([b"large", large] if large else []))
        for user, number in joined.items():
            await env.command("HSET", g + ":since", user, 100 * number)
            await env.command("ZADD", g + ":joined", number, user)
            await env.command("SADD", f"{base}u:{user}", gid)
    await env.command("SET", f"{base}seq", 5)
    await env.command("DEL", env.groups.layout_key)


@pytest_twisted.ensureDeferred
async def test_start_migrates_the_single_slot_layout(env: Env) -> None:
    await write_old_layout(env)
    g = env.store()
    await g.start()
    alpha, beta = 1001, 2**63 - 1
    assert await g.info(alpha) == GroupInfo(alpha, "alpha", 30, (20, 30, U64_MAX))
    assert await g.info(beta) == GroupInfo(beta, "beta", U64_MAX, (20, U64_MAX))
    assert await g.groups_of(20) == ((alpha, "alpha"), (beta, "beta"))
    assert await g.groups_of(U64_MAX) == ((alpha, "alpha"), (beta, "beta"))
    assert [await g.since(alpha, u) for u in (30, 20, U64_MAX)] == [100, 200, 300]
    assert await held(env, U64_MAX) == ({alpha: 3, beta: 1}, 0)
    # the join order came along: the owner leaving passes the group to 20, then U64_MAX
    assert await g.remove(alpha, (30,)) == (30,)
    assert (await g.info(alpha)).owner_id == 20
    assert await g.add(alpha, (40,), 400) == (40,)  # join number 4
    await g.remove(alpha, (20,))
    assert (await g.info(alpha)).owner_id == U64_MAX
    # the old keys are gone; the layout key says so, and the next start looks no further
    old = f"{env.prefix}:{{groups}}:"
    for key in (f"{old}g:{alpha}", f"{old}g:{beta}:since", f"{old}u:20", f"{old}seq"):
        assert not await env.command("EXISTS", key)
    assert await env.command("GET", g.layout_key) == b"2"
    await env.command("SET", f"{old}seq", 5)
    await env.store().start()
    assert await env.command("EXISTS", f"{old}seq")


@pytest_twisted.ensureDeferred
async def test_the_migration_is_idempotent(env: Env) -> None:
    """Two servers starting together, or a migration interrupted and run again."""
    await write_old_layout(env)
    first, second = env.store(), env.store()
    moved = await gather([first.migrate_from_single_slot(), second.migrate_from_single_slot()])
    assert sum(moved) == 2  # each group moved once (the other found it there)
    for g in (first, second):
        assert await g.groups_of(20) == ((1001, "alpha"), (2**63 - 1, "beta"))
        assert len((await g.info(1001)).members) == 3
    await write_old_layout(env)  # the old keys back (a run that stopped before deleting)
    await first.migrate_from_single_slot()
    assert await first.info(1001) == GroupInfo(1001, "alpha", 30, (20, 30, U64_MAX))
    assert await held(env, 30) == ({1001: 1}, 0)
