"""Sync-state checks of bench/chaos.py (`--sync-state`, spec 18): wire-once, read positions
and conversation lists, judged from the clients' view.

About half the devices enable WIRE_ONCE, CONVERSATIONS and READ_RECEIPTS. Such a device
follows the spec 18 client rules: it moves its cursor on an INBOX_NOTICE whose `from` is its
cursor and whose ids it holds (a notice lists entries, so it counts like page entries for
loss and duplicate checks), runs the sync loop on a SYNC_HINT or a notice listing an id it
lacks, and does no periodic sync; it keeps a conversation table from CONV_LIST once and
CONV_CHANGES(stored version) afterwards, marks conversations read up to what it received,
and applies READ_UPDATEs. Counted:

- wire_twice: per connection, a msg_id that crossed the wire twice (PUSH + page, two pages,
  two pushes), by cause: `timeline` (one copy in a TIMELINE_PAGE: 20.6 lets pushes and
  timeline pages overlap; bench/chaos_large.py counts twice in timeline pages), `login` (one
  copy during the login sync loop, where 9.2 lets a push and a page overlap), `hint` (a page
  pulled after SYNC_HINT or after a notice listing an id the device lacked: the pull re-sends
  entries after the cursor), `forced` (a page of a sync the harness forced to arm a mid-page
  drop: the same), `other`. `other` on a WIRE_ONCE connection is a problem (wire_twice);
  everything else is reported.
- read_back: a conversation row whose read_id or version went back between two reads of the
  device's list (READ_UPDATE sequences that go back are reported: two devices may mark in
  either order; positions are a max).
- conv_mismatch, at the end: each user's CONV_LIST against history (one row per conversation
  with history; last = the newest history message; unread = others' messages after read_id;
  1:1 peer_read_id = the peer's read_id); read_id at least every acknowledged mark and the
  user's own newest message, and one of the positions marked or sent; every WIRE_ONCE device's
  table, after a final CONV_CHANGES from its stored version, equal to that list.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import chaos_faults as cf

from improto.conformance.conn import Conn, describe
from improto.enums import ConvKind, Feature
from improto.frames import (
    ConvChanges,
    ConvChangesPage,
    ConvEntry,
    ConvList,
    ConvPage,
    Features,
    FeaturesOk,
    InboxNotice,
    Message,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
)

if TYPE_CHECKING:
    from chaos import Device, Sim

PROBLEMS = ("wire_twice", "read_back", "conv_mismatch")  # counted in the report, fail the run
FEATURES = (Feature.WIRE_ONCE, Feature.CONVERSATIONS, Feature.READ_RECEIPTS)
MARK_P = 0.08  # per chat step of a device with CONVERSATIONS
CONV_POLL_S = (3.0, 6.0)
Key = tuple[int, int]
Row = tuple[int, int, int, int, int]  # last msg_id, read_id, peer_read_id, unread, hidden


def row(e: ConvEntry) -> Row:
    return (e.last[0].msg_id if e.last else 0, e.read_id, e.peer_read_id, e.unread, e.hidden)


@dataclass
class DeviceState:
    """What one device with the post-v1 features holds beyond chaos.Device's v1 state."""

    ext: bool
    # persisted
    version: int | None = None
    table: dict[Key, ConvEntry] = field(default_factory=dict)
    notice_hits: Counter[int] = field(default_factory=Counter)
    read_seen: dict[tuple[int, int, int], int] = field(default_factory=dict)
    newest_from_others: dict[Key, int] = field(default_factory=dict)
    sent_ids: set[int] = field(default_factory=set)  # its own acked messages: held locally
    # per connection
    wire: dict[int, list[str]] = field(default_factory=dict)
    phase: str = "login"
    next_poll: float = 0.0
    twice: Counter[str] = field(default_factory=Counter)


def new_state(rng: random.Random, enabled: bool) -> DeviceState:
    return DeviceState(ext=enabled and rng.random() < 0.5)


def features(d: Device) -> tuple[int, ...]:
    """What the device asks for in its FEATURES (chaos.py sends one, with the others')."""
    return FEATURES if d.state.ext else ()


def on_login(d: Device) -> None:
    """After HELLO_OK and FEATURES: a fresh connection's wire count."""
    st = d.state
    st.wire, st.phase = {}, "login"


def arrival(d: Device, m: Message) -> None:
    """A message record crossed the wire on the current connection."""
    st = d.state
    phases = st.wire.setdefault(m.msg_id, [])
    phases.append(st.phase)
    if len(phases) > 1:
        # "timeline": a TIMELINE_PAGE repeats what a PUSH brought (20.6 lets them overlap;
        # twice in timeline pages is chaos_large's duplicate)
        # "forced": a page of a sync the harness armed a drop in (nobody told the device to
        # pull: it re-sends entries after the cursor, as after a hint)
        cause = next((c for c in ("timeline", "login", "hint", "forced") if c in phases),
                     "other")  # fmt: skip
        st.twice[cause] += 1
        if cause == "other" and st.ext:
            d.sim.problem("wire_twice", f"{d.device_id}: {m.msg_id} over the wire {phases}")
    if m.sender_id != d.user:
        key = conv_key(m, d.user)
        st.newest_from_others[key] = max(st.newest_from_others.get(key, 0), m.msg_id)


def on_notice(d: Device, n: InboxNotice) -> None:
    st = d.state
    d.stats["notices"] += 1
    if n.from_cursor != d.cursor:
        d.stats["notices_ignored"] += 1
    elif all(i in d.info or i in st.sent_ids for i in n.msg_ids):
        for i in n.msg_ids:
            st.notice_hits[i] += 1
        d.cursor = n.to_cursor
    else:
        d.stats["notices_missing_ids"] += 1
        d.need_sync = True
        st.phase = "hint"


def on_read_update(d: Device, u: ReadUpdate) -> None:
    key = (u.reader_id, u.conv_kind, u.conv_id)
    prev = d.state.read_seen.get(key, 0)
    if u.msg_id < prev:
        d.stats["read_update_regressions"] += 1
    d.state.read_seen[key] = max(prev, u.msg_id)
    d.stats["read_updates"] += 1


def step(d: Device, now: float) -> None:
    """A chat step of a device with CONVERSATIONS: maybe mark a conversation, poll changes."""
    st = d.state
    if not st.ext:
        return
    if now >= st.next_poll:
        refresh(d)
        st.next_poll = now + d.rng.uniform(*CONV_POLL_S)
    if st.newest_from_others and d.rng.random() < MARK_P:
        key = d.rng.choice(sorted(st.newest_from_others))
        if key[0] == ConvKind.GROUP and key[1] not in d.sim.groups_of.get(d.user, ()):
            return  # the large group, which the user left (FORBIDDEN)
        msg_id = st.newest_from_others[key]
        d.sim.mark_sent(d.user, key, msg_id)
        ok = d.request(ReadMark(key[0], key[1], msg_id), ReadMarkOk)
        d.sim.mark_acked(d.user, key, ok.msg_id)
        d.stats["read_marks"] += 1


def refresh(d: Device) -> None:
    """CONV_LIST the first time, then CONV_CHANGES from the stored version (spec 18)."""
    st = d.state
    c = d._conn()
    if st.version is None:
        rows, first, _ = walk(c, True, 0)
        for e in rows:
            apply(d, e)
        st.version = first
    rows, _, last = walk(c, False, st.version)
    for e in rows:
        apply(d, e)
    st.version = last


def walk(c: Conn, listing: bool, start: int) -> tuple[list[ConvEntry], int, int]:
    """All pages of CONV_LIST (`listing`, from the newest) or of CONV_CHANGES(start): the
    rows, the first page's version and the last page's."""
    rows: list[ConvEntry] = []
    first: int | None = None
    cursor = version = start
    for _ in range(1000):
        req = ConvList(cursor, 100) if listing else ConvChanges(cursor, 100)
        page = c.request(req)
        if not isinstance(page, ConvPage if listing else ConvChangesPage):
            raise EOFError(f"{req.TYPE.name} answered by {describe(page)}")
        first = page.list_version if first is None else first
        version = page.list_version
        rows += page.convs
        if not page.has_more:
            break
        cursor = page.convs[-1].last[0].msg_id if listing else page.list_version
    return rows, first or 0, version


def apply(d: Device, e: ConvEntry) -> None:
    key = (e.conv_kind, e.conv_id)
    old = d.state.table.get(key)
    if old is not None and (e.read_id < old.read_id or e.version < old.version):
        d.sim.problem("read_back", f"{d.device_id} {key}: read_id {old.read_id} -> {e.read_id}, "
                                   f"version {old.version} -> {e.version}")  # fmt: skip
    d.state.table[key] = e


def conv_key(m: Message, me: int) -> Key:
    if m.conv_kind == ConvKind.GROUP:
        return ConvKind.GROUP, m.conv_id
    return ConvKind.USER, m.conv_id if m.sender_id == me else m.sender_id


# --------------------------------------------------------------------------- verdict


def full_list(c: Conn) -> dict[Key, ConvEntry]:
    return {(e.conv_kind, e.conv_id): e for e in walk(c, True, 0)[0]}


def verify(sim: Sim, history: dict[tuple[int, int, int], list[Message]]) -> dict[str, Any]:
    """The end-of-run checks; returns the figures for the report's details."""
    convs_of: dict[int, dict[Key, list[Message]]] = defaultdict(dict)
    large = (ConvKind.GROUP, sim.large.gid)  # its rows follow the timeline heads: left out
    for (viewer, kind, cid), msgs in history.items():
        if (kind, cid) == large:
            continue
        if kind == ConvKind.GROUP:
            for u in sim.groups[cid].members:
                convs_of[u][(kind, cid)] = msgs
        elif msgs:
            convs_of[viewer][(kind, cid)] = msgs
            convs_of[cid][(kind, viewer)] = msgs
    lists: dict[int, dict[Key, ConvEntry]] = {}
    for u in sim.users:
        c = Conn(cf.HOST, sim.rng.choice(sim.cluster.ports), 10.0, f"convs u{u}")
        try:
            c.login(sim.secret, u, f"u{u}convs")
            ok = c.request(Features((Feature.CONVERSATIONS,)))
            if not isinstance(ok, FeaturesOk):
                raise EOFError(f"FEATURES answered by {describe(ok)}")
            lists[u] = full_list(c)
            lists[u].pop(large, None)
        except (AssertionError, EOFError, OSError) as err:
            raise RuntimeError(f"user {u}: final CONV_LIST failed: {err}") from err
        finally:
            c.close()
    for u, rows in lists.items():
        check_user(sim, u, rows, convs_of[u], lists)
    tables_equal = 0
    for d in sim.devices:
        if not d.state.ext:
            continue
        for key, e in lists[d.user].items():
            mine = d.state.table.get(key)
            if mine is None or row(mine) != row(e):
                sim.problem("conv_mismatch", f"{d.device_id} {key}: table "
                            f"{row(mine) if mine else None}, list {row(e)}")  # fmt: skip
                sim.counts["conv_mismatch_device_table"] += 1
            else:
                tables_equal += 1
    twice: Counter[str] = Counter()
    twice_v1: Counter[str] = Counter()
    for d in sim.devices:
        (twice if d.state.ext else twice_v1).update(d.state.twice)
    return {
        "ext_devices": sum(d.state.ext for d in sim.devices),
        "wire_twice_wire_once": dict(twice),
        "wire_twice_v1": dict(twice_v1),
        "conv_rows": sum(len(r) for r in lists.values()),
        "device_rows_equal": tables_equal,
        "read_marks_acked": len(sim.marks_acked),
        "conv_mismatch_kinds": {
            k.removeprefix("conv_mismatch_"): n
            for k, n in sorted(sim.counts.items())
            if k.startswith("conv_mismatch_")
        },
    }


def check_user(sim: Sim, u: int, rows: dict[Key, ConvEntry], convs: dict[Key, list[Message]],
               lists: dict[int, dict[Key, ConvEntry]]) -> None:  # fmt: skip
    where = f"user {u} CONV_LIST"
    for key in sorted(convs.keys() - rows.keys()):
        sim.problem("conv_mismatch", f"{where} lacks {key}")
        sim.counts["conv_mismatch_missing_row"] += 1
    for key in sorted(rows.keys() - convs.keys()):
        sim.problem("conv_mismatch", f"{where} has {key} without history")
        sim.counts["conv_mismatch_extra_row"] += 1
    for key in sorted(rows.keys() & convs.keys()):
        e, msgs = rows[key], convs[key]
        newest = max(m.msg_id for m in msgs)
        own = max((m.msg_id for m in msgs if m.sender_id == u), default=0)
        floor = max(own, sim.marks_acked.get((u, key), 0))
        allowed = sim.marks_sent.get((u, key), set()) | {m.msg_id for m in msgs if m.sender_id == u}
        unread = min(1000, sum(1 for m in msgs if m.sender_id != u and m.msg_id > e.read_id))
        bad = []
        if not e.last or e.last[0].msg_id != newest:
            bad.append(f"last {row(e)[0]} != newest history {newest}")
        if e.read_id < floor or (e.read_id and e.read_id not in allowed):
            bad.append(f"read_id {e.read_id}: floor {floor}, not a position marked or sent")
        if e.unread != unread:
            bad.append(f"unread {e.unread}, history says {unread}")
        if key[0] == ConvKind.USER:
            mirror = lists.get(key[1], {}).get((ConvKind.USER, u))
            if mirror is not None and e.peer_read_id != mirror.read_id:
                bad.append(f"peer_read_id {e.peer_read_id}, the peer's read_id {mirror.read_id}")
        if e.hidden:
            bad.append("hidden (nobody hid it)")
        for b in bad:
            sim.problem("conv_mismatch", f"{where} {key}: {b}")
            sim.counts["conv_mismatch_" + b.split()[0]] += 1
