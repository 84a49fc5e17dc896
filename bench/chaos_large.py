"""Large-group checks of bench/chaos.py (PROTOCOL.md 20): one group crosses the server's
`large_group_threshold` both ways while its members chat, through the same faults, and is
judged from the clients' view. On in every mode (quick, default, --sync-state, --push,
--storage embedded).

Setup. The servers run with `large_group_threshold` = the plan's group size (6 quick, 12
default; written to the run's TOML --config), so the ordinary chaos groups (that many members)
stay small, and a group is large above it and small again at threshold * 9 // 10 members or
fewer (20.8). One more group, the **large group**, has a pool of threshold + 3 users: its
creator and threshold * 9 // 10 - 2 others stay members all along (the core); the other
users of the pool float. It is created small (threshold * 9 // 10 members); during the chat a
thread of the harness (the creator's own device `u<creator>admin`, its pushes acknowledged
and dropped) adds 1-2 floating users at a time until the group is large (threshold + 1 or +2
members), then removes 1-2 at a time until it is small again (down to the core), and so on,
every 1.5-3 s (quick) or 3-7 s (default): several crossings each way, in the hysteresis band
between them too, with users removed and re-added later (a new membership window). The first
time the group becomes large (and every 4th time after) its creator bursts 250 SENDs into it
6 s later, once every device has seen its head (timeline pages of 200), and the membership
holds still until 4 s after the burst began. A change whose answer was lost (connection drop,
kill, 5xx) is found out by GROUP_MEMBERS and retried if it did not happen: the harness always
knows the member list, the time of each change (request sent, answer or check read) and the
group's flag before and after it (the hysteresis rule).

Devices. Every device of a pool user enables LARGE_GROUPS (with its other features, in one
FEATURES). Its sync loop is 20.6's: the offline pages and OFFLINE_ACK as before, then
TIMELINE_HEADS, then for each head whose done differs from the device's stored position
TIMELINE_PULL(group, position, 200) until has_more 0, storing the page's messages, then the
page's position. A device with no stored position for a group (fresh: every device is at the
start) starts at the head's read_seq and stores it as its position (20.2 allows that value);
positions are persisted with the device's other state, across reconnects. A TIMELINE_PULL
refused with FORBIDDEN or NOT_FOUND (removed between the heads and the pull) skips that group.
Wire-once devices, which run the offline loop only when told, run the timeline part every
2-5 s besides. The armed mid-page drop fault counts the sync's pages across both loops, so a
drop can hit a TIMELINE_PAGE too (client_drop_modes.mid_timeline_page). Pushes as before.

Verdict, after the settle rounds (each device's final sync runs both loops) and the history
check. The timeline T is read whole by the creator (a member from the start: every seq
readable), TIMELINE_PULL from 0: page messages are seqs after_seq + 1 ..., so T maps each
msg_id to its seq. The items are the group's acked messages and its events: each change's
event is the one of the creator's history with the change's `event` and `members` whose id
was taken while the change ran. An item is placed in the timeline (in T) or in the inboxes
(not in T). A message's accept lies between its compose time and its first SEND_ACK; a user
is a member all through it when added (answer received, +50 ms: the ids' clock) before the
compose and not removed (request sent) before the ack; events have exact receivers. For every
device of every pool user:

- required from the inbox (offline pages or INBOX_NOTICE entries): each item not in T whose
  accept the user was a member all through (events: the user is a receiver; a large group's
  "removed" event also for the removed users, 20.1);
- required from the timeline (TIMELINE_PAGE entries): each item in T of the user's last
  membership window (the user a member at the end; messages composed after that join, events
  from the join on) with a seq above the device's start (the read_seq it began at). Items of
  that window at or below its start are what the user had read (20.6: older messages come from
  HISTORY_PULL): counted in `skipped_read`, not required. Items of earlier windows placed in
  the timeline cannot be pulled after a removal (20.5): not required.
- lost: a required item the device does not have at all; offline_missing: one it has only by
  PUSH (or, required from the inbox, only from a timeline page). A timeline item missed at or
  below the join floor (the count of T's msg_ids below the user's last join event, which the
  server's TIMELINE_PULL starts at whatever after_seq says) is also counted in
  figures.missed_below_join_floor, and its example says so.
- duplicated (the same delivery path twice where the spec forbids it): the same msg_id in two
  TIMELINE_PAGE entries of one device (the device always pulls above the position of the last
  page it stored, and no seq is added at or below done later, 20.4); the same msg_id at two
  seqs of T; an event msg_id at a device that is not the msg_id of a change it received.
  Twice in offline pages is counted by chaos.py as for every conversation. NOT duplicates: a
  PUSH and a page with the same message (20.6: clients dedupe by msg_id), in either order.
- crossing: a message in both the inbox and the timeline: in T and in an offline-page or
  notice entry of a device (except the removed users' inbox copy of a large group's "removed"
  event), which also covers a device holding it from both paths (20.8: "never both").
- out_of_order: a non-empty TIMELINE_PAGE whose position is not above the after_seq it
  answered; a page message whose seq (in T) is not in (after_seq, position]; a device's
  timeline entries of one group not in strictly ascending seq (pages keep the order); a head's
  done lower than one the device saw before (done never moves back, 20.2).
- misplaced: an item placed against the flag: an event in T exactly when the group was large
  before its change (20.8: the change that makes it large has its event in the inboxes, the one
  that makes it small in the timeline); a message in T while the group was small all through
  its accept, or not in T while it was large all through (messages across a change: either).
- unexpected: a timeline page message not in T or not of the group; a history event matching
  no change; (chaos.py) a message at a user who was never a member during its accept window.
- events_dropped (fails the run): a change without an event in the history while a server
  logged "persistence queue refused message" for an id taken during the change, or whose
  answer was lost (drop, kill); likewise a removed user's missing inbox copy of a large
  group's "removed" event whose refusal was logged. The improto server writes the membership
  change, then queues its event; a refused event is kept and retried in the background until
  the queue takes it (server/improto_server/event_retry.py), so only the death of the gateway
  process that made the change can lose it (12.2: each change has one event). Excused, as
  events_dropped_killed (reported, does not fail the run): a missing event or copy when a
  gateway the change's requests went to was killed (or exited) from the change's request up
  to RETRY_SLACK_S after its answer, that window stretched past any service crash
  overlapping it (the retries wait for the queue to come back). Such an event is required
  nowhere.

lost, duplicated, out_of_order and unexpected add to the run's totals (and fail it as
before); crossing, misplaced and events_dropped are counted in the report and fail it too. The
report's `large` object has the group's own counts and figures (changes, crossings each way,
the timeline's size, items by placement, deliveries by path, skipped_read); details.large has
the change log and more figures. Pushes of the group are not judged by the --push verdict
(20.1: large groups' messages are not notified): its messages are left out there; the
--sync-state CONV_LIST checks leave the group's rows out (their read positions and unread
counts follow the timeline heads, not the history) and skip READ_MARKs in it once the user
left.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
import re
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import chaos_faults as cf
import chaos_state as cs

from improto.conformance.conn import Conn, describe
from improto.enums import ContentType, ConvKind, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    Error,
    Features,
    FeaturesOk,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupMemberList,
    GroupMembers,
    GroupRemove,
    GroupRemoveOk,
    Message,
    Push,
    PushAck,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto.limits import TIMELINE_PAGE_MAX
from improto_server.ids import EPOCH_MS, NODE_BITS, SEQ_BITS

if TYPE_CHECKING:
    from chaos import Device, Sent, Sim

PROBLEMS = ("crossing", "misplaced", "events_dropped")  # counted in the report, fail the run
KINDS = ("lost", "duplicated", "out_of_order", "unexpected", "offline_missing", *PROBLEMS)
FEATURES = (Feature.LARGE_GROUPS,)
PAGE = TIMELINE_PAGE_MAX
JOIN_MARGIN_S = 0.05  # after a GROUP_ADD_OK: later msg_ids are above the join event's
BURST_AFTER_S = 6.0  # after the group became large: every device synced since (POLL_S)
BURST_HOLD_S = 4.0  # the membership stays as it is from then on until the burst is done
POLL_S = (2.0, 5.0)  # wire-once devices: the timeline part of the sync this often
TIMEOUT_S = 10.0
LOST = (AssertionError, OSError, EOFError)
INF = float("inf")
REFUSED = re.compile(r"persistence queue refused message (\d+)")
# A refused group event is retried with backoff up to 5 s, and one accept can take ~18 s on
# RabbitMQ (a pending dedup key's staleness plus the confirm timeout): a gateway killed this
# long after a change (or after a service crash during it) may have taken its event along.
RETRY_SLACK_S = 30.0
KILLS = ("gateway_kill", "exit")  # Injector.outages kinds that end a gateway process


def threshold(group_size: int) -> int:
    return group_size


def small_at(t: int) -> int:
    """The member count at or below which a large group is small again (20.8)."""
    return t * 9 // 10


def flag_after(n: int, large_before: bool, t: int) -> bool:
    return n > t if not large_before else n > small_at(t)


@dataclass
class Change:
    """One membership change of the large group (its creation included)."""

    index: int
    event: str  # created | added | removed
    users: frozenset[int]  # the event's `members`
    receivers: frozenset[int]  # members after the change, the removed users too
    members_after: frozenset[int]
    large_before: bool
    large_after: bool
    t_req: float  # the request was sent
    t_ok: float  # its answer (or the check that found it done) arrived
    how: str = "ok"  # ok | checked (the answer was lost, GROUP_MEMBERS showed it done)
    msg_id: int | None = None  # the event's, from the creator's history
    ports: frozenset[int] = frozenset()  # the gateways its requests went to

    def key(self) -> tuple[str, frozenset[int]]:
        return self.event, self.users

    def row(self, t0: float) -> list[Any]:
        """For the details: index, event, users, flag before and after, time, how, msg_id."""
        flags = int(self.large_before), int(self.large_after)
        return [self.index, self.event, sorted(self.users), *flags, round(self.t_req - t0, 2),
                self.how, self.msg_id]  # fmt: skip


@dataclass
class DeviceTimeline:
    """A LARGE_GROUPS device's timeline state (persisted: survives every connection loss)."""

    positions: dict[int, int] = field(default_factory=dict)
    starts: dict[int, int] = field(default_factory=dict)  # group -> read_seq it began at
    hits: Counter[int] = field(default_factory=Counter)  # msg_id -> timeline-page entries
    log: dict[int, list[tuple[int, int, int]]] = field(default_factory=lambda: defaultdict(list))
    done_seen: dict[int, int] = field(default_factory=dict)
    next_poll: float = 0.0


# ----------------------------------------------------------------------------- devices


def features(d: Device) -> tuple[int, ...]:
    return FEATURES if d.tl is not None else ()


def step(d: Device, now: float) -> None:
    """A wire-once device (no periodic sync) runs the timeline part every few seconds."""
    tl = d.tl
    if tl is None or not d.state.ext or now < tl.next_poll:
        return
    tl.next_poll = now + d.rng.uniform(*POLL_S)
    sync(d, None)


def sync(d: Device, pages: int | None) -> int:
    """The timeline part of the sync loop (20.6); `pages`: the offline pages this sync read
    (the armed mid-page drop counts on), None: no drop. Returns the timeline pages read."""
    tl = d.tl
    if tl is None:
        return 0
    st = d.state
    phase, st.phase = st.phase, "timeline"
    heads: TimelineHeadsPage = d.request(TimelineHeads(), TimelineHeadsPage)
    d.stats["timeline_heads"] += 1
    run = d.sim.large
    read = 0
    for h in heads.heads:
        g = h.group_id
        seen = tl.done_seen.get(g, 0)
        if h.done < seen:
            run.problem("out_of_order", f"{d.device_id}: head of {g}: done {h.done} < {seen}")
        tl.done_seen[g] = max(seen, h.done)
        p = tl.positions.get(g)
        if p is None:  # a fresh device starts at the user's read position (20.6)
            p = tl.positions[g] = tl.starts[g] = h.read_seq
        if h.done == p:
            continue
        for _ in range(100_000):
            if pages is not None and d.drop_page is not None and pages + read >= d.drop_page:
                d.drop_mid_page(d._conn(), TimelinePull(g, p, PAGE), FrameType.TIMELINE_PAGE)
            reply = d._conn().request(TimelinePull(g, p, PAGE), TIMEOUT_S)
            if isinstance(reply, Error) and reply.code in (ErrorCode.FORBIDDEN,
                                                            ErrorCode.NOT_FOUND):  # fmt: skip
                d.stats[f"timeline_pull_{reply.code}"] += 1  # removed since the heads
                break
            if not isinstance(reply, TimelinePage):
                d.stats["error_TIMELINE_PULL"] += 1
                raise EOFError(f"TIMELINE_PULL answered by {describe(reply)}")
            read += 1
            store(d, reply, p)
            if not reply.has_more:
                break
            if reply.position <= p:
                run.problem("out_of_order", f"{d.device_id}: {g} page after {p} has position "
                                            f"{reply.position} and has_more=1")  # fmt: skip
                break
            p = reply.position
    st.phase = phase
    d.stats["timeline_pages"] += read
    return read


def store(d: Device, page: TimelinePage, after: int) -> None:
    tl = d.tl
    assert tl is not None
    run = d.sim.large
    g = page.group_id
    if page.messages and page.position <= after:
        n = len(page.messages)
        run.problem("out_of_order", f"{d.device_id}: {g} page after {after}: position "
                                    f"{page.position} with {n} messages")  # fmt: skip
    if page.position < after:
        d.sim.problem("anomalies", f"{d.device_id}: {g} position clamped {after} -> "
                                   f"{page.position}")  # fmt: skip
    if bool(page.has_more) != (page.position < page.done):
        d.sim.problem("anomalies", f"{d.device_id}: {g} page position {page.position} done "
                                   f"{page.done} has_more {page.has_more}")  # fmt: skip
    for m in page.messages:
        if m.conv_kind != ConvKind.GROUP or m.conv_id != g:
            run.problem("unexpected", f"{d.device_id}: timeline page of {g} holds {m.msg_id} "
                                      f"of {m.conv_kind}:{m.conv_id}")  # fmt: skip
        tl.hits[m.msg_id] += 1
        tl.log[g].append((m.msg_id, after, page.position))
        d.stats["timeline_entries"] += 1
        cs.arrival(d, m)
        d.note(m)
    tl.positions[g] = page.position  # persisted after the messages


# ------------------------------------------------------------------------------ the group


class LargeRun(threading.Thread):
    """The large group: its setup, the membership changes during the chat, the verdict."""

    def __init__(self, sim: Sim, log: Callable[[str], None]) -> None:
        super().__init__(name="large-group", daemon=True)
        self.sim = sim
        self.log = log
        plan = sim.plan
        self.threshold = threshold(plan.group_size)
        self.rng = random.Random(plan.seed + 3)
        self.gap = (1.5, 3.0) if plan.quick else (3.0, 7.0)
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.changes: list[Change] = []
        self.gid = 0
        self.creator = 0
        self.core: frozenset[int] = frozenset()
        self.floating: list[int] = []
        self.pool: frozenset[int] = frozenset()
        self.members: frozenset[int] = frozenset()
        self.large = False
        self.conn: Conn | None = None
        self.conn_port = 0  # the gateway port of self.conn
        self.change_ports: set[int] = set()  # those the change under way went to
        self.errors: list[str] = []
        self.stats: Counter[str] = Counter()
        self.up = True
        self.became_large = 0
        self.hold_until = 0.0  # no change before (a burst is under way)
        self.t0 = time.monotonic()
        self.wall_offset = time.time() - time.monotonic()
        self.refused: set[int] = set()
        self._windows: dict[int, list[tuple[Change, Change | None]]] = {}
        self.history_events: list[tuple[int, tuple[str, frozenset[int]]]] = []
        sim.cluster.settings["large_group_threshold"] = self.threshold

    def problem(self, kind: str, example: str) -> None:
        with self.lock:
            self.counts[kind] += 1
        self.sim.problem(kind, f"large group: {example}")

    # --- setup (fault-free, before the chat)

    def choose(self) -> None:
        """The pool (before the devices are made: theirs enable LARGE_GROUPS)."""
        t = self.threshold
        users = list(self.sim.users)
        n = min(len(users), t + 3)
        chosen = self.rng.sample(users, n)
        core_n = max(2, small_at(t) - 1)
        self.creator = chosen[0]
        self.core = frozenset(chosen[:core_n])
        self.floating = chosen[core_n:]
        self.pool = frozenset(chosen)

    def new_device(self, user: int) -> DeviceTimeline | None:
        return DeviceTimeline() if user in self.pool else None

    def setup(self) -> tuple[int, int, frozenset[int]]:
        """Create the group (small); returns its id, creator and members."""
        first = sorted(self.core) + self.floating[:1]
        others = tuple(u for u in first if u != self.creator)
        t0 = time.monotonic()
        created = self.conn_().request(GroupCreate("chaos large group", others), TIMEOUT_S)
        if not isinstance(created, GroupCreated):
            raise RuntimeError(f"GROUP_CREATE (large group) answered by {describe(created)}")
        self.gid = created.group_id
        members = frozenset(first)
        self.large = flag_after(len(members), False, self.threshold)
        self.changes.append(Change(0, "created", members, members, members, False, self.large,
                                   t0, time.monotonic()))  # fmt: skip
        self.members = members
        self.log(f"large group {self.gid}: threshold {self.threshold} (small again at "
                f"{small_at(self.threshold)}), pool {sorted(self.pool)}, core "
                f"{sorted(self.core)}, {len(members)} members")  # fmt: skip
        return self.gid, self.creator, members

    def conn_(self) -> Conn:
        if self.conn is None:
            port = self.rng.choice(self.sim.cluster.ports)
            c = Conn(cf.HOST, port, TIMEOUT_S, "large-admin")
            try:
                c.login(self.sim.secret, self.creator, f"u{self.creator}admin")
            except BaseException:
                c.close()
                raise
            self.conn, self.conn_port = c, port
        return self.conn

    def drop_conn(self) -> None:
        c, self.conn = self.conn, None
        if c is not None:
            c.close()

    def drain(self) -> None:
        """Acknowledge and forget what the admin device was pushed."""
        c = self.conn
        if c is None:
            return
        queued, c.queue = c.queue, []
        for f in queued:
            if isinstance(f, Push):
                c.send(PushAck(f.message.msg_id))

    # --- the changes during the chat

    def run(self) -> None:
        try:
            while not self.stopping.wait(self.rng.uniform(*self.gap)):
                if time.monotonic() >= self.hold_until:
                    self.step()
        except Exception as e:  # reported as a harness error
            self.errors.append(f"large group: {e}\n{traceback.format_exc()}")
        finally:
            self.drop_conn()

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def step(self) -> None:
        t, n = self.threshold, len(self.members)
        rng = self.rng
        k = rng.choice((1, 1, 2))
        if self.up:
            out = [u for u in self.floating if u not in self.members]
            k = min(k, t + 2 - n, len(out))
            if k <= 0:
                self.up = False
                return
            self.change("added", frozenset(rng.sample(out, k)))
            n = len(self.members)
            if self.large and (n >= t + 2 or rng.random() < 0.5):
                self.up = False
        else:
            inside = [u for u in self.floating if u in self.members]
            k = min(k, n - len(self.core), len(inside))
            if k <= 0:
                self.up = True
                return
            self.change("removed", frozenset(rng.sample(inside, k)))
            n = len(self.members)
            if not self.large and (n <= len(self.core) or rng.random() < 0.5):
                self.up = True

    def change(self, event: str, users: frozenset[int]) -> None:
        sim = self.sim
        before = self.members
        after = before | users if event == "added" else before - users
        if event == "removed":  # its devices stop picking the group now (a late SEND: refused)
            for u in users:
                sim.groups_of[u] = [g for g in sim.groups_of[u] if g != self.gid]
        t_req = time.monotonic()
        self.change_ports = set()
        how = self.apply(event, users, after)
        t_ok = time.monotonic()
        large_before = self.large
        self.large = flag_after(len(after), large_before, self.threshold)
        receivers = after | users
        self.changes.append(Change(len(self.changes), event, users, receivers, after,
                                   large_before, self.large, t_req, t_ok, how,
                                   ports=frozenset(self.change_ports)))  # fmt: skip
        self.members = after
        sim.groups[self.gid].members = after
        if event == "added":
            for u in users:
                sim.groups_of[u] = [*sim.groups_of[u], self.gid]
        flip = "" if large_before == self.large else (" -> large" if self.large else " -> small")
        self.log(f"large group: {event} {sorted(users)}: {len(after)} members{flip}"
                f"{' (answer lost, checked)' if how != 'ok' else ''}")  # fmt: skip
        if self.large and not large_before:
            self.became_large += 1
            if self.became_large % 4 == 1:
                # A burst of more than a timeline page, once the devices have seen the head
                # (from then on what they lack is theirs to pull), while the group stays large.
                dev = next(d for d in sim.devices if d.user == self.creator)
                at = time.monotonic() + BURST_AFTER_S
                bisect.insort(dev.bursts_due, (at, ConvKind.GROUP, self.gid))
                self.hold_until = at + BURST_HOLD_S

    def apply(self, event: str, users: frozenset[int], after: frozenset[int]) -> str:
        """Make the change; returns "ok", or "checked" when its answer was lost and
        GROUP_MEMBERS showed it done. Retries (a new connection each time) until one or the
        other, for at most 120 s."""
        frame = (GroupAdd if event == "added" else GroupRemove)(self.gid, tuple(sorted(users)))
        ok_type = GroupAddOk if event == "added" else GroupRemoveOk
        deadline = time.monotonic() + 120.0
        while True:
            try:
                conn = self.conn_()
                self.change_ports.add(self.conn_port)
                reply = conn.request(frame, 25.0)
                self.drain()
                if isinstance(reply, ok_type):
                    if reply.count != len(users):
                        self.errors.append(f"large group: {event} {sorted(users)}: count "
                                           f"{reply.count}")  # fmt: skip
                    return "ok"
                if not (isinstance(reply, Error) and reply.code // 100 == 5):
                    raise RuntimeError(f"{frame.TYPE.name} answered by {describe(reply)}")
                self.stats[f"change_error_{reply.code}"] += 1
            except LOST:
                self.stats["change_conn_lost"] += 1
                self.drop_conn()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{event} {sorted(users)}: no outcome in 120 s")
            time.sleep(0.3)
            members = self.read_members(deadline)
            if members == after:
                return "checked"
            if members != self.members:
                raise RuntimeError(f"member list {sorted(members)}, expected "
                                   f"{sorted(self.members)} or {sorted(after)}")  # fmt: skip

    def read_members(self, deadline: float) -> frozenset[int]:
        while True:
            try:
                reply = self.conn_().request(GroupMembers(self.gid), TIMEOUT_S)
                self.drain()
                if isinstance(reply, GroupMemberList):
                    return frozenset(reply.members)
                self.stats["members_error"] += 1
            except LOST:
                self.drop_conn()
            if time.monotonic() > deadline:
                raise RuntimeError("GROUP_MEMBERS: no answer in time")
            time.sleep(0.5)

    # --- membership windows

    def windows(self, user: int) -> list[tuple[Change, Change | None]]:
        """The user's membership windows: (the change that made them a member, the one that
        removed them or None). Cached once the changes are over (the verdict)."""
        if self.stopping.is_set() and not self.is_alive():
            if user not in self._windows:
                self._windows[user] = self._compute_windows(user)
            return self._windows[user]
        return self._compute_windows(user)

    def _compute_windows(self, user: int) -> list[tuple[Change, Change | None]]:
        out: list[tuple[Change, Change | None]] = []
        start: Change | None = None
        for c in self.changes:
            if user in c.users and c.event in ("created", "added"):
                start = c
            elif user in c.users and c.event == "removed" and start is not None:
                out.append((start, c))
                start = None
        if start is not None:
            out.append((start, None))
        return out

    def member_throughout(self, user: int, a: float, b: float) -> bool:
        return any(
            join.t_ok + JOIN_MARGIN_S <= a and (leave is None or b < leave.t_req)
            for join, leave in self.windows(user)
        )

    def member_some_time(self, user: int, a: float, b: float) -> bool:
        return any(
            join.t_req - 1.0 <= b and (leave is None or a <= leave.t_ok + 1.0)
            for join, leave in self.windows(user)
        )

    def flag_throughout(self, a: float, b: float) -> bool | None:
        """The group's flag all through [a, b], None if a change may have moved it then."""
        flag = False
        for c in self.changes:
            if c.t_ok <= a:
                flag = c.large_after
            elif c.t_req <= b and c.large_before != c.large_after:
                return None
        return flag

    def is_member(self, user: int) -> bool:
        return user in self.members

    def sent_of_group(self, s: Sent) -> bool:
        return s.frame.conv_kind == ConvKind.GROUP and s.frame.conv_id == self.gid

    # --- verdict

    def finalize(self) -> None:
        """Before the device checks: each message's receivers become the users who may have
        got it (members at some time between its compose and its ack, or the end)."""
        end = time.monotonic()
        for s in list(self.sim.ledger.sent.values()):
            if self.sent_of_group(s):
                b = s.acked_at if s.acked_at is not None else end
                s.receivers = frozenset(u for u in self.pool
                                        if self.member_some_time(u, s.composed_at, b))  # fmt: skip

    def read_timeline(self) -> tuple[dict[int, int], int, int]:
        """T: msg_id -> seq, read by the creator from seq 0; and the page count and done."""
        sim = self.sim
        c = Conn(cf.HOST, self.rng.choice(sim.cluster.ports), TIMEOUT_S, "large-verdict")
        seq_of: dict[int, int] = {}
        pages = 0
        try:
            c.login(sim.secret, self.creator, f"u{self.creator}tl")
            ok = c.request(Features(FEATURES), TIMEOUT_S)
            if not isinstance(ok, FeaturesOk) or Feature.LARGE_GROUPS not in ok.features:
                raise RuntimeError(f"FEATURES (LARGE_GROUPS) answered by {describe(ok)}")
            heads = c.request(TimelineHeads(), TIMEOUT_S)
            if not isinstance(heads, TimelineHeadsPage):
                raise RuntimeError(f"TIMELINE_HEADS answered by {describe(heads)}")
            done = next((h.done for h in heads.heads if h.group_id == self.gid), 0)
            after = 0
            while True:
                before = after
                page = self.pull(c, after, PAGE)
                pages += 1
                msgs = list(page.messages)
                if len(msgs) != page.position - after:  # not one message per seq: exactly
                    sim.problem(
                        "anomalies",
                        f"large group: timeline page after {after}: "
                        f"{len(msgs)} messages for {page.position - after} seqs",
                    )
                    msgs = []
                    for s in range(after, page.position):
                        one = self.pull(c, s, 1)
                        pages += 1
                        msgs += [m for m in one.messages if one.position == s + 1]
                for i, m in enumerate(msgs):
                    seq = after + 1 + i
                    if m.msg_id in seq_of:
                        self.problem("duplicated", f"{m.msg_id} at seqs {seq_of[m.msg_id]} "
                                                   f"and {seq} of the timeline")  # fmt: skip
                    else:
                        seq_of[m.msg_id] = seq
                after = max(after, page.position)
                if not page.has_more:
                    break
                if after <= before:
                    raise RuntimeError(f"timeline page after {before}: position "
                                       f"{page.position}, has_more=1")  # fmt: skip
            if after != done:
                sim.problem("anomalies", f"large group: head done {done}, timeline read to "
                                         f"{after}")  # fmt: skip
        finally:
            c.close()
        return seq_of, pages, done

    def pull(self, c: Conn, after: int, limit: int) -> TimelinePage:
        page = c.request(TimelinePull(self.gid, after, limit), TIMEOUT_S)
        if not isinstance(page, TimelinePage):
            raise RuntimeError(f"TIMELINE_PULL after {after}: {describe(page)}")
        return page

    def id_ms(self, msg_id: int) -> int:
        """The wall-clock millisecond a msg_id was taken (improto_server.ids layout)."""
        return (msg_id >> (NODE_BITS + SEQ_BITS)) + EPOCH_MS

    def wall_ms(self, t: float) -> int:
        return int((t + self.wall_offset) * 1000)

    def refused_ids(self) -> set[int]:
        """The msg_ids a server logged as refused by its persistence queue."""
        out: set[int] = set()
        for p in self.sim.cluster.procs:
            try:
                out.update(int(x) for x in REFUSED.findall(p.log.read_text(errors="replace")))
            except OSError:
                continue
        return out

    def match_events(self, history: list[Message]) -> None:
        """Each change's event msg_id, from the creator's history: the event with the
        change's key whose id was taken while the change ran. A change without one whose
        server logged a queue refusal of an id taken then, or whose answer was lost, is
        `events_dropped` (`events_dropped_killed` if a gateway it went to was killed before
        the retry could succeed, see the module docstring), otherwise its event is lost."""
        events: list[tuple[int, tuple[str, frozenset[int]]]] = []
        self.history_events = events
        for m in sorted(history, key=lambda m: m.msg_id):
            if m.content_type != ContentType.GROUP_EVENT:
                continue
            key = event_key(m)
            if key is None:
                self.problem("unexpected", f"history: event {m.msg_id} {m.body[:80]!r}")
            else:
                events.append((m.msg_id, key))
        refused = self.refused_ids()
        self.refused = refused
        taken: set[int] = set()
        for c in self.changes:
            lo, hi = self.wall_ms(c.t_req) - 100, self.wall_ms(c.t_ok) + 100
            found = [i for i, k in events
                     if k == c.key() and i not in taken and lo <= self.id_ms(i) <= hi]  # fmt: skip
            if found:
                c.msg_id = found[0]
                taken.add(found[0])
            elif c.how == "checked" or any(lo <= self.id_ms(r) <= hi for r in refused):
                # a queue refusal logged then, or the answer lost: the server retries the
                # event while it lives, so only a gateway kill excuses its absence
                why = "answer lost" if c.how == "checked" else "a queue refusal logged"
                c.how += ", event dropped"
                self.dropped(c, f"change {c.index} ({c.event} {sorted(c.users)}): no event; "
                                f"{why} then")  # fmt: skip
            else:
                self.problem("lost", f"history lacks the event of change {c.index} ({c.event} "
                                     f"{sorted(c.users)})")  # fmt: skip
        for i, (event, _) in events:
            if i not in taken:
                self.problem("unexpected", f"history: event {i} ({event}) matches no change")

    def killed(self, c: Change) -> str | None:
        """A kill (or exit) of a gateway the change's requests went to, from its request
        until its event's retries could have succeeded (RETRY_SLACK_S after the answer, or
        after a service crash overlapping that window): what it was, or None."""
        injector = self.sim.injector
        outages = sorted(injector.outages, key=lambda o: o[3]) if injector is not None else []
        until = c.t_ok + RETRY_SLACK_S
        for kind, _, _, start, end in outages:
            if kind.endswith("_crash") and start <= until and end >= c.t_req:
                until = max(until, end + RETRY_SLACK_S)
        for kind, name, port, start, _ in outages:
            if kind in KILLS and port in c.ports and c.t_req <= start <= until:
                return f"{kind} of {name} {start - c.t_req:.1f} s after the request"
        return None

    def dropped(self, c: Change, example: str) -> None:
        """An event (or its inbox copy) that never arrived: a failure (events_dropped)
        unless a gateway kill may have taken it along (events_dropped_killed, reported)."""
        kill = self.killed(c)
        if kill is None:
            self.problem("events_dropped", example)
        else:
            with self.lock:
                self.counts["events_dropped_killed"] += 1
            self.sim.problem("events_dropped_killed", f"large group: {example} ({kill})")

    def verify(self, history: dict[tuple[int, int, int], list[Message]]) -> dict[str, Any]:
        sim = self.sim
        self.match_events(history.get((self.creator, ConvKind.GROUP, self.gid), []))
        seq_of, t_pages, done = self.read_timeline()
        end = time.monotonic()
        # The items: (msg_id, in the timeline, inbox receivers, final-window test)
        msgs = [s for s in sim.ledger.by_id.values() if self.sent_of_group(s)]
        figures: Counter[str] = Counter()
        for s in msgs:
            assert s.msg_id is not None and s.acked_at is not None
            flag = self.flag_throughout(s.composed_at, s.acked_at)
            placed = s.msg_id in seq_of
            figures["messages_in_timeline" if placed else "messages_in_inboxes"] += 1
            if flag is None:
                figures["messages_across_a_flip"] += 1
            elif flag != placed:
                self.problem("misplaced", f"{s.msg_id} ({s.device}) {'in' if placed else 'not in'}"
                                          f" the timeline, the group {'large' if flag else 'small'}"
                                          " all through its accept")  # fmt: skip
        for c in self.changes:
            if c.msg_id is None:
                continue
            placed = c.msg_id in seq_of
            figures["events_in_timeline" if placed else "events_in_inboxes"] += 1
            if placed != c.large_before:
                self.problem("misplaced", f"event of change {c.index} ({c.event}, group "
                             f"{'large' if c.large_before else 'small'} before it) "
                             f"{'in' if placed else 'not in'} the timeline")  # fmt: skip
        event_ids = {c.msg_id: c for c in self.changes if c.msg_id is not None}
        by_seq = [i for i, _ in sorted(seq_of.items(), key=lambda kv: kv[1])]
        # seq order is storage order, which may differ from msg_id order (20.2): how often
        figures["timeline_id_inversions"] = sum(a > b for a, b in itertools.pairwise(by_seq))
        for d in sim.devices:
            if d.user not in self.pool:
                continue
            self.verify_device(d, msgs, seq_of, event_ids, end, figures)
        return {
            "group_id": self.gid,
            "threshold": self.threshold,
            "small_at": small_at(self.threshold),
            "pool": len(self.pool),
            "core": len(self.core),
            "changes": len(self.changes) - 1,
            "changes_checked": sum(c.how != "ok" for c in self.changes),
            "became_large": sum(c.large_after and not c.large_before for c in self.changes),
            "became_small": sum(c.large_before and not c.large_after for c in self.changes),
            "members_at_end": len(self.members),
            "large_at_end": self.large,
            "timeline_seqs": len(seq_of),
            "timeline_done": done,
            "verdict_timeline_pages": t_pages,
            "messages": len(msgs),
            "figures": dict(sorted(figures.items())),
            "change_stats": dict(self.stats),
            "change_log": [c.row(self.t0) for c in self.changes],
            "history_events": [[i, e, sorted(u)] for i, (e, u) in self.history_events],
            "errors": self.errors,
        }

    def summary(self, details: dict[str, Any]) -> dict[str, Any]:
        """The report's `large` object: this group's problem counts and main figures."""
        f = details.get("figures", {})
        out: dict[str, Any] = {k: self.counts[k] for k in KINDS}
        out["events_dropped_killed"] = self.counts["events_dropped_killed"]
        for k in ("changes", "became_large", "became_small", "timeline_seqs", "messages"):
            out[k] = details.get(k)
        for k in ("required_inbox", "required_timeline", "skipped_read", "timeline_entries"):
            out[k] = f.get(k, 0)
        return out

    def verify_device(self, d: Device, msgs: list[Sent], seq_of: dict[int, int],
                      event_ids: dict[int, Change], end: float,
                      figures: Counter[str]) -> None:  # fmt: skip
        u, tl = d.user, d.tl
        inbox = (d.page_hits + d.state.notice_hits).keys()
        timeline = tl.hits.keys() if tl is not None else set()
        pushed = d.push_hits.keys()
        windows = self.windows(u)
        final = windows[-1][0] if windows and windows[-1][1] is None else None
        start = tl.starts.get(self.gid, 0) if tl is not None else 0
        where = d.device_id
        # rank(since - 1) of the last join: TIMELINE_PULL serves no seq at or below it
        since = final.msg_id if final is not None else None
        floor = sum(1 for i in seq_of if i < since) if since else 0

        def judge(msg_id: int, in_inbox: bool, in_final: bool, what: str) -> None:
            """`in_inbox`: required from the inbox; `in_final`: of the last window (required
            from the timeline if placed there, above the device's start)."""
            if msg_id in seq_of:
                if not in_final:
                    return
                if seq_of[msg_id] <= start:
                    if msg_id not in timeline and msg_id not in inbox and msg_id not in pushed:
                        figures["skipped_read"] += 1
                    return
                figures["required_timeline"] += 1
                seq = seq_of[msg_id]
                why = f"seq {seq}, start {start}, join floor {floor}"
                if seq <= floor and msg_id not in timeline:
                    figures["missed_below_join_floor"] += 1
                    why += " (at or below the floor: no page serves it)"
                if msg_id in timeline:
                    figures["got_timeline"] += 1
                elif msg_id in pushed:
                    self.problem("offline_missing", f"{where}: {what} {msg_id} only pushed "
                                                    f"({why})")  # fmt: skip
                elif msg_id not in inbox:
                    self.problem("lost", f"{where} lacks {what} {msg_id} ({why})")
            elif in_inbox:
                figures["required_inbox"] += 1
                if msg_id in inbox:
                    figures["got_inbox"] += 1
                elif msg_id in pushed or msg_id in timeline:
                    self.problem("offline_missing", f"{where}: {what} {msg_id} not in an "
                                                    "offline page")  # fmt: skip
                else:
                    self.problem("lost", f"{where} lacks {what} {msg_id} (inbox)")

        for s in msgs:
            assert s.msg_id is not None and s.acked_at is not None
            in_final = final is not None and s.composed_at >= final.t_ok + JOIN_MARGIN_S
            judge(s.msg_id, self.member_throughout(u, s.composed_at, s.acked_at), in_final,
                  "message")  # fmt: skip
        for c in event_ids.values():
            assert c.msg_id is not None
            copy = c.event == "removed" and c.large_before and u in c.users  # 20.1
            in_final = final is not None and c.index >= final.index and u in c.receivers
            judge(c.msg_id, u in c.receivers or copy, in_final, f"{c.event} event")
            if copy and c.msg_id not in inbox:
                if c.msg_id in self.refused:  # the copy's job refused (logged), not the event
                    self.dropped(c, f"{where}: no inbox copy of removed event {c.msg_id}: its "
                                    "queue refusal logged")  # fmt: skip
                elif c.msg_id in pushed:
                    self.problem("offline_missing", f"{where}: removed event {c.msg_id} (its "
                                                    "inbox copy) only pushed")  # fmt: skip
                else:
                    self.problem("lost", f"{where} lacks the inbox copy of removed event "
                                         f"{c.msg_id}")  # fmt: skip
        # crossing: a timeline message in an inbox (the removed users' copy apart)
        for msg_id in inbox:
            if msg_id in seq_of:
                ev = event_ids.get(msg_id)
                if ev is not None and ev.event == "removed" and u in ev.users:
                    continue
                self.problem(
                    "crossing",
                    f"{where}: {msg_id} in an offline page and in the "
                    f"timeline (seq {seq_of[msg_id]}"
                    f"{', also in its timeline pages' if msg_id in timeline else ''})",
                )
        # events of the group at the device: each one the event of a change it received
        for m in d.info.values():
            if m.conv_kind == ConvKind.GROUP and m.conv_id == self.gid and \
                    m.content_type == ContentType.GROUP_EVENT:  # fmt: skip
                ev = event_ids.get(m.msg_id)
                if ev is None or u not in ev.receivers:
                    kind = "duplicated" if event_key(m) in {x.key() for x in self.changes} \
                        else "unexpected"  # fmt: skip
                    self.problem(kind, f"{where}: event {m.msg_id} {m.body[:60]!r} is no "
                                       "change's it received")  # fmt: skip
        if tl is None:
            return
        for msg_id, n in tl.hits.items():
            for _ in range(n - 1):
                self.problem("duplicated", f"{where}: {msg_id} in {n} timeline-page entries")
        figures["timeline_entries"] += tl.hits.total()
        for g, entries in tl.log.items():
            last = 0
            for msg_id, after, position in entries:
                seq = seq_of.get(msg_id) if g == self.gid else None
                if seq is None:
                    if g == self.gid:
                        self.problem("unexpected", f"{where}: timeline page message {msg_id} "
                                                   "is not in the timeline")  # fmt: skip
                    continue
                if not after < seq <= position:
                    self.problem("out_of_order", f"{where}: {msg_id} (seq {seq}) in the page "
                                                 f"({after}, {position}]")  # fmt: skip
                if seq <= last:
                    self.problem("out_of_order", f"{where}: seq {seq} after seq {last}")
                last = max(last, seq)


def event_key(m: Message) -> tuple[str, frozenset[int]] | None:
    try:
        body = json.loads(m.body)
        if body.get("group_id") != str(m.conv_id) or body.get("event") not in (
            "created",
            "added",
            "removed",
        ):
            return None
        return body["event"], frozenset(int(x) for x in body["members"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None
