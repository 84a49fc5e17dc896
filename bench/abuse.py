"""Abuse suite: the attacks of issue 12 against a live server, on loopback, bounded in count
and time, with a verdict per attack against the documented bounds.

    python bench/abuse.py [--quick] [--strict] [--storage embedded|production|both]
                          [--attacks name,name...] [--jwt-secret S] [--json FILE]

For each storage it starts imserver (tests/support/server.py; production: a gateway and a
persister process on fresh Redis key prefix / HBase table, deleted afterwards) with limits from
a TOML file it writes (config.py defaults, except where an attack could not finish in time:
see `server_config`), a bystander process (bench/abuse_bystander.py: pairs of users chatting
at a fixed low rate, SEND->ACK latency) and a sampler of the server's VmRSS and open fds.
It measures the bystander idle first, then runs each attack in turn and reports:

  server RSS before / peak / after (after: `SETTLE_S` after the attack ended), fds, the
  bystander's p50/p99 during the attack next to idle, messages lost (every SEND the attacker
  or the bystander got a SEND_ACK for must be in the receiver's history: pulled at the end),
  the ERROR codes the attacker got, whether it was disconnected, and checks against the bounds
  (`bounds`): memory per connection from the config, bystander p99 <= 2x idle, lost == 0.

The last line of stdout is one JSON object. Exit status: 0 unless --strict and a check failed
(by default it reports; the lead decides when the limits are in). --quick is the CI size.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import itertools
import json
import math
import os
import re
import secrets
import selectors
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers
from abuse_wire import (
    BODY_64K,
    T_ERROR,
    Client,
    Drained,
    ProcStats,
    Sampler,
    device,
    drain,
    group_send_frame,
    hello_outcome,
    is_closed,
    json_line,
    login,
    missing_acked,
    odd_token,
    percentiles,
    send_all,
    send_frame,
    source_address,
    split_frames,
)

from improto.codec import encode
from improto.frames import (
    GroupCreate,
    GroupCreated,
    GroupList,
    HistoryPull,
    MyGroups,
    OfflinePull,
    Ping,
)
from improto.limits import HEADER_SIZE, MAX_FRAME_LENGTH, MAX_GROUPS_PER_USER, MAX_TOKEN
from improto_server.config import Config
from tests.support import server as server_support
from tests.support import services

KIB, MIB = 1024, 1024 * 1024
BYSTANDER_RATE = 40.0  # SENDs/s in total over four pairs: 10/s per user, half of send_rate
SETTLE_S = 2.0
# After an attack: the bystander's share of CPU (at 20 SENDs/s) is a few percent of a core;
# above IDLE_CPU the server is still working off the attack.
IDLE_CPU = 0.25
# The attacks' generator (this process) runs at this niceness while they run: a real attacker
# is on machines of its own, and here it would otherwise take the server's and the bystander's
# CPU (two cores for all three), which is load, not the server's unfairness.
ATTACKER_NICE = 10
QUIESCE_MAX_S = 60.0
# Memory the server may gain during an attack beyond the per-connection bounds: allocator
# arenas, SQLite page cache, the attack's rows in transit. Python seldom returns freed arenas
# to the OS, so "after" is compared with this slack, not with zero.
SLACK = 32 * MIB
# Per pre-login connection: the largest HELLO (4 + 7 + 3 + 64 + 2 + 4096 bytes) buffered, and
# a transport, protocol and session object.
HELLO_MAX = 4 + HEADER_SIZE + 3 + 64 + 2 + MAX_TOKEN
PRELOGIN_CONN = HELLO_MAX + 28 * KIB
REDIS_OVERHEAD = 1.25  # Redis memory of an inbox per byte of its records (64 KiB records)
PER_ADDRESS = 50  # attack connections per loopback source address (under the per-address cap)


def per_connection_bound(cfg: Config) -> int:
    """What one logged-in connection may make the server hold: its output up to the hard
    limit, the requests in flight (each at most one frame) and one partial frame read."""
    return (
        cfg.output_hard_limit_bytes
        + cfg.max_requests_in_flight * MAX_FRAME_LENGTH
        + MAX_FRAME_LENGTH
    )


def server_config(quick: bool, storage: str) -> dict[str, Any]:
    """The limits written to the server's TOML file: config.py's defaults, except those an
    attack must see expire within its bounded time (quick: the login deadline and the slow
    reader timeout; production: the inbox byte cap, reached by attack 11's count)."""
    values: dict[str, Any] = {}
    if quick:
        values["login_timeout_s"] = 3.0
        values["slow_reader_timeout_s"] = 3.0
    if storage == "production":
        values["inbox_max_bytes"] = (1 if quick else 8) * MIB
    return values


def toml(values: dict[str, Any]) -> str:
    return "".join(f"{k} = {json.dumps(v)}\n" for k, v in sorted(values.items()))


# ------------------------------------------------------------------------------ context


@dataclass
class Ledger:
    """Messages the server acknowledged, by where they must be found: (reader, kind, conv)."""

    acked: dict[tuple[int, int, int], list[int]] = field(default_factory=dict)

    def add(self, reader: int, kind: int, conv: int, ids: list[int]) -> None:
        self.acked.setdefault((reader, kind, conv), []).extend(ids)

    def count(self) -> int:
        return sum(len(v) for v in self.acked.values())


@dataclass
class Ctx:
    storage: str
    quick: bool
    cfg: Config
    handle: servers.ServerHandle
    stats: ProcStats
    sampler: Sampler
    key_prefix: str | None = None
    next_user: int = 1000

    @property
    def port(self) -> int:
        return self.handle.port

    @property
    def secret(self) -> str:
        assert self.handle.secret is not None
        return self.handle.secret

    def user(self) -> int:
        self.next_user += 1
        return self.next_user

    def users(self, n: int) -> list[int]:
        return [self.user() for _ in range(n)]

    def login(self, user: int | None = None, **kw: Any) -> Client:
        return login(self.port, self.secret, self.user() if user is None else user, **kw)

    def q(self, quick: int | float, full: int | float) -> Any:
        return quick if self.quick else full


@dataclass
class Outcome:
    """What one attack did, as the attack function reports it."""

    info: dict[str, Any] = field(default_factory=dict)
    errors: dict[int, int] = field(default_factory=dict)
    disconnected: bool | None = None
    ledger: Ledger = field(default_factory=Ledger)
    checks: dict[str, bool] = field(default_factory=dict)
    peak_bound: int | None = None  # bytes the RSS may rise during the attack (None: no check)
    after_bound: int | None = None  # bytes the RSS may stay above "before" once it ended

    def bound(self, peak: int) -> None:
        """The RSS may rise by `peak` bytes (plus SLACK) during the attack, SLACK after it."""
        self.peak_bound = peak + SLACK
        self.after_bound = SLACK


def merge(into: dict[int, int], more: dict[int, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


# ---------------------------------------------------------------------- shared moves


def flood_64k(ctx: Ctx, receiver: int, count: int, out: Outcome) -> int:
    """`count` 64 KiB 1:1 SENDs to `receiver` from as many senders as it takes for each to
    stay within its byte burst (so the push path, not the sender's rate limit, is what the
    attack loads). Acked ones go to the ledger; returns how many were acked."""
    cfg = ctx.cfg
    # a 1:1 message is stored in two inboxes (the receiver's and the sender's): its bytes
    # count twice against the sender's byte bucket
    per_sender = max(1, min(int(cfg.send_bytes_burst // (2 * BODY_64K)), int(cfg.send_burst)) - 2)
    body = b"\xab" * BODY_64K
    acked, left = 0, count
    while left > 0:
        n = min(per_sender, left)
        left -= n
        sender = ctx.login(timeout=30.0)
        try:
            frames = b"".join(send_frame(receiver, body, rid) for rid in range(1, n + 1))
            written, _ = send_all(sender.sock, frames, stall_s=20.0)
            d = drain(sender.sock, 60.0, quiet_s=20.0, expect_acks=n)
            merge(out.errors, d.errors)
            ctx_ledger_add(out, receiver, 1, sender.user, d.acks)
            acked += len(d.acks)
            if written < len(frames):
                out.info["sender_stalled"] = out.info.get("sender_stalled", 0) + 1
        finally:
            sender.close(reset=True)
    return acked


def ctx_ledger_add(out: Outcome, reader: int, kind: int, conv: int, ids: list[int]) -> None:
    if ids:
        out.ledger.add(reader, kind, conv, ids)


def open_many(n: int, port: int, source: Callable[[int], str], timeout: float = 10.0,
              ) -> tuple[list[socket.socket], int]:  # fmt: skip
    """n non-blocking TCP connections (connect in parallel); (the connected ones, failures)."""
    sel = selectors.DefaultSelector()
    socks: list[socket.socket] = []
    failed = 0
    for i in range(n):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        try:
            s.bind((source(i), 0))
            err = s.connect_ex((servers.HOST, port))
        except OSError:
            s.close()
            failed += 1
            continue
        if err not in (0, errno.EINPROGRESS):
            s.close()
            failed += 1
            continue
        sel.register(s, selectors.EVENT_WRITE)
    deadline = time.monotonic() + timeout
    while sel.get_map() and time.monotonic() < deadline:
        for key, _ in sel.select(0.1):
            fileobj = key.fileobj
            assert isinstance(fileobj, socket.socket)
            s = fileobj
            sel.unregister(s)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                socks.append(s)
            else:
                s.close()
                failed += 1
    for key in list(sel.get_map().values()):
        fileobj = key.fileobj
        assert isinstance(fileobj, socket.socket)
        fileobj.close()
        failed += 1
    sel.close()
    return socks, failed


def poll_open(socks: list[socket.socket], errors: dict[int, int]) -> int:
    """How many of these the server has not closed (what it sent is read; ERRORs counted)."""
    still = 0
    for s in socks:
        if s.fileno() < 0:
            continue
        closed = False
        while True:
            try:
                chunk = s.recv(1 << 16)
            except BlockingIOError:
                break
            except OSError:
                closed = True
                break
            if not chunk:
                closed = True
                break
            buf = bytearray(chunk)
            for p in split_frames(buf):
                if p[1] == T_ERROR:
                    code = struct.unpack_from(">H", p, 7)[0]
                    errors[code] = errors.get(code, 0) + 1
        if closed:
            s.close()
        else:
            still += 1
    return still


def close_all(socks: list[socket.socket]) -> None:
    for s in socks:
        with contextlib.suppress(OSError):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


def hold(seconds: float) -> None:
    time.sleep(max(0.0, seconds))


def login_works(ctx: Ctx) -> bool:
    try:
        c = ctx.login(timeout=5.0)
        c.close()
        return True
    except (OSError, RuntimeError):
        return False


def pipeline_flood(c: Client, seconds: float, make: Callable[[int], bytes], out: Outcome,
                   max_requests: int = 10**9, drain_s: float = 30.0) -> Drained:  # fmt: skip
    """Write requests from make(rid) as fast as the server reads them for `seconds` (at most
    `max_requests`), reading its answers at the same time; then wait up to `drain_s` for the
    answers still due (a server that holds a rate-limited peer answers them slowly: the
    attacker gives up, and what was never answered was never acknowledged). Returns what
    came."""
    sock = c.sock
    sock.setblocking(False)
    d = Drained()
    buf, pending = bytearray(), bytearray()
    rid, answered = 0, 0
    end = time.monotonic() + seconds
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE)
    closed = False
    while time.monotonic() < end and not closed and (pending or rid < max_requests):
        if len(pending) < 256 * KIB and rid < max_requests:
            batch = []
            for _ in range(min(64, max_requests - rid)):
                rid += 1
                batch.append(make(rid))
            pending += b"".join(batch)
        for _key, ev in sel.select(0.05):
            if ev & selectors.EVENT_WRITE and pending:
                try:
                    n = sock.send(pending)
                    del pending[:n]
                except BlockingIOError:
                    pass
                except OSError:
                    closed = True
            if ev & selectors.EVENT_READ:
                answered += _read_into(sock, buf, d)
                closed = closed or d.closed
    sel.close()
    sent = rid - _unsent_requests(pending, rid)
    out.info["requests_written"] = sent
    sock.setblocking(True)
    if not closed:
        drain(sock, drain_s, quiet_s=min(5.0, drain_s), out=d,
              expect_acks=max(0, sent - answered))  # fmt: skip
    merge(out.errors, d.errors)
    return d


def _unsent_requests(pending: bytearray, rid: int) -> int:
    """How many whole requests are still in `pending` (never written)."""
    n, off = 0, 0
    while len(pending) - off >= 4:
        off += 4 + struct.unpack_from(">I", pending, off)[0]
        n += 1
    return n if pending else 0


def _read_into(sock: socket.socket, buf: bytearray, d: Drained) -> int:
    answered = 0
    while True:
        try:
            chunk = sock.recv(1 << 18)
        except BlockingIOError:
            return answered
        except OSError:
            chunk = b""
        if not chunk:
            d.closed = True
            return answered
        answered += d.feed(buf, chunk, any_rid=True)


def data_dir_bytes(ctx: Ctx) -> int:
    total = 0
    if ctx.handle.data_dir is None:
        return 0
    for root, _dirs, files in os.walk(ctx.handle.data_dir):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.path.getsize(os.path.join(root, f))
    return total


# ------------------------------------------------------------------------------ attacks


def a01_push_window_cycle(ctx: Ctx) -> Outcome:
    """Connect, fill the push window with 64 KiB pushes (never read), disconnect, repeat."""
    out = Outcome()
    cycles, per_cycle = ctx.q(2, 4), ctx.q(150, ctx.cfg.max_unacked_pushes)
    victim = ctx.user()
    rss = []
    for _ in range(cycles):
        v = ctx.login(victim)
        flood_64k(ctx, victim, per_cycle, out)
        v.close(reset=True)
        hold(0.5)
        rss.append(ctx.stats.rss_kib())
    out.info.update(cycles=cycles, pushes_per_cycle=per_cycle, rss_after_each_cycle_kib=rss)
    out.bound(2 * per_connection_bound(ctx.cfg))  # the victim and one sender
    return out


def a02_pull_pipeline(ctx: Ctx) -> Outcome:
    """A peer that never reads, pipelining HISTORY_PULL(100) / OFFLINE_PULL(200)."""
    out = Outcome()
    attacker = ctx.user()
    helpers = ctx.users(2)
    for h in helpers:  # 100 messages of 1,200 bytes each: every page is ~128 KiB
        c = ctx.login(h)
        frames = b"".join(send_frame(attacker, b"p" * 1200, rid) for rid in range(1, 101))
        c.send(frames)
        d = drain(c.sock, 30.0, quiet_s=10.0, expect_acks=100)
        ctx_ledger_add(out, attacker, 1, h, d.acks)
        c.close()
    n = ctx.q(2000, 10000)
    reqs = []
    for rid in range(1, n + 1):
        if rid % 2:
            reqs.append(encode(HistoryPull(1, helpers[0], 0, 100, request_id=rid)))
        else:
            reqs.append(encode(OfflinePull(0, 200, request_id=rid)))
    a = ctx.login(attacker)
    written, stalled = send_all(a.sock, b"".join(reqs), stall_s=3.0)
    whole = sum(1 for _ in itertools.takewhile(lambda k: k <= written,
                                               itertools.accumulate(map(len, reqs))))  # fmt: skip
    out.info.update(requests=n, requests_written=whole, server_stopped_reading=stalled)
    hold(ctx.q(1.0, 3.0) + ctx.cfg.slow_reader_timeout_s)
    out.disconnected = is_closed(a.sock, 1.0)
    a.close(reset=True)
    out.bound(per_connection_bound(ctx.cfg))
    return out


def a03_slow_receiver(ctx: Ctx) -> Outcome:
    """A never-reading receiver of 64 KiB pushes."""
    out = Outcome()
    victim = ctx.user()
    v = ctx.login(victim)
    count = ctx.q(150, 1000)
    t0 = time.monotonic()
    flood_64k(ctx, victim, count, out)
    hold(ctx.cfg.slow_reader_timeout_s + 2.0 - (time.monotonic() - t0))
    out.disconnected = is_closed(v.sock, 1.0)
    v.close(reset=True)
    out.info.update(pushes=count)
    out.bound(2 * per_connection_bound(ctx.cfg))
    out.checks["slow_reader_disconnected"] = bool(out.disconnected)
    return out


def a04_prelogin_partial(ctx: Ctx) -> Outcome:
    """Unauthenticated connections each holding 131,060 bytes of an unfinished frame."""
    out = Outcome()
    n = ctx.q(200, 1000)
    socks, failed = open_many(n, ctx.port, lambda i: source_address(i, PER_ADDRESS))
    header = struct.pack(">IBBBI", MAX_FRAME_LENGTH, 1, 0x01, 0, 1)
    data = header + b"\0" * (131_060 - HEADER_SIZE)
    left = {s: memoryview(data) for s in socks}
    deadline = time.monotonic() + ctx.q(5.0, 15.0)
    while left and time.monotonic() < deadline:
        for s, view in list(left.items()):
            try:
                k = s.send(view)
                left[s] = view[k:]
                if not left[s]:
                    del left[s]
            except BlockingIOError:
                pass
            except OSError:
                del left[s]
        time.sleep(0.01)
    hold(ctx.q(2.0, 5.0))
    still = poll_open(socks, out.errors)
    out.info.update(connections=len(socks), connect_failed=failed, fully_written=n - len(left),
                    still_open_after_hold=still)  # fmt: skip
    out.disconnected = still == 0
    close_all(socks)
    out.bound(n * PRELOGIN_CONN)
    return out


def a05_prelogin_idle(ctx: Ctx) -> Outcome:
    """Idle unauthenticated connections: closed at the login deadline; logins still work."""
    out = Outcome()
    cfg = ctx.cfg
    n = ctx.q(400, 2000)
    t_open = time.monotonic()
    socks, failed = open_many(n, ctx.port, lambda i: source_address(i, PER_ADDRESS))
    one_n = cfg.max_prelogin_per_address + 36
    one, one_failed = open_many(one_n, ctx.port, lambda i: "127.0.3.1")
    hold(1.0)
    one_open = poll_open(one, out.errors)
    works_during = login_works(ctx)
    hold(cfg.login_timeout_s + 2.0 - (time.monotonic() - t_open))
    still = poll_open(socks, out.errors)
    works_after = login_works(ctx)
    out.info.update(connections=len(socks), connect_failed=failed, still_open_after_deadline=still,
                    login_timeout_s=cfg.login_timeout_s, one_address_opened=one_n,
                    one_address_open_after_1s=one_open, one_address_failed=one_failed,
                    login_during=works_during, login_after=works_after)  # fmt: skip
    out.disconnected = still == 0
    close_all(socks + one)
    out.checks["closed_at_login_deadline"] = still == 0
    out.checks["per_address_cap"] = one_open <= cfg.max_prelogin_per_address
    out.checks["logins_still_work"] = works_during and works_after
    out.bound((n + one_n) * PRELOGIN_CONN)
    return out


def a06_ping_flood(ctx: Ctx) -> Outcome:
    """Unauthenticated PING flood, never read (reconnects when the server closes it)."""
    out = Outcome()
    chunk = encode(Ping(request_id=1)) * 2000
    seconds = ctx.q(2.0, 10.0)
    end = time.monotonic() + seconds
    sent, stalls, reconnects = 0, 0, 0
    socks = []
    c = Client(ctx.port, source="127.0.4.1")
    socks.append(c)
    while time.monotonic() < end:
        k, stalled = send_all(c.sock, chunk, stall_s=min(2.0, max(0.1, end - time.monotonic())))
        sent += k
        stalls += stalled
        if k < len(chunk) and not stalled:  # closed by the server
            reconnects += 1
            c = Client(ctx.port, source="127.0.4.1")
            socks.append(c)
    out.info.update(pings_written=sent // len(encode(Ping(request_id=1))),
                    seconds=seconds, stalls=stalls, reconnects=reconnects)  # fmt: skip
    out.disconnected = reconnects > 0 or is_closed(c.sock, 0.5)
    for s in socks:
        s.close(reset=True)
    out.bound(per_connection_bound(ctx.cfg))
    return out


def a07_send_flood(ctx: Ctx) -> Outcome:
    """One user pipelining 1:1 SENDs as fast as possible."""
    out = Outcome()
    cfg = ctx.cfg
    receiver = ctx.user()
    a = ctx.login()
    seconds = ctx.q(2.0, 10.0)
    disk0 = data_dir_bytes(ctx)
    body = b"f" * 100
    t0 = time.monotonic()
    d = pipeline_flood(
        a,
        seconds,
        lambda rid: send_frame(receiver, body, rid),
        out,
        max_requests=ctx.q(50_000, 500_000),
        drain_s=ctx.q(3.0, 30.0),
    )
    elapsed = time.monotonic() - t0  # writing, then the answers still due
    ctx_ledger_add(out, receiver, 1, a.user, d.acks)
    out.disconnected = d.closed
    a.close(reset=True)
    accepted_rate = len(d.acks) / elapsed
    allowed = cfg.send_rate + cfg.send_burst / elapsed
    out.info.update(seconds_writing=seconds, seconds_answered=round(elapsed, 1),
                    acked=len(d.acks), acked_per_s=round(accepted_rate, 1),
                    allowed_per_s=round(allowed, 1))  # fmt: skip
    if ctx.storage == "embedded":
        out.info["disk_bytes_per_min"] = int((data_dir_bytes(ctx) - disk0) * 60 / seconds)
    out.checks["rate_limited"] = accepted_rate <= allowed * 1.05
    out.peak_bound = per_connection_bound(cfg) + SLACK
    return out


def a08_group_flood(ctx: Ctx) -> Outcome:
    """SEND flood into a 1,001-member group (the members offline: all fan-out to inboxes)."""
    out = Outcome()
    cfg = ctx.cfg
    members = ctx.users(1000)
    owner = ctx.login(timeout=60.0)
    rid = owner.next_rid()
    owner.send(encode(GroupCreate("abuse flood", tuple(members), request_id=rid)))
    created = owner.reply(rid, timeout=60.0)
    if not isinstance(created, GroupCreated):
        out.info["group_create"] = repr(created)
        out.checks["group_created"] = False
        return out
    group = created.group_id
    seconds = ctx.q(2.0, 10.0)
    body = b"g" * 100
    t0 = time.monotonic()
    d = pipeline_flood(
        owner,
        seconds,
        lambda r: group_send_frame(group, body, r + 10),
        out,
        max_requests=ctx.q(2000, 20000),
        drain_s=ctx.q(3.0, 30.0),
    )
    elapsed = time.monotonic() - t0
    ctx_ledger_add(out, owner.user, 2, group, d.acks)
    out.disconnected = d.closed
    owner.close(reset=True)
    weight = 1 + 1000 / 100  # 1 + members / 100 (config.py), the sender not counted
    allowed = (cfg.send_rate * elapsed + cfg.send_burst) / weight / elapsed
    out.info.update(members=1001, seconds_writing=seconds, seconds_answered=round(elapsed, 1),
                    acked=len(d.acks), acked_per_s=round(len(d.acks) / elapsed, 1),
                    allowed_per_s=round(allowed, 2))  # fmt: skip
    out.checks["rate_limited"] = len(d.acks) / elapsed <= allowed * 1.05 + 1.0 / elapsed
    out.peak_bound = per_connection_bound(cfg) + SLACK
    return out


def a09_big_inflight(ctx: Ctx) -> Outcome:
    """64 KiB SENDs written without waiting for (or reading) any ack."""
    out = Outcome()
    receiver = ctx.user()
    a = ctx.login()
    n = ctx.q(400, 2000)
    body = b"\xcd" * BODY_64K
    seconds = ctx.q(8.0, 30.0)
    end = time.monotonic() + seconds
    written = 0  # whole frames (all the same length)
    stalled_once = False
    while written < n and time.monotonic() < end:
        rids = range(written + 1, min(n, written + 16) + 1)
        batch = b"".join(send_frame(receiver, body, rid) for rid in rids)
        k, stalled = send_all(a.sock, batch, stall_s=max(0.1, end - time.monotonic()))
        stalled_once = stalled_once or stalled
        written += k // (len(batch) // len(rids))
        if k < len(batch):
            break
    d = drain(a.sock, 60.0, quiet_s=15.0, expect_acks=written)
    merge(out.errors, d.errors)
    ctx_ledger_add(out, receiver, 1, a.user, d.acks)
    out.disconnected = d.closed
    a.close(reset=True)
    out.info.update(sends=n, written=written, server_stopped_reading=stalled_once,
                    acked=len(d.acks))  # fmt: skip
    out.bound(per_connection_bound(ctx.cfg))
    return out


def a10_group_spam(ctx: Ctx) -> Outcome:
    """GROUP_CREATE spam with a victim as the only other member."""
    out = Outcome()
    cfg = ctx.cfg
    victim, friend = ctx.user(), ctx.user()
    a = ctx.login()
    n = ctx.q(150, 600)
    frames = b"".join(
        encode(GroupCreate(f"spam {i}", (victim,), request_id=i)) for i in range(1, n + 1)
    )
    a.send(frames)
    d = drain(a.sock, 60.0, quiet_s=10.0, expect_acks=n)
    merge(out.errors, d.errors)
    created = d.frames.get(0x90, 0)
    a.close()
    v = ctx.login(victim)
    rid = v.next_rid()
    v.send(encode(MyGroups(request_id=rid)))
    groups = v.reply(rid)
    victim_groups = len(groups.groups) if isinstance(groups, GroupList) else -1
    rid = v.next_rid()
    v.send(encode(GroupCreate("my own", (friend,), request_id=rid)))
    own = v.reply(rid)
    v.close()
    f = ctx.login(friend)
    rid = f.next_rid()
    f.send(encode(GroupCreate("friend's", (victim,), request_id=rid)))
    by_friend = f.reply(rid)
    f.close()
    out.info.update(creates=n, created=created, victim_groups=victim_groups,
                    victim_can_create=isinstance(own, GroupCreated),
                    friend_can_add_victim=isinstance(by_friend, GroupCreated))  # fmt: skip
    out.checks["victim_slots_bounded"] = (
        0 <= victim_groups <= cfg.added_by_others_per_day and victim_groups < MAX_GROUPS_PER_USER
    )
    out.checks["victim_can_create"] = isinstance(own, GroupCreated)
    return out


def a11_redis_64k(ctx: Ctx) -> Outcome:
    """Production: 64 KiB messages to one offline receiver; Redis memory per message."""
    out = Outcome()
    assert ctx.key_prefix is not None
    receiver = ctx.user()
    n = ctx.q(40, 300)
    with services.sync_redis() as r:
        used0 = _used_memory(r)
        ours0 = _prefix_bytes(r, ctx.key_prefix)
    flood_64k(ctx, receiver, n, out)
    hold(2.0)  # the persister writes the inboxes just after the acks
    with services.sync_redis() as r:
        used1 = _used_memory(r)
        ours1 = _prefix_bytes(r, ctx.key_prefix)
        inbox = _prefix_bytes(r, f"{ctx.key_prefix}:inbox:{{u{receiver}}}")
        no_ttl = _keys_without_ttl(r, ctx.key_prefix)
        maxmemory = int(r("CONFIG", "GET", "maxmemory")[1])
        policy = r("CONFIG", "GET", "maxmemory-policy")[1].decode()
    acked = out.ledger.count()
    out.info.update(
        messages=n, acked=acked,
        redis_used_memory_per_msg_all_clients=int((used1 - used0) / max(1, acked)),
        prefix_bytes_per_msg=int((ours1 - ours0) / max(1, acked)),
        receiver_inbox_bytes=inbox, inbox_max_bytes=ctx.cfg.inbox_max_bytes,
        keys_without_ttl=no_ttl, maxmemory=maxmemory, maxmemory_policy=policy,
    )  # fmt: skip
    # the cap counts record bytes; Redis adds its own per entry (sorted-set members, hash
    # fields): REDIS_OVERHEAD of them, and the one record that may cross the cap
    out.checks["inbox_capped"] = inbox <= ctx.cfg.inbox_max_bytes * REDIS_OVERHEAD + 70 * KIB
    out.checks["maxmemory_noeviction"] = maxmemory > 0 and policy == "noeviction"
    out.checks["keys_without_ttl_documented"] = all(
        re.fullmatch(NO_TTL_SHAPES, shape) for shape in no_ttl
    )
    return out


def _used_memory(r: Any) -> int:
    for line in r("INFO", "memory").decode().splitlines():
        if line.startswith("used_memory:"):
            return int(line.split(":")[1])
    return 0


def _prefix_bytes(r: Any, prefix: str) -> int:
    """MEMORY USAGE summed over the keys under `prefix:` (exact for our run, unlike INFO,
    which other users of the same Redis move too)."""
    return sum(int(r("MEMORY", "USAGE", k, "SAMPLES", "0") or 0) for k in r.scan(prefix))


# The keys docs/SERVICES.md lists as kept without a TTL (with its reason), as shapes.
NO_TTL_SHAPES = (
    r":(inbox|conv):\{u#\}:meta|:groups:(\{g#\}(:since|:joined)?|\{u#\}(:res)?|\{layout\})"
    r"|:presence:\{u#\}|:gwdev:\{g[^}]*\}|:gateways|:dev:\{u#\}:(push|reg|revoked)"
)


def _keys_without_ttl(r: Any, prefix: str) -> dict[str, int]:
    """Keys without an expiry, by shape (digits replaced by #)."""
    shapes: dict[str, int] = {}
    for k in r.scan(prefix):
        if r("TTL", k) == -1:
            shape = re.sub(rb"[0-9]+", b"#", k[len(prefix) :]).decode(errors="replace")
            shapes[shape] = shapes.get(shape, 0) + 1
    return shapes


def a12_odd_tokens(ctx: Ctx) -> Outcome:
    """Signed tokens with odd claims: each must get ERROR AUTH_FAILED, then the close."""
    out = Outcome()
    far = int(time.time()) + 3600
    subs = ['"\uff15"', '"\u0665"', '"\u00b2"', '"05"', '"+5"', '" 5"', '"5 "', '"0"',
            '"18446744073709551616"', "5", '"5.0"', '"1e3"']  # fmt: skip
    exps = ["NaN", "Infinity", "-Infinity", "1e400", f'"{far}"', "true", f"{far}.5",
            str(10**30)]  # fmt: skip
    cases = {f"sub={s}": (s, str(far)) for s in subs} | {f"exp={e}": ('"5"', e) for e in exps}
    results = {}
    for name, (sub, exp) in cases.items():
        dev = device()
        claims = f'{{"sub":{sub},"dev":"{dev}","exp":{exp}}}'
        results[name] = hello_outcome(ctx.port, odd_token(ctx.secret, claims), dev)
    dev = device()
    claims = f'{{"sub":"5","dev":"{dev}","exp":{far}}}'
    control = hello_outcome(ctx.port, odd_token(ctx.secret, claims), dev)
    bad = {k: v for k, v in results.items() if v != "error 201 then closed"}
    out.info.update(cases=len(cases), not_auth_failed=bad, control=control)
    out.checks["all_auth_failed"] = not bad
    out.checks["control_logs_in"] = control == "hello_ok"
    return out


ATTACKS: dict[str, Callable[[Ctx], Outcome]] = {
    "push_window_cycle": a01_push_window_cycle,
    "pull_pipeline": a02_pull_pipeline,
    "slow_receiver": a03_slow_receiver,
    "prelogin_partial_frames": a04_prelogin_partial,
    "prelogin_idle": a05_prelogin_idle,
    "prelogin_ping_flood": a06_ping_flood,
    "send_flood_1to1": a07_send_flood,
    "group_send_flood": a08_group_flood,
    "sends_64k_in_flight": a09_big_inflight,
    "group_create_spam": a10_group_spam,
    "redis_64k_messages": a11_redis_64k,
    "odd_token_claims": a12_odd_tokens,
}
EMBEDDED_ONLY = {"group_send_flood"}
PRODUCTION_ONLY = {"redis_64k_messages"}
# Quick mode on production storage: the attacks whose path differs from embedded.
PRODUCTION_QUICK = ("push_window_cycle", "send_flood_1to1", "redis_64k_messages",
                    "odd_token_claims")  # fmt: skip


# ------------------------------------------------------------------------------- runner


@dataclass
class Phase:
    name: str
    t0: float
    t1: float


class Bystander:
    def __init__(self, ctx: Ctx, workdir: Path) -> None:
        self.users = ctx.users(8)  # four (sender, receiver) pairs
        self.out = workdir / "bystander.json"
        cmd = [sys.executable, str(servers.BENCH_DIR / "abuse_bystander.py"), str(ctx.port),
               ctx.secret, str(BYSTANDER_RATE), str(self.out), *map(str, self.users)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     preexec_fn=server_support.die_with_parent)  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != b"ready":
            raise RuntimeError(f"bystander did not start: {line!r}")

    def stop(self) -> dict[str, Any]:
        assert self.proc.stdin is not None
        with contextlib.suppress(OSError):
            self.proc.stdin.write(b"stop\n")
            self.proc.stdin.close()
        self.proc.wait(30)
        result: dict[str, Any] = json.loads(self.out.read_text())
        return result


def quiesce(ctx: Ctx, max_s: float) -> float:
    """Wait until the server's processes use under `IDLE_CPU` of a core over half a second
    (work the attack queued, e.g. group fan-out, is still the attack's), at most `max_s`;
    returns the seconds waited."""
    pids = [ctx.handle.pid, *ctx.handle.helper_pids]
    t0 = time.monotonic()
    while time.monotonic() - t0 < max_s:
        c0 = servers.cpu_seconds(pids)
        hold(0.5)
        if servers.cpu_seconds(pids) - c0 < IDLE_CPU * 0.5:
            break
    return time.monotonic() - t0


def window_stats(samples: list[list[Any]], t0: float, t1: float, t_end: float) -> dict[str, Any]:
    lat: list[float] = []
    errors: dict[str, int] = {}
    unanswered = 0
    for t, ms, _mid, _pair, err in samples:
        if not t0 <= t <= t1:
            continue
        if ms is None:
            unanswered += 1
            lat.append((t_end - t) * 1000.0)  # a lower bound: still waiting at the end
        elif err:
            errors[str(err)] = errors.get(str(err), 0) + 1
        else:
            lat.append(ms)
    return {**percentiles(lat), "errors": errors, "unanswered": unanswered}


def run_storage(storage: str, quick: bool, attacks: list[str], secret: str | None,
                ) -> dict[str, Any]:  # fmt: skip
    values = server_config(quick, storage)
    workdir = Path(tempfile.mkdtemp(prefix=f"abuse-{storage}-"))
    conf = workdir / "limits.toml"
    conf.write_text(toml(values))
    cfg = Config().merged(values)
    key_prefix = f"abuse{uuid.uuid4().hex[:10]}" if storage == "production" else None
    table = f"abuse_{uuid.uuid4().hex[:10]}" if storage == "production" else None
    extra = ["--config", str(conf)]
    if secret:
        extra += ["--jwt-secret", secret]
    if storage == "production":  # a gateway, and a persister below: both read the limits
        extra += ["--role", "gateway"]
    handle = servers.start_improto(storage, extra=extra, key_prefix=key_prefix,
                                   hbase_table=table)  # fmt: skip
    if secret:
        handle.secret = secret
    if storage == "production":
        start_persister(handle, conf, key_prefix or "", table or "")
        handle.on_stop.append(lambda: services.purge(key_prefix or "", table, 1))
    stats = ProcStats([handle.pid, *handle.helper_pids])
    sampler = Sampler(stats)
    sampler.start()
    ctx = Ctx(storage, quick, cfg, handle, stats, sampler, key_prefix=key_prefix)
    result: dict[str, Any] = {"storage": storage, "config": values, "attacks": []}
    try:
        by = Bystander(ctx, workdir)
        os.setpriority(os.PRIO_PROCESS, 0, ATTACKER_NICE)  # this thread: the attacks' one
        hold(1.0)  # connections settled
        t0 = time.monotonic()
        hold(4.0 if quick else 15.0)
        idle = Phase("idle", t0, time.monotonic())
        runs: list[tuple[str, Phase, dict[str, Any], Outcome]] = []
        for name in attacks:
            rss0, fds0 = stats.rss_kib(), stats.fds()
            t0 = time.monotonic()
            try:
                outcome = ATTACKS[name](ctx)
                failure = None
            except Exception as e:  # an attack that breaks is reported, the run goes on
                outcome, failure = Outcome(), f"{type(e).__name__}: {e}"
            t1 = time.monotonic()
            busy = quiesce(ctx, QUIESCE_MAX_S if not quick else QUIESCE_MAX_S / 2)
            t2 = time.monotonic()
            peak, peak_fds = sampler.peak(t0, t2)
            peak, peak_fds = max(peak, rss0), max(peak_fds, fds0)
            hold(SETTLE_S)
            mem: dict[str, Any] = {
                "rss_before_kib": rss0, "rss_peak_kib": peak, "rss_after_kib": stats.rss_kib(),
                "fds_before": fds0, "fds_peak": peak_fds, "fds_after": stats.fds(),
                "seconds": round(t1 - t0, 1), "server_busy_after_s": round(busy, 1),
                "server_alive": stats.alive(),
            }  # fmt: skip
            if failure:
                mem["attack_failed"] = failure
            runs.append((name, Phase(name, t0, t2), mem, outcome))
            print(f"abuse: {storage} {name}: {mem['seconds']} s, RSS {rss0 // KIB} -> "
                  f"{peak // KIB} MB", file=sys.stderr, flush=True)  # fmt: skip
            if not stats.alive():
                break
        bystander = by.stop()
        t_end = time.monotonic()
        idle_stats = window_stats(bystander["samples"], idle.t0, idle.t1, t_end)
        result["idle"] = idle_stats
        by_ledger = Ledger()
        for s in bystander["samples"]:
            if s[2]:
                sender, receiver = bystander["pairs"][s[3]]
                by_ledger.add(receiver, 1, sender, [s[2]])
        result["bystander_lost"], result["bystander_lost_notes"] = lost_count(ctx, by_ledger)
        result["bystander_disconnects"] = bystander["disconnects"]
        for name, phase, mem, outcome in runs:
            during = window_stats(bystander["samples"], phase.t0, phase.t1, t_end)
            result["attacks"].append(report(ctx, name, mem, outcome, idle_stats, during))
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, 0)  # root: the next storage's servers start at 0
        sampler.stop()
        handle.stop()
    return result


def start_persister(handle: servers.ServerHandle, conf: Path, key_prefix: str, table: str) -> None:
    """The production persister with the gateway's settings and limits file (it writes the
    inboxes, so the inbox caps are its settings too)."""
    assert handle.data_dir is not None and handle.secret is not None
    cmd = [sys.executable, "-m", "improto_server", "--role", "persister",
           "--data-dir", str(handle.data_dir), "--jwt-secret", handle.secret,
           "--storage", "production", *services.server_flags(), "--key-prefix", key_prefix,
           "--hbase-table", table, "--config", str(conf)]  # fmt: skip
    log = handle.data_dir.parent / "persister.log"
    proc = server_support.popen(cmd, log, server_support.die_with_parent)
    handle.helper_pids.append(proc.pid)
    handle.on_stop.insert(0, lambda: server_support.terminate(proc))


def lost_count(ctx: Ctx, ledger: Ledger) -> tuple[int, list[str]]:
    """Acked messages found in neither history nor inbox; and the read problems, if any (a
    message that could not be looked for counts as lost: it was not shown to be there)."""
    lost, notes = 0, []
    for (reader, kind, conv), ids in ledger.acked.items():
        try:
            n, how = missing_acked(
                ctx.port,
                ctx.secret,
                reader,
                kind,
                conv,
                ids,
                timeout_s=20.0 if ctx.storage == "production" else 5.0,
            )
        except (OSError, RuntimeError) as e:
            n, how = len(set(ids)), f"not read: {e}"[:200]
        lost += n
        if how not in ("history", "none acked") and how not in notes:
            notes.append(how)
    return lost, notes


def report(ctx: Ctx, name: str, mem: dict[str, Any], o: Outcome, idle: dict[str, Any],
           during: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    lost, notes = lost_count(ctx, o.ledger) if ctx.stats.alive() else (o.ledger.count(), [])
    checks = dict(o.checks)
    checks["server_alive"] = mem["server_alive"]
    grow_peak = (mem["rss_peak_kib"] - mem["rss_before_kib"]) * KIB
    grow_after = (mem["rss_after_kib"] - mem["rss_before_kib"]) * KIB
    if o.peak_bound is not None:
        checks["rss_peak_within_bound"] = grow_peak <= o.peak_bound
    if o.after_bound is not None:
        checks["rss_after_within_bound"] = grow_after <= o.after_bound
    ratio = during["p99"] / idle["p99"] if idle["p99"] else math.inf
    checks["bystander_p99_within_2x_idle"] = ratio <= 2.0
    checks["bystander_no_errors"] = not during["errors"] and not during["unanswered"]
    checks["lost_zero"] = lost == 0
    if "attack_failed" in mem:
        checks["attack_ran"] = False
    return {
        "attack": name,
        **mem,
        "rss_peak_bound_kib": None if o.peak_bound is None else o.peak_bound // KIB,
        "rss_after_bound_kib": None if o.after_bound is None else o.after_bound // KIB,
        "bystander": during,
        "bystander_p99_ratio": round(ratio, 2),
        "acked": o.ledger.count(),
        "lost": lost,
        "lost_check_notes": notes,
        "errors": {str(k): v for k, v in sorted(o.errors.items())},
        "attacker_disconnected": o.disconnected,
        "info": o.info,
        "checks": checks,
        "verdict": "pass" if all(checks.values()) else "fail",
    }


def table(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        idle = r["idle"]
        lines.append(
            f"== {r['storage']}: bystander idle p50 {idle['p50']} ms, p99 {idle['p99']} ms"
            f" (n={idle['n']}); bystander lost {r['bystander_lost']}"
        )
        lines.append(
            f"{'attack':26} {'RSS MB before/peak/after':>26} {'fds':>15} {'p50/p99 ms':>16}"
            f" {'x idle':>6} {'lost':>5} {'disc':>5}  verdict"
        )
        for a in r["attacks"]:
            mb = "/".join(str(round(a[k] / 1024)) for k in
                          ("rss_before_kib", "rss_peak_kib", "rss_after_kib"))  # fmt: skip
            fds = f"{a['fds_before']}/{a['fds_peak']}/{a['fds_after']}"
            by = f"{a['bystander']['p50']}/{a['bystander']['p99']}"
            failed = [k for k, v in a["checks"].items() if not v]
            lines.append(f"{a['attack']:26} {mb:>26} {fds:>15} {by:>16} "
                         f"{a['bystander_p99_ratio']:>6} {a['lost']:>5} "
                         f"{a['attacker_disconnected']!s:>5}  {a['verdict']}"
                         + (f" ({', '.join(failed)})" if failed else ""))  # fmt: skip
    return lines


def commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=servers.REPO,
                             capture_output=True, text=True, check=True)  # fmt: skip
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=servers.REPO, capture_output=True, text=True)  # fmt: skip
        return out.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="CI size: small counts, ~90 s")
    p.add_argument("--strict", action="store_true", help="exit 1 when a check fails")
    p.add_argument("--storage", choices=("embedded", "production", "both"), default="both")
    p.add_argument("--attacks", help="comma-separated subset (names: " + ", ".join(ATTACKS) + ")")
    p.add_argument("--jwt-secret", help="the server's secret (default: a random one)")
    p.add_argument("--json", type=Path, help="also write the full result here")
    args = p.parse_args(argv)
    servers.raise_nofile()
    chosen = args.attacks.split(",") if args.attacks else list(ATTACKS)
    unknown = [a for a in chosen if a not in ATTACKS]
    if unknown:
        p.error(f"unknown attacks: {', '.join(unknown)}")
    storages = ["embedded", "production"] if args.storage == "both" else [args.storage]
    secret = args.jwt_secret or secrets.token_hex(16)
    t0 = time.monotonic()
    commit_at_start = commit()  # the tree may move during a run: both ends are reported
    results: list[dict[str, Any]] = []
    for storage in storages:
        names = [a for a in chosen if not (
            (storage == "production" and a in EMBEDDED_ONLY)
            or (storage != "production" and a in PRODUCTION_ONLY)
            or (storage == "production" and args.quick and not args.attacks
                and a not in PRODUCTION_QUICK))]  # fmt: skip
        if storage == "production" and (missing := services.missing(services.NAMES)):
            results.append({"storage": storage, "skipped": f"services down: {missing}"})
            continue
        results.append(run_storage(storage, args.quick, names, secret))
    ran: list[dict[str, Any]] = [r for r in results if "attacks" in r]
    for line in table(ran):
        print(line)
    failed = [f"{r['storage']}/{a['attack']}" for r in ran for a in r["attacks"]
              if a["verdict"] != "pass"]  # fmt: skip
    failed += [f"{r['storage']}/bystander_lost" for r in ran if r["bystander_lost"]]
    summary = {
        "bench": "abuse", "commit": commit(), "commit_at_start": commit_at_start,
        "quick": args.quick,
        "seconds": round(time.monotonic() - t0, 1), "results": results,
        "passed": sum(a["verdict"] == "pass" for r in ran for a in r["attacks"]),
        "failed": failed,
    }  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(summary, indent=1))
    print(json_line(summary))
    return 1 if args.strict and failed else 0


if __name__ == "__main__":
    sys.exit(main())
