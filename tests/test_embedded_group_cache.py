"""embedded/groups.py: info() served from its bounded cache, exact across every change."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import reactor

from improto_server.embedded import groups as groups_module
from improto_server.embedded.database import Database
from improto_server.embedded.groups import SQLiteGroups


class CountingDatabase(Database):
    def __init__(self, path: Path) -> None:
        super().__init__(path, reactor)
        self.calls: list[str] = []

    def call(self, fn, *args):  # type: ignore[no-untyped-def]
        self.calls.append(fn.__name__)
        return super().call(fn, *args)


@pytest_twisted.ensureDeferred
async def test_info_is_read_once_then_follows_every_change(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "g.sqlite3")
    await db.open()
    try:
        g = SQLiteGroups(db)
        gid = await g.create(1, "team", (2, 3), 10)
        first = await g.info(gid)
        assert first is not None and first.members == (1, 2, 3)
        assert await g.info(gid) == first
        assert db.calls.count("_info") == 1  # the second came from the cache
        await g.add(gid, (4,), 11)
        after_add = await g.info(gid)
        assert after_add is not None and after_add.members == (1, 2, 3, 4)
        await g.remove(gid, (1,))  # the owner leaves: ownership moves
        after_leave = await g.info(gid)
        assert after_leave is not None
        assert after_leave.members == (2, 3, 4) and after_leave.owner_id == 2
        assert db.calls.count("_info") == 3
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_a_read_running_while_a_change_is_issued_is_not_kept(tmp_path: Path) -> None:
    db = CountingDatabase(tmp_path / "g.sqlite3")
    await db.open()
    try:
        g = SQLiteGroups(db)
        gid = await g.create(1, "team", (2,), 10)
        reading = g.info(gid)  # runs before the add: it reads the old members
        adding = g.add(gid, (3,), 11)
        old = await reading
        assert old is not None and old.members == (1, 2)
        await adding
        now = await g.info(gid)
        assert now is not None and now.members == (1, 2, 3)
        assert db.calls.count("_info") == 2  # the first read was not kept
    finally:
        await db.close()


@pytest_twisted.ensureDeferred
async def test_the_cache_holds_at_most_its_member_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(groups_module, "CACHE_MEMBERS", 10)
    db = CountingDatabase(tmp_path / "g.sqlite3")
    await db.open()
    try:
        g = SQLiteGroups(db)
        small = [await g.create(1, f"s{i}", (2, 3, 4), 10) for i in range(3)]  # 4 each
        big = await g.create(1, "big", tuple(range(2, 13)), 10)  # 12: never cached
        for gid in small:
            await g.info(gid)
        assert g._cached_members <= 10 and len(g._cache) == 2  # the oldest was dropped
        assert small[0] not in g._cache
        for _ in range(2):
            info = await g.info(big)
            assert info is not None and len(info.members) == 12
        assert big not in g._cache and g._cached_members <= 10
    finally:
        await db.close()
