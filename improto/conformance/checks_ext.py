"""Post-v1 features (spec sections 18 and 19): FEATURES negotiation, wire-once INBOX_NOTICE,
the login race, conversation lists and read state, push registrations; and that a version-1
connection sees none of it.

A server that answers FEATURES with UNKNOWN_FRAME_TYPE speaks version 1 only: the checks that
need a feature skip (the login race applies to every server and never skips).
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from improto.conformance.checks_offline import expected_unread
from improto.conformance.conn import (
    Conn,
    Env,
    describe,
    eventually,
    huge_id,
    new_device,
    new_user,
    raw_frame,
    sync,
    u64,
)
from improto.conformance.runner import Skip, check
from improto.enums import ConvKind, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    ConvChanges,
    ConvChangesPage,
    ConvEntry,
    ConvHide,
    ConvHideOk,
    ConvList,
    ConvPage,
    Error,
    FeaturesOk,
    Frame,
    GroupCreate,
    GroupCreated,
    InboxNotice,
    Message,
    OfflinePage,
    OfflinePull,
    Ping,
    Push,
    PushAck,
    PushRegister,
    PushRegisterOk,
    PushUnregister,
    PushUnregisterOk,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
    SendAck,
    SyncHint,
    UnreadCount,
)

WIRE_ONCE, CONVERSATIONS, READ_RECEIPTS, PUSH = (
    Feature.WIRE_ONCE,
    Feature.CONVERSATIONS,
    Feature.READ_RECEIPTS,
    Feature.PUSH,
)
USER, GROUP = ConvKind.USER, ConvKind.GROUP
# A notice follows the PUSH_ACK once the entry is stored: persistence is asynchronous (spec
# 11), and an earlier check's 500-member group can keep the persister busy for seconds.
NOTICE_WAIT_S = 20.0
UPDATE_WAIT_S = 2.0  # READ_UPDATE crosses gateways before READ_MARK_OK
STATE_WAIT_S = 2.0  # a mark shows in the list shortly after READ_MARK_OK
LOGIN_RACE_TRIES = 20
LOGIN_RACE_DEADLINE_S = 1.0
LOGIN_RACE_SPREAD_S = 0.020
POST_V1_TYPES = (0x31, 0x32, 0x33, 0x34)
PUSH_TYPES = (0x35, 0x36)
# Platforms spec 19 names; a server allows some set of platforms (the improto server: both).
KNOWN_PLATFORMS = ("apns", "fcm")
Key = tuple[int, int]  # (conv_kind, conv_id) as the viewing user names it


# ----------------------------------------------------------------------- helpers


def features_frame(numbers: Sequence[int], rid: int) -> bytes:
    """FEATURES by hand: unknown numbers and duplicates are legal on the wire."""
    body = struct.pack(f">H{len(numbers)}H", len(numbers), *numbers)
    return raw_frame(FrameType.FEATURES, body, rid=rid)


def negotiate(c: Conn, numbers: Sequence[int]) -> tuple[int, ...]:
    """Send FEATURES; the features FEATURES_OK enabled. Skip on a version-1 server."""
    rid = c.next_rid()
    c.send_raw(features_frame(numbers, rid))
    got = c.reply(rid, "FEATURES_OK")
    if isinstance(got, Error) and got.code == ErrorCode.UNKNOWN_FRAME_TYPE:
        raise Skip("FEATURES -> UNKNOWN_FRAME_TYPE: the server speaks version 1 only (18)")
    assert isinstance(got, FeaturesOk), f"FEATURES answered by {describe(got)}"
    return tuple(got.features)


def ext_login(env: Env, features: Iterable[int], user: int | None = None) -> Conn:
    """A logged-in connection with `features` enabled (skip if the server lacks one)."""
    want = tuple(features)
    c = env.login(user)
    got = negotiate(c, want)
    lacking = set(want) - set(got)
    if lacking:
        raise Skip(f"server does not enable features {sorted(lacking)} (FEATURES_OK {got})")
    return c


def conv_key(m: Message, me: int) -> Key:
    """The conversation of `m` as user `me` names it (spec 6)."""
    if m.conv_kind == GROUP:
        return GROUP, m.conv_id
    return USER, m.conv_id if m.sender_id == me else m.sender_id


def last_id(e: ConvEntry) -> int:
    return e.last[0].msg_id if e.last else 0


def list_all(c: Conn, limit: int = 0) -> tuple[list[ConvEntry], list[ConvPage]]:
    """CONV_LIST pages from the newest until has_more = 0 (before_id = the last row's last)."""
    rows: list[ConvEntry] = []
    pages: list[ConvPage] = []
    before = 0
    for _ in range(1000):
        page = c.call(ConvList(before_id=before, limit=limit), ConvPage)
        pages.append(page)
        rows.extend(page.convs)
        if not page.has_more:
            return rows, pages
        assert page.convs, "CONV_PAGE with has_more=1 and no rows (18)"
        before = last_id(page.convs[-1])
        assert before, "has_more=1 after a row without a message: no before_id to page on (18)"
    raise AssertionError("CONV_LIST paging did not end after 1000 pages")


def rows_by_key(rows: Iterable[ConvEntry]) -> dict[Key, ConvEntry]:
    return {(e.conv_kind, e.conv_id): e for e in rows}


def changes_all(c: Conn, since: int, limit: int = 0) -> tuple[list[ConvEntry], int]:
    """CONV_CHANGES from `since` until has_more = 0; the rows and the last version."""
    rows: list[ConvEntry] = []
    for _ in range(1000):
        page = c.call(ConvChanges(since_version=since, limit=limit), ConvChangesPage)
        versions = [e.version for e in page.convs]
        assert versions == sorted(set(versions)), f"CONV_CHANGES versions {versions} (18)"
        assert all(v > since for v in versions), f"rows at or below since {since}: {versions}"
        if page.convs:
            assert page.list_version == versions[-1], (
                f"CONV_CHANGES_PAGE version {page.list_version}, last row's {versions[-1]} (18)"
            )
        rows.extend(page.convs)
        since = page.list_version
        if not page.has_more:
            return rows, since
    raise AssertionError("CONV_CHANGES paging did not end after 1000 pages")


def row_of(c: Conn, key: Key) -> ConvEntry | None:
    return rows_by_key(list_all(c)[0]).get(key)


def mark(c: Conn, key: Key, msg_id: int) -> ReadMarkOk:
    ok = c.call(ReadMark(conv_kind=key[0], conv_id=key[1], msg_id=msg_id), ReadMarkOk)
    assert (ok.conv_kind, ok.conv_id) == key, f"READ_MARK_OK for {ok.conv_kind}:{ok.conv_id}"
    return ok


def frames_of(c: Conn, ftype: int) -> list[Frame]:
    return [f for f in c.queue if f.TYPE == ftype]


def accept_pushes(c: Conn, want: set[int], timeout: float = 5.0) -> None:
    """Wait for the PUSH of every msg_id in `want`, PUSH_ACKing each as it comes."""
    for msg_id in sorted(want):
        c.push_for(msg_id, timeout)
        c.send(PushAck(msg_id))


def wait_pinging(c: Conn, pred: Callable[[Frame], bool], timeout: float, what: str) -> Frame:
    """wait_for that PINGs every second, so that a long wait is not an idle connection."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return c.wait_for(pred, min(1.0, max(0.01, deadline - time.monotonic())), what)
        except AssertionError:
            if c.eof or time.monotonic() >= deadline:
                raise
            c.send(Ping())


def notices_until(c: Conn, ids: set[int], cursor: int, timeout: float) -> tuple[int, list[int]]:
    """Collect INBOX_NOTICEs chaining from `cursor` until they list every id in `ids`.
    Returns the final cursor and the ids in notice order. Fails on a SYNC_HINT meanwhile."""
    listed: list[int] = []
    deadline = time.monotonic() + timeout
    while not ids <= set(listed):
        f = wait_pinging(
            c,
            lambda f: isinstance(f, InboxNotice | SyncHint),
            max(0.01, deadline - time.monotonic()),
            f"INBOX_NOTICE for {sorted(ids - set(listed))}",
        )
        assert isinstance(f, InboxNotice), (
            "SYNC_HINT instead of INBOX_NOTICE for messages the connection holds (18 wire-once)"
        )
        assert f.request_id == 0, f"INBOX_NOTICE with request_id {f.request_id} (18)"
        assert f.from_cursor == cursor, (
            f"INBOX_NOTICE from {f.from_cursor}, the connection's cursor is {cursor} (18)"
        )
        assert f.to_cursor > f.from_cursor, f"INBOX_NOTICE to {f.to_cursor} <= from"
        extra = set(f.msg_ids) - ids
        assert not extra, f"INBOX_NOTICE lists {sorted(extra)}, not pushed to this connection"
        listed.extend(f.msg_ids)
        cursor = f.to_cursor
    assert len(listed) == len(set(listed)), f"a msg_id in two notices: {listed}"
    return cursor, listed


# -------------------------------------------------------------------- negotiation


@check("ext.features_negotiation")
def features_negotiation(env: Env) -> str:
    """18: FEATURES_OK lists the supported features asked for, ascending, unknowns and
    duplicates ignored; READ_RECEIPTS needs CONVERSATIONS; each FEATURES replaces the set."""
    c = env.login()
    asked = [READ_RECEIPTS, 999, CONVERSATIONS, WIRE_ONCE, PUSH, CONVERSATIONS, 0, 65535]
    got = negotiate(c, asked)
    assert list(got) == sorted(set(got)), f"FEATURES_OK {got} not ascending without repeats"
    assert set(got) <= {WIRE_ONCE, CONVERSATIONS, READ_RECEIPTS, PUSH}, (
        f"FEATURES_OK {got}: unasked"
    )
    alone = negotiate(c, [READ_RECEIPTS])
    assert READ_RECEIPTS not in alone, f"READ_RECEIPTS enabled without CONVERSATIONS: {alone}"
    assert negotiate(c, [4242, 7]) == (), "unknown features enabled"
    if CONVERSATIONS in got:
        negotiate(c, [CONVERSATIONS])
        c.call(ConvList(before_id=0, limit=1), ConvPage)
        assert negotiate(c, []) == (), "FEATURES [] left features enabled"
        c.expect_error(ConvList(before_id=0, limit=1), ErrorCode.UNKNOWN_FRAME_TYPE)
    c.ping()
    return f"server supports {list(got)}"


@check("ext.features_before_hello")
def features_before_hello(env: Env) -> None:
    """18/8.1: FEATURES before HELLO_OK -> NOT_AUTHENTICATED; the connection stays usable."""
    c = env.connect()
    c.expect_error(features_frame([WIRE_ONCE], 77), ErrorCode.NOT_AUTHENTICATED, rid=77)
    c.ping()
    c.login(env.secret, new_user(), new_device())


@check("ext.v1_post_v1_types_unknown")
def v1_post_v1_types_unknown(env: Env) -> None:
    """18/14: without CONVERSATIONS, 0x31..0x34 (any body) -> UNKNOWN_FRAME_TYPE, as in v1."""
    pre = env.connect()
    for t in POST_V1_TYPES:
        pre.expect_error(raw_frame(t, b"", rid=t), ErrorCode.UNKNOWN_FRAME_TYPE, rid=t)
    c = env.login()
    bodies = (b"", b"\x00" * 9, u64(0) + b"\x65", b"\x01" + u64(1) + u64(1))
    for t in POST_V1_TYPES:
        for i, body in enumerate(bodies):
            rid = t * 16 + i
            c.expect_error(raw_frame(t, body, rid=rid), ErrorCode.UNKNOWN_FRAME_TYPE, rid=rid)
    try:
        got = negotiate(c, [WIRE_ONCE])
    except Skip:
        got = ()
    if got:  # WIRE_ONCE alone does not enable the conversation requests
        c.expect_error(
            raw_frame(0x31, u64(0) + b"\x01", rid=5), ErrorCode.UNKNOWN_FRAME_TYPE, rid=5
        )
    c.ping()


# ----------------------------------------------------------------------- wire-once


@check("ext.wire_once_notice")
def wire_once_notice(env: Env) -> str:
    """18: pushed and acked messages (and one's own sends) come as INBOX_NOTICE(from = the
    page cursor) within 2 s; a later sync from `to` downloads nothing."""
    r = ext_login(env, [WIRE_ONCE])
    s = env.login()
    cursor = sync(r).cursor
    first = s.send_msg(r.user_id, b"wire once")
    accept_pushes(r, {first.msg_id})
    t0 = time.monotonic()
    cursor, listed = notices_until(r, {first.msg_id}, cursor, NOTICE_WAIT_S)
    took = time.monotonic() - t0
    assert listed == [first.msg_id], f"notice lists {listed}, want [{first.msg_id}]"
    s = env.login(s.user_id, s.device_id)  # the sender sat idle meanwhile (idle timeout)
    more = [s.send_msg(r.user_id, b"more %d" % i).msg_id for i in range(3)]
    accept_pushes(r, set(more))
    own = r.send_msg(s.user_id, b"my own").msg_id  # sent by it: held without a push
    cursor, listed = notices_until(r, {*more, own}, cursor, NOTICE_WAIT_S)
    assert not frames_of(r, FrameType.SYNC_HINT), "SYNC_HINT for messages the device holds"
    again = env.login(r.user_id, r.device_id)
    tail = sync(again, cursor)
    assert not tail.messages, (
        f"sync from the notice's cursor {cursor} re-sent {[m.msg_id for m in tail.messages]}"
    )
    full = sync(again, 0)
    want = [first.msg_id, *more, own]
    assert sorted(m.msg_id for m in full.messages) == sorted(want), "inbox != what was noticed"
    assert full.cursor == cursor, f"sync from 0 ends at {full.cursor}, notices at {cursor}"
    return f"first notice {took * 1000:.0f} ms after the PUSH_ACK"


@check("ext.wire_once_hint_for_unheld")
def wire_once_hint_for_unheld(env: Env) -> None:
    """18.2: an entry the connection does not hold (its own group change's event) -> the
    server PUSHes it from the inbox (then notices it once acked) or sends SYNC_HINT; never a
    notice first. After that, notices go on from the connection's cursor."""
    r = ext_login(env, [WIRE_ONCE])
    cursor = sync(r).cursor
    r.call(GroupCreate("wire once", ()), GroupCreated)
    first = wait_pinging(
        r,
        lambda f: (
            isinstance(f, SyncHint | InboxNotice)
            or (isinstance(f, Push) and f.message.content_type == 0)
        ),
        20.0,
        "PUSH of the group event or SYNC_HINT",
    )
    assert not isinstance(first, InboxNotice), (
        f"{describe(first)} before the unpushed group event was pushed or hinted (18.2)"
    )
    if isinstance(first, Push):
        event = first.message.msg_id
        r.send(PushAck(event))
        cursor, listed = notices_until(r, {event}, cursor, NOTICE_WAIT_S)
        assert listed == [event], f"notice after the event's PUSH lists {listed}"
    else:
        res = sync(r, cursor)
        assert [m.content_type for m in res.messages] == [0], "sync after the hint: not the event"
        cursor = res.cursor
    s = env.login()
    ack = s.send_msg(r.user_id, b"after the event")
    accept_pushes(r, {ack.msg_id})
    _, listed = notices_until(r, {ack.msg_id}, cursor, NOTICE_WAIT_S)
    assert listed == [ack.msg_id]


@check("ext.notices_need_features")
def notices_need_features(env: Env) -> None:
    """18: no INBOX_NOTICE without WIRE_ONCE, no READ_UPDATE without CONVERSATIONS (v1 bytes)."""
    me = new_user()
    v1 = env.login(me)
    conv_only = ext_login(env, [CONVERSATIONS], me)
    marker = ext_login(env, [CONVERSATIONS], me)
    s = env.login()
    for c in (v1, conv_only):
        sync(c)
    ack = s.send_msg(me, b"v1 sees a PUSH only")
    for c in (v1, conv_only):
        accept_pushes(c, {ack.msg_id})
    mark(marker, (USER, s.user_id), ack.msg_id)
    conv_only.wait_for(lambda f: isinstance(f, ReadUpdate), UPDATE_WAIT_S, "READ_UPDATE")
    v1.drain(NOTICE_WAIT_S)
    conv_only.drain(0.2)
    post = [
        describe(f) for f in v1.queue if f.TYPE in (FrameType.INBOX_NOTICE, FrameType.READ_UPDATE)
    ]
    assert not post and not v1.skipped_unknown, (
        f"a version-1 connection got post-v1 frames: {post or v1.skipped_unknown}"
    )
    assert not frames_of(conv_only, FrameType.INBOX_NOTICE), "INBOX_NOTICE without WIRE_ONCE"


# ---------------------------------------------------------------------- login race


@dataclass
class RaceResult:
    tries: int
    first_page: int = 0  # in the sync loop right after HELLO_OK
    by_hint: int = 0  # after a SYNC_HINT
    by_push: int = 0
    worst_s: float = 0.0


def login_race(env: Env, tries: int, deadline_s: float = LOGIN_RACE_DEADLINE_S) -> RaceResult:
    """A v1 receiver logs in 0-20 ms after the sender's SEND_ACK and follows only the spec's
    sync loop (10.2; a SYNC_HINT restarts it): it must hold the message within `deadline_s`."""
    sender = env.login()
    # An earlier check may have left the persister a backlog (a 500-member group): the race
    # is about the normal delay, so wait until a probe message of the sender is stored.
    probe = sender.send_msg(sender.user_id, b"probe")
    eventually(lambda: _holds(sync(sender).messages, probe.msg_id), 30.0)
    out = RaceResult(tries)
    for i in range(tries):
        receiver, device = new_user(), new_device()
        c = env.connect(f"receiver {i}")
        ack = sender.send_msg(receiver, b"race %d" % i)
        time.sleep(LOGIN_RACE_SPREAD_S * i / max(1, tries - 1))
        t0 = time.monotonic()
        c.login(env.secret, receiver, device)
        res = sync(c)
        how = "first_page" if ack.msg_id in {m.msg_id for m in res.messages} else ""
        cursor = res.cursor
        while not how:
            left = t0 + deadline_s - time.monotonic()
            assert left > 0, (
                f"try {i}: message {ack.msg_id} not received {deadline_s:.1f} s after a login "
                f"{LOGIN_RACE_SPREAD_S * i / max(1, tries - 1) * 1000:.1f} ms after its "
                f"SEND_ACK (no PUSH, no SYNC_HINT brought it)"
            )
            try:
                f = c.wait_for(lambda f: isinstance(f, SyncHint | Push), left, "SYNC_HINT")
            except AssertionError:
                continue  # the deadline assertion above reports it
            if isinstance(f, Push):
                c.send(PushAck(f.message.msg_id))
                how = "by_push" if f.message.msg_id == ack.msg_id else ""
            else:
                res = sync(c, cursor)
                cursor = res.cursor
                how = "by_hint" if ack.msg_id in {m.msg_id for m in res.messages} else ""
        setattr(out, how, getattr(out, how) + 1)
        out.worst_s = max(out.worst_s, time.monotonic() - t0)
        c.close()
    return out


def _holds(messages: list[Message], msg_id: int) -> None:
    assert msg_id in {m.msg_id for m in messages}, f"{msg_id} not in the inbox yet"


@check("ext.login_race_v1")
def login_race_v1(env: Env) -> str:
    """18 login race: a v1 device logging in 0-20 ms after a SEND_ACK has the message within
    1 s by the sync loop alone (20 tries)."""
    r = login_race(env, LOGIN_RACE_TRIES)
    return (
        f"{r.tries} tries: {r.first_page} in the first page, {r.by_hint} after SYNC_HINT, "
        f"{r.by_push} by PUSH; slowest {r.worst_s * 1000:.0f} ms"
    )


# ------------------------------------------------------------------- conversations


@dataclass
class Chat:
    """A user `me` with CONVERSATIONS and conversations with peers a, b, c and a group."""

    me: Conn
    peers: list[Conn]
    acks: dict[Key, list[tuple[int, SendAck]]]  # conv -> (sender, ack) in send order
    group: int


def chat(env: Env) -> Chat:
    me = ext_login(env, [CONVERSATIONS])
    u = me.user_id
    a, b, c = env.login(), env.login(), env.login()
    acks: dict[Key, list[tuple[int, SendAck]]] = {}

    def say(who: Conn, to: int, kind: int = USER) -> None:
        ack = who.send_msg(to, b"from %d" % who.user_id, kind=kind)
        key = (GROUP, to) if kind == GROUP else (USER, to if who.user_id == u else who.user_id)
        acks.setdefault(key, []).append((who.user_id, ack))

    gid = a.call(GroupCreate("convs", (u,)), GroupCreated).group_id
    say(a, u)
    say(b, u)
    say(a, u)
    say(c, u)
    say(me, c.user_id)  # my own answer: my read position moves to it
    say(a, gid, GROUP)
    say(me, gid, GROUP)
    return Chat(me, [a, b, c], acks, gid)


def expected_rows(ch: Chat) -> dict[Key, tuple[int, int, int, int]]:
    """conv -> (last msg_id, read_id, peer_read_id, unread), from the messages sent."""
    u = ch.me.user_id
    out = {}
    for key, sent in ch.acks.items():
        last = max(a.msg_id for _, a in sent)
        read = max((a.msg_id for who, a in sent if who == u), default=0)
        peer = 0 if key[0] == GROUP else max(a.msg_id for who, a in sent if who != u)
        unread = sum(1 for who, a in sent if who != u and a.msg_id > read)
        out[key] = (last, read, peer, unread)
    return out


def check_rows(rows: list[ConvEntry], want: dict[Key, tuple[int, int, int, int]]) -> None:
    got = rows_by_key(rows)
    assert len(got) == len(rows), "a conversation listed twice"
    assert set(got) == set(want), f"rows {sorted(got)}, want {sorted(want)}"
    for key, (last, read, peer, unread) in want.items():
        e = got[key]
        have = (last_id(e), e.read_id, e.peer_read_id, e.unread)
        assert have == (last, read, peer, unread) and not e.hidden, (
            f"{key}: (last, read_id, peer_read_id, unread) {have}, "
            f"want {(last, read, peer, unread)}"
        )
    order = [last_id(e) for e in rows]
    assert order == sorted(order, reverse=True), f"rows not newest first: {order} (18)"


@check("ext.conv_list")
def conv_list(env: Env) -> str:
    """18: CONV_LIST: one row per conversation with its last message, read positions and
    unread, newest first; total_unread; paging with before_id; limit 101 -> INVALID_FIELD."""
    ch = chat(env)
    want = expected_rows(ch)

    def listed() -> tuple[list[ConvEntry], list[ConvPage]]:
        rows, pages = list_all(ch.me)
        check_rows(rows, want)
        return rows, pages

    rows, pages = eventually(listed, 10.0)
    page = pages[0]
    assert page.total_unread == sum(w[3] for w in want.values()), (
        f"total_unread {page.total_unread}, want {sum(w[3] for w in want.values())}"
    )
    versions = [e.version for e in rows]
    assert len(set(versions)) == len(versions) and page.list_version >= max(versions), (
        f"row versions {versions}, list version {page.list_version} (18: one counter per user)"
    )
    for e in rows:
        if e.last:
            assert conv_key(e.last[0], ch.me.user_id) == (e.conv_kind, e.conv_id), (
                f"row {e.conv_kind}:{e.conv_id} carries a message of another conversation"
            )
    paged, small = list_all(ch.me, limit=3)
    assert [p.has_more for p in small] == [1, 0], f"has_more {[p.has_more for p in small]}"
    assert [len(p.convs) for p in small] == [3, 1], "4 rows at limit 3: not pages of 3 and 1"
    assert [(e.conv_kind, e.conv_id) for e in paged] == [(e.conv_kind, e.conv_id) for e in rows]
    ch.me.expect_error(raw_frame(0x31, u64(0) + b"\x65", rid=101), ErrorCode.INVALID_FIELD, rid=101)
    ch.me.expect_error(raw_frame(0x32, u64(0) + b"\xff", rid=102), ErrorCode.INVALID_FIELD, rid=102)
    return f"{len(rows)} rows, total_unread {page.total_unread}"


@check("ext.conv_changes")
def conv_changes(env: Env) -> None:
    """18: CONV_CHANGES(V) returns the rows changed after version V, ascending; an empty page
    has the newest version; CONV_CHANGES(0) returns every row."""
    ch = chat(env)
    want = expected_rows(ch)
    _, pages = eventually(lambda: _listed(ch.me, want), 10.0)
    v = pages[0].list_version
    every, newest = changes_all(ch.me, 0, limit=1)
    assert set(rows_by_key(every)) == set(want), "CONV_CHANGES(0) does not return every row"
    assert newest == v, f"CONV_CHANGES(0) ends at version {newest}, CONV_LIST says {v}"
    a = ch.peers[0]
    ack = a.send_msg(ch.me.user_id, b"a change")

    def changed() -> tuple[list[ConvEntry], int]:
        got, version = changes_all(ch.me, v)
        assert [(e.conv_kind, e.conv_id, last_id(e)) for e in got] == [
            (USER, a.user_id, ack.msg_id)
        ], f"changes since {v}: {[(e.conv_kind, e.conv_id, last_id(e)) for e in got]}"
        return got, version

    got, version = eventually(changed, 10.0)
    assert got[0].unread == want[(USER, a.user_id)][3] + 1, f"unread {got[0].unread} after one more"
    empty = ch.me.call(ConvChanges(since_version=version, limit=0), ConvChangesPage)
    assert (empty.convs, empty.has_more, empty.list_version) == ((), 0, version), (
        f"CONV_CHANGES at the newest version {version}: {len(empty.convs)} rows, has_more "
        f"{empty.has_more}, version {empty.list_version}"
    )


def _listed(
    c: Conn, want: dict[Key, tuple[int, int, int, int]]
) -> tuple[list[ConvEntry], list[ConvPage]]:
    rows, pages = list_all(c)
    check_rows(rows, want)
    return rows, pages


# ---------------------------------------------------------------------- read marks


@check("ext.read_mark_devices")
def read_mark_devices(env: Env) -> str:
    """18: READ_MARK -> READ_UPDATE to the user's other CONVERSATIONS devices and, with
    READ_RECEIPTS, to the 1:1 peer's; positions only move forward; msg_id is clamped."""
    u, p = new_user(), new_user()
    d1 = ext_login(env, [CONVERSATIONS], u)
    d2 = ext_login(env, [CONVERSATIONS], u)
    d_v1 = env.login(u)
    peer_rr = env.login(p)
    receipts = READ_RECEIPTS in negotiate(peer_rr, [CONVERSATIONS, READ_RECEIPTS])
    peer_conv = ext_login(env, [CONVERSATIONS], p)
    acks = [peer_conv.send_msg(u, b"read me %d" % i) for i in range(3)]
    m = acks[1].msg_id
    ok = mark(d1, (USER, p), m)
    assert ok.msg_id == m, f"READ_MARK_OK msg_id {ok.msg_id}, marked {m}"
    upd = d2.wait_for(lambda f: isinstance(f, ReadUpdate), UPDATE_WAIT_S, "READ_UPDATE")
    assert isinstance(upd, ReadUpdate) and upd.request_id == 0
    assert (upd.reader_id, upd.conv_kind, upd.conv_id, upd.msg_id) == (u, USER, p, m), (
        f"own device's READ_UPDATE {upd}"
    )
    if receipts:
        rec = peer_rr.wait_for(lambda f: isinstance(f, ReadUpdate), UPDATE_WAIT_S, "receipt")
        assert isinstance(rec, ReadUpdate)
        assert (rec.reader_id, rec.conv_kind, rec.conv_id, rec.msg_id) == (u, USER, u, m), (
            f"peer's READ_UPDATE {rec}: want reader {u}, conv 1:{u}, msg {m}"
        )
    for c in (d1, d_v1, peer_conv):
        c.drain(0.3)
    assert not frames_of(d1, FrameType.READ_UPDATE), "READ_UPDATE to the marking device itself"
    assert not frames_of(d_v1, FrameType.READ_UPDATE) and not d_v1.skipped_unknown
    assert not frames_of(peer_conv, FrameType.READ_UPDATE), "receipt without READ_RECEIPTS"
    mark(d1, (USER, p), acks[0].msg_id)  # backwards: the position stays
    ahead = huge_id()
    future = mark(d1, (USER, p), ahead)
    assert m <= future.msg_id < ahead, f"READ_MARK of {ahead} kept as {future.msg_id}"

    def positions() -> None:
        mine, theirs = row_of(d2, (USER, p)), row_of(peer_conv, (USER, u))
        assert mine is not None and theirs is not None, "1:1 rows missing from CONV_LIST"
        assert mine.read_id == future.msg_id and mine.unread == 0, (
            f"my row: read_id {mine.read_id} unread {mine.unread}, want {future.msg_id}, 0"
        )
        assert theirs.peer_read_id == future.msg_id, (
            f"peer's row: peer_read_id {theirs.peer_read_id}, want {future.msg_id}"
        )

    eventually(positions, 10.0)
    return f"read receipts {'on' if receipts else 'off'}"


@check("ext.unread_follows_marks")
def unread_follows_marks(env: Env) -> str:
    """18: after READ_MARK_OK, CONV_LIST unread and total_unread follow the mark within 2 s."""
    me = ext_login(env, [CONVERSATIONS])
    a = env.login()
    acks = [a.send_msg(me.user_id, b"unread %d" % i) for i in range(3)]
    key = (USER, a.user_id)

    def unread_is(n: int) -> None:
        rows, pages = list_all(me)
        e = rows_by_key(rows).get(key)
        assert e is not None and e.unread == n and pages[0].total_unread == n, (
            f"unread {e.unread if e else None}, total {pages[0].total_unread}, want {n}"
        )

    eventually(lambda: unread_is(3), 10.0)
    took = []
    for msg_id, left in ((acks[0].msg_id, 2), (acks[2].msg_id, 0)):
        mark(me, key, msg_id)
        t0 = time.monotonic()
        eventually(functools.partial(unread_is, left), STATE_WAIT_S)
        took.append(time.monotonic() - t0)
    return f"list followed the marks in {', '.join(f'{t * 1000:.0f}' for t in took)} ms"


@check("ext.read_mark_errors")
def read_mark_errors(env: Env) -> None:
    """18: READ_MARK on a group one is not in -> FORBIDDEN, on no group -> NOT_FOUND; a
    member's mark is accepted."""
    me = ext_login(env, [CONVERSATIONS])
    other = env.login()
    theirs = other.call(GroupCreate("not mine", ()), GroupCreated).group_id
    mine = other.call(GroupCreate("mine too", (me.user_id,)), GroupCreated).group_id
    me.expect_error(ReadMark(conv_kind=GROUP, conv_id=theirs, msg_id=1), ErrorCode.FORBIDDEN)
    me.expect_error(ReadMark(conv_kind=GROUP, conv_id=huge_id(), msg_id=1), ErrorCode.NOT_FOUND)
    ack = other.send_msg(mine, b"in the group", kind=GROUP)
    assert mark(me, (GROUP, mine), ack.msg_id).msg_id == ack.msg_id
    me.ping()


@check("ext.conv_hide")
def conv_hide(env: Env) -> None:
    """18: CONV_HIDE removes the row from CONV_LIST (CONV_CHANGES shows it hidden); a newer
    message brings it back."""
    me = ext_login(env, [CONVERSATIONS])
    a, b = env.login(), env.login()
    a.send_msg(me.user_id, b"hide me")
    b.send_msg(me.user_id, b"keep me")
    ka, kb = (USER, a.user_id), (USER, b.user_id)

    def both() -> int:
        rows, pages = list_all(me)
        assert {ka, kb} <= set(rows_by_key(rows)), "rows not listed yet"
        return pages[0].list_version

    v = eventually(both, 10.0)
    ok = me.call(ConvHide(conv_kind=USER, conv_id=a.user_id), ConvHideOk)
    assert (ok.conv_kind, ok.conv_id) == ka, f"CONV_HIDE_OK for {ok.conv_kind}:{ok.conv_id}"

    def hidden() -> None:
        rows, pages = list_all(me)
        keys = set(rows_by_key(rows))
        assert ka not in keys and kb in keys, f"after CONV_HIDE the list has {sorted(keys)}"
        assert pages[0].total_unread == 1, f"total_unread {pages[0].total_unread}, want 1"
        changed = rows_by_key(changes_all(me, v)[0])
        assert ka in changed and changed[ka].hidden == 1, "CONV_CHANGES lacks the hidden row"

    eventually(hidden, 10.0)
    back = a.send_msg(me.user_id, b"back again")

    def returned() -> None:
        e = row_of(me, ka)
        assert e is not None and not e.hidden and last_id(e) == back.msg_id, (
            f"row after a new message: {e}"
        )

    eventually(returned, 10.0)


@check("ext.offline_unread_follows_marks")
def offline_unread_follows_marks(env: Env) -> None:
    """18: with CONVERSATIONS, OFFLINE_PAGE unread counts only messages after the read
    position (conversations with none are left out); a v1 connection keeps 10.3's counts."""
    me = ext_login(env, [CONVERSATIONS])
    v1 = env.login(me.user_id)
    a, b = env.login(), env.login()
    sa = [a.send_msg(me.user_id, b"a%d" % i).msg_id for i in range(3)]
    sb = [b.send_msg(me.user_id, b"b%d" % i).msg_id for i in range(2)]
    mark(me, (USER, a.user_id), sa[1])
    mark(me, (USER, b.user_id), sb[1])
    want = {*sa, *sb}

    def counted() -> None:
        page = me.call(OfflinePull(0, 200), OfflinePage)
        assert want <= {m.msg_id for m in page.messages}, "messages not in the inbox yet"
        assert list(page.unread) == [UnreadCount(USER, a.user_id, 1)], (
            f"unread with marks at a's 2nd and b's last: {list(page.unread)}"
        )

    eventually(counted, 10.0)
    page = v1.call(OfflinePull(0, 200), OfflinePage)
    assert list(page.unread) == expected_unread(page.messages, me.user_id), (
        f"v1 unread {list(page.unread)} (10.3: others' messages in the page)"
    )


# ------------------------------------------------------------- push registrations (19)


def push_register(platform: bytes, token: bytes, options: int, rid: int) -> bytes:
    """PUSH_REGISTER by hand (values the codec refuses)."""
    body = struct.pack(">B", len(platform)) + platform + struct.pack(">H", len(token)) + token
    return raw_frame(FrameType.PUSH_REGISTER, body + struct.pack(">B", options), rid=rid)


def allowed_platform(c: Conn) -> str:
    """A platform the server accepts (registered with a throwaway token); skip if none of
    KNOWN_PLATFORMS is."""
    for platform in KNOWN_PLATFORMS:
        got = c.request(PushRegister(platform, "conformance-probe"))
        if isinstance(got, PushRegisterOk):
            return platform
        assert isinstance(got, Error) and got.code == ErrorCode.INVALID_FIELD, (
            f"PUSH_REGISTER({platform}) answered by {describe(got)}"
        )
    raise Skip(f"the server allows none of the platforms {list(KNOWN_PLATFORMS)} (19)")


@check("ext.push_types_need_feature")
def push_types_need_feature(env: Env) -> None:
    """19/14: without PUSH, 0x35 and 0x36 (any body, other features enabled or not) ->
    UNKNOWN_FRAME_TYPE, as in v1; FEATURES without PUSH leaves them unknown."""
    pre = env.connect()
    for t in PUSH_TYPES:
        pre.expect_error(raw_frame(t, b"\xff", rid=t), ErrorCode.UNKNOWN_FRAME_TYPE, rid=t)
    c = env.login()
    bodies = (b"", b"\x00", push_register(b"apns", b"t", 0, 0)[11:])
    for t in PUSH_TYPES:
        for i, body in enumerate(bodies):
            rid = t * 16 + i
            c.expect_error(raw_frame(t, body, rid=rid), ErrorCode.UNKNOWN_FRAME_TYPE, rid=rid)
    try:
        got = negotiate(c, [WIRE_ONCE, CONVERSATIONS])
    except Skip:
        got = ()
    if got:
        c.expect_error(push_register(b"apns", b"t", 0, rid=7), ErrorCode.UNKNOWN_FRAME_TYPE, rid=7)
        c.expect_error(PushUnregister(), ErrorCode.UNKNOWN_FRAME_TYPE)
    c.ping()


@check("ext.push_register")
def push_register_replace_unregister(env: Env) -> str:
    """19: PUSH_REGISTER -> PUSH_REGISTER_OK (same request_id); registering again (another
    token, preview on) replaces it -> OK; PUSH_UNREGISTER -> PUSH_UNREGISTER_OK, also when
    nothing is registered."""
    c = ext_login(env, [PUSH])
    platform = allowed_platform(c)
    ok = c.call(PushRegister(platform, "a" * 64, 0), PushRegisterOk)
    assert ok.request_id, "PUSH_REGISTER_OK without the request's id"
    longest = "\u00e9" * 2048  # 4096 bytes of UTF-8
    c.call(PushRegister(platform, longest, PushRegister.PREVIEW), PushRegisterOk)
    rid = c.send(PushUnregister())
    got = c.reply(rid, "PUSH_UNREGISTER_OK")
    assert isinstance(got, PushUnregisterOk), f"PUSH_UNREGISTER answered by {describe(got)}"
    c.call(PushUnregister(), PushUnregisterOk)
    other = env.login(c.user_id)  # another device of the user registers on its own
    negotiate(other, [PUSH])
    other.call(PushRegister(platform, "b" * 64, 0), PushRegisterOk)
    other.call(PushUnregister(), PushUnregisterOk)
    c.ping()
    return f"platform {platform}"


@check("ext.push_register_refused")
def push_register_refused(env: Env) -> None:
    """19: a platform the server does not allow, a platform with other characters than
    [a-z0-9._-] or of 33 bytes, a token of 0 or 4097 bytes, options bits other than bit 0 ->
    INVALID_FIELD; a token that is not UTF-8 -> BAD_UTF8; the connection stays usable."""
    c = ext_login(env, [PUSH])
    allowed_platform(c)
    got = c.expect_error(PushRegister("no-such-platform.conformance", "t"),
                         ErrorCode.INVALID_FIELD)  # fmt: skip
    assert got.request_id, "ERROR without the request's id"
    cases = [
        (b"APNS", b"t", 0, ErrorCode.INVALID_FIELD),
        (b"ap ns", b"t", 0, ErrorCode.INVALID_FIELD),
        (b"p" * 33, b"t", 0, ErrorCode.INVALID_FIELD),
        (b"", b"t", 0, ErrorCode.INVALID_FIELD),
        (b"apns", b"", 0, ErrorCode.INVALID_FIELD),
        (b"apns", b"t" * 4097, 0, ErrorCode.INVALID_FIELD),
        (b"apns", b"t", 2, ErrorCode.INVALID_FIELD),
        (b"apns", b"t", 0x81, ErrorCode.INVALID_FIELD),
        (b"apns", b"to\xffk", 1, ErrorCode.BAD_UTF8),
        (b"fcm\xc3", b"t", 0, ErrorCode.BAD_UTF8),
    ]
    for i, (platform, token, options, code) in enumerate(cases):
        rid = 900 + i
        c.expect_error(push_register(platform, token, options, rid), code, rid=rid)
    c.ping()
