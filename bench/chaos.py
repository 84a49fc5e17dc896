"""Chaos run of production mode, judged from the clients' own view.

    python bench/chaos.py [--quick] [--seconds N] [--seed S] [--keep] [--sync-state] [--push]
                          [--storage production|embedded] [--spare redis|rabbitmq|thrift ...]

Starts 2 gateways and 2 persisters (`python -m improto_server --storage production --role
gateway|persister`) on 127.0.0.1 with a fresh key prefix, HBase table and JWT secret, simulates
users with 1-3 devices each (one thread and one blocking `improto.conformance.conn.Conn` per
device, each connection to a random gateway) chatting 1:1 and in groups, and meanwhile kills
things: client connections (mid offline page, mid pipelined burst, at any moment), `kill -9`
of a gateway (restarted on the same port), `kill -9` of a persister (restarted), and `kill -9`
of Redis, of RabbitMQ and of the HBase Thrift server (each restarted by `scripts/services
crash`). Gateways lease their message-id nodes in Redis, as in production.
It starts the services first (`scripts/services start`, which reuses running ones; the crash
faults need services that script started). The crashes kill the services of
IMPROTO_SERVICES_DIR (default .services): to run next to other users of those, give the run
services of its own (IMPROTO_SERVICES_DIR, IMPROTO_REDIS_PORT, IMPROTO_RABBITMQ_PORT; see
docs/SERVICES.md) and, since HBase's ports are fixed, `--spare thrift` (no Thrift crash).
`--quick` takes about a minute; the default chats 10 minutes.
The seed fixes the plan (users, groups, conversations, fault choices); thread timing is real.
`--sync-state`: about half the devices use the post-v1 features (WIRE_ONCE, CONVERSATIONS,
READ_RECEIPTS) and bench/chaos_state.py adds its checks (wire-once, read positions, lists).
`--push`: the servers notify through a push gateway stand-in run by the harness, which fails,
hangs and reports tokens dead meanwhile; some devices register push targets and go to the
background for long; bench/chaos_push.py adds its checks (every offline registered device
notified or a logged, counted drop; dead tokens unregistered; metrics against both). Quick:
30 s of chat.
`--redis-cluster [SEEDS]`: the production processes use a Redis Cluster (default the one of
`scripts/services start redis-cluster`, 127.0.0.1:7000-7005) instead of the single Redis, and
the Redis fault is a `kill -9` of one of its masters: the run waits for its replica's
promotion, then restarts the killed node, which rejoins as a replica. The servers run with
`redis_wait_replicas = 1` (docs/GUARANTEES.md, promise 14).
`--storage embedded`: one `imserver` process on SQLite (gateway, persister and notifier)
instead of the production processes; its faults: client drops, lost pushes and `kill -9` of
the server (restarted on the same port and database); no services.
In every mode one more group crosses the servers' `large_group_threshold` (set to the group
size) both ways while its members chat: members are added and removed during the run, its
members' devices enable LARGE_GROUPS and page its timeline; bench/chaos_large.py adds its
checks (PROTOCOL.md 20: lost / duplicated / out-of-order per delivery path, crossing,
misplaced) and the report's `large` object.

Clients follow spec/PROTOCOL.md: every SEND has a fresh client_msg_id and stays in the
device's outbox until a SEND_ACK; after every (re)connect the device runs the offline sync loop
(section 10.2) from its persisted cursor, OFFLINE_ACKs, then resends its outbox with the same
client_msg_ids (section 17). The device's "persisted" state (cursor, outbox, what it received)
lives in the harness and survives every connection loss; the cursor moves only from
OFFLINE_PAGE.cursor, after the page's messages are recorded.

Verdict. After chatting stops, every device flushes its outbox (bounded), then rounds of
offline syncs run until two rounds in a row bring nothing new and the persist queues are empty
(bounded: persistence has settled); the last round is each device's final sync from its
persisted cursor. Then the full history of every conversation is paged (50 per page). Counted:

- acked: distinct msg_ids a sender got a SEND_ACK for.
- lost: an acked message (or a group event) missing from what a device of a receiver got
  (pushes + offline pages), or missing from its conversation's history.
- offline_missing: received only by PUSH, never in an offline page. Pushes are best effort
  (9.2); the offline sync is the gap-free path (10.3) and every user's inbox holds every message
  they sent or received (10.1), so each device must see each message in a page.
- duplicated (what the spec says the server must not do twice):
  * the same msg_id in two offline-page entries of one device: section 10.3 says no entry
    ever appears with a cursor <= one already served, and an inbox holds a message once
    (10.1); the device always pulls from the cursor of the last page it stored;
  * one client_msg_id showing up under two msg_ids (at a device, in history, or in two
    SEND_ACKs): section 9.1.4, "nobody receives the message twice";
  * the same msg_id twice in one conversation's history (11: "every message once").
  NOT duplicates: a message seen by PUSH and again in an offline page (9.2 says a push and a
  sync page can carry the same message; clients dedupe by msg_id); a SEND_ACK with
  duplicate=1 for a retried SEND (that is the dedup working). A message pushed twice to one
  device is reported as details.push_repeats, not counted.
- out_of_order: a history page sequence that is not strictly newest-first by msg_id (11), or
  a non-empty offline page whose cursor is not above the device's stored cursor (10.3). The
  inbox order of one conversation may legitimately differ from msg_id order (10.3: cursor
  order is storage order; clients sort a conversation by msg_id): such inversions are only
  reported (device_stats.inbox_inversions_same_node / _cross_node, split by the node bits of
  the two ids, and examples.inbox_inversions).
- unexpected: anything else a device or a history page holds: a message for a conversation
  the user is not in, an unknown client_msg_id, a body that differs from what was sent, or a
  client_msg_id under another msg_id than its SEND_ACK said (a message never acked may appear,
  once).

Pushes travel between gateways (presence in Redis, routing over RabbitMQ), but they are best
effort, so correctness is judged on the offline sync and the history; pushes count as a bonus
(details.pushes). Prints progress to stderr,
details as a JSON object to stderr, and a final JSON line to stdout; exits 1 when lost,
duplicated, out_of_order, unexpected, offline_missing, crossing or misplaced (or a count of
--sync-state or --push) is non-zero, 2 on a harness failure.
On failure the work directory (server logs) and the run's service data are kept.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import chaos_faults as cf
import chaos_large as cl
import chaos_push as cp
import chaos_state as cs

from improto.codec import encode
from improto.conformance.conn import Conn, describe
from improto.enums import ContentType, ConvKind, FrameType
from improto.frames import (
    Close,
    Error,
    Features,
    FeaturesOk,
    Frame,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    HistoryPage,
    HistoryPull,
    InboxNotice,
    Message,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Push,
    PushAck,
    ReadUpdate,
    Send,
    SendAck,
    SyncHint,
)

HOST = cf.HOST
REQUEST_TIMEOUT_S = 10.0  # HELLO, pulls
ACK_TIMEOUT_S = 25.0  # > the server's stale-pending takeover (10 s) after a gateway crash
PAGE = 200  # offline page size (the maximum)
HISTORY_PAGE = 50
EXAMPLES = 5  # examples kept per problem kind

# Any of these means: this connection is gone or unusable; drop it and reconnect. Conn raises
# AssertionError for EOF, timeouts and undecodable frames.
LOST = (AssertionError, OSError, EOFError)


class ConnLost(EOFError):
    """The harness drops the connection (fault, unexpected answer)."""


class HarnessError(Exception):
    """The harness cannot go on (setup failed)."""


def log(msg: str) -> None:
    print(f"[chaos {time.monotonic() - T0:7.2f}s] {msg}", file=sys.stderr, flush=True)


T0 = time.monotonic()


# ------------------------------------------------------------------------------ plan


@dataclass
class Plan:
    quick: bool
    seed: int
    seconds: float  # chatting time
    users: int
    rate: float  # messages per second, all devices together (bursts apart)
    groups: int
    group_size: int
    burst: int  # pipelined sends per burst (> one offline page of 200)
    bursts: int
    fault_gap: tuple[float, float]  # seconds between faults
    flush_s: float
    settle_s: float
    partitions: int
    sync_state: bool = False  # chaos_state: post-v1 devices and their checks
    push: bool = False  # chaos_push: a push gateway with faults, and its checks
    storage: str = "production"
    spare: frozenset[str] = frozenset()  # services never crashed (shared with other runs)
    redis_cluster: str = ""  # the servers' Redis: this cluster (its masters get killed)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Plan:
        q = a.quick
        quick_s = 30.0 if a.push else 45.0
        return cls(
            quick=q,
            seed=a.seed if a.seed is not None else random.randrange(1 << 31),
            seconds=a.seconds if a.seconds is not None else (quick_s if q else 600.0),
            users=a.users or (12 if q else 40),
            rate=a.rate or (40.0 if q else 60.0),
            groups=2 if q else 3,
            group_size=6 if q else 12,
            burst=250,
            bursts=2 if q else 6,
            fault_gap=(2.0, 4.0) if q else (3.0, 8.0),
            flush_s=30.0 if q else 60.0,
            settle_s=30.0 if q else 90.0,
            partitions=a.partitions,
            sync_state=a.sync_state,
            push=a.push,
            storage=a.storage,
            spare=frozenset(a.spare or ()),
            redis_cluster=a.redis_cluster or "",
        )


# ---------------------------------------------------------------------------- ledger


@dataclass
class Sent:
    """One composed message (one client_msg_id) and what SEND_ACKs said about it."""

    sender: int
    device: str
    frame: Send
    receivers: frozenset[int]
    msg_id: int | None = None  # from the first SEND_ACK
    acked_at: float | None = None  # time.monotonic() of the first SEND_ACK
    composed_at: float = dataclasses.field(default_factory=time.monotonic)  # before any write


class Ledger:
    """Every SEND composed and every SEND_ACK received, across devices (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sent: dict[tuple[int, bytes], Sent] = {}
        self.by_id: dict[int, Sent] = {}
        self.dup_acks = 0  # SEND_ACK duplicate=1: a retry the server deduplicated
        self.ack_conflicts: list[str] = []  # one client_msg_id acked with two msg_ids
        self.refused: Counter[int] = Counter()  # non-retriable ERROR codes

    def compose(self, s: Sent) -> None:
        with self.lock:
            self.sent[(s.sender, s.frame.client_msg_id)] = s

    def acked(self, sender: int, ack: SendAck) -> None:
        with self.lock:
            s = self.sent[(sender, ack.client_msg_id)]
            if ack.duplicate:
                self.dup_acks += 1
            if s.msg_id is None:
                s.msg_id = ack.msg_id
                s.acked_at = time.monotonic()
                self.by_id[ack.msg_id] = s
            elif s.msg_id != ack.msg_id:
                self.ack_conflicts.append(
                    f"sender {sender} cmid {ack.client_msg_id.hex()}: {s.msg_id} then {ack.msg_id}"
                )

    def lookup(self, m: Message) -> Sent | None:
        with self.lock:
            return self.sent.get((m.sender_id, m.client_msg_id))


@dataclass
class Group:
    gid: int
    creator: int
    members: frozenset[int]
    events: dict[str, frozenset[int]]  # expected event ("created", "added") -> its receivers
    churn: bool = False  # the large group (chaos_large: members change, its own checks)


# ---------------------------------------------------------------------------- device


class Device(threading.Thread):
    """One app installation: its persisted state, and a thread that chats with faults."""

    def __init__(self, sim: Sim, user: int, index: int, seed: int) -> None:
        super().__init__(name=f"u{user}d{index}", daemon=True)
        self.sim = sim
        self.user = user
        self.device_id = f"u{user}d{index}"
        self.rng = random.Random(seed)
        # Persisted app state.
        self.cursor = 0
        self.outbox: dict[bytes, Send] = {}
        self.page_hits: Counter[int] = Counter()  # msg_id -> offline-page entries
        self.push_hits: Counter[int] = Counter()  # msg_id -> PUSHes
        self.info: dict[int, Message] = {}  # msg_id -> first record (text bodies dropped)
        self._last_in_conv: dict[tuple[int, int], int] = {}
        # Session state.
        self.conn: Conn | None = None
        self.stats: Counter[str] = Counter()
        self.drop_page: int | None = None  # armed fault: drop the sync after this many pages
        self.drop_pushes_until = 0.0  # fault: pushes received before then are lost
        self.offline_until = 0.0
        self.need_sync = False
        self.next_sync = 0.0
        self.retry_at = 0.0
        self.bursts_due: list[tuple[float, int, int]] = []  # (when, conv_kind, conv_id)
        self.backoff = 0.1
        self.seq = 0
        self.state = cs.new_state(self.rng, sim.plan.sync_state)
        self.push = cp.new_device(self, seed)
        self.tl = sim.large.new_device(user)  # LARGE_GROUPS: timeline positions (persisted)
        self.enabled: set[int] = set()  # FEATURES_OK of the current connection

    # --- thread

    def run(self) -> None:
        sim = self.sim
        try:
            while not sim.chat_over.is_set():
                try:
                    self.chat_step()
                except LOST as e:
                    self.lost(e)
            self.flush(time.monotonic() + sim.plan.flush_s)
        except Exception:
            sim.harness_errors.append(f"{self.device_id}: {traceback.format_exc()}")
        finally:
            self.disconnect()

    def chat_step(self) -> None:
        now = time.monotonic()
        if cp.background(self, now):
            return
        if now < self.offline_until:
            time.sleep(min(0.2, self.offline_until - now))
            return
        if self.conn is None:
            self.connect()
        self.pump(self.rng.uniform(0.05, 0.3))
        if self.need_sync or now >= self.next_sync:
            self.sync()
        cs.step(self, now)
        cl.step(self, now)
        if self.outbox and now >= self.retry_at:
            self.send_frames(list(self.outbox.values()))
        if self.bursts_due and now >= self.bursts_due[0][0]:
            _, kind, conv = self.bursts_due.pop(0)
            self.burst(kind, conv)
        elif self.rng.random() < self.sim.send_p:
            self.send_frames([self.compose(*self.sim.pick_conv(self.user, self.rng))])
        if self.rng.random() < self.sim.offline_p and not self.bursts_due:
            # The user closes the app for a while: a backlog builds up for the next sync.
            self.stats["offline_spells"] += 1
            self.disconnect()
            cp.went_offline(self)
            self.offline_until = time.monotonic() + self.rng.uniform(2.0, 10.0)

    def flush(self, deadline: float) -> None:
        """Chat over: resend the outbox until every SEND is acknowledged (bounded)."""
        self.offline_until = 0.0
        while self.outbox and time.monotonic() < deadline:
            try:
                if self.conn is None:
                    self.connect()  # sync, then resend
                else:
                    self.send_frames(list(self.outbox.values()))
                if self.outbox:
                    time.sleep(0.5)  # 5xx: retry later
            except LOST as e:
                self.lost(e)
        self.disconnect()

    # --- connection

    def connect(self, resend: bool = True) -> None:
        port = self.rng.choice(self.sim.cluster.ports)
        cp.on_connect(self, port)
        self.conn = Conn(HOST, port, REQUEST_TIMEOUT_S, self.device_id)
        self.conn.login(self.sim.secret, self.user, self.device_id)
        self.stats["logins"] += 1
        self.enabled = set()
        wanted = {*cs.features(self), *cp.features(self), *cl.features(self)}
        if wanted:  # one FEATURES: each one replaces the connection's set (18.1)
            ok: FeaturesOk = self.request(Features(tuple(sorted(wanted))), FeaturesOk)
            self.enabled = set(ok.features)
            if self.enabled != wanted:
                self.sim.harness_errors.append(f"{self.device_id}: FEATURES_OK {ok.features}"
                                               f" for {sorted(wanted)}")  # fmt: skip
        cs.on_login(self)
        cp.on_login(self)
        self.sync()  # section 17: on HELLO_OK sync first, then resend unacknowledged SENDs
        if resend and self.outbox:
            self.stats["outbox_resends"] += len(self.outbox)
            self.send_frames(list(self.outbox.values()))
        self.backoff = 0.1

    def disconnect(self) -> None:
        c, self.conn = self.conn, None
        if c is not None:
            c.close()
            cp.on_disconnect(self)

    def lost(self, e: BaseException) -> None:
        self.stats["connections_lost"] += 1
        if isinstance(e, AssertionError) and ("invalid frame" in str(e) or "oversize" in str(e)):
            self.sim.problem("protocol_errors", f"{self.device_id}: {e}")
        self.disconnect()
        time.sleep(self.backoff * self.rng.uniform(0.5, 1.0))
        self.backoff = min(self.backoff * 2, 2.0)

    def _conn(self) -> Conn:
        if self.conn is None:
            raise ConnLost("not connected")
        return self.conn

    def request(self, frame: Frame, expect: type[Any], timeout: float = REQUEST_TIMEOUT_S) -> Any:
        reply = self._conn().request(frame, timeout)
        if not isinstance(reply, expect):
            self.stats[f"error_{frame.TYPE.name}"] += 1
            raise ConnLost(f"{frame.TYPE.name} answered by {describe(reply)}")
        return reply

    def pump(self, seconds: float) -> None:
        """Read for `seconds`, then handle what arrived on its own: PUSH, SYNC_HINT, CLOSE."""
        c = self._conn()
        c.drain(seconds)
        self.handle_queued(c)
        if c.eof:
            raise ConnLost("closed by the server")

    def handle_queued(self, c: Conn) -> None:
        queued, c.queue = c.queue, []
        closed = None
        for f in queued:
            if isinstance(f, Push):
                self.on_push(c, f.message)
            elif isinstance(f, SyncHint):
                self.need_sync = True
                self.state.phase = "hint"
                self.stats["sync_hints"] += 1
            elif isinstance(f, InboxNotice):
                cs.on_notice(self, f)
            elif isinstance(f, ReadUpdate):
                cs.on_read_update(self, f)
            elif isinstance(f, Close):
                closed = f
            elif isinstance(f, SendAck) and f.client_msg_id in self.outbox:
                self.acked(self.outbox[f.client_msg_id], f)  # a late ack still counts (9.1.5)
            elif isinstance(f, Error) and f.request_id == 0:
                self.stats[f"unsolicited_error_{f.code}"] += 1
        if closed is not None:
            self.stats[f"close_reason_{closed.reason}"] += 1
            raise ConnLost(describe(closed))

    def on_push(self, c: Conn, m: Message) -> None:
        cs.arrival(self, m)
        if time.monotonic() < self.drop_pushes_until:
            # A push lost after the transport (the app died before storing it): acked, never
            # recorded. The message must still come in an offline page.
            self.stats["pushes_dropped"] += 1
            c.send(PushAck(m.msg_id))
            return
        self.push_hits[m.msg_id] += 1
        self.note(m)
        c.send(PushAck(m.msg_id))

    def note(self, m: Message) -> None:
        """Keep the first record of each msg_id (without the body, checked here)."""
        if m.msg_id in self.info:
            return
        if m.content_type != ContentType.GROUP_EVENT:
            s = self.sim.ledger.lookup(m)
            if s is not None and s.frame.body != m.body:
                self.sim.problem("unexpected", f"{self.device_id}: body differs for {m.msg_id}")
        self.info[m.msg_id] = dataclasses.replace(m, body=m.body if m.content_type == 0 else b"")

    # --- offline sync (section 10.2), then the timelines (20.6, chaos_large)

    def sync(self) -> None:
        c = self._conn()
        pages = 0
        if self.drop_page is not None and self.state.phase == "online":
            self.state.phase = "forced"  # the harness made it pull (chaos_state.arrival)
        while True:
            if self.drop_page is not None and pages >= self.drop_page:
                self.drop_mid_page(c, OfflinePull(self.cursor, PAGE), FrameType.OFFLINE_PAGE)
            page: OfflinePage = self.request(OfflinePull(self.cursor, PAGE), OfflinePage)
            self.store_page(page)
            pages += 1
            if not page.has_more:
                break
            if not page.messages:
                self.sim.problem("anomalies", f"{self.device_id}: empty page with has_more=1")
        ok: OfflineAckOk = self.request(OfflineAck(self.cursor), OfflineAckOk)
        if ok.cursor < self.cursor:
            self.sim.problem("anomalies", f"{self.device_id}: position {ok.cursor} < {self.cursor}")
        cl.sync(self, pages)  # the armed drop counts the timeline pages on
        if self.drop_page is not None:
            self.drop_page = 0  # still armed: the next sync's first page
        self.need_sync = False
        self.state.phase = "online"
        # a wire-once device syncs only when told to (SYNC_HINT, a notice it cannot apply)
        self.next_sync = float("inf") if self.state.ext else (
            time.monotonic() + self.rng.uniform(2.0, 5.0))  # fmt: skip
        self.stats["syncs"] += 1
        self.stats["pages"] += pages
        self.stats["multi_page_syncs"] += pages > 1

    def store_page(self, page: OfflinePage) -> None:
        if page.messages and page.cursor <= self.cursor:
            self.sim.problem(
                "out_of_order", f"{self.device_id}: page cursor {page.cursor} <= {self.cursor}"
            )
        if not page.messages and page.cursor != self.cursor:
            self.sim.problem("anomalies", f"{self.device_id}: cursor clamped {self.cursor}"
                                          f" -> {page.cursor}")  # fmt: skip
        if page.gap:
            self.sim.problem("anomalies", f"{self.device_id}: gap=1")
        for m in page.messages:
            self.page_hits[m.msg_id] += 1
            cs.arrival(self, m)
            self.note(m)
            peer = m.conv_id if m.sender_id == self.user else m.sender_id
            conv = (m.conv_kind, m.conv_id if m.conv_kind == ConvKind.GROUP else peer)
            last = self._last_in_conv.get(conv, 0)
            if m.msg_id < last:  # allowed (10.3); split by the id's node bits (informative)
                same = (m.msg_id >> 12) & 0x3FF == (last >> 12) & 0x3FF
                self.stats["inbox_inversions_" + ("same_node" if same else "cross_node")] += 1
                self.sim.note_inversion(self, conv, self.info[last], m)
            self._last_in_conv[conv] = max(last, m.msg_id)
        self.cursor = page.cursor  # persisted after the messages

    def drop_mid_page(self, c: Conn, pull: Frame, page_type: int) -> None:
        """Fault: send `pull` and close the connection as soon as part of its page (of type
        `page_type`: OFFLINE_PAGE or TIMELINE_PAGE) arrived (or, for a page that fits one
        read, once it arrived, before it is stored)."""
        self.drop_page = None
        c.send(pull)
        where = "before_page"
        deadline = time.monotonic() + 2.0
        with contextlib.suppress(OSError):
            while where == "before_page" and time.monotonic() < deadline:
                c.sock.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = c.sock.recv(self.rng.randint(16, 512))
                if not chunk:
                    break
                done = c.reader.feed(chunk)  # frames before the page are abandoned too
                partial = c.reader._buf  # the frame arriving now (byte 5: its type)
                if any(p[1] == page_type for p in done):
                    where = "after_page"
                elif len(partial) >= 6 and partial[5] == page_type:
                    where = "inside_page"
        mode = "mid_page" if page_type == FrameType.OFFLINE_PAGE else "mid_timeline_page"
        self.stats[f"{mode}_drops_{where}"] += 1
        self.sim.count_drop(mode, self.device_id)
        raise ConnLost("dropped mid-page")

    # --- sending (section 9.1)

    def compose(self, kind: int, conv: int, small: bool = False) -> Send:
        self.seq += 1
        # Some pages get cut by the frame size (131072 bytes) rather than by the count.
        big = not small and self.rng.random() < 0.05
        pad = self.rng.randint(2000, 8000) if big else self.rng.randint(0, 200)
        body = f"{self.device_id}#{self.seq} ".encode() + b"x" * pad
        frame = Send(self.rng.randbytes(16), kind, conv, ContentType.TEXT, body)
        self.outbox[frame.client_msg_id] = frame  # the outbox first, then the wire
        receivers = self.sim.receivers(self.user, kind, conv)
        self.sim.ledger.compose(Sent(self.user, self.device_id, frame, receivers))
        return frame

    def burst(self, kind: int, conv: int) -> None:
        """More SENDs than an offline page holds, written at once (one write, ~1 ms)."""
        frames = [self.compose(kind, conv, small=True) for _ in range(self.sim.plan.burst)]
        # A third of the bursts lose their connection while acks are due, a third their
        # gateway (kill -9 right after the write): the rest is resent after reconnecting.
        fault = self.rng.choice(["none", "drop", "kill"])
        drop_after = self.rng.randrange(len(frames)) if fault == "drop" else None
        self.stats["bursts"] += 1
        how = {"none": "", "drop": f", dropping the connection after {drop_after} acks",
               "kill": ", killing its gateway meanwhile"}[fault]  # fmt: skip
        log(f"{self.device_id}: burst of {len(frames)} to {conv_name(kind, conv)}{how}")
        injector = self.sim.injector
        if fault == "kill" and injector is not None:
            port = self._conn().sock.getpeername()[1]
            timer = threading.Timer(self.rng.uniform(0, 0.05), injector.request_gateway_kill,
                                    (port,))  # fmt: skip
            timer.start()
        self.send_frames(frames, drop_after)

    def send_frames(self, frames: list[Send], drop_after: int | None = None) -> None:
        """Pipeline the SENDs in one write, then collect every answer."""
        c = self._conn()
        rids = [c.next_rid() for _ in frames]
        c.send_raw(b"".join(encode(dataclasses.replace(f, request_id=r))
                            for f, r in zip(frames, rids, strict=True)))  # fmt: skip
        self.stats["sends_written"] += len(frames)
        for i, (f, rid) in enumerate(zip(frames, rids, strict=True)):
            if drop_after is not None and i >= drop_after:
                with contextlib.suppress(OSError):
                    c.sock.shutdown(socket.SHUT_RDWR)
                self.sim.count_drop("mid_burst", self.device_id)
                raise ConnLost("dropped mid-burst")
            reply = c.reply(rid, "SEND_ACK", ACK_TIMEOUT_S)
            if isinstance(reply, SendAck):
                self.acked(f, reply)
            elif isinstance(reply, Error) and reply.code // 100 == 5:
                self.stats[f"send_error_{reply.code}"] += 1  # nothing stored: retry later
                self.retry_at = time.monotonic() + 1.0
            elif isinstance(reply, Error):
                self.outbox.pop(f.client_msg_id, None)
                with self.sim.ledger.lock:
                    self.sim.ledger.refused[reply.code] += 1
            else:
                raise ConnLost(f"SEND answered by {describe(reply)}")
        self.handle_queued(c)

    def acked(self, frame: Send, ack: SendAck) -> None:
        if ack.client_msg_id != frame.client_msg_id:
            self.sim.problem("anomalies", f"{self.device_id}: SEND_ACK for another cmid")
            return
        self.outbox.pop(frame.client_msg_id, None)
        self.state.sent_ids.add(ack.msg_id)
        self.sim.ledger.acked(self.user, ack)

    # --- the verdict's sync (main thread, after the device threads ended)

    def final_sync(self, deadline: float) -> int:
        """Connect, sync from the persisted cursor (no resend: the ledger is frozen), close.
        Returns how many offline-page and timeline-page entries it brought."""
        before = self.entries()
        while True:
            try:
                self.connect(resend=False)
                self.pump(0.0)
                if self.state.ext:
                    cs.refresh(self)
                break
            except LOST as e:
                self.disconnect()
                if time.monotonic() > deadline:
                    raise HarnessError(f"{self.device_id}: final sync impossible: {e}") from e
                time.sleep(0.2)
        self.disconnect()
        return self.entries() - before

    def entries(self) -> int:
        return self.page_hits.total() + (self.tl.hits.total() if self.tl is not None else 0)


def conv_of(s: Sent, viewer: int) -> tuple[int, int]:
    """The conversation of a sent message as `viewer` names it (section 6)."""
    f = s.frame
    if f.conv_kind == ConvKind.GROUP:
        return ConvKind.GROUP, f.conv_id
    return ConvKind.USER, f.conv_id if s.sender == viewer else s.sender


def conv_name(kind: int, conv: int) -> str:
    return f"{'group' if kind == ConvKind.GROUP else 'user'}:{conv}"


# ----------------------------------------------------------------------------- sim


class Sim:
    def __init__(self, plan: Plan, workdir: Path) -> None:
        self.plan = plan
        self.rng = random.Random(plan.seed)
        self.prefix = f"chaos{uuid.uuid4().hex[:12]}"
        self.secret = uuid.uuid4().hex
        self.cluster = cf.Cluster(
            workdir, self.prefix, self.secret, partitions=plan.partitions,
            storage=plan.storage, redis_cluster=plan.redis_cluster,
        )  # fmt: skip
        if plan.redis_cluster:  # the persisters ack only writes a replica holds (promise 14)
            self.cluster.settings["redis_wait_replicas"] = 1
        self.ledger = Ledger()
        self.users = list(range(1001, 1001 + plan.users))
        self.friends: dict[int, list[int]] = {}
        self.groups: dict[int, Group] = {}
        self.groups_of: dict[int, list[int]] = defaultdict(list)
        self.devices: list[Device] = []
        self.chat_over = threading.Event()
        self.send_p = 0.0
        self.offline_p = 0.0
        self.lock = threading.Lock()
        self.drops: Counter[str] = Counter()
        self.problems: dict[str, list[str]] = defaultdict(list)
        self.counts: Counter[str] = Counter()
        self.harness_errors: list[str] = []
        self.injector: cf.Injector | None = None
        self.push: cp.PushRun | None = None
        self.large = cl.LargeRun(self, log)  # sets the servers' large_group_threshold
        # chaos_state: read marks per (user, conversation), and the history read at the end
        self.marks_sent: dict[tuple[int, tuple[int, int]], set[int]] = defaultdict(set)
        self.marks_acked: dict[tuple[int, tuple[int, int]], int] = {}
        self.history: dict[tuple[int, int, int], list[Message]] = {}

    # --- bookkeeping

    def problem(self, kind: str, example: str) -> None:
        with self.lock:
            self.counts[kind] += 1
            if len(self.problems[kind]) < EXAMPLES:
                self.problems[kind].append(example)

    def mark_sent(self, user: int, conv: tuple[int, int], msg_id: int) -> None:
        with self.lock:
            self.marks_sent[(user, conv)].add(msg_id)

    def mark_acked(self, user: int, conv: tuple[int, int], msg_id: int) -> None:
        with self.lock:
            self.marks_acked[(user, conv)] = max(self.marks_acked.get((user, conv), 0), msg_id)

    def count_drop(self, mode: str, device: str) -> None:
        with self.lock:
            self.drops[mode] += 1
        if self.injector is not None:
            self.injector.event(f"{device}: connection dropped ({mode})")

    def note_inversion(self, d: Device, conv: tuple[int, int], first: Message,
                       then: Message) -> None:  # fmt: skip
        """An example of an inbox listing a lower msg_id after a higher one (allowed)."""
        if len(self.problems["inbox_inversions"]) >= EXAMPLES:
            return
        label = []
        for m in (first, then):
            s = self.ledger.lookup(m)
            label.append(f"{m.msg_id} ({s.frame.body[:16].decode() if s else '?'})")
        self.problem("inbox_inversions", f"{d.device_id} {conv_name(*conv)}: {label[1]} after "
                                         f"{label[0]}")  # fmt: skip

    def receivers(self, sender: int, kind: int, conv: int) -> frozenset[int]:
        if kind == ConvKind.GROUP:
            return self.groups[conv].members
        return frozenset((sender, conv))

    def pick_conv(self, user: int, rng: random.Random) -> tuple[int, int]:
        groups = self.groups_of.get(user)
        if groups and rng.random() < 0.3:
            return ConvKind.GROUP, rng.choice(groups)
        return ConvKind.USER, rng.choice(self.friends[user])

    # --- setup

    def setup(self) -> None:
        plan, rng = self.plan, self.rng
        n = len(self.users)
        self.large.choose()  # before the devices: its pool's devices enable LARGE_GROUPS
        for i, u in enumerate(self.users):  # a ring plus random extra friends, symmetric
            self.friends.setdefault(u, [])
            for v in (self.users[(i + 1) % n], *rng.sample(self.users, 2)):
                if v != u and v not in self.friends[u]:
                    self.friends[u].append(v)
                    self.friends.setdefault(v, []).append(u)
        for u in self.users:
            for i in range(rng.randint(1, 3)):
                self.devices.append(Device(self, u, i, rng.randrange(1 << 62)))
        for g in range(plan.groups):
            members = rng.sample(self.users, min(plan.group_size, n))
            self.create_group(f"chaos group {g}", members[0], members[1:], add_later=g == 1)
        per_step = 0.2  # seconds a chat step takes, about
        self.send_p = min(0.9, plan.rate * per_step / len(self.devices))
        self.offline_p = per_step / 30.0  # an offline spell every ~30 s per device
        # Bursts: the first to a group (from its creator), the rest alternate 1:1 and groups.
        for b in range(plan.bursts):
            at = time.monotonic() + plan.seconds * (0.25 + 0.6 * b / plan.bursts)
            if b % 2 == 0:
                target = self.groups[sorted(self.groups)[b // 2 % len(self.groups)]]
                sender, kind, conv = target.creator, ConvKind.GROUP, target.gid
            else:
                sender = rng.choice(self.users)
                kind, conv = ConvKind.USER, rng.choice(self.friends[sender])
            dev = next(d for d in self.devices if d.user == sender)
            dev.bursts_due.append((at, kind, conv))
        gid, creator, initial = self.large.setup()
        self.groups[gid] = Group(gid, creator, initial, {}, churn=True)
        for u in initial:
            self.groups_of[u] = [*self.groups_of[u], gid]
        log(f"{n} users, {len(self.devices)} devices, {len(self.groups)} groups, "
            f"send_p {self.send_p:.2f}, prefix {self.prefix}")  # fmt: skip

    def create_group(self, name: str, creator: int, others: list[int], add_later: bool) -> None:
        """GROUP_CREATE (and GROUP_ADD for half the members when `add_later`), fault-free."""
        first, later = (others[: len(others) // 2], others[len(others) // 2 :]) if add_later \
            else (others, [])  # fmt: skip
        c = Conn(HOST, self.cluster.ports[0], REQUEST_TIMEOUT_S, "setup")
        try:
            c.login(self.secret, creator, f"u{creator}d0")
            created = c.request(GroupCreate(name, tuple(first)))
            if not isinstance(created, GroupCreated):
                raise HarnessError(f"GROUP_CREATE answered by {describe(created)}")
            initial = frozenset((creator, *first))
            events = {"created": initial}
            if later:
                added = c.request(GroupAdd(created.group_id, tuple(later)))
                if not isinstance(added, GroupAddOk) or added.count != len(later):
                    raise HarnessError(f"GROUP_ADD answered by {describe(added)}")
                events["added"] = initial | frozenset(later)
        finally:
            c.close()
        g = Group(created.group_id, creator, initial | frozenset(later), events)
        self.groups[g.gid] = g
        for u in g.members:
            self.groups_of[u].append(g.gid)

    # --- faults

    def drop_client(self, rng: random.Random) -> str | None:
        """The injector's hook for a client drop: now, or armed for the next offline page."""
        online = [d for d in self.devices if d.conn is not None]
        if rng.random() < 0.35 and online:
            d = rng.choice(online)
            c = d.conn
            if c is None:
                return None
            try:
                c.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                return None
            self.count_drop("anytime", d.device_id)
            return "anytime"
        idle = [d for d in self.devices if d.drop_page is None]
        if not idle:
            return None
        # Prefer a device coming back from an offline spell: its sync has a backlog.
        now = time.monotonic()
        away = [d for d in idle if d.offline_until > now]
        d = rng.choice(away or idle)
        d.drop_page = rng.randint(0, 2)
        d.need_sync = True
        log(f"{d.device_id}: armed to drop its connection in its next sync, page {d.drop_page}")
        return "mid_page_armed"

    def drop_pushes(self, rng: random.Random) -> bool:
        """The injector's hook for lost pushes: a device loses what it is pushed for 1-4 s."""
        online = [d for d in self.devices if d.conn is not None]
        if not online:
            return False
        d = rng.choice(online)
        d.drop_pushes_until = time.monotonic() + rng.uniform(1.0, 4.0)
        log(f"{d.device_id}: loses its pushes for a while")
        return True

    # --- verdict

    def settle(self) -> dict[str, Any]:
        """Offline-sync rounds until two in a row bring nothing and the queues are empty."""
        start = time.monotonic()
        deadline = start + self.plan.settle_s
        rounds = stable = 0
        for d in self.devices:
            d.drop_page = None  # no fault during the verdict
        while True:
            backlog = self.cluster.backlog()
            new = sum(d.final_sync(deadline + 30) for d in self.devices)
            rounds += 1
            stable = stable + 1 if new == 0 and backlog == 0 else 0
            log(f"settle round {rounds}: {new} new page entries, queue backlog {backlog}")
            if stable >= 2:
                break
            if time.monotonic() > deadline:
                self.harness_errors.append("persistence did not settle in time")
                break
            time.sleep(0.5)
        return {"rounds": rounds, "seconds": round(time.monotonic() - start, 1)}

    def verify_devices(self) -> None:
        acked = self.ledger.by_id
        expected: dict[int, set[int]] = defaultdict(set)  # user -> acked msg_ids
        for msg_id, s in acked.items():
            if self.large.sent_of_group(s):
                continue  # chaos_large judges the large group's messages
            for u in s.receivers:
                expected[u].add(msg_id)
        for d in self.devices:
            entries = d.page_hits + d.state.notice_hits  # an INBOX_NOTICE lists entries
            seen = entries.keys() | d.push_hits.keys()
            for msg_id in expected[d.user]:
                if msg_id not in seen:
                    self.problem("lost", f"{d.device_id} lacks {msg_id} ({acked[msg_id].device})")
                elif msg_id not in entries:
                    self.problem("offline_missing", f"{d.device_id}: {msg_id} only pushed")
            for msg_id, n in entries.items():
                for _ in range(n - 1):
                    self.problem("duplicated", f"{d.device_id}: {msg_id} in {n} inbox entries")
            self.counts["push_repeats"] += sum(n - 1 for n in d.push_hits.values())
            self.check_records(d.device_id, d.user, list(d.info.values()), None)

    def check_records(self, where: str, user: int, msgs: list[Message],
                      conv: tuple[int, int] | None) -> None:  # fmt: skip
        """Every record is known, belongs to `user` (and to `conv` for history), carries the
        msg_id its SEND_ACK gave, and each client_msg_id / group event has one msg_id."""
        ids_of: dict[tuple[int, bytes] | tuple[int, str], set[int]] = defaultdict(set)
        for m in msgs:
            if m.content_type == ContentType.GROUP_EVENT:
                event = self.group_event(m)
                g = self.groups.get(m.conv_id)
                if g is not None and g.churn:
                    continue  # chaos_large judges the large group's events
                if event is None or g is None or user not in g.events.get(event, ()):
                    self.problem("unexpected", f"{where}: group event {m.msg_id} {m.body[:80]!r}")
                    continue
                ids_of[(m.conv_id, event)].add(m.msg_id)
                continue
            s = self.ledger.lookup(m)
            if s is None:
                self.problem("unexpected", f"{where}: unknown message {m.msg_id}")
                continue
            ids_of[(m.sender_id, m.client_msg_id)].add(m.msg_id)
            if s.msg_id is not None and s.msg_id != m.msg_id:
                self.problem("unexpected", f"{where}: {m.msg_id} carries the cmid acked as "
                                           f"{s.msg_id}")  # fmt: skip
            mine = user in s.receivers and (conv is None or conv_of(s, user) == conv)
            if not mine:
                self.problem("unexpected", f"{where}: {m.msg_id} is not for user {user}")
        for key, ids in ids_of.items():
            for _ in range(len(ids) - 1):
                self.problem("duplicated", f"{where}: {key!r} under msg_ids {sorted(ids)}")

    @staticmethod
    def group_event(m: Message) -> str | None:
        try:
            body = json.loads(m.body)
        except ValueError:
            return None
        if not isinstance(body, dict) or body.get("group_id") != str(m.conv_id):
            return None
        return body.get("event") if body.get("event") in ("created", "added") else None

    def verify_group_events(self) -> None:
        for d in self.devices:
            got: dict[tuple[int, str | None], set[int]] = defaultdict(set)
            for m in d.info.values():
                if m.content_type == ContentType.GROUP_EVENT:
                    got[(m.conv_id, self.group_event(m))].add(m.msg_id)
            for g in self.groups.values():
                for event, receivers in g.events.items():
                    entries = d.page_hits.keys() | d.state.notice_hits.keys()
                    ids = got[(g.gid, event)] & (entries | d.push_hits.keys())
                    if d.user not in receivers:
                        continue
                    if not ids:
                        self.problem("lost", f"{d.device_id} lacks the {event} event of {g.gid}")
                    elif not ids & entries:
                        self.problem("offline_missing", f"{d.device_id}: {event} event of "
                                                        f"{g.gid} only pushed")  # fmt: skip

    def verify_history(self) -> int:
        """Page every conversation's history; returns the pages read."""
        convs: dict[tuple[int, int, int], set[int]] = defaultdict(set)  # (viewer, kind, id)
        for (sender, _), s in list(self.ledger.sent.items()):
            f = s.frame
            if f.conv_kind == ConvKind.GROUP:
                key = (self.groups[f.conv_id].creator, ConvKind.GROUP, f.conv_id)
            else:
                a, b = sorted((sender, f.conv_id))
                key = (a, ConvKind.USER, b)
            if s.msg_id is not None:
                convs[key].add(s.msg_id)
            else:
                convs.setdefault(key, set())
        for g in self.groups.values():
            convs.setdefault((g.creator, ConvKind.GROUP, g.gid), set())
        pages = 0
        conns: dict[int, Conn] = {}
        try:
            for (viewer, kind, cid), want in sorted(convs.items()):
                if viewer not in conns:
                    conns[viewer] = Conn(HOST, self.rng.choice(self.cluster.ports),
                                         REQUEST_TIMEOUT_S, f"history u{viewer}")  # fmt: skip
                    conns[viewer].login(self.secret, viewer, f"u{viewer}hist")
                c = conns[viewer]
                for attempt in range(4):  # history may trail the inbox a little (11)
                    msgs, n, order = self.pull_history(c, kind, cid)
                    pages += n
                    missing = want - {m.msg_id for m in msgs}
                    if not missing:
                        break
                    time.sleep(1.0 + attempt)
                where = f"history {conv_name(kind, cid)} (viewer {viewer})"
                self.history[(viewer, kind, cid)] = msgs
                for msg_id in sorted(missing):
                    self.problem("lost", f"{where} lacks {msg_id}")
                for example in order:
                    self.problem("out_of_order", f"{where}: {example}")
                self.check_records(where, viewer, msgs, (kind, cid))
                if kind == ConvKind.GROUP:
                    events = Counter(self.group_event(m) for m in msgs
                                     if m.content_type == ContentType.GROUP_EVENT)  # fmt: skip
                    for event in self.groups[cid].events:
                        if events[event] == 0:
                            self.problem("lost", f"{where} lacks the {event} event")
        finally:
            for c in conns.values():
                c.close()
        return pages

    @staticmethod
    def pull_history(c: Conn, kind: int, cid: int) -> tuple[list[Message], int, list[str]]:
        """All pages, newest first; returns the messages, the page count and order faults."""
        out: list[Message] = []
        order: list[str] = []
        before, pages = 0, 0
        while True:
            page = c.request(HistoryPull(kind, cid, before, HISTORY_PAGE), REQUEST_TIMEOUT_S)
            if not isinstance(page, HistoryPage):
                raise HarnessError(f"HISTORY_PULL {conv_name(kind, cid)}: {describe(page)}")
            pages += 1
            for m in page.messages:
                if out and m.msg_id >= out[-1].msg_id:
                    order.append(f"{m.msg_id} after {out[-1].msg_id} (page {pages})")
                out.append(m)
            if not page.has_more or not page.messages:
                return out, pages, order
            before = page.messages[-1].msg_id


# ------------------------------------------------------------------------------ main


def run(plan: Plan, keep: bool) -> int:
    workdir = Path(tempfile.mkdtemp(prefix="improto-chaos-"))
    sim = Sim(plan, workdir)
    injector: cf.Injector | None = None
    failed = True
    report: dict[str, Any] = {}
    details: dict[str, Any] = {}
    try:
        if plan.storage == "production":
            log("services: scripts/services start (Redis, RabbitMQ, HBase; reused if running)")
            subprocess.run([str(cf.SERVICES_SCRIPT), "start"], check=True, stdout=sys.stderr)
            if plan.redis_cluster:
                subprocess.run([str(cf.SERVICES_SCRIPT), "start", "redis-cluster"], check=True,
                               stdout=sys.stderr)  # fmt: skip
        if plan.push:
            sim.push = cp.PushRun(sim, workdir, log)
            sim.push.start()
        what = "1 embedded server" if sim.cluster.embedded else "2 gateways + 2 persisters"
        log(f"seed {plan.seed}; starting {what} in {workdir}")
        sim.cluster.start()
        sim.setup()
        injector = sim.injector = cf.Injector(
            sim.cluster,
            sim.drop_client,
            random.Random(plan.seed + 1),
            plan.fault_gap,
            log,
            sim.drop_pushes,
            plan.spare,
        )
        for d in sim.devices:
            d.start()
        time.sleep(min(2.0, plan.seconds / 10))
        injector.start()
        sim.large.start()
        if sim.push is not None:
            sim.push.start_faults()
        chat_end = time.monotonic() + plan.seconds
        while time.monotonic() < chat_end and not sim.harness_errors and not sim.large.errors:
            time.sleep(0.5)
        sim.large.stop()
        sim.harness_errors += sim.large.errors
        if sim.push is not None:
            sim.push.stop_faults()
        injector.stop()
        sim.chat_over.set()
        log("chat over: flushing outboxes")
        for d in sim.devices:
            d.join()
        unacked = sum(len(d.outbox) for d in sim.devices)
        log(f"{len(sim.ledger.by_id)} messages acked, {unacked} never acked; settling")
        push = None
        if sim.push is not None:
            drained = sim.push.drain()
            push = sim.push.verify()
            push["summary"]["drain_seconds"] = drained["seconds"]
        settle = sim.settle()
        sim.large.finalize()
        sim.verify_devices()
        sim.verify_group_events()
        history_pages = sim.verify_history()
        large = sim.large.verify(sim.history)
        sync_state = cs.verify(sim, sim.history) if plan.sync_state else None
        dead = sim.cluster.dead_letters()
        if sim.ledger.ack_conflicts:
            for ex in sim.ledger.ack_conflicts:
                sim.problem("duplicated", f"SEND_ACKs: {ex}")
        stats: Counter[str] = Counter()
        for d in sim.devices:
            stats.update(d.stats)
        pushes = sum(d.push_hits.total() for d in sim.devices)
        log_counts: dict[str, dict[str, int]] = {}
        log_examples: list[str] = []
        for p in sim.cluster.procs:
            counts, examples = p.log_problems()
            log_counts[p.name] = dict(counts)
            log_examples += examples
        faults = dict(injector.faults)
        faults["client_drops"] = sim.drops.total()
        if sim.push is not None and sim.push.faults is not None:
            faults.update(sim.push.faults.faults)
        c = sim.counts
        report = {
            "acked": len(sim.ledger.by_id),
            "lost": c["lost"],
            "duplicated": c["duplicated"],
            "out_of_order": c["out_of_order"],
            "unexpected": c["unexpected"],
            "offline_missing": c["offline_missing"],
            **{k: c[k] for k in cl.PROBLEMS},
            "large": sim.large.summary(large),
            "faults": faults,
            "seconds": round(time.monotonic() - T0, 1),
            "seed": plan.seed,
            "quick": plan.quick,
            "storage": plan.storage,
            "redis": "cluster" if plan.redis_cluster else "single",
            "users": plan.users,
            "devices": len(sim.devices),
            "composed": len(sim.ledger.sent),
            "unacked": unacked,
            "pushes": pushes,
        }
        if sync_state is not None:
            report.update({k: c[k] for k in cs.PROBLEMS})
        if push is not None:
            report.update(push["counts"])
            report["push"] = {k: v for k, v in push["summary"].items() if k != "examples"}
        details = {
            "large": large,
            "prefix": sim.prefix,
            "workdir": str(workdir),
            "chat_seconds": plan.seconds,
            "client_drop_modes": dict(sim.drops),
            "mid_page_drops_armed": injector.drop_modes["mid_page_armed"],
            "fault_events": injector.events,
            "unexpected_exits": injector.unexpected_exits,
            "injector_errors": injector.errors,
            "dup_acks": sim.ledger.dup_acks,
            "refused_sends": dict(sim.ledger.refused),
            "push_repeats": c["push_repeats"],
            "anomalies": c["anomalies"],
            "protocol_errors": c["protocol_errors"],
            "dead_letters": dead,
            "server_log_lines": log_counts,
            "server_log_examples": log_examples,
            "settle": settle,
            "history_pages": history_pages,
            "device_stats": dict(sorted(stats.items())),
            "examples": {k: v for k, v in sim.problems.items() if v},
            "harness_errors": sim.harness_errors,
        }
        if sync_state is not None:
            details["sync_state"] = sync_state
        if push is not None:
            details["push"] = push["summary"]
        bad = any(report.get(k) for k in ("lost", "duplicated", "out_of_order", "unexpected",
                                          "offline_missing", *cs.PROBLEMS, *cp.PROBLEMS,
                                          *cl.PROBLEMS))  # fmt: skip
        failed = bad or bool(sim.harness_errors) or bool(injector.errors)
        code = 2 if sim.harness_errors or injector.errors else int(bad)
    except (HarnessError, RuntimeError, OSError) as e:
        log(f"harness failure: {e}")
        traceback.print_exc()
        report = {"error": str(e), "seconds": round(time.monotonic() - T0, 1),
                  "seed": plan.seed}  # fmt: skip
        code = 2
    finally:
        sim.chat_over.set()
        sim.large.stopping.set()
        if injector is not None and injector.is_alive():
            injector.stopping = True
            injector.requests.put(("stop", None))
        sim.cluster.stop()
        if sim.push is not None:
            sim.push.stop()
        if failed or keep:
            log(f"kept: {workdir} (server logs), service data under prefix {sim.prefix} "
                f"(delete with --purge {sim.prefix})")  # fmt: skip
        else:
            log(f"cleanup: {sim.cluster.purge()}")
            shutil.rmtree(workdir, ignore_errors=True)
    if details:
        print(json.dumps(details, indent=1, default=str), file=sys.stderr)
    print(json.dumps(report), flush=True)
    return code


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="12 users, 45 s of chat (< 2 min)")
    p.add_argument("--seconds", type=float, help="chatting time (default 600; quick 45)")
    p.add_argument("--seed", type=int, help="seed of the plan (default: random, printed)")
    p.add_argument("--users", type=int, help="simulated users (default 40; quick 12)")
    p.add_argument("--rate", type=float, help="messages per second overall (bursts apart)")
    p.add_argument("--partitions", type=int, default=2, help="persist queues (default 2)")
    p.add_argument(
        "--sync-state",
        action="store_true",
        help="half the devices use WIRE_ONCE and CONVERSATIONS (bench/chaos_state.py)",
    )
    p.add_argument(
        "--push",
        action="store_true",
        help="notifications through a failing push gateway stand-in (bench/chaos_push.py)",
    )
    p.add_argument(
        "--storage",
        choices=["production", "embedded"],
        default="production",
        help="production processes (default) or one embedded-storage server",
    )
    p.add_argument(
        "--spare",
        action="append",
        choices=["redis", "rabbitmq", "thrift"],
        help="never crash this service (repeatable): one shared with other runs",
    )
    p.add_argument(
        "--redis-cluster", nargs="?", const=str(cf.services.REDIS_CLUSTER), metavar="SEEDS",
        help="production: the servers use a Redis Cluster (default scripts/services' "
        "127.0.0.1:7000), whose masters are killed (and their replicas promoted) as faults",
    )  # fmt: skip
    p.add_argument("--keep", action="store_true", help="keep logs and service data")
    p.add_argument("--purge", metavar="PREFIX", help="delete a kept run's service data, exit")
    args = p.parse_args()
    if args.purge:
        print(json.dumps(cf.purge(args.purge, f"{args.purge}_history", 16)))
        return
    sys.exit(run(Plan.from_args(args), args.keep))


if __name__ == "__main__":
    main()
