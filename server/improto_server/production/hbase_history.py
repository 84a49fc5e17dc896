"""HistoryStore on HBase, through its Thrift1 gateway with happybase.

Row key: ``salt ‖ conversation ‖ 0x00 ‖ be64(2**64-1 - msg_id)``.

* The 1-byte salt (CRC-32 of the conversation key, mod `SALT_BUCKETS`) spreads conversations
  over regions while each conversation stays one contiguous key range. A table created
  pre-split at the salt boundaries (`split_keys`: 0x01 .. 0x0f) starts with one region per
  salt bucket, so writes spread over the region servers from the first message instead of
  all going to one region until HBase splits it by size. Thrift1 (happybase) cannot pass split
  keys: its createTable takes the column families only (Thrift2 and the Admin API can). So a
  missing table is still created here, with one region and a warning that gives the HBase
  shell command (`create_table_command`) for creating it pre-split beforehand, which is what
  a deployment does (docs/SERVICES.md, "Pre-splitting the history table"); `start()` also
  says so when an existing table is not split at the salt boundaries.
* The conversation is ``str(ConvKey)`` ("u:1:2", "g:7"); the 0x00 after it cannot occur in it,
  so no conversation's keys fall inside another's range ("g:1" vs "g:12").
* The inverted big-endian id makes a forward scan from the conversation prefix return the
  newest message first, and byte order equals unsigned order, so ids near 2**64-1 sort right.

The table also holds the large groups' timelines (production/timeline.py): rows
``salt ‖ "t:<group id>" ‖ 0x00 ‖ be64(seq)``, with the same cells, written by `put_rows` and
read by `scan` (consecutive seqs).

One row per message: column ``m:v`` holds its stored record (improto.records: a storage
format byte, then the MESSAGE record; cells written before formats were numbered hold a PUSH
payload), ``m:t`` its server_time as 16 hex digits, whose byte order is its numeric order,
so a server-side SingleColumnValueFilter skips rows past retention, and ``m:s`` the length of
its MESSAGE record (decimal). A page reads no more than its byte budget: it scans ``m:s`` and
``m:t`` only, picks the rows whose records fit, then reads just those rows' ``m:v`` (one
getRows call). Rows written before ``m:s`` existed are read one by one as the page reaches
them, so at most one record that does not fit is read. Cells are written with
their server_time (rounded down to the second) as timestamp, so the family TTL (the
retention) removes them physically relative to HBase's wall clock; reads still filter by the
injected clock, which is what the contract defines retention against.

happybase blocks, so every call runs on a dedicated thread pool as large as the happybase
connection pool (a worker never waits for a connection). The Thrift server drops connections
idle for `hbase.thrift.server.socket.read.timeout` (60 s): an operation that fails on the
transport is retried once, on a freshly opened connection; every operation is idempotent.
"""

from __future__ import annotations

import functools
import threading
import zlib
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple, TypeVar, cast

import happybase
from thriftpy2.transport import TTransportException

from twisted.internet.defer import Deferred, DeferredList, fail, gatherResults, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.python.threadpool import ThreadPool

from improto.limits import U64_MAX
from improto.records import CorruptRecord, record_of_stored
from improto_server.deferreds import as_deferred
from improto_server.model import ConvKey, HistoryRecords, PersistJob
from improto_server.production.once import Once
from improto_server.reactor_types import IServerReactor, server_reactor

_log = Logger()

_R = TypeVar("_R")

FAMILY = "m"
COL_MESSAGE = b"m:v"
COL_TIME = b"m:t"
COL_SIZE = b"m:s"
SALT_BUCKETS = 16
_SEPARATOR = b"\x00"
# A put with Long.MAX_VALUE as timestamp means "now" to HBase, and Thrift's i64 cannot carry
# larger values: server_times at or above it (never wall-clock ones) are stored just below.
_MAX_CELL_TS = 2**63 - 2
_SCAN_CACHING = 1000  # rows per scannerGetList round trip, at most

# What an idle connection closed by the Thrift server looks like on the next call:
# "TSocket read 0 bytes" (END_OF_FILE), EPIPE or ECONNRESET.
RETRYABLE: tuple[type[BaseException], ...] = (TTransportException, ConnectionError)


def key_prefix(text: str) -> bytes:
    """The first bytes of every row key under `text` (a conversation's "u:1:2", "g:7", a
    timeline's "t:7"): salt, text, separator."""
    raw = text.encode("ascii")
    return bytes((zlib.crc32(raw) % SALT_BUCKETS,)) + raw + _SEPARATOR


def split_keys(buckets: int = SALT_BUCKETS) -> list[bytes]:
    """The start keys of a pre-split table's regions after the first (which starts at b""):
    one region per salt bucket, the rows of salt s in [bytes([s]), bytes([s + 1]))."""
    return [bytes((salt,)) for salt in range(1, buckets)]


def create_table_command(table: str, ttl_s: int | None = None) -> str:
    """The HBase shell command that creates `table` as HBaseHistory would (family m, one
    version, the TTL), pre-split by salt. The shell reads each split with
    Bytes.toBytesBinary, so '\\x0A' is the byte 0x0a (its escapes take upper-case hex only:
    '\\x0a' would be the three characters x0a)."""
    ttl = f", TTL => {ttl_s}" if ttl_s else ""
    splits = ", ".join(f"'\\x{key[0]:02X}'" for key in split_keys())  # upper case only
    return f"create '{table}', {{NAME => '{FAMILY}', VERSIONS => 1{ttl}}}, SPLITS => [{splits}]"


def conversation_prefix(key: ConvKey) -> bytes:
    """The first bytes of every row key of the conversation: salt, key, separator."""
    return key_prefix(str(key))


def _inverted(msg_id: int) -> bytes:
    if not 0 <= msg_id <= U64_MAX:
        raise ValueError(f"{msg_id} is not an unsigned 64-bit value")
    return (U64_MAX - msg_id).to_bytes(8, "big")


def row_key(key: ConvKey, msg_id: int) -> bytes:
    return conversation_prefix(key) + _inverted(msg_id)


def msg_id_of(row: bytes) -> int:
    return U64_MAX - int.from_bytes(row[-8:], "big")


def _time_value(server_time: int) -> bytes:
    return b"%016x" % server_time


CELL_TS_GRAIN_MS = 1000


def _cell_ts(server_time: int) -> int:
    """The HBase cell timestamp (what the family TTL expires by): server_time rounded down to
    the second. Thrift1 takes one timestamp per mutateRowsTs call, so a batch costs one call
    (and WAL sync) per distinct timestamp, and a batch spans few seconds but many
    milliseconds (docs/BENCHMARKS.md, "Optimisations"). Expiry up to 1 s early does not
    matter next to a retention of days, and reads filter on the exact server_time (m:t)."""
    return min(server_time - server_time % CELL_TS_GRAIN_MS, _MAX_CELL_TS)


def _retention_filter(cutoff: int) -> bytes | None:
    """Server-side: keep rows with server_time >= cutoff (rows without m:t are dropped)."""
    if cutoff <= 0:
        return None
    return b"SingleColumnValueFilter('m', 't', >=, 'binary:%s', true, true)" % _time_value(cutoff)


def _encode(job: PersistJob) -> dict[bytes, bytes]:
    return {
        COL_MESSAGE: job.stored_record,
        COL_TIME: _time_value(job.message.server_time),
        COL_SIZE: b"%d" % len(job.record),
    }


def _record(value: bytes) -> bytes:
    """The MESSAGE record of a history cell (any storage format)."""
    try:
        return record_of_stored(value)
    except CorruptRecord as e:
        raise ValueError(f"history cell: {e}") from None


class RowPage(NamedTuple):
    """A scan's page: the rows' keys and their MESSAGE records, in key order."""

    keys: tuple[bytes, ...]
    records: tuple[bytes, ...]
    has_more: bool


def _consecutive(keys: list[bytes]) -> int:
    """How many of `keys` (ascending, ending in a big-endian number) run on from the first
    without a gap."""
    if not keys:
        return 0
    first = int.from_bytes(keys[0][-8:], "big")
    for i, key in enumerate(keys):
        if int.from_bytes(key[-8:], "big") != first + i:
            return i
    return len(keys)


@as_deferred
async def _all(ds: list[Deferred[None]]) -> None:
    """Wait for every one (none left running), then raise the first failure."""
    for ok, value in await DeferredList(ds, consumeErrors=True):
        if not ok:
            assert isinstance(value, Failure)
            value.raiseException()


# ---------------------------------------------------------------------- on the HBase threads


def _ensure_table(table: happybase.Table, families: dict[str, dict[str, Any]]) -> None:
    conn = table.connection
    name = table.name.decode()
    command = create_table_command(name, families[FAMILY].get("time_to_live"))
    if table.name in conn.tables():
        starts = {region["start_key"] for region in cast(Any, table).regions()}
        if not starts.issuperset(split_keys()):
            _log.info(
                "HBase table {table} is not pre-split by salt ({n} regions): see "
                "docs/SERVICES.md, 'Pre-splitting the history table' ({command})",
                table=name, n=len(starts), command=command,
            )  # fmt: skip
        return
    try:
        conn.create_table(table.name, families)
    except Exception:
        if table.name not in conn.tables():  # not a racing creator: a real error
            raise
        return
    _log.warn(
        "created HBase table {table} through Thrift1, which cannot pre-split it: 1 region, not "
        "{n} (one per salt bucket). For production create it beforehand with the HBase shell: "
        "{command} (docs/SERVICES.md, 'Pre-splitting the history table')",
        table=name, n=SALT_BUCKETS, command=command,
    )  # fmt: skip


_PutsByTs = dict[int, list[tuple[bytes, dict[bytes, bytes]]]]  # cell timestamp -> (row, cells)


def _put(table: happybase.Table, row: bytes, data: dict[bytes, bytes], ts: int) -> None:
    table.put(row, data, timestamp=ts)


def _put_many(table: happybase.Table, rows: _PutsByTs) -> None:
    # Thrift1 carries one timestamp per mutateRowsTs call: one batch per cell timestamp.
    for ts, puts in rows.items():
        batch = table.batch(timestamp=ts)
        for row, data in puts:
            batch.put(row, data)
        batch.send()


def _scan(
    table: happybase.Table,
    start: bytes,
    stop: bytes,
    limit: int,
    max_bytes: int,
    filter_: bytes | None,
    deliver: Callable[[RowPage], None] | None = None,
    consecutive: bool = False,
) -> RowPage:
    """Up to `limit` records from `start` on whose sizes sum to at most `max_bytes` (at least
    one), and has_more; `consecutive`: only rows whose keys' numbers run on from the first
    (a timeline page stops at a seq the filter skipped). `deliver` gets the result as soon as
    it is known, before the scanner is closed: the close round trip is off the latency."""
    scanner = table.scan(
        row_start=start,
        row_stop=stop,
        columns=[COL_SIZE, COL_TIME],  # sizes, not records; the filter needs m:t in the scan
        filter=filter_,
        limit=limit + 1,  # one more than asked: has_more
        batch_size=min(limit + 1, _SCAN_CACHING),
    )
    try:
        rows = []
        for row in scanner:
            rows.append(row)
            if len(rows) > limit:
                break  # has_more is known: the generator's close() closes the scanner below
        usable = rows[:limit]
        if consecutive:
            usable = usable[: _consecutive([key for key, _ in usable])]
        keys: list[bytes] = []
        read: dict[bytes, bytes] = {}  # records already read (rows without m:s)
        used = 0
        for key, data in usable:
            size_cell = data.get(COL_SIZE)
            if size_cell is not None:
                size = int(size_cell)
            else:
                cells = table.row(key, columns=[COL_MESSAGE])
                if COL_MESSAGE not in cells:
                    if consecutive:
                        break  # gone since the scan (the family TTL): a gap
                    continue
                read[key] = _record(cells[COL_MESSAGE])
                size = len(read[key])
            if keys and used + size > max_bytes:
                break
            keys.append(key)
            used += size
        todo = [k for k in keys if k not in read]
        if todo:
            for key, cells in table.rows(todo, columns=[COL_MESSAGE]):
                read[key] = _record(cells[COL_MESSAGE])
        found = [k for k in keys if k in read]  # a row gone meanwhile is left out
        if consecutive:
            found = found[: _consecutive(found)]
        more = len(rows) > len(keys) or (consecutive and len(found) < len(keys))
        result = RowPage(tuple(found), tuple(read[k] for k in found), more)
        if deliver is not None:
            deliver(result)
        return result
    finally:
        scanner.close()


# -------------------------------------------------------------------------------- the store


class HBaseHistory:
    """HistoryStore on one HBase table; `start()` before use, `close()` after."""

    def __init__(
        self,
        host: str,
        port: int,
        table: str,
        *,
        now_ms: Callable[[], int],
        retention_ms: int,
        pool_size: int = 4,
        reactor: IServerReactor | None = None,
        family_ttl: bool = True,
        timeout_ms: int | None = 30_000,
    ) -> None:
        """`family_ttl=False` creates the table without a TTL: for a clock that is not wall
        time (tests' fake clock), where cells stamped with server_time would be expired by
        HBase at once. `timeout_ms` bounds each socket read, so close() cannot hang forever."""
        # The pool's constructor connects its first connection at once (blocking): opened on
        # an HBase thread, by start().
        self._open_pool = functools.partial(
            happybase.ConnectionPool, pool_size, host=host, port=port, timeout=timeout_ms
        )
        self.table_name = table
        self.now_ms = now_ms
        self.retention_ms = retention_ms
        self.pool_size = pool_size
        self._reactor = reactor or server_reactor()
        self._family_ttl = family_ttl
        self._threads = ThreadPool(minthreads=pool_size, maxthreads=pool_size, name="improto-hbase")
        self._pool: happybase.ConnectionPool | None = None
        self._started = False
        self._running = False  # accepting calls: after start() succeeded, before close()
        self._closing = Once(self._close)
        self._in_flight: set[Deferred[None]] = set()
        self._shutdown_trigger: object = None
        self._retry_lock = threading.Lock()
        self.retries = 0  # operations retried after a transport error (for tests and metrics)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Deferred[None]:
        """Connect, and create the table if it is missing."""
        if self._started or self._closing.started:
            raise RuntimeError("HBaseHistory can be started once, before close()")
        self._started = True
        self._threads.start()
        # Pool threads are not daemons: reactor shutdown must release them.
        self._shutdown_trigger = self._reactor.addSystemEventTrigger(
            "before", "shutdown", self.close
        )
        d = self._submit(self._open)
        d.addCallbacks(self._opened, self._start_failed)
        return d

    def _opened(self, _: None) -> None:
        if not self._closing.started:
            self._running = True

    @as_deferred
    async def _start_failed(self, failure: Failure) -> None:
        await self.close()
        failure.raiseException()

    def _open(self) -> None:
        self._pool = self._open_pool()
        options: dict[str, Any] = {"max_versions": 1}
        if self._family_ttl:
            # HBase TTLs are whole seconds: round up so HBase never hides a message that the
            # retention (by server_time, in ms) still serves.
            options["time_to_live"] = max(1, -(-self.retention_ms // 1000))
        self._with_retry(_ensure_table, {FAMILY: options})

    def close(self) -> Deferred[None]:
        """Stop taking calls, let the running ones finish, then stop the threads."""
        return self._closing()

    @as_deferred
    async def _close(self) -> None:
        self._running = False
        try:
            if self._in_flight:
                await gatherResults(list(self._in_flight))
        finally:
            if self._started:
                self._threads.stop()  # workers are idle now: the join is immediate
            # happybase has no public close for a pool: its connections close their sockets
            # when collected (Connection.__del__), which dropping the pool does here.
            self._pool = None
            if self._shutdown_trigger is not None:
                self._reactor.removeSystemEventTrigger(self._shutdown_trigger)
                self._shutdown_trigger = None

    # ------------------------------------------------------------------ plumbing

    def _call(self, fn: Callable[..., _R], *args: Any) -> Deferred[_R]:
        """Run `fn(table, *args)` on an HBase thread, retried once on a transport error."""
        if not self._running:
            return fail(RuntimeError("HBaseHistory is not running"))
        return self._submit(self._with_retry, fn, *args)

    def _submit(self, fn: Callable[..., _R], *args: Any) -> Deferred[_R]:
        """Run `fn(*args)` on an HBase thread; close() waits for it before stopping them."""
        done: Deferred[None] = Deferred()
        self._in_flight.add(done)

        def finished(result: Any) -> Any:
            self._in_flight.discard(done)
            done.callback(None)
            return result

        d = deferToThreadPool(self._reactor, self._threads, fn, *args)
        d.addBoth(finished)
        return d

    def _with_retry(self, fn: Callable[..., _R], *args: Any) -> _R:
        pool = self._pool
        assert pool is not None, "not started"
        try:
            with pool.connection() as conn:
                return fn(conn.table(self.table_name), *args)
        except RETRYABLE as e:
            # The pool has already replaced the failed connection's client (pool.py), but
            # this thread may now be handed another one that sat idle just as long: reopen
            # it, so the one retry runs on a socket that is certainly fresh.
            _log.info("HBase connection failed ({error!r}); retrying once", error=e)
            with self._retry_lock:
                self.retries += 1
            with pool.connection() as conn:
                conn.close()
                conn.open()
                return fn(conn.table(self.table_name), *args)

    # ------------------------------------------------------------------ HistoryStore

    def append(self, key: ConvKey, job: PersistJob) -> Deferred[None]:
        """One put; idempotent by construction (same row, same cell timestamp, same value)."""
        m = job.message
        try:
            row, data = row_key(key, m.msg_id), _encode(job)  # validates before anything runs
        except Exception:
            return fail()
        return self._call(_put, row, data, _cell_ts(m.server_time))

    def append_many(self, items: Iterable[tuple[ConvKey, PersistJob]]) -> Deferred[None]:
        """Batched appends: one mutateRowsTs per distinct cell timestamp (second), the batches
        spread over the pool's threads."""
        try:
            rows = [(row_key(key, job.message.msg_id), job) for key, job in items]
        except Exception:
            return fail()
        return self.put_rows(rows)

    def put_rows(self, rows: Iterable[tuple[bytes, PersistJob]]) -> Deferred[None]:
        """Write each job's cells (record, server_time, size) under its row key, batched as
        append_many says: the history's rows and the timelines' (production/timeline.py)."""
        by_ts: _PutsByTs = {}
        try:
            for row, job in rows:
                by_ts.setdefault(_cell_ts(job.message.server_time), []).append((row, _encode(job)))
        except Exception:
            return fail()
        if len(by_ts) <= 1:
            return self._call(_put_many, by_ts)
        stamps = list(by_ts.items())
        n = min(self.pool_size, len(stamps))
        chunks = [dict(stamps[i::n]) for i in range(n)]
        return _all([self._call(_put_many, chunk) for chunk in chunks])

    def page(
        self, key: ConvKey, before_id: int, limit: int, min_id: int, max_bytes: int
    ) -> Deferred[HistoryRecords]:
        """The MESSAGE records of the messages, taken from the cells without decoding them:
        what the pull handler splices into HISTORY_PAGE."""
        try:
            prefix = conversation_prefix(key)
            # Inclusive bounds: min_id <= msg_id <= hi. Inverted, hi comes first.
            start = prefix + _inverted(before_id - 1 if before_id else U64_MAX)
            stop = prefix + _inverted(min_id) + b"\x00"  # the smallest key after min_id's
        except ValueError:
            return fail()
        if start >= stop:  # min_id >= before_id: nothing in range (HBase wants start < stop)
            return succeed(HistoryRecords((), False))
        d = self.scan(start, stop, limit, max_bytes)
        return d.addCallback(lambda page: HistoryRecords(page.records, page.has_more))

    def scan(
        self, start: bytes, stop: bytes, limit: int, max_bytes: int, *, consecutive: bool = False
    ) -> Deferred[RowPage]:
        """The retained rows from `start` up to `stop` (excluded), as `_scan` reads them."""
        limit = max(0, limit)
        cutoff = max(0, self.now_ms() - self.retention_ms)
        # The answer fires from the HBase thread as soon as the rows are in, while the thread
        # goes on to close the scanner; a retry after that (the close failed on the
        # transport) cannot fire it again.
        result: Deferred[RowPage] = Deferred()

        def fire(outcome: RowPage | Failure) -> None:
            if not result.called:
                if isinstance(outcome, Failure):
                    result.errback(outcome)
                else:
                    result.callback(outcome)
            elif isinstance(outcome, Failure):
                _log.info("HBase scan failed after answering: {error}", error=outcome.value)

        def early(page: RowPage) -> None:
            self._reactor.callFromThread(fire, page)

        filter_ = _retention_filter(cutoff)
        d = self._call(_scan, start, stop, limit, max_bytes, filter_, early, consecutive)
        d.addBoth(fire)
        return result
