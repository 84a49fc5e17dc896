"""Offline sync: spec sections 5 (cursors), 7 (OFFLINE_PULL/PAGE/ACK) and 10."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from improto.codec import encode
from improto.conformance.conn import (
    Conn,
    Env,
    describe,
    eventually,
    new_user,
    offline_ack,
    raw_frame,
    sync,
    u64,
)
from improto.conformance.runner import check
from improto.enums import ConvKind, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    GroupCreate,
    GroupCreated,
    Message,
    OfflinePage,
    OfflinePull,
    PushAck,
    Send,
    SendAck,
    UnreadCount,
)
from improto.limits import CURSOR_RESUME, MAX_BODY, MAX_FRAME_LENGTH, U64_MAX

BURST = 450


def pull(c: Conn, cursor: int, limit: int = 200) -> OfflinePage:
    return c.call(OfflinePull(cursor, limit), OfflinePage)


def expected_unread(messages: tuple[Message, ...] | list[Message], me: int) -> list[UnreadCount]:
    """10.3: per conversation (as `me` sees it), others' messages, in order of first appearance."""
    counts: dict[tuple[int, int], int] = {}
    for m in messages:
        if m.sender_id == me:
            continue
        conv = m.conv_id if m.conv_kind == ConvKind.GROUP else m.sender_id
        counts[(m.conv_kind, conv)] = counts.get((m.conv_kind, conv), 0) + 1
    return [UnreadCount(k, c, n) for (k, c), n in counts.items()]


def wait_inbox(c: Conn, want: set[int], timeout: float = 5.0) -> list[Message]:
    """Sync from 0 until every msg_id in `want` is visible (spec 11: persistence is async)."""

    def visible() -> list[Message]:
        msgs = sync(c).messages
        missing = want - {m.msg_id for m in msgs}
        assert not missing, f"{len(missing)} of {len(want)} messages never reached the inbox"
        return msgs

    return eventually(visible, timeout)


def send_many(c: Conn, to: int, n: int, kind: int = ConvKind.USER) -> list[SendAck]:
    """Pipeline `n` SENDs in one write and collect their SEND_ACKs in order."""
    rids = [c.next_rid() for _ in range(n)]
    c.send_raw(
        b"".join(
            encode(Send(os.urandom(16), kind, to, 1, b"burst %d" % i, request_id=rid))
            for i, rid in enumerate(rids)
        )
    )
    acks = []
    for rid in rids:
        ack = c.reply(rid, "SEND_ACK", timeout=20.0)
        assert isinstance(ack, SendAck), f"SEND answered by {describe(ack)}"
        acks.append(ack)
    return acks


@dataclass
class Burst:
    receiver: int
    msg_ids: set[int]
    shared_ms: int  # how many messages share their server_time with another one
    max_per_ms: int


_BURSTS: dict[tuple[str, int], Burst] = {}


def burst(env: Env) -> Burst:
    """450 messages pipelined to an offline user, once per server (shared by several checks)."""
    key = (env.host, env.port)
    if key not in _BURSTS:
        receiver = new_user()
        acks = send_many(env.login(), receiver, BURST)
        times = Counter(a.server_time for a in acks)
        shared = sum(n for n in times.values() if n > 1)
        ids = {a.msg_id for a in acks}
        assert len(ids) == BURST, f"{BURST} SENDs got {len(ids)} distinct msg_ids"
        wait_inbox(env.login(receiver), ids, timeout=15.0)
        _BURSTS[key] = Burst(receiver, ids, shared, max(times.values()))
    return _BURSTS[key]


@check("offline.fresh_device_gets_everything")
def fresh_device_gets_everything(env: Env) -> None:
    """10.1/10.3: cursor 0 returns every message sent or received (1:1, group), exactly once."""
    me = new_user()
    mine = env.login(me)
    p1, p2 = env.login(), env.login()
    acks = [p1.send_msg(me, b"a"), p2.send_msg(me, b"b"), p1.send_msg(me, b"c")]
    acks.append(mine.send_msg(p2.user_id, b"mine"))
    gid = p1.call(GroupCreate("offline", (me,)), GroupCreated).group_id
    acks.append(p1.send_msg(gid, b"group", kind=ConvKind.GROUP))
    stranger = p1.send_msg(p2.user_id, b"not for me")
    want = {a.msg_id for a in acks}
    fresh = env.login(me)

    def check_inbox() -> None:
        msgs = sync(fresh).messages
        ids = [m.msg_id for m in msgs]
        dups = [i for i, n in Counter(ids).items() if n > 1]
        assert not dups, f"msg_ids {dups[:3]} served more than once"
        missing = want - set(ids)
        assert not missing, f"{len(missing)} of {len(want)} messages missing"
        assert stranger.msg_id not in ids, "a message between two other users is in my inbox"
        events = [m for m in msgs if m.content_type == 0 and m.conv_id == gid]
        assert len(events) == 1, f"{len(events)} group events for the group I was added to"
        extra = set(ids) - want - {events[0].msg_id}
        assert not extra, f"unexpected messages in the inbox: {sorted(extra)[:3]}"

    eventually(check_inbox)


@check("offline.burst_paging")
def burst_paging(env: Env) -> str:
    """10.3/5: 450 messages (many per millisecond) in pages of 200: has_more 1,1,0, no loss."""
    b = burst(env)
    c = env.login(b.receiver)
    pages = [pull(c, 0, 200)]
    while pages[-1].has_more and len(pages) < 10:
        pages.append(pull(c, pages[-1].cursor, 200))
    sizes = [len(p.messages) for p in pages]
    flags = [p.has_more for p in pages]
    assert flags == [1, 1, 0], f"has_more per page {flags} (sizes {sizes}), want [1, 1, 0]"
    assert sizes == [200, 200, 50], f"page sizes {sizes}, want [200, 200, 50]"
    cursors = [p.cursor for p in pages]
    assert cursors == sorted(set(cursors)), f"page cursors do not strictly increase: {cursors}"
    ids = [m.msg_id for p in pages for m in p.messages]
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} messages served twice"
    assert set(ids) == b.msg_ids, f"{len(b.msg_ids - set(ids))} messages lost across pages"
    for p in pages:
        assert list(p.unread) == expected_unread(p.messages, b.receiver), (
            f"unread {p.unread} does not match the page's messages (10.3)"
        )
    tail = pull(c, cursors[-1], 200)
    assert not tail.messages and not tail.has_more and tail.cursor == cursors[-1], (
        f"pull after the last page: {len(tail.messages)} messages, has_more {tail.has_more}, "
        f"cursor {tail.cursor} (want empty, 0, {cursors[-1]})"
    )
    return (
        f"{b.shared_ms} of {BURST} messages share a server_time with another; "
        f"up to {b.max_per_ms} in one ms"
    )


@check("offline.limit_zero_is_200")
def limit_zero_is_200(env: Env) -> None:
    """7 OFFLINE_PULL: limit 0 means the default, 200."""
    b = burst(env)
    c = env.login(b.receiver)
    page = pull(c, 0, 0)
    assert len(page.messages) == 200 and page.has_more == 1, (
        f"limit 0 on a {BURST}-entry inbox: {len(page.messages)} messages, has_more {page.has_more}"
    )


@check("offline.limit_one")
def limit_one(env: Env) -> None:
    """10.3: limit 1 pages one entry at a time, has_more on all but the last, cursor order kept."""
    me = new_user()
    p = env.login()
    want = {p.send_msg(me, b"%d" % i).msg_id for i in range(5)}
    c = env.login(me)
    big = wait_inbox(c, want)
    order, cursors, flags = [], [], []
    cursor = 0
    for _ in range(10):
        page = pull(c, cursor, 1)
        assert len(page.messages) <= 1, f"limit 1 page with {len(page.messages)} messages"
        order += [m.msg_id for m in page.messages]
        cursors.append(page.cursor)
        flags.append(page.has_more)
        cursor = page.cursor
        if not page.has_more:
            break
    assert flags == [1, 1, 1, 1, 0], f"has_more per page {flags}, want [1, 1, 1, 1, 0]"
    assert cursors == sorted(set(cursors)), f"cursors not strictly increasing: {cursors}"
    assert order == [m.msg_id for m in big], (
        "limit 1 pages return the entries in another order than one limit 200 page (10.3)"
    )


@check("offline.own_messages_in_inbox")
def own_messages_in_inbox(env: Env) -> None:
    """10.1: messages I sent are in my inbox: another of my devices syncs them; not unread."""
    me = new_user()
    a1 = env.login(me)
    acks = [a1.send_msg(new_user(), b"out %d" % i) for i in range(3)]
    a2 = env.login(me)
    msgs = wait_inbox(a2, {a.msg_id for a in acks})
    for m in msgs:
        assert m.sender_id == me and m.sender_device == a1.device_id, (
            f"own message shows sender {m.sender_id}/{m.sender_device}"
        )
    page = pull(a2, 0)
    assert not page.unread, f"own messages counted as unread: {page.unread}"


@check("offline.unread_counts")
def unread_counts(env: Env) -> None:
    """10.3: UNREAD per viewer-relative conversation, others' messages only, first-seen order."""
    me = new_user()
    a = env.login(me)
    p1, p2 = env.login(), env.login()
    acks = [p1.send_msg(me, b"1"), p1.send_msg(me, b"2"), p2.send_msg(me, b"3")]
    acks += [a.send_msg(p1.user_id, b"reply"), a.send_msg(me, b"self"), p1.send_msg(me, b"4")]
    gid = p2.call(GroupCreate("unread", (me, p1.user_id)), GroupCreated).group_id
    acks += [p1.send_msg(gid, b"g1", kind=ConvKind.GROUP), a.send_msg(gid, b"g2", kind=2)]
    fresh = env.login(me)
    msgs = wait_inbox(fresh, {x.msg_id for x in acks})
    page = pull(fresh, 0, 200)
    assert len(page.messages) == len(msgs) and not page.has_more, "one page should hold all"
    want = expected_unread(page.messages, me)
    totals = {(u.conv_kind, u.conv_id): u.count for u in want}
    # Sanity of the expectation itself: P1 3, P2 1, the group: created event (P2) + g1 (P1).
    assert totals == {(1, p1.user_id): 3, (1, p2.user_id): 1, (2, gid): 2}, totals
    assert list(page.unread) == want, f"unread {list(page.unread)}, want {want}"
    # Over several pages, each page counts its own messages.
    cursor, pages = 0, 0
    while True:
        pg = pull(fresh, cursor, 3)
        assert list(pg.unread) == expected_unread(pg.messages, me), (
            f"page {pages}: unread {list(pg.unread)}, want {expected_unread(pg.messages, me)}"
        )
        cursor, pages = pg.cursor, pages + 1
        if not pg.has_more:
            break


def _inbox_of(env: Env, n: int) -> tuple[int, list[int]]:
    """A user with `n` messages in their inbox, visible; returns (user, msg_ids in order)."""
    me = new_user()
    p = env.login()
    want = {p.send_msg(me, b"m%d" % i).msg_id for i in range(n)}
    msgs = wait_inbox(env.login(me), want)
    return me, [m.msg_id for m in msgs]


@check("offline.resume_after_ack")
def resume_after_ack(env: Env) -> None:
    """10.3/10.4: OFFLINE_ACK(c) then OFFLINE_PULL(2^64-1) resumes right after c."""
    me, ids = _inbox_of(env, 5)
    c = env.login(me)
    first2 = pull(c, 0, 2)  # cursor 0 does not move the position
    assert [m.msg_id for m in first2.messages] == ids[:2], "limit 2 is not the first 2 entries"
    assert offline_ack(c, first2.cursor) == first2.cursor, "OFFLINE_ACK_OK is not the position"
    page = pull(c, CURSOR_RESUME, 200)
    got = [m.msg_id for m in page.messages]
    assert got == ids[2:], f"resume returned {len(got)} messages, want the last {len(ids) - 2}"
    fresh = env.login(me)
    page = pull(fresh, CURSOR_RESUME, 200)
    assert [m.msg_id for m in page.messages] == ids, (
        "resume on a device without a stored position does not start at 0 (10.3)"
    )


@check("offline.ack_returns_position")
def ack_returns_position(env: Env) -> None:
    """10.4: OFFLINE_ACK_OK is max(position, C); positions are per device; ACK 0 reports it."""
    me, _ = _inbox_of(env, 4)
    c = env.login(me)
    c1 = pull(c, 0, 1).cursor
    c3 = pull(c, 0, 3).cursor
    assert c1 < c3, f"cursor after 1 entry {c1} not below cursor after 3 entries {c3}"
    assert offline_ack(c, 0) == 0, "a fresh device's position is not 0"
    assert offline_ack(c, c3) == c3, "OFFLINE_ACK_OK is not the acknowledged cursor"
    assert offline_ack(c, c1) == c3, "OFFLINE_ACK with a lower cursor moved the position back"
    assert offline_ack(c, 0) == c3, "OFFLINE_ACK(0) moved the position back"
    other = env.login(me)
    assert offline_ack(other, 0) == 0, "another device of the same user shares the position"


@check("offline.pull_moves_position")
def pull_moves_position(env: Env) -> None:
    """10.4: OFFLINE_PULL with C (not 0, not 2^64-1) sets the position; 0 and resume do not."""
    me, _ = _inbox_of(env, 4)
    c = env.login(me)
    c2 = pull(c, 0, 2).cursor
    assert offline_ack(c, 0) == 0, "OFFLINE_PULL(0) moved the position"
    pull(c, CURSOR_RESUME, 200)
    assert offline_ack(c, 0) == 0, "OFFLINE_PULL(resume) moved the position"
    pull(c, c2, 1)
    assert offline_ack(c, 0) == c2, "OFFLINE_PULL(C) did not set the position to C"


@check("offline.cursor_clamped")
def cursor_clamped(env: Env) -> None:
    """10.3/10.4: a cursor above the largest assigned is clamped (page and ACK); has_more 0."""
    me, _ = _inbox_of(env, 3)
    c = env.login(me)
    last = sync(c).cursor
    page = pull(c, U64_MAX - 1, 200)
    assert not page.messages and page.has_more == 0, (
        f"made-up cursor: {len(page.messages)} messages, has_more {page.has_more}"
    )
    assert page.cursor == last, (
        f"made-up cursor 2^64-2 answered with cursor {page.cursor}, want the largest {last}"
    )
    assert offline_ack(c, U64_MAX - 1) == last, "OFFLINE_ACK with a made-up cursor not clamped"
    later = env.login().send_msg(me, b"after the clamp")
    wait_inbox(c, {later.msg_id})
    nxt = pull(c, page.cursor, 200)
    assert [m.msg_id for m in nxt.messages] == [later.msg_id], (
        "a message arriving after the clamp is not served after the clamped cursor"
    )


@check("offline.pushes_do_not_move_position")
def pushes_do_not_move_position(env: Env) -> None:
    """9.3/10.4: pushes and PUSH_ACKs do not move the position; resume still returns them."""
    me = new_user()
    c = env.login(me)
    p = env.login()
    acks = [p.send_msg(me, b"push %d" % i) for i in range(3)]
    for a in acks:
        c.push_for(a.msg_id)
        c.send(PushAck(a.msg_id), rid=0)
    want = [a.msg_id for a in acks]

    def resumed() -> None:
        got = [m.msg_id for m in pull(c, CURSOR_RESUME, 200).messages]
        assert sorted(got) == sorted(want), f"resume after pushes returned {len(got)} of 3"

    eventually(resumed)
    assert offline_ack(c, 0) == 0, "pushes or PUSH_ACKs moved the position"


@check("offline.empty_inbox")
def empty_inbox(env: Env) -> None:
    """10.3: an empty inbox gives an empty page: cursor = S (0), has_more 0, gap 0, no unread."""
    c = env.login()
    for cursor in (0, CURSOR_RESUME):
        page = pull(c, cursor, 0)
        assert (page.cursor, page.has_more, page.gap, page.messages, page.unread) == (
            0, 0, 0, (), ()
        ), f"empty inbox, cursor {cursor}: {page}"  # fmt: skip


@check("offline.limit_201")
def limit_201(env: Env) -> None:
    """7 OFFLINE_PULL: limit above 200 -> INVALID_FIELD (non-fatal)."""
    c = env.login()
    c.expect_error(
        raw_frame(FrameType.OFFLINE_PULL, u64(0) + b"\x00\xc9", rid=201),
        ErrorCode.INVALID_FIELD,
        rid=201,
    )
    c.ping()
    pull(c, 0, 200)


@check("offline.page_size_cap")
def page_size_cap(env: Env) -> str:
    """10.3/2: pages stay within 131072 bytes (fewer entries, at least one) and lose nothing."""
    me = new_user()
    p = env.login()
    acks = [p.send_msg(me, os.urandom(MAX_BODY), content_type=0x8001) for _ in range(3)]
    acks.append(p.send_msg(me, b"small"))
    c = env.login(me)
    wait_inbox(c, {a.msg_id for a in acks}, timeout=10.0)
    r = sync(c, 0, 200)  # a frame above 131072 bytes fails in the client's reader
    got = [m.msg_id for m in r.messages]
    assert sorted(got) == sorted(a.msg_id for a in acks), "messages lost with large bodies"
    by_id = {m.msg_id: m for m in r.messages}
    for a in acks[:3]:
        assert len(by_id[a.msg_id].body) == MAX_BODY, "a 65535-byte body came back altered"
    return f"page sizes {[len(pg.messages) for pg in r.pages]}"


@check("offline.never_used_inbox_clamps_to_0")
def never_used_inbox_clamps_to_0(env: Env) -> None:
    """10.3/10.4: an inbox that never had an entry clamps every cursor (pull and ACK) to 0."""
    c = env.login()
    for cursor in (1, 12_345, U64_MAX - 1):
        page = pull(c, cursor)
        assert (page.cursor, page.has_more, page.gap, page.messages) == (0, 0, 0, ()), (
            f"never-used inbox, cursor {cursor}: {describe(page)} cursor {page.cursor} (want 0)"
        )
    for cursor in (12_345, U64_MAX, 0):
        assert offline_ack(c, cursor) == 0, f"OFFLINE_ACK({cursor}) on a never-used inbox not 0"


@check("offline.ack_max_takes_everything_so_far")
def ack_max_takes_everything_so_far(env: Env) -> None:
    """7/10.4: OFFLINE_ACK(2^64-1) sets the position to the largest cursor (no 'resume'
    meaning); OFFLINE_ACK(0) then reads it; resume serves only what came after."""
    me, _ = _inbox_of(env, 3)
    c = env.login(me)
    last = sync(c).cursor
    assert offline_ack(c, 0) == 0, "a fresh device's position is not 0"
    assert offline_ack(c, U64_MAX) == last, (
        f"OFFLINE_ACK(2^64-1) did not set the position to the largest cursor {last}"
    )
    assert offline_ack(c, 0) == last, "OFFLINE_ACK(0) changed or did not report the position"
    assert not pull(c, CURSOR_RESUME).messages, "resume after OFFLINE_ACK(2^64-1) is not empty"
    later = env.login().send_msg(me, b"after the ack")
    wait_inbox(c, {later.msg_id})
    got = [m.msg_id for m in pull(c, CURSOR_RESUME).messages]
    assert got == [later.msg_id], f"resume after OFFLINE_ACK(2^64-1) returned {len(got)} messages"


def _record_size(device: str, body: int) -> int:
    """Bytes of a MESSAGE record (6) with this sender_device and body length."""
    return 8 + 8 + 8 + 1 + len(device.encode()) + 1 + 8 + 2 + 16 + 2 + body


@check("offline.page_fills_to_131072")
def page_fills_to_131072(env: Env) -> None:
    """10.3: a page holds every entry that fits: two large messages whose page is exactly
    131072 bytes long come in one page, with only the unread list they need."""
    for own in (True, False):
        me = new_user()
        sender = env.login(me if own else None)
        dev = sender.device_id
        # OFFLINE_PAGE: 7 header + 12 fixed + 2 unread count, + one UNREAD (11) from a peer.
        room = MAX_FRAME_LENGTH - 21 - (0 if own else 11)
        second = room - _record_size(dev, MAX_BODY) - _record_size(dev, 0)
        acks = [sender.send_msg(me, bytes(n), content_type=0x8001) for n in (MAX_BODY, second)]
        acks.append(sender.send_msg(me, b"next page"))
        c = env.login(me)
        wait_inbox(c, {a.msg_id for a in acks}, timeout=10.0)
        page = pull(c, 0)
        got = [m.msg_id for m in page.messages]
        who = "own messages" if own else "a peer's messages"
        assert got == [a.msg_id for a in acks[:2]] and page.has_more == 1, (
            f"{who}: a page of exactly 131072 bytes was split: first page has {len(got)} of "
            f"the 2 messages that fit (10.3)"
        )
        assert len(encode(page)) - 4 == MAX_FRAME_LENGTH, "page length not 131072"
