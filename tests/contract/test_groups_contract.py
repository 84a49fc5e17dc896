"""GroupStore contract: membership, ownership transfer, since ids, limits, id allocation, the
large flag.

Group ids are random (spec section 5), so no test assumes an order between two new ids. A
store draws candidates from its `new_id` attribute; tests replace it to force collisions."""

from __future__ import annotations

import contextlib
import itertools
import sqlite3

import pytest
import pytest_twisted

from improto.limits import MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER, U64_MAX
from improto_server.config import Config
from improto_server.model import GroupInfo, GroupNotFound, LimitExceeded

PORT = "groups"

OWNER = 10


async def raises(exc: type[BaseException], d) -> BaseException:
    """Await `d` and return the exception it failed with (pytest.raises for Deferreds)."""
    with pytest.raises(exc) as info:
        await d
    return info.value


@pytest_twisted.ensureDeferred
async def test_create_and_read_back(backend):
    g = backend.groups
    gid = await g.create(OWNER, "team", (30, 20, 30, OWNER, U64_MAX), 500)
    assert gid >= 1
    # Owner included once, duplicates dropped, members ascending as unsigned ids.
    assert await g.info(gid) == GroupInfo(gid, "team", OWNER, (OWNER, 20, 30, U64_MAX))
    for user in (OWNER, 20, 30, U64_MAX):
        assert await g.since(gid, user) == 500
        assert await g.groups_of(user) == ((gid, "team"),)
    assert await g.since(gid, 99) is None
    assert await g.groups_of(99) == ()


@pytest_twisted.ensureDeferred
async def test_unknown_groups(backend):
    g = backend.groups
    for gid in (1, 12345, 2**63, U64_MAX):
        assert await g.info(gid) is None
        assert await g.since(gid, OWNER) is None
        await raises(GroupNotFound, g.add(gid, (1,), 5))
        await raises(GroupNotFound, g.remove(gid, (1,)))


@pytest_twisted.ensureDeferred
async def test_groups_of_lists_current_groups_by_ascending_id(backend):
    g = backend.groups
    a = await g.create(OWNER, "a", (), 1)
    b = await g.create(20, "b", (OWNER,), 2)
    c = await g.create(OWNER, "c", (20,), 3)
    assert await g.groups_of(OWNER) == tuple(sorted([(a, "a"), (b, "b"), (c, "c")]))
    assert await g.remove(b, (OWNER,)) == (OWNER,)
    assert await g.groups_of(OWNER) == tuple(sorted([(a, "a"), (c, "c")]))
    assert await g.groups_of(20) == tuple(sorted([(b, "b"), (c, "c")]))
    # Ascending as unsigned ids, also far apart.
    g.new_id = iter([2**63 - 1, 3]).__next__
    top, low = await g.create(20, "top", (), 4), await g.create(20, "low", (), 5)
    assert await g.groups_of(20) == tuple(sorted([(b, "b"), (c, "c"), (top, "top"), (low, "low")]))


@pytest_twisted.ensureDeferred
async def test_add_returns_only_new_members(backend):
    g = backend.groups
    gid = await g.create(OWNER, "team", (20,), 100)
    assert await g.add(gid, (40, 20, 30, 40, OWNER), 200) == (30, 40)
    assert await g.add(gid, (20, 30), 300) == ()
    assert (await g.info(gid)).members == (OWNER, 20, 30, 40)
    assert [await g.since(gid, u) for u in (OWNER, 20, 30, 40)] == [100, 100, 200, 200]


@pytest_twisted.ensureDeferred
async def test_remove_returns_only_removed_members(backend):
    g = backend.groups
    gid = await g.create(OWNER, "team", (20, 30, 40), 100)
    assert await g.remove(gid, (40, 99, 20, 40)) == (20, 40)
    assert await g.remove(gid, (20, 99)) == ()
    assert await g.info(gid) == GroupInfo(gid, "team", OWNER, (OWNER, 30))
    assert await g.since(gid, 20) is None
    assert await g.groups_of(20) == ()


@pytest_twisted.ensureDeferred
async def test_owner_passes_to_the_earliest_joiner_then_lowest_id(backend):
    g = backend.groups
    gid = await g.create(OWNER, "team", (30, 20), 1)  # 20 and 30 joined together
    assert await g.add(gid, (5,), 2) == (5,)  # lower id, but joined later

    async def leave(user: int) -> int:
        assert await g.remove(gid, (user,)) == (user,)
        return (await g.info(gid)).owner_id

    assert await leave(OWNER) == 20  # tie between 20 and 30: lower id
    assert await leave(30) == 20  # a non-owner leaving changes nothing
    assert await leave(20) == 5
    assert await leave(5) == 0  # nobody left
    assert await g.info(gid) == GroupInfo(gid, "team", 0, ())  # the group still exists


@pytest_twisted.ensureDeferred
async def test_join_order_ties_use_unsigned_ids(backend):
    g = backend.groups
    gid = await g.create(OWNER, "team", (U64_MAX, 2**63, 2**63 - 1), 1)
    await g.remove(gid, (OWNER,))
    assert (await g.info(gid)).owner_id == 2**63 - 1
    await g.remove(gid, (2**63 - 1,))
    assert (await g.info(gid)).owner_id == 2**63


@pytest_twisted.ensureDeferred
async def test_rejoining_is_a_new_membership(backend):
    g = backend.groups
    gid = await g.create(OWNER, "team", (20,), 100)
    assert await g.add(gid, (30,), 200) == (30,)
    assert await g.remove(gid, (20,)) == (20,)
    assert await g.since(gid, 20) is None
    assert await g.add(gid, (20,), 300) == (20,)
    assert await g.since(gid, 20) == 300
    # 20 now joined after 30, so 30 inherits the group.
    await g.remove(gid, (OWNER,))
    assert (await g.info(gid)).owner_id == 30


@pytest_twisted.ensureDeferred
async def test_group_ids_are_never_reused(backend):
    g = backend.groups
    first = await g.create(OWNER, "a", (), 1)
    second = await g.create(OWNER, "b", (20,), 1)
    await g.remove(second, (OWNER, 20))  # now empty
    third = await g.create(OWNER, "c", (), 1)
    await backend.restart()
    fourth = await backend.groups.create(OWNER, "d", (), 1)
    assert len({first, second, third, fourth}) == 4
    assert await backend.groups.info(second) == GroupInfo(second, "b", 0, ())
    assert await backend.groups.info(third) == GroupInfo(third, "c", OWNER, (OWNER,))


@pytest_twisted.ensureDeferred
async def test_groups_per_user_limit(backend):
    g = backend.groups
    user, other, bystander = 1, 2, 3
    made = [await g.create(user, f"g{i}", (), i) for i in range(MAX_GROUPS_PER_USER)]
    theirs = await g.create(other, "theirs", (), 1)
    before = await g.info(theirs)

    # One more, as creator, as an initial member, or added: refused whole.
    await raises(LimitExceeded, g.create(user, "one too many", (bystander,), 9))
    await raises(LimitExceeded, g.create(other, "with user", (bystander, user), 9))
    await raises(LimitExceeded, g.add(theirs, (bystander, user), 9))
    assert await g.info(theirs) == before
    assert await g.groups_of(bystander) == ()
    assert await g.groups_of(other) == ((theirs, "theirs"),)
    assert len(await g.groups_of(user)) == MAX_GROUPS_PER_USER

    # After leaving one group there is room for exactly one more.
    await g.remove(made[0], (user,))
    assert await g.add(theirs, (bystander, user), 9) == (user, bystander)
    await raises(LimitExceeded, g.create(user, "again too many", (), 9))
    # The refused creates left no group behind: the id they drew is still free.
    g.new_id = lambda: 4242
    await raises(LimitExceeded, g.create(user, "refused", (bystander,), 9))
    assert await g.info(4242) is None
    assert await g.create(bystander, "next", (), 9) == 4242


@pytest_twisted.ensureDeferred
async def test_group_member_limit(backend):
    g = backend.groups
    crowd = tuple(range(1000, 1000 + MAX_GROUP_MEMBERS - 2))  # with the owner: 9999 members
    gid = await g.create(OWNER, "crowd", crowd, 1)
    await raises(LimitExceeded, g.add(gid, (1, 2), 2))
    info = await g.info(gid)
    assert len(info.members) == MAX_GROUP_MEMBERS - 1 and 1 not in info.members
    assert await g.since(gid, 1) is None

    assert await g.add(gid, (2, *crowd[:5]), 3) == (2,)  # already-members do not count
    assert len((await g.info(gid)).members) == MAX_GROUP_MEMBERS
    await raises(LimitExceeded, g.add(gid, (1,), 4))

    too_big = tuple(range(50_000, 50_000 + MAX_GROUP_MEMBERS))  # plus the owner: 10001
    await raises(LimitExceeded, g.create(OWNER, "too big", too_big, 5))
    assert await g.groups_of(50_000) == ()
    exact = await g.create(OWNER, "exact", too_big[1:], 5)
    assert len((await g.info(exact)).members) == MAX_GROUP_MEMBERS


@pytest_twisted.ensureDeferred
async def test_group_ids_are_random_and_unique(backend):
    """Spec section 5: ids reveal neither how many groups exist nor a neighbour to probe."""
    g = backend.groups
    ids = [await g.create(1000 + i, f"g{i}", (), i) for i in range(200)]
    assert len(set(ids)) == len(ids)
    assert all(1 <= gid <= 2**63 - 1 for gid in ids)
    ordered = sorted(ids)
    # Random 63-bit ids: neither in creation order nor adjacent, and spread over the range
    # (each of these fails for uniform draws with a probability below 2^-40).
    assert ids != ordered
    assert all(b - a > 1 for a, b in itertools.pairwise(ordered))
    assert ordered[-1] > 2**61
    assert ordered[0] < 2**62
    for gid in ids[:5]:  # the neighbours of a real id are not groups
        for probe in (gid - 1, gid + 1):
            assert await g.info(probe) is None


@pytest_twisted.ensureDeferred
async def test_create_draws_again_on_a_collision(backend):
    g = backend.groups
    taken = await g.create(OWNER, "first", (20,), 1)
    draws = iter([taken, taken, 77_000])
    g.new_id = draws.__next__
    assert await g.create(30, "second", (OWNER,), 2) == 77_000
    assert await g.info(taken) == GroupInfo(taken, "first", OWNER, (OWNER, 20))
    assert await g.info(77_000) == GroupInfo(77_000, "second", 30, (OWNER, 30))
    assert await g.groups_of(OWNER) == tuple(sorted([(taken, "first"), (77_000, "second")]))
    # Only colliding draws: the create fails (an internal error, not a refusal) and writes
    # nothing.
    g.new_id = lambda: taken
    try:
        await g.create(40, "never", (50,), 3)
    except (LimitExceeded, GroupNotFound) as e:  # pragma: no cover - the wrong failure
        pytest.fail(f"a create that found no free id raised {e!r}")
    except Exception:
        pass
    else:  # pragma: no cover
        pytest.fail("a create whose every draw collided succeeded")
    assert await g.groups_of(40) == ()
    assert await g.groups_of(50) == ()
    assert await g.info(taken) == GroupInfo(taken, "first", OWNER, (OWNER, 20))


# ------------------------------------------------------------- the large flag (issue 14)

THRESHOLD = 20  # large above 20 members, small again at 18 or fewer (20 * 9 // 10)


async def size_and_flag(g, gid: int) -> tuple[int, bool]:
    info = await g.info(gid)
    return len(info.members), info.large


def crowd(n: int, start: int = 1000) -> tuple[int, ...]:
    """n members besides the owner."""
    return tuple(range(start, start + n))


@pytest_twisted.ensureDeferred
async def test_the_default_threshold_is_the_configured_one(backend):
    assert backend.groups.large_threshold == Config().large_group_threshold
    g = backend.groups
    gid = await g.create(OWNER, "team", crowd(3), 1)
    assert await g.info(gid) == GroupInfo(gid, "team", OWNER, (OWNER, *crowd(3)), large=False)


@pytest_twisted.ensureDeferred
async def test_a_group_created_above_the_threshold_is_large(backend):
    g = backend.groups
    g.large_threshold = THRESHOLD
    at = await g.create(OWNER, "at", crowd(THRESHOLD - 1), 1)  # the owner makes it 20
    above = await g.create(OWNER, "above", crowd(THRESHOLD), 1)
    assert await size_and_flag(g, at) == (THRESHOLD, False)
    assert await size_and_flag(g, above) == (THRESHOLD + 1, True)
    assert await g.info(above) == GroupInfo(
        above, "above", OWNER, (OWNER, *crowd(THRESHOLD)), large=True
    )
    # The flag is stored: another instance on the same data reads it.
    await backend.restart()
    assert (await backend.groups.info(above)).large
    assert not (await backend.groups.info(at)).large


@pytest_twisted.ensureDeferred
async def test_an_add_above_the_threshold_makes_the_group_large(backend):
    g = backend.groups
    g.large_threshold = THRESHOLD
    gid = await g.create(OWNER, "team", crowd(9), 1)
    assert await g.add(gid, crowd(10, start=2000), 2) == crowd(10, start=2000)
    assert await size_and_flag(g, gid) == (THRESHOLD, False)  # at the threshold: not above
    assert await g.add(gid, (*crowd(3), OWNER), 3) == ()  # members already: nothing moves
    assert await size_and_flag(g, gid) == (THRESHOLD, False)
    assert await g.add(gid, (*crowd(3), 5), 4) == (5,)
    assert await size_and_flag(g, gid) == (THRESHOLD + 1, True)
    assert await g.add(gid, (6, 7), 5) == (6, 7)
    assert await size_and_flag(g, gid) == (THRESHOLD + 3, True)
    # Across the threshold in one add, from well below it.
    other = await g.create(OWNER, "other", (), 1)
    assert not (await g.info(other)).large
    await g.add(other, crowd(THRESHOLD + 5, start=3000), 2)
    assert await size_and_flag(g, other) == (THRESHOLD + 6, True)


@pytest_twisted.ensureDeferred
async def test_a_large_group_stays_large_down_to_90_percent_of_the_threshold(backend):
    g = backend.groups
    g.large_threshold = THRESHOLD
    members = crowd(THRESHOLD + 1)  # 22 with the owner
    gid = await g.create(OWNER, "team", members, 1)
    assert await size_and_flag(g, gid) == (22, True)
    assert await g.remove(gid, members[:3]) == members[:3]
    assert await size_and_flag(g, gid) == (19, True)  # between 90% and the threshold
    assert await g.remove(gid, (99, 98)) == ()  # not members: nothing moves
    assert await size_and_flag(g, gid) == (19, True)
    assert await g.remove(gid, members[3:4]) == members[3:4]
    assert await size_and_flag(g, gid) == (18, False)  # 20 * 9 // 10
    # Small again, it stays small up to the threshold, and is large above it.
    await g.add(gid, members[:2], 2)
    assert await size_and_flag(g, gid) == (THRESHOLD, False)
    await g.add(gid, members[2:3], 3)
    assert await size_and_flag(g, gid) == (THRESHOLD + 1, True)
    # Below 90% in one remove (the owner among them).
    assert len(await g.remove(gid, (OWNER, *members[4:14]))) == 11
    assert await size_and_flag(g, gid) == (10, False)


@pytest_twisted.ensureDeferred
async def test_the_small_mark_rounds_down(backend):
    g = backend.groups
    g.large_threshold = 4  # large above 4, small at 3 or fewer (3.6 rounded down)
    members = crowd(4)
    gid = await g.create(OWNER, "team", members, 1)
    assert await size_and_flag(g, gid) == (5, True)
    await g.remove(gid, members[:1])
    assert await size_and_flag(g, gid) == (4, True)
    await g.remove(gid, members[1:2])
    assert await size_and_flag(g, gid) == (3, False)
    g.large_threshold = 2  # the lowest the configuration allows: small at 1 member
    await g.add(gid, (5,), 2)
    assert await size_and_flag(g, gid) == (4, True)
    await g.remove(gid, (5, OWNER))
    assert await size_and_flag(g, gid) == (2, True)
    await g.remove(gid, members[2:3])
    assert await size_and_flag(g, gid) == (1, False)


@pytest_twisted.ensureDeferred
async def test_ownership_and_since_ids_do_not_depend_on_the_flag(backend):
    g = backend.groups
    g.large_threshold = 4
    gid = await g.create(OWNER, "team", (30, 20), 100)
    assert await g.add(gid, (5, 6), 200) == (5, 6)  # 5 members: large
    assert await g.info(gid) == GroupInfo(gid, "team", OWNER, (5, 6, OWNER, 20, 30), large=True)
    assert [await g.since(gid, u) for u in (OWNER, 20, 30, 5, 6)] == [100, 100, 100, 200, 200]
    assert await g.remove(gid, (OWNER,)) == (OWNER,)  # the owner leaves a large group
    assert await g.info(gid) == GroupInfo(gid, "team", 20, (5, 6, 20, 30), large=True)
    assert await g.remove(gid, (20,)) == (20,)  # and the next one, making it small
    assert await g.info(gid) == GroupInfo(gid, "team", 30, (5, 6, 30), large=False)
    assert [await g.since(gid, u) for u in (5, 6, 30)] == [200, 200, 100]
    assert await g.since(gid, 20) is None
    assert await g.groups_of(5) == ((gid, "team"),)


@pytest_twisted.ensureDeferred
async def test_a_refused_add_changes_no_flag(backend):
    g = backend.groups
    g.large_threshold = 4
    user = 1
    for i in range(MAX_GROUPS_PER_USER):
        await g.create(user, f"g{i}", (), i)
    small = await g.create(OWNER, "small", crowd(3), 1)  # 4 members: one more makes it large
    large = await g.create(OWNER, "large", crowd(4), 1)
    await g.remove(large, crowd(1))  # 4 members, large (above 90%)
    before = [await g.info(small), await g.info(large)]
    assert [i.large for i in before] == [False, True]
    # Refused whole (the user is in too many groups): no member and no flag changes.
    await raises(LimitExceeded, g.add(small, (2, user), 2))
    await raises(LimitExceeded, g.add(large, (2, user), 2))
    assert [await g.info(small), await g.info(large)] == before
    # The member limit refuses whole too.
    g.large_threshold = MAX_GROUP_MEMBERS - 2
    full = await g.create(OWNER, "full", crowd(MAX_GROUP_MEMBERS - 3, start=100_000), 1)
    assert await size_and_flag(g, full) == (MAX_GROUP_MEMBERS - 2, False)
    await raises(LimitExceeded, g.add(full, (2, 3, 4), 2))
    assert await size_and_flag(g, full) == (MAX_GROUP_MEMBERS - 2, False)
    assert await g.add(full, (2,), 2) == (2,)
    assert await size_and_flag(g, full) == (MAX_GROUP_MEMBERS - 1, True)


async def forget_flags(backend, gids: tuple[int, ...]) -> None:
    """Back to the groups as a server from before the flag stored them: Redis group hashes
    without their `large` field; a SQLite file of schema version 6 (no `large` column),
    which the restart migrates."""
    g = backend.groups
    if hasattr(g, "_redis"):  # RedisGroups
        for gid in gids:
            await g._redis.execute_command("HDEL", g.group_keys(gid)[0], "large")
        return
    path = backend.current.db.path
    await backend.current.close()
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        db.execute("ALTER TABLE groups DROP COLUMN large")
        db.execute("PRAGMA user_version = 6")
    await backend.restart()


@pytest_twisted.ensureDeferred
async def test_a_group_without_a_stored_flag_reads_small(backend):
    """Groups stored before the flag existed read as small (whatever their size: none had a
    timeline), and the flag moves at their next membership change as for any group."""
    g = backend.groups
    g.large_threshold = 4
    big = await g.create(OWNER, "big", crowd(6), 1)
    small = await g.create(OWNER, "small", crowd(2), 1)
    await forget_flags(backend, (big, small))
    g = backend.groups
    g.large_threshold = 4
    assert await g.info(big) == GroupInfo(big, "big", OWNER, (OWNER, *crowd(6)), large=False)
    assert await g.info(small) == GroupInfo(small, "small", OWNER, (OWNER, *crowd(2)))
    await g.remove(big, crowd(1))  # a removal only ever clears the flag
    assert await size_and_flag(g, big) == (6, False)
    await g.add(big, (5,), 2)
    assert await size_and_flag(g, big) == (7, True)
    await g.remove(small, crowd(1))
    assert await size_and_flag(g, small) == (2, False)
    await g.add(small, (5, 6, 7), 2)
    assert await size_and_flag(g, small) == (5, True)
