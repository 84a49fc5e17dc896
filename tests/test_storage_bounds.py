"""Redis at its memory limit (maxmemory + noeviction, as scripts/services runs it): a write
Redis refuses fails whole and visibly, so nothing acknowledged is lost and nothing is half
written; once memory is free again the same writes succeed.

Each test runs a private redis-server (real Redis, real OOM errors) on a free port with a
tiny maxmemory, started and stopped here; RabbitMQ is the shared one.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.config import InboxCaps
from improto_server.embedded.backend import SQLiteBackend
from improto_server.embedded.database import SCHEMA_VERSION, UnsupportedSchema
from improto_server.model import GroupInfo, PersistJob, PushTarget
from improto_server.persister import Persister
from improto_server.production.redis_connection import connect
from improto_server.production.redis_inbox import RedisInbox
from tests.contract.pages import ANY_SIZE, ids
from tests.support import services
from tests.support.clock import INBOX_RETENTION_MS, FakeClock
from tests.support.ports import LOOPBACK, free_port
from tests.support.services import Address, needs
from tests.support.waiting import eventually

MAXMEMORY = "2mb"


@contextlib.contextmanager
def private(addr: Address) -> Iterator[services.SyncRedis]:
    client = services.SyncRedis(addr)
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def tiny_redis(tmp_path: Path) -> Iterator[Address]:
    """A redis-server of our own with maxmemory 2 MB and noeviction."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", LOOPBACK, "--dir", str(tmp_path),
         "--maxmemory", MAXMEMORY, "--maxmemory-policy", "noeviction", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    addr = Address(LOOPBACK, port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                with private(addr) as client:
                    if client("PING") == b"PONG":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the private redis-server did not start")
            time.sleep(0.05)
        yield addr
    finally:
        proc.terminate()
        proc.wait(10)


def _used_memory(client: services.SyncRedis) -> int:
    info = client("INFO", "memory").decode()
    return int(info.split("used_memory:")[1].split()[0])


def fill(addr: Address) -> int:
    """Write filler keys until Redis refuses one with OOM; returns how many went in. Used
    memory then hovers around the limit (buffers come and go), so the limit is also lowered a
    little below it: every write is refused until free()."""
    n = 0
    with private(addr) as client:
        for _ in range(1000):
            try:
                client("SET", f"filler:{n}", b"f" * 65_536)
            except RuntimeError as e:
                assert "OOM" in str(e), e
                break
            n += 1
        client("CONFIG", "SET", "maxmemory", _used_memory(client) - 256 * 1024)
        with pytest.raises(RuntimeError, match="OOM"):
            client("SET", "probe", "x")
    return n


def free(addr: Address, n: int) -> None:
    with private(addr) as client:
        for i in range(n):
            client("DEL", f"filler:{i}")
        client("CONFIG", "SET", "maxmemory", MAXMEMORY)


_ids = iter(range(5_000_000, 10**9))


def job(*users: int, body: bytes = b"x" * 20_000) -> PersistJob:
    mid = next(_ids)
    m = Message(
        mid, 1_000, 1, "phone", ConvKind.USER, 2, ContentType.TEXT, mid.to_bytes(16, "big"), body
    )
    return PersistJob(m, users)


V5_TABLES = ("notify_jobs", "push_targets", "revocations")  # what schema 5 added
V6_TABLES = ("timeline", "timeline_heads")  # what schema 6 added


def drop_v7_columns(db: sqlite3.Connection) -> None:
    """Back to the tables a version-6 server had (schema 7 added the groups' large flag)."""
    db.execute("ALTER TABLE groups DROP COLUMN large")


def drop_v6_tables(db: sqlite3.Connection) -> None:
    """Back to the tables a version-5 server had."""
    drop_v7_columns(db)
    for table in V6_TABLES:
        db.execute(f"DROP TABLE {table}")


def drop_v5_tables(db: sqlite3.Connection) -> None:
    """Back to the tables a version-4 (or older) server had."""
    drop_v6_tables(db)
    for table in V5_TABLES:
        db.execute(f"DROP TABLE {table}")


def table_sql(path: Path, tables: Sequence[str]) -> list[str]:
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT sql FROM sqlite_master WHERE tbl_name IN (SELECT value FROM json_each(?))"
            " ORDER BY name",
            (json.dumps(list(tables)),),
        ).fetchall()
    return [sql for (sql,) in rows]


@pytest_twisted.ensureDeferred
async def test_an_append_redis_refuses_writes_nothing_and_succeeds_later(tiny_redis):
    redis = connect(tiny_redis.host, tiny_redis.port)
    inbox = RedisInbox(redis, "oom", FakeClock(), INBOX_RETENTION_MS)
    try:
        await inbox.start()
        before = [job(1, 2) for _ in range(3)]
        await inbox.append_many(before)
        page = await inbox.page(1, 0, 100, ANY_SIZE)
        filled = fill(tiny_redis)

        refused = [job(1, 2, 3) for _ in range(2)]
        with pytest.raises(Exception, match="OOM"):
            await inbox.append_many(refused)
        # Nothing of the refused batch is there: entries, cursors, byte totals as before.
        assert await inbox.page(1, 0, 100, ANY_SIZE) == page
        assert await redis.execute_command("HGET", inbox.keys(1)[0], "seq") == b"3"
        assert await redis.execute_command("EXISTS", *inbox.keys(3)) == 0
        # Reads still work at the limit.
        assert ids(await inbox.page(2, 0, 100, ANY_SIZE)) == ids(page)

        free(tiny_redis, filled)
        await inbox.append_many(refused)  # the persister's retry
        for user in (1, 2):
            after = await inbox.page(user, 0, 100, ANY_SIZE)
            assert ids(after) == [j.message.msg_id for j in before + refused]
            assert list(after.cursors) == [1, 2, 3, 4, 5]
        assert ids(await inbox.page(3, 0, 100, ANY_SIZE)) == [j.message.msg_id for j in refused]
    finally:
        await redis.disconnect()


class CountingInbox(RedisInbox):
    calls = 0

    def append_many(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        self.calls += 1
        return super().append_many(jobs)


@pytest_twisted.ensureDeferred
async def test_the_persister_retries_until_redis_has_room(tiny_redis, tmp_path):
    clock = FakeClock()
    sqlite = SQLiteBackend(tmp_path / "q.sqlite3", now_ms=clock)
    redis = connect(tiny_redis.host, tiny_redis.port)
    inbox = CountingInbox(redis, "oom", clock, INBOX_RETENTION_MS)
    await sqlite.start()
    try:
        await inbox.start()
        filled = fill(tiny_redis)
        jobs = [job(7, 8) for _ in range(5)]
        for j in jobs:
            await sqlite.queue.accept(j, j.message.client_msg_id)  # acknowledged to the sender
        persister = Persister(sqlite.queue, inbox, sqlite.history)
        persister.start()
        await eventually(lambda: inbox.calls >= 2, timeout=10)  # tried, and tried again
        assert (await inbox.page(7, 0, 100, ANY_SIZE)).records == ()

        free(tiny_redis, filled)
        expected = [j.message.msg_id for j in jobs]
        deadline = time.monotonic() + 15
        while (got := ids(await inbox.page(8, 0, 100, ANY_SIZE))) != expected:
            assert time.monotonic() < deadline, got
            await deferLater(reactor, 0.05, lambda: None)
        assert got == expected  # every acknowledged message, once, in order
        assert ids(await inbox.page(7, 0, 100, ANY_SIZE)) == expected
    finally:
        await sqlite.close()
        await redis.disconnect()


@pytest.fixture
@needs("rabbitmq")
def queue_prefix() -> Iterator[str]:
    prefix = f"improto-oom-{uuid.uuid4().hex[:12]}"
    yield prefix
    services.delete_queues(prefix, 1)


@pytest_twisted.ensureDeferred
async def test_an_accept_redis_refuses_is_not_acknowledged(tiny_redis, queue_prefix):
    from improto_server.production.rabbit_queue import RabbitQueue

    queue = RabbitQueue(
        services.AMQP_URL, redis_host=tiny_redis.host, redis_port=tiny_redis.port,
        prefix=queue_prefix, partitions=1,
    )  # fmt: skip
    await queue.start()
    try:
        filled = fill(tiny_redis)
        j = job(1, 2, body=b"hello")
        cmid = j.message.client_msg_id
        with pytest.raises(Exception, match="OOM"):
            await queue.accept(j, cmid)  # the SEND gets an error, not a SEND_ACK
        with private(tiny_redis) as client:
            assert client.scan(queue_prefix) == []  # no dedup key half-written
        assert services.queued_messages([f"{queue_prefix}.persist.0"]) == 0

        free(tiny_redis, filled)
        accepted = await queue.accept(j, cmid)  # the client's resend
        assert accepted.msg_id == j.message.msg_id and not accepted.duplicate
        await eventually(
            lambda: services.queued_messages([f"{queue_prefix}.persist.0"]) == 1, timeout=10
        )
    finally:
        await queue.close()


@pytest_twisted.ensureDeferred
async def test_a_version_1_database_gets_sizes_and_totals(tmp_path):
    """Schema 2 adds inbox sizes, byte totals and device order; a version-1 file migrates."""
    path = tmp_path / "old.sqlite3"
    backend = SQLiteBackend(path, now_ms=FakeClock())
    await backend.start()
    jobs = [job(1, body=b"y" * 50_000) for _ in range(3)]
    await backend.inbox.append_many(jobs)
    await backend.inbox.advance(1, "phone", 1)
    await backend.close()
    with sqlite3.connect(path) as db:  # back to what a version-1 server wrote
        for table, column in (("inbox", "size"), ("inbox_head", "bytes"), ("positions", "used")):
            db.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        db.execute("DROP TABLE conv_rows")
        db.execute("DROP TABLE conv_users")
        drop_v5_tables(db)
        db.execute("PRAGMA user_version = 1")

    backend = SQLiteBackend(path, now_ms=FakeClock(), inbox_caps=InboxCaps(max_bytes=131_072))
    await backend.start()
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            (total,) = db.execute("SELECT bytes FROM inbox_head").fetchone()
        assert total == 3 * len(jobs[0].record)
        # The migrated total counts: the cap trims the oldest, the budget sees the sizes.
        page = await backend.inbox.page(1, 0, 10, ANY_SIZE)
        assert ids(page) == [j.message.msg_id for j in jobs[1:]] and page.gap
        assert len((await backend.inbox.page(1, 0, 10, len(jobs[0].record))).records) == 1
        assert await backend.inbox.position(1, "phone") == 1
        # On through versions 3 and 4: the inbox users are folded up to their heads (user 2,
        # the receiver, has list rows from the messages and no inbox).
        assert await backend.conversations.behind() == []
        with sqlite3.connect(path) as db:
            folded = db.execute("SELECT user_id, folded_to FROM conv_users ORDER BY 1").fetchall()
        assert folded == [(1 - 2**63, 3), (2 - 2**63, 0)]
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_version_2_database_gets_conversation_lists(tmp_path):
    """Schema 3 adds the conversation lists; the migration fills them from the retained
    messages: 1:1 both sides, groups for the members that joined before the message."""
    path = tmp_path / "v2.sqlite3"
    clock = FakeClock()
    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    gid = await backend.groups.create(1, "g", (2, 3), since_id=1)
    await backend.groups.add(gid, (4,), since_id=1_000_000_000)  # joined after the messages

    def message(mid: int, sender: int, kind: int, conv: int) -> PersistJob:
        cmid = mid.to_bytes(16, "big")
        m = Message(mid, clock.now, sender, "phone", kind, conv, ContentType.TEXT, cmid, b"hi")
        return PersistJob(m, ())

    sent = [
        message(10, 1, ConvKind.USER, 2),
        message(20, 2, ConvKind.USER, 1),  # bob answers: the newest of alice/bob
        message(30, 3, ConvKind.USER, 3),  # carol's notes to self
        message(40, 3, ConvKind.GROUP, gid),
        message(5, 1, ConvKind.USER, 4),  # alice/dave
    ]
    await backend.history.append_many([(j.history_key, j) for j in sent])
    await backend.close()
    with sqlite3.connect(path) as db:  # back to what a version-2 server wrote
        drop_v5_tables(db)
        db.executescript("DROP TABLE conv_rows; DROP TABLE conv_users; PRAGMA user_version = 2;")

    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        convs = backend.conversations

        async def rows(user: int) -> list[tuple[int, int, int, int, int, int]]:
            page = await convs.changes(user, 0, 100, ANY_SIZE)
            return [(c.conv_kind, c.conv_id, c.version, c.last_id, c.read_id, c.unread)
                    for c in page.convs]  # fmt: skip

        u, g = ConvKind.USER, ConvKind.GROUP
        # Versions by last message; read state unknown: nothing read, nothing counted.
        assert await rows(1) == [(u, 4, 1, 5, 0, 0), (u, 2, 2, 20, 0, 0), (g, gid, 3, 40, 0, 0)]
        assert await rows(2) == [(u, 1, 1, 20, 0, 0), (g, gid, 2, 40, 0, 0)]
        assert await rows(3) == [(u, 3, 1, 30, 0, 0), (g, gid, 2, 40, 0, 0)]
        assert await rows(4) == [(u, 1, 1, 5, 0, 0)]  # not the group: joined after it
        page = await convs.by_activity(1, 0, 100, ANY_SIZE)
        assert page.version == 3 and page.convs[0].last == sent[3].record
        # New changes continue the versions; the rows age from their last message's time.
        clock.advance(backend.history_retention_ms // 2)
        await convs.record([PersistJob(message(50, 2, ConvKind.USER, 1).message, (1, 2))])
        assert (await convs.changes(1, 3, 100, ANY_SIZE)).convs[0].version == 4
        clock.advance(backend.history_retention_ms - backend.history_retention_ms // 2 + 1)
        assert (await backend.sweep())["conversations"] == 6  # all but the two rows just changed
        assert [c.conv_id for c in (await convs.by_activity(2, 0, 100, ANY_SIZE)).convs] == [1]
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_version_3_database_gets_fold_positions(tmp_path):
    """Schema 4 adds each user's folded inbox position. A version-3 persister recorded every
    entry it appended, so the migration folds every inbox up to its head: the rows stay as
    they were, nobody is behind, and a fold applies only what is appended after it."""
    path = tmp_path / "v3.sqlite3"
    clock = FakeClock()
    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    convs = backend.conversations
    recorded = [job(1, 2, body=b"hi") for _ in range(3)]  # 1 -> 2
    await backend.inbox.append_many(recorded)
    await convs.record(recorded)
    await backend.inbox.append_many([job(3, body=b"hi")])  # an inbox without list rows
    await backend.close()
    with sqlite3.connect(path) as db:  # back to what a version-3 server wrote
        db.execute("DELETE FROM conv_users WHERE user_id = ?", (3 - 2**63,))
        db.execute("ALTER TABLE conv_users DROP COLUMN folded_to")
        drop_v5_tables(db)
        db.execute("PRAGMA user_version = 3")
        before = db.execute("SELECT * FROM conv_rows ORDER BY 1, 2, 3").fetchall()
        users = db.execute("SELECT * FROM conv_users ORDER BY 1").fetchall()

    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    convs = backend.conversations
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            assert db.execute("SELECT * FROM conv_rows ORDER BY 1, 2, 3").fetchall() == before
            migrated = db.execute("SELECT * FROM conv_users ORDER BY 1").fetchall()
        # Kept: versions and totals; folded to the heads (3, 3 and 1); user 3 gets its row.
        assert migrated == [(*users[0], 3), (*users[1], 3), (3 - 2**63, 0, 0, 1)]
        assert await convs.behind() == []
        assert await convs.fold([1, 2, 3]) == []
        with sqlite3.connect(path) as db:
            assert db.execute("SELECT * FROM conv_rows ORDER BY 1, 2, 3").fetchall() == before
        bob = (await convs.changes(2, 0, 10, ANY_SIZE)).convs
        assert [(c.conv_id, c.unread) for c in bob] == [(1, 3)]  # not counted twice

        late = job(1, 2, body=b"hi")
        await backend.inbox.append_many([late])
        assert sorted(await convs.behind()) == [1, 2]
        assert await convs.fold([1, 2]) == []
        bob = (await convs.changes(2, 0, 10, ANY_SIZE)).convs
        assert [(c.conv_id, c.unread, c.last_id) for c in bob] == [(1, 4, late.message.msg_id)]
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_version_4_database_gets_the_push_tables(tmp_path):
    """Schema 5 adds push registrations, revocations and the notifier's queue: new, empty
    tables exactly as a new database has them; everything else stays as it was."""
    fresh = tmp_path / "fresh.sqlite3"
    backend = SQLiteBackend(fresh, now_ms=FakeClock())
    await backend.start()
    await backend.close()
    path = tmp_path / "v4.sqlite3"
    clock = FakeClock()
    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    sent = [job(1, 2, body=b"hi") for _ in range(3)]
    await backend.inbox.append_many(sent)
    await backend.conversations.record(sent)
    await backend.inbox.advance(2, "phone", 2)
    await backend.close()
    with sqlite3.connect(path) as db:  # back to what a version-4 server wrote
        drop_v5_tables(db)
        db.execute("PRAGMA user_version = 4")
        tables = ("conv_rows", "conv_users", "inbox", "inbox_head", "positions", "messages")
        before = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}

    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            after = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
            assert after == before
            for table in V5_TABLES:
                assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        assert table_sql(path, V5_TABLES) == table_sql(fresh, V5_TABLES) != []
        devices = backend.devices
        assert await devices.targets([1, 2]) == {} and await devices.revoked_before(2) == 0
        await devices.set_target(2**63, "phone", PushTarget("apns", "tok", True))
        await devices.revoke(2, 1_750_000_000_000)
        assert await backend.inbox.position(2, "phone") == 2
        assert len((await backend.inbox.page(1, 0, 10, ANY_SIZE)).records) == 3
    finally:
        await backend.close()
    backend = SQLiteBackend(path, now_ms=clock)  # a current file opens as it is
    await backend.start()
    try:
        assert await backend.devices.targets([2**63]) == {
            2**63: {"phone": PushTarget("apns", "tok", True)}
        }
        assert await backend.devices.revoked_before(2) == 1_750_000_000_000
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_version_5_database_gets_the_timeline_tables(tmp_path):
    """Schema 6 adds the large groups' timelines: new, empty tables exactly as a new database
    has them; everything else stays as it was."""
    fresh = tmp_path / "fresh.sqlite3"
    backend = SQLiteBackend(fresh, now_ms=FakeClock())
    await backend.start()
    await backend.close()
    path = tmp_path / "v5.sqlite3"
    clock = FakeClock()
    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    sent = [job(1, 2, body=b"hi") for _ in range(3)]
    await backend.inbox.append_many(sent)
    await backend.history.append_many([(j.history_key, j) for j in sent])
    await backend.devices.set_target(2, "phone", PushTarget("fcm", "tok", False))
    await backend.close()
    tables = ("inbox", "inbox_head", "messages", "history", "push_targets", "conv_users")
    with sqlite3.connect(path) as db:  # back to what a version-5 server wrote
        drop_v6_tables(db)
        db.execute("PRAGMA user_version = 5")
        before = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}

    backend = SQLiteBackend(path, now_ms=clock)
    await backend.start()
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
            after = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
            assert after == before
            for table in V6_TABLES:
                assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
        assert table_sql(path, V6_TABLES) == table_sql(fresh, V6_TABLES) != []
        assert await backend.timeline.heads([7]) == {}
        m = Message(10, 1_000, 1, "phone", ConvKind.GROUP, 7, ContentType.TEXT, bytes(16), b"hi")
        assert await backend.timeline.append([PersistJob(m, ())]) == [1]
        assert len((await backend.inbox.page(2, 0, 10, ANY_SIZE)).records) == 3
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_version_6_database_gets_the_large_flag(tmp_path):
    """Schema 7 adds the groups' large flag: the column exactly as a new database has it,
    every existing group small (whatever its size: version 6 wrote no timeline), flagged at
    its next join above the threshold; everything else stays as it was."""
    fresh = tmp_path / "fresh.sqlite3"
    backend = SQLiteBackend(fresh, now_ms=FakeClock())
    await backend.start()
    await backend.close()
    path = tmp_path / "v6.sqlite3"
    clock = FakeClock()
    backend = SQLiteBackend(path, now_ms=clock, large_group_threshold=4)
    await backend.start()
    big = await backend.groups.create(1, "big", (2, 3, 4, 5, 6), 10)  # 6 members
    small = await backend.groups.create(1, "small", (2,), 10)
    await backend.inbox.append_many([job(1, 2, body=b"hi")])
    await backend.close()
    tables = ("groups", "members", "inbox", "messages")
    with sqlite3.connect(path) as db:  # back to what a version-6 server wrote
        drop_v7_columns(db)
        db.execute("PRAGMA user_version = 6")
        before = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}

    backend = SQLiteBackend(path, now_ms=clock, large_group_threshold=4)
    await backend.start()
    groups = backend.groups
    try:
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,) == (7,)
            after = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1, 2").fetchall() for t in tables}
            assert after["groups"] == [(*row, 0) for row in before["groups"]]
            assert {t: after[t] for t in tables[1:]} == {t: before[t] for t in tables[1:]}
            columns = db.execute("PRAGMA table_info(groups)").fetchall()
        with sqlite3.connect(fresh) as db:
            assert columns == db.execute("PRAGMA table_info(groups)").fetchall()
        assert groups.large_threshold == 4
        assert await groups.info(big) == GroupInfo(big, "big", 1, (1, 2, 3, 4, 5, 6), large=False)
        assert await groups.info(small) == GroupInfo(small, "small", 1, (1, 2))
        assert await groups.remove(big, (6,)) == (6,)  # a removal never sets the flag
        assert not (await groups.info(big)).large
        assert await groups.add(big, (7,), 20) == (7,)  # the next join above the threshold
        assert (await groups.info(big)).large
        assert len((await backend.inbox.page(2, 0, 10, ANY_SIZE)).records) == 1
    finally:
        await backend.close()
    backend = SQLiteBackend(path, now_ms=clock)  # a current file opens as it is
    await backend.start()
    try:
        assert (await backend.groups.info(big)).large
        assert not (await backend.groups.info(small)).large
    finally:
        await backend.close()


@pytest_twisted.ensureDeferred
async def test_a_database_of_a_newer_version_is_refused(tmp_path):
    """A file a newer improto wrote is refused before anything in it is read or written."""
    path = tmp_path / "newer.sqlite3"
    backend = SQLiteBackend(path, now_ms=FakeClock())
    await backend.start()
    await backend.inbox.append_many([job(1, body=b"hi")])
    await backend.close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        before = db.execute("SELECT * FROM inbox").fetchall()
    backend = SQLiteBackend(path, now_ms=FakeClock())
    with pytest.raises(UnsupportedSchema, match="a newer improto wrote it"):
        await backend.start()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION + 1,)
        assert db.execute("SELECT * FROM inbox").fetchall() == before
