"""HBaseHistory beyond the contract suite: row-key order, the reconnect path, threading,
idempotency, and retention by the injected clock and by the family TTL.

Needs HBase's Thrift1 server (tests/support/services.py): skips without it, except under CI
(CI set), where it fails. Every test uses its own `improto_test_*` table and
drops it afterwards. The row-key tests need no server.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import happybase
import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.protocols import portforward
from twisted.python.failure import Failure

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto.limits import U64_MAX
from improto.records import message_of
from improto_server.model import ConvKey, PersistJob
from improto_server.production import hbase_history
from improto_server.production.hbase_history import (
    RETRYABLE,
    HBaseHistory,
    conversation_prefix,
    msg_id_of,
    row_key,
)
from tests.contract.pages import ANY_SIZE
from tests.support import services
from tests.support.clock import DAY_MS, FakeClock, wall_ms
from tests.support.ports import free_port
from tests.support.services import needs
from tests.support.waiting import eventually

HOST, PORT = services.HBASE.host, services.HBASE.port
DM = ConvKey.direct(1, 2)


def message(msg_id: int, server_time: int, key: ConvKey = DM, body: bytes = b"hi") -> Message:
    conv_id = key.a if key.kind == ConvKind.GROUP else key.b
    return Message(
        msg_id, server_time, key.a, "phone-1", key.kind, conv_id, ContentType.TEXT,
        msg_id.to_bytes(16, "big"), body,
    )  # fmt: skip


def job(msg_id: int, server_time: int, key: ConvKey = DM) -> PersistJob:
    return PersistJob(message(msg_id, server_time, key), ())


def messages(records: tuple[bytes, ...]) -> tuple[Message, ...]:
    return tuple(map(message_of, records))


def ids(records: tuple[bytes, ...]) -> list[int]:
    return [m.msg_id for m in messages(records)]


# ----------------------------------------------------------------------- row keys (no HBase)

TOP = [1, 2, 2**32, 2**63 - 1, 2**63, 2**63 + 1, U64_MAX - 1, U64_MAX]


def test_row_keys_sort_newest_first_as_unsigned() -> None:
    keys = sorted(row_key(DM, i) for i in TOP)
    assert [msg_id_of(k) for k in keys] == sorted(TOP, reverse=True)
    assert all(k.startswith(conversation_prefix(DM)) for k in keys)
    for bad in (-1, U64_MAX + 1):
        with pytest.raises(ValueError):
            row_key(DM, bad)


def _same_salt_pair() -> tuple[ConvKey, ConvKey]:
    """Two group keys with one salt where one key's text is a prefix of the other's."""
    short = ConvKey.group(1)
    for n in range(10, 1000):
        other = ConvKey.group(n)
        if str(other).startswith(str(short)) and (
            conversation_prefix(other)[0] == conversation_prefix(short)[0]
        ):
            return short, other
    raise AssertionError("no pair found")


def test_conversations_with_one_salt_stay_contiguous() -> None:
    a, b = _same_salt_pair()  # "g:1" and e.g. "g:1N": without a separator they would interleave
    keys = sorted([row_key(a, i) for i in TOP] + [row_key(b, i) for i in TOP])
    owners = [a if k.startswith(conversation_prefix(a)) else b for k in keys]
    assert owners == [a] * len(TOP) + [b] * len(TOP)
    assert not conversation_prefix(b).startswith(conversation_prefix(a))


# ------------------------------------------------------------------------------- with HBase


@pytest.fixture
@needs("hbase")
def hbase() -> Iterator[happybase.Connection]:
    """A direct connection for inspecting tables; drops the test's tables afterwards."""
    conn = services.hbase_connection()
    yield conn
    conn.close()


@pytest.fixture
def make_history(hbase: happybase.Connection) -> Iterator[Callable[..., HBaseHistory]]:
    """`make_history(**kw)`: an unstarted HBaseHistory on a fresh table (closed, dropped after)."""
    made: list[HBaseHistory] = []

    def make(**kw: Any) -> HBaseHistory:
        kw.setdefault("host", HOST)
        kw.setdefault("port", PORT)
        kw.setdefault("now_ms", FakeClock(wall_ms()))
        kw.setdefault("retention_ms", 180 * DAY_MS)
        table = kw.pop("table", None) or f"improto_test_{uuid.uuid4().hex[:12]}"
        history = HBaseHistory(table=table, **kw)
        made.append(history)
        return history

    yield make
    for history in made:
        pytest_twisted.blockon(history.close())
    existing = set(hbase.tables())
    for name in {h.table_name for h in made}:
        if name.encode() in existing:
            hbase.delete_table(name, disable=True)


@pytest.fixture
def history(make_history: Callable[..., HBaseHistory]) -> HBaseHistory:
    h = make_history()
    pytest_twisted.blockon(h.start())
    return h


def raw_rows(conn: happybase.Connection, h: HBaseHistory, prefix: bytes) -> list[bytes]:
    return [row for row, _ in conn.table(h.table_name).scan(row_prefix=prefix)]


@pytest_twisted.ensureDeferred
async def test_ids_near_u64_max_and_same_salt_conversations(history, hbase):
    a, b = _same_salt_pair()
    now = history.now_ms()
    for i in TOP:
        await history.append(a, job(i, now, a))
        await history.append(b, job(i, now, b))
    newest_first = sorted(TOP, reverse=True)
    page = await history.page(a, 0, 100, 0, ANY_SIZE)
    assert ids(page.records) == newest_first and not page.has_more
    assert ids((await history.page(b, 0, 100, 0, ANY_SIZE)).records) == newest_first
    top = await history.page(a, U64_MAX, 2, 2**63, ANY_SIZE)
    assert ids(top.records) == [U64_MAX - 1, 2**63 + 1]
    assert ids((await history.page(a, 2**63, 100, 1, ANY_SIZE)).records) == [2**63 - 1, 2**32, 2, 1]
    # In the table, one salt bucket holds both conversations, each contiguous, newest first.
    rows = raw_rows(hbase, history, conversation_prefix(a)[:1])
    mine = [r for r in rows if r.startswith(conversation_prefix(a))]
    assert rows[: len(TOP)] == mine and [msg_id_of(r) for r in mine] == newest_first


@pytest_twisted.ensureDeferred
async def test_appending_twice_leaves_one_row_and_one_version(history, hbase):
    j = job(42, history.now_ms())
    await history.append(DM, j)
    await history.append(DM, j)
    await history.append_many([(DM, j)])
    assert raw_rows(hbase, history, conversation_prefix(DM)) == [row_key(DM, 42)]
    cells = hbase.table(history.table_name).cells(
        row_key(DM, 42), b"m:v", versions=10, include_timestamp=True
    )
    # stamped with server_time rounded down to the second (one Thrift call per second)
    assert len(cells) == 1 and cells[0][1] == j.message.server_time // 1000 * 1000
    assert messages((await history.page(DM, 0, 10, 0, ANY_SIZE)).records) == (j.message,)


@pytest_twisted.ensureDeferred
async def test_append_many_batches_across_times_and_conversations(history):
    now = history.now_ms()
    other = ConvKey.group(9)
    items = [(DM, job(i, now + i % 3)) for i in range(1, 31)]
    items += [(other, job(i, now, other)) for i in range(100, 110)]
    await history.append_many(items)
    page = await history.page(DM, 0, 100, 0, ANY_SIZE)
    assert ids(page.records) == list(range(30, 0, -1))
    times = [m.server_time for m in messages(page.records)]
    assert times == [now + i % 3 for i in range(30, 0, -1)]
    assert ids((await history.page(other, 0, 100, 0, ANY_SIZE)).records) == list(range(109, 99, -1))


@pytest_twisted.ensureDeferred
async def test_blocking_calls_run_on_the_pool_threads(make_history, monkeypatch):
    seen: list[tuple[str, threading.Thread]] = []

    def spy(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapped(*args: Any, **kw: Any) -> Any:
            seen.append((name, threading.current_thread()))
            return original(*args, **kw)

        monkeypatch.setattr(cls, name, wrapped)

    spy(happybase.ConnectionPool, "__init__")  # it connects at once
    spy(happybase.Connection, "tables")
    spy(happybase.Table, "put")
    spy(happybase.Table, "scan")
    spy(happybase.Table, "batch")
    h = make_history()
    await h.start()
    await h.append(DM, job(1, h.now_ms()))
    await h.append_many([(DM, job(2, h.now_ms()))])
    assert ids((await h.page(DM, 0, 10, 0, ANY_SIZE)).records) == [2, 1]
    assert {name for name, _ in seen} == {"__init__", "tables", "put", "scan", "batch"}
    for _, thread in seen:
        assert thread is not threading.main_thread()
        assert thread.name.startswith("PoolThread-improto-hbase")


# ---------------------------------------------------------------------- the reconnect path


class _DroppingProxy(portforward.ProxyFactory):
    """Forwards to HBase's Thrift server and can close its client connections, as the Thrift
    server does with connections idle past its read timeout."""

    def __init__(self) -> None:
        super().__init__(HOST, PORT)
        self.live: set[_ProxyServer] = set()
        self.accepted = 0
        self.refuse = False  # close every new connection as soon as it is accepted

    def drop_all(self) -> None:
        for server in list(self.live):
            server.transport.loseConnection()


class _ProxyServer(portforward.ProxyServer):
    factory: _DroppingProxy

    def connectionMade(self) -> None:
        self.factory.accepted += 1
        if self.factory.refuse:
            self.transport.loseConnection()
            return
        self.factory.live.add(self)
        super().connectionMade()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.factory.live.discard(self)
        super().connectionLost(reason)


_DroppingProxy.protocol = _ProxyServer


@pytest.fixture
def proxy(hbase: happybase.Connection) -> Iterator[tuple[_DroppingProxy, int]]:
    factory = _DroppingProxy()
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    yield factory, port.getHost().port
    factory.drop_all()
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_a_dropped_idle_connection_is_retried_once_on_a_fresh_one(make_history, proxy):
    factory, port = proxy
    h = make_history(port=port, pool_size=2)
    await h.start()
    await h.append(DM, job(1, h.now_ms()))
    assert factory.accepted == 1 and h.retries == 0

    factory.drop_all()  # the server side closes the idle connection
    await eventually(lambda: not factory.live)
    page = await h.page(DM, 0, 10, 0, ANY_SIZE)
    assert ids(page.records) == [1]
    assert h.retries == 1  # the first attempt failed on the dead socket, the retry worked
    assert len(factory.live) == 1  # the retry's connection, now open and reusable
    await h.append(DM, job(2, h.now_ms()))
    assert h.retries == 1


@pytest_twisted.ensureDeferred
async def test_the_retry_happens_once_only(make_history, proxy, monkeypatch):
    factory, port = proxy
    h = make_history(port=port, pool_size=1)
    await h.start()
    attempts: list[int] = []
    scan = hbase_history._scan

    def counting_scan(*args: Any) -> Any:
        attempts.append(1)
        return scan(*args)

    monkeypatch.setattr(hbase_history, "_scan", counting_scan)
    factory.refuse = True  # every connection dies, the retry's too
    factory.drop_all()
    await eventually(lambda: not factory.live)
    with pytest.raises(RETRYABLE):
        await h.page(DM, 0, 10, 0, ANY_SIZE)
    assert len(attempts) == 2 and h.retries == 1

    factory.refuse = False  # the server is back: the pool recovers without a restart
    attempts.clear()
    assert (await h.page(DM, 0, 10, 0, ANY_SIZE)).records == ()
    assert len(attempts) <= 2


@pytest_twisted.ensureDeferred
async def test_start_fails_cleanly_without_a_server(make_history):
    dead_port = free_port()  # nothing listens there now
    h = make_history(port=dead_port, timeout_ms=2000)
    with pytest.raises(RETRYABLE):
        await h.start()
    assert h._threads.joined  # the threads were released
    with pytest.raises(RuntimeError):
        await h.page(DM, 0, 10, 0, ANY_SIZE)


@pytest_twisted.ensureDeferred
async def test_close_waits_for_calls_in_flight(history):
    await history.append(DM, job(1, history.now_ms()))
    page: Deferred[Any] = history.page(DM, 0, 10, 0, ANY_SIZE)
    closed = history.close()
    assert ids((await page).records) == [1]
    await closed
    with pytest.raises(RuntimeError):
        await history.append(DM, job(2, history.now_ms()))


# ------------------------------------------------------------------------------- retention


@pytest_twisted.ensureDeferred
async def test_retention_follows_the_injected_clock(make_history, hbase):
    clock = FakeClock(wall_ms())
    retention = 10 * DAY_MS
    h = make_history(now_ms=clock, retention_ms=retention)
    await h.start()
    t0 = clock.now
    # Expiring rows (t0) interleaved with retained ones (t0 + 5 days) in msg_id order.
    for mid, st in ((1, t0), (2, t0), (3, t0 + 5 * DAY_MS), (4, t0), (5, t0 + 5 * DAY_MS)):
        await h.append(DM, job(mid, st))

    clock.now = t0 + retention  # t0 is exactly `retention` old: still served
    assert ids((await h.page(DM, 0, 10, 0, ANY_SIZE)).records) == [5, 4, 3, 2, 1]

    clock.now += 1
    page = await h.page(DM, 0, 10, 0, ANY_SIZE)
    assert ids(page.records) == [5, 3] and not page.has_more
    first = await h.page(DM, 0, 1, 0, ANY_SIZE)
    assert ids(first.records) == [5] and first.has_more  # 4 is expired: it does not count
    last = await h.page(DM, 5, 1, 0, ANY_SIZE)
    assert ids(last.records) == [3] and not last.has_more  # nor do 2 and 1
    assert (await h.page(DM, 3, 10, 0, ANY_SIZE)).records == ()
    # HBase's own clock has not moved: the rows are all still stored.
    assert len(raw_rows(hbase, h, conversation_prefix(DM))) == 5


@pytest_twisted.ensureDeferred
async def test_the_family_ttl_expires_cells_by_server_time(make_history, hbase):
    hour = 3_600_000
    h = make_history(retention_ms=hour)  # clock: wall time, as in production
    await h.start()
    families = hbase.table(h.table_name).families()
    assert families[b"m"]["time_to_live"] == 3600 and families[b"m"]["max_versions"] == 1
    now = wall_ms()
    await h.append(DM, job(1, now - 2 * hour))  # already past retention on HBase's clock
    await h.append(DM, job(2, now - 60_000))
    # HBase itself hides the old cell: a raw scan, without the store's filter, misses it.
    assert [msg_id_of(r) for r in raw_rows(hbase, h, conversation_prefix(DM))] == [2]
    assert ids((await h.page(DM, 0, 10, 0, ANY_SIZE)).records) == [2]


@pytest_twisted.ensureDeferred
async def test_a_page_reads_only_the_records_it_returns(history, hbase, monkeypatch):
    now = history.now_ms()
    big = [PersistJob(message(i, now, body=bytes([i]) * 60_000), ()) for i in range(1, 6)]
    await history.append_many([(DM, j) for j in big])
    # A row as servers wrote it before sizes were stored (no m:s), the newest of them.
    legacy = PersistJob(message(6, now, body=b"L" * 60_000), ())
    hbase.table(history.table_name).put(
        row_key(DM, 6),
        {b"m:v": legacy.stored_record, b"m:t": b"%016x" % now},
        timestamp=hbase_history._cell_ts(now),
    )
    read: list[int] = []
    real = hbase_history._record

    def counting(value: bytes) -> bytes:
        read.append(len(value))
        return real(value)

    monkeypatch.setattr(hbase_history, "_record", counting)
    budget = 2 * len(big[0].record) + 10  # two of these records fit, not three
    page = await history.page(DM, 0, 100, 0, budget)
    assert ids(page.records) == [6, 5] and page.has_more
    assert len(read) == 2  # the legacy row (read to learn its size) and message 5: no more
    read.clear()
    page = await history.page(DM, 5, 100, 0, budget)
    assert ids(page.records) == [4, 3] and page.has_more and len(read) == 2


# ---------------------------------------------------------------------- pre-split by salt

# Creates a table through HBase's Admin API, which (unlike Thrift1) takes split keys: `java
# PreSplit.java TABLE FAMILY TTL_S SPLIT...`, each split in the shell's notation
# (Bytes.toBytesBinary, e.g. \x0A), as the HBase shell's `create ... SPLITS => [...]` reads it.
PRESPLIT_JAVA = r"""
import org.apache.hadoop.hbase.HBaseConfiguration;
import org.apache.hadoop.hbase.TableName;
import org.apache.hadoop.hbase.client.*;
import org.apache.hadoop.hbase.util.Bytes;

public class PreSplit {
    public static void main(String[] a) throws Exception {
        byte[][] splits = new byte[a.length - 3][];
        for (int i = 3; i < a.length; i++) splits[i - 3] = Bytes.toBytesBinary(a[i]);
        ColumnFamilyDescriptorBuilder family =
            ColumnFamilyDescriptorBuilder.newBuilder(Bytes.toBytes(a[1])).setMaxVersions(1);
        if (Integer.parseInt(a[2]) > 0) family.setTimeToLive(Integer.parseInt(a[2]));
        try (Connection c = ConnectionFactory.createConnection(HBaseConfiguration.create());
             Admin admin = c.getAdmin()) {
            admin.createTable(TableDescriptorBuilder.newBuilder(TableName.valueOf(a[0]))
                .setColumnFamily(family.build()).build(), splits);
        }
    }
}
"""


def _admin_java() -> tuple[str, str]:
    """(java, classpath) for PRESPLIT_JAVA: a JDK (it compiles the source) and the HBase jars
    and conf of scripts/services; skips when they are not on this machine."""
    repo = Path(__file__).resolve().parents[1]
    hbase_dir = Path(os.environ.get("IMPROTO_SERVICES_DIR") or repo / ".services") / "hbase"
    jars = hbase_dir / "classpath.txt"
    if services.HBASE.host not in ("127.0.0.1", "localhost") or not jars.is_file():
        pytest.skip(f"no HBase of scripts/services here ({jars})")
    for java in (
        os.environ.get("IMPROTO_JAVA17"),
        *sorted(glob.glob("/usr/lib/jvm/java-17-openjdk-*/bin/java")),
        shutil.which("java"),
    ):
        if java and os.access(java, os.X_OK) and Path(java).with_name("javac").exists():
            return java, f"{jars.read_text().strip()}:{hbase_dir / 'conf'}"
    pytest.skip("no JDK to run the HBase Admin API with")


def _shell_splits(command: str) -> list[str]:
    return re.findall(r"'(\\x[0-9A-F]{2})'", command)


def test_split_keys_give_each_salt_bucket_its_own_region() -> None:
    keys = hbase_history.split_keys()
    assert keys == [bytes((s,)) for s in range(1, hbase_history.SALT_BUCKETS)]
    starts = [b"", *keys]
    for n in range(1, 500):
        for key in (ConvKey.direct(n, n + 1), ConvKey.group(n)):
            prefix = conversation_prefix(key)
            region = max(i for i, start in enumerate(starts) if start <= prefix)
            assert region == prefix[0]  # salt s: region s, and only it
    # The shell command carries exactly these keys, in the escapes Bytes.toBytesBinary reads.
    command = hbase_history.create_table_command("t", 3600)
    assert command.startswith("create 't', {NAME => 'm', VERSIONS => 1, TTL => 3600}, SPLITS")
    assert [bytes((int(s[2:], 16),)) for s in _shell_splits(command)] == keys


@pytest_twisted.ensureDeferred
async def test_a_table_created_as_documented_has_one_region_per_salt_bucket(
    make_history, hbase, tmp_path, logs
):
    java, classpath = _admin_java()
    h = make_history()  # dropped afterwards; start() finds the table made below
    ttl = -(-h.retention_ms // 1000)
    command = hbase_history.create_table_command(h.table_name, ttl)  # docs/SERVICES.md's
    source = tmp_path / "PreSplit.java"
    source.write_text(PRESPLIT_JAVA)
    created = subprocess.run(
        [java, "-cp", classpath, str(source), h.table_name, "m", str(ttl),
         *_shell_splits(command)],
        capture_output=True, text=True, timeout=180,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr[-3000:]

    await h.start()
    regions = hbase.table(h.table_name).regions()
    assert len(regions) == hbase_history.SALT_BUCKETS
    assert [r["start_key"] for r in regions] == [b"", *hbase_history.split_keys()]
    assert not [line for line in logs if "not pre-split" in line or "cannot pre-split" in line]
    families = hbase.table(h.table_name).families()
    assert families[b"m"]["max_versions"] == 1 and families[b"m"]["time_to_live"] == ttl

    # A conversation in every salt bucket, so in every region: written and read back.
    by_salt: dict[int, ConvKey] = {}
    for n in range(1, 1000):
        by_salt.setdefault(conversation_prefix(ConvKey.group(n))[0], ConvKey.group(n))
    assert len(by_salt) == hbase_history.SALT_BUCKETS
    now = h.now_ms()
    await h.append_many([(key, job(salt + 1, now, key)) for salt, key in by_salt.items()])
    for salt, key in by_salt.items():
        assert ids((await h.page(key, 0, 10, 0, ANY_SIZE)).records) == [salt + 1]
        rows = raw_rows(hbase, h, conversation_prefix(key))
        region = regions[salt]
        assert all(region["start_key"] <= row < (region["end_key"] or b"\xff") for row in rows)


@pytest_twisted.ensureDeferred
async def test_a_table_created_through_thrift1_has_one_region_and_says_how_to_pre_split(
    make_history, hbase, logs
):
    h = make_history()
    await h.start()
    assert len(hbase.table(h.table_name).regions()) == 1  # Thrift1 takes no split keys
    warned = [line for line in logs if "cannot pre-split" in line]
    assert len(warned) == 1 and f"create '{h.table_name}'" in warned[0]
    assert "SPLITS => ['\\x01'" in warned[0] and "docs/SERVICES.md" in warned[0]
    # The next start finds it and says it is not pre-split (once), without failing.
    again = make_history(table=h.table_name)
    await again.start()
    assert len([line for line in logs if "is not pre-split by salt" in line]) == 1
