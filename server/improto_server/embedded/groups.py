"""Groups and memberships in the embedded database (the GroupStore port).

Group ids are random in 1..2^63-1 (spec section 5: they reveal neither how many groups exist
nor where to probe for one), chosen inside the create transaction and drawn again on the
rare collision; a group row is never deleted, so an id is never reused. 2^63-1 is the
largest value the INTEGER PRIMARY KEY holds as itself (group ids are stored unbiased), and
the same range as the Redis store's. Join sequence numbers come from an AUTOINCREMENT column
and order members for ownership transfer. Every check and write of one call is one
transaction, so the member and per-user limits hold exactly.

A group's `large` flag (docs/design/large-groups.md) is decided by the same transaction as
the membership write that moves it (large_after_join, large_after_leave), so info() reads
members and flag together.

info() answers from a cache of recent groups when it can: every SEND to a group reads its
members, and reading 1,000 rows on the one database thread per SEND (refused ones too: the
rate limit weighs by member count) queues every other user's accept behind it. The cache is
exact because this store is the only writer of its tables (one process): a change drops the
group's entry when it is issued and again when it is done, and a read stores its result only
if no change (to any group) began or ended while it ran. It is bounded by members held
(`CACHE_MEMBERS`), oldest-used groups dropped first.
"""

from __future__ import annotations

import secrets
import sqlite3
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, TypeVar

from twisted.internet.defer import Deferred, succeed

from improto.limits import MAX_GROUP_MEMBERS, MAX_GROUPS_PER_USER
from improto_server.config import Config
from improto_server.embedded.database import SQLITE_MAX_INT, Database, id_list, signed, unsigned
from improto_server.model import GroupInfo, GroupNotFound, LimitExceeded

GROUP_ID_MAX = SQLITE_MAX_INT  # 2^63-1
# Draws before giving up: one draw collides with probability (groups so far) / 2^63.
CREATE_ATTEMPTS = 8
# Member ids the info() cache holds at most, over all its groups (about 40 bytes each).
CACHE_MEMBERS = 200_000

_T = TypeVar("_T")


def random_group_id() -> int:
    """A uniformly random group id in 1..GROUP_ID_MAX (cryptographic: not predictable)."""
    return secrets.randbelow(GROUP_ID_MAX) + 1


# A group's large flag (hysteresis: a group at the threshold does not flip on every join and
# leave). The Redis store's scripts apply the same two rules.


def large_after_join(large: bool, members: int, threshold: int) -> bool:
    """The flag after a create or add left the group with `members`: large once it has more
    than `threshold`, else unchanged."""
    return large or members > threshold


def large_after_leave(large: bool, members: int, threshold: int) -> bool:
    """The flag after a removal left the group with `members`: small again at 90% of the
    threshold or fewer (rounded down), else unchanged."""
    return large and members > threshold * 9 // 10


class SQLiteGroups:
    """GroupStore. add/remove raise GroupNotFound for a group id that was never created.

    `new_id` draws candidate group ids; tests replace it to force collisions or to give two
    stores the same ids. `large_threshold`: Config.large_group_threshold (see
    large_after_join); read by each call, so tests may set a small one."""

    def __init__(
        self, db: Database, *, large_threshold: int = Config.large_group_threshold
    ) -> None:
        self._db = db
        self.new_id: Callable[[], int] = random_group_id
        self.large_threshold = large_threshold
        self._cache: OrderedDict[int, GroupInfo] = OrderedDict()
        self._cached_members = 0
        # changes begun plus changes ended: a read that saw it move must not be kept
        self._epoch = 0

    def create(
        self, owner_id: int, name: str, members: tuple[int, ...], since_id: int
    ) -> Deferred[int]:
        # a new id is in no cache entry; a collision retries inside the transaction
        return self._db.call(
            _create, owner_id, name, members, since_id, self.new_id, self.large_threshold
        )

    def add(
        self, group_id: int, users: tuple[int, ...], since_id: int
    ) -> Deferred[tuple[int, ...]]:
        return self._changing(
            group_id, self._db.call(_add, group_id, users, since_id, self.large_threshold)
        )

    def remove(self, group_id: int, users: tuple[int, ...]) -> Deferred[tuple[int, ...]]:
        return self._changing(
            group_id, self._db.call(_remove, group_id, users, self.large_threshold)
        )

    def info(self, group_id: int) -> Deferred[GroupInfo | None]:
        cached = self._cache.get(group_id)
        if cached is not None:
            self._cache.move_to_end(group_id)
            return succeed(cached)
        epoch = self._epoch

        def keep(info: GroupInfo | None) -> GroupInfo | None:
            if info is not None and self._epoch == epoch:
                self._remember(info)
            return info

        return self._db.call(_info, group_id).addCallback(keep)

    def _changing(self, group_id: int, d: Deferred[_T]) -> Deferred[_T]:
        self._epoch += 1
        self._forget(group_id)

        def done(result: Any) -> Any:
            self._epoch += 1
            self._forget(group_id)
            return result

        return d.addBoth(done)

    def _forget(self, group_id: int) -> None:
        gone = self._cache.pop(group_id, None)
        if gone is not None:
            self._cached_members -= len(gone.members)

    def _remember(self, info: GroupInfo) -> None:
        size = len(info.members)
        if size > CACHE_MEMBERS:
            return
        self._forget(info.group_id)
        while self._cache and self._cached_members + size > CACHE_MEMBERS:
            _, old = self._cache.popitem(last=False)
            self._cached_members -= len(old.members)
        self._cache[info.group_id] = info
        self._cached_members += size

    def since(self, group_id: int, user_id: int) -> Deferred[int | None]:
        return self._db.call(_since, group_id, user_id)

    def groups_of(self, user_id: int) -> Deferred[tuple[tuple[int, str], ...]]:
        return self._db.call(_groups_of, user_id)


def _group_key(group_id: int) -> int | None:
    """The stored group id, or None for a value no group can have."""
    return group_id if 1 <= group_id <= SQLITE_MAX_INT else None


def _check_user_limits(db: sqlite3.Connection, users: list[int]) -> None:
    row = db.execute(
        "SELECT user_id FROM members WHERE user_id IN (SELECT value FROM json_each(?))"
        " GROUP BY user_id HAVING count(*) >= ? LIMIT 1",
        (id_list(users), MAX_GROUPS_PER_USER),
    ).fetchone()
    if row is not None:
        raise LimitExceeded(f"user {unsigned(row[0])} is in {MAX_GROUPS_PER_USER} groups")


def _join(db: sqlite3.Connection, gid: int, users: list[int], since: int) -> None:
    # Inserted in the given order: join_seq then ranks earlier joiners (and, within one
    # request, lower user ids) first, which is the ownership-transfer order.
    db.executemany(
        "INSERT INTO members (group_id, user_id, since_id) VALUES (?, ?, ?)",
        [(gid, u, since) for u in users],
    )


def _create(
    db: sqlite3.Connection,
    owner_id: int,
    name: str,
    members: tuple[int, ...],
    since_id: int,
    new_id: Callable[[], int],
    threshold: int,
) -> int:
    owner = signed(owner_id)
    users = [owner, *sorted({signed(u) for u in members} - {owner})]
    if len(users) > MAX_GROUP_MEMBERS:
        raise LimitExceeded(f"a group has at most {MAX_GROUP_MEMBERS} members")
    _check_user_limits(db, users)
    gid = _free_group_id(db, new_id)
    large = large_after_join(False, len(users), threshold)
    db.execute(
        "INSERT INTO groups (group_id, name, owner_id, large) VALUES (?, ?, ?, ?)",
        (gid, name, owner, large),
    )
    _join(db, gid, users, signed(since_id))
    return gid


def _free_group_id(db: sqlite3.Connection, new_id: Callable[[], int]) -> int:
    """A random id no group has (this runs inside the create transaction, so it stays free)."""
    for _ in range(CREATE_ATTEMPTS):
        gid = new_id()
        if not 1 <= gid <= GROUP_ID_MAX:
            raise ValueError(f"group id {gid} outside 1..{GROUP_ID_MAX}")
        if db.execute("SELECT 1 FROM groups WHERE group_id = ?", (gid,)).fetchone() is None:
            return gid
    raise RuntimeError(f"no free group id in {CREATE_ATTEMPTS} random draws")


def _require_group(db: sqlite3.Connection, group_id: int) -> tuple[int, int, bool]:
    """(stored group id, stored owner id, large); GroupNotFound if the group does not exist."""
    gid = _group_key(group_id)
    if gid is not None:
        row = db.execute("SELECT owner_id, large FROM groups WHERE group_id = ?", (gid,)).fetchone()
        if row is not None:
            return gid, row[0], bool(row[1])
    raise GroupNotFound(group_id)


def _count(db: sqlite3.Connection, gid: int) -> int:
    (count,) = db.execute("SELECT count(*) FROM members WHERE group_id = ?", (gid,)).fetchone()
    return int(count)


def _set_large(db: sqlite3.Connection, gid: int, was: bool, large: bool) -> None:
    """Store the group's new flag (written only when it changes)."""
    if large != was:
        db.execute("UPDATE groups SET large = ? WHERE group_id = ?", (large, gid))


def _current(db: sqlite3.Connection, gid: int, users: list[int]) -> list[int]:
    """Which of `users` are members of the group, ascending."""
    return [
        u
        for (u,) in db.execute(
            "SELECT user_id FROM members WHERE group_id = ?"
            " AND user_id IN (SELECT value FROM json_each(?)) ORDER BY user_id",
            (gid, id_list(users)),
        )
    ]


def _add(
    db: sqlite3.Connection, group_id: int, users: tuple[int, ...], since_id: int, threshold: int
) -> tuple[int, ...]:
    gid, _, large = _require_group(db, group_id)
    wanted = sorted({signed(u) for u in users})
    present = set(_current(db, gid, wanted))
    new = [u for u in wanted if u not in present]
    if not new:
        return ()
    count = _count(db, gid)
    if count + len(new) > MAX_GROUP_MEMBERS:
        raise LimitExceeded(f"a group has at most {MAX_GROUP_MEMBERS} members")
    _check_user_limits(db, new)
    _join(db, gid, new, signed(since_id))
    _set_large(db, gid, large, large_after_join(large, count + len(new), threshold))
    return tuple(unsigned(u) for u in new)


def _remove(
    db: sqlite3.Connection, group_id: int, users: tuple[int, ...], threshold: int
) -> tuple[int, ...]:
    gid, owner, large = _require_group(db, group_id)
    gone = _current(db, gid, sorted({signed(u) for u in users}))
    if not gone:
        return ()
    db.execute(
        "DELETE FROM members WHERE group_id = ? AND user_id IN (SELECT value FROM json_each(?))",
        (gid, id_list(gone)),
    )
    if owner in gone:
        row = db.execute(
            "SELECT user_id FROM members WHERE group_id = ? ORDER BY join_seq LIMIT 1", (gid,)
        ).fetchone()
        new_owner = row[0] if row else signed(0)
        db.execute("UPDATE groups SET owner_id = ? WHERE group_id = ?", (new_owner, gid))
    _set_large(db, gid, large, large_after_leave(large, _count(db, gid), threshold))
    return tuple(unsigned(u) for u in gone)


def _info(db: sqlite3.Connection, group_id: int) -> GroupInfo | None:
    gid = _group_key(group_id)
    if gid is None:
        return None
    row = db.execute(
        "SELECT name, owner_id, large FROM groups WHERE group_id = ?", (gid,)
    ).fetchone()
    if row is None:
        return None
    members = db.execute(
        "SELECT user_id FROM members WHERE group_id = ? ORDER BY user_id", (gid,)
    ).fetchall()
    name, owner, large = row
    return GroupInfo(
        gid, name, unsigned(owner), tuple(unsigned(u) for (u,) in members), bool(large)
    )


def _since(db: sqlite3.Connection, group_id: int, user_id: int) -> int | None:
    gid = _group_key(group_id)
    if gid is None:
        return None
    row = db.execute(
        "SELECT since_id FROM members WHERE group_id = ? AND user_id = ?", (gid, signed(user_id))
    ).fetchone()
    return unsigned(row[0]) if row else None


def _groups_of(db: sqlite3.Connection, user_id: int) -> tuple[tuple[int, str], ...]:
    rows = db.execute(
        "SELECT g.group_id, g.name FROM members m JOIN groups g ON g.group_id = m.group_id"
        " WHERE m.user_id = ? ORDER BY g.group_id",
        (signed(user_id),),
    ).fetchall()
    return tuple((gid, name) for gid, name in rows)
