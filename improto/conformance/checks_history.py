"""History: spec sections 7 (HISTORY_PULL/PAGE) and 11."""

from __future__ import annotations

import json
import os
from collections.abc import Container

from improto.conformance.checks_offline import send_many
from improto.conformance.checks_send import assert_record
from improto.conformance.conn import Conn, Env, eventually, huge_id, new_user, raw_frame, u64
from improto.conformance.runner import check
from improto.enums import ConvKind, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupRemove,
    GroupRemoveOk,
    HistoryPage,
    HistoryPull,
    Message,
)
from improto.limits import MAX_BODY, U64_MAX


def hpull(c: Conn, kind: int, conv: int, before: int = 0, limit: int = 0) -> HistoryPage:
    page = c.call(HistoryPull(kind, conv, before, limit), HistoryPage)
    assert (page.conv_kind, page.conv_id) == (kind, conv), (
        f"HISTORY_PAGE for ({page.conv_kind}, {page.conv_id}), asked ({kind}, {conv}) (7)"
    )
    ids = [m.msg_id for m in page.messages]
    assert ids == sorted(ids, reverse=True) and len(set(ids)) == len(ids), (
        "HISTORY_PAGE messages not in strictly descending msg_id order (7)"
    )
    if before:
        assert all(i < before for i in ids), f"message with msg_id >= before_id {before}"
    return page


def walk(c: Conn, kind: int, conv: int, limit: int) -> tuple[list[Message], list[int]]:
    """Page backwards to the beginning; return all messages and the has_more flags."""
    msgs: list[Message] = []
    flags: list[int] = []
    before = 0
    for _ in range(200):
        page = hpull(c, kind, conv, before, limit)
        msgs += page.messages
        flags.append(page.has_more)
        if not page.has_more:
            return msgs, flags
        assert page.messages, "empty HISTORY_PAGE with has_more=1"
        before = page.messages[-1].msg_id
    raise AssertionError("history paging did not reach the beginning")


def wait_history(c: Conn, kind: int, conv: int, want: set[int], timeout: float = 5.0) -> None:
    def visible() -> None:
        ids = {m.msg_id for m in walk(c, kind, conv, 100)[0]}
        missing = want - ids
        assert not missing, f"{len(missing)} of {len(want)} messages never reached the history"

    eventually(visible, timeout)


def _conversation(env: Env, n: int) -> tuple[Conn, Conn, list[int]]:
    """Two users with `n` messages between them (both directions); msg_ids newest first."""
    a, b = env.login(), env.login()
    acks = send_many(a, b.user_id, n - n // 2) + send_many(b, a.user_id, n // 2)
    ids = sorted((x.msg_id for x in acks), reverse=True)
    wait_history(a, ConvKind.USER, b.user_id, set(ids))
    return a, b, ids


def _flags_ok(flags: list[int], pages: int) -> bool:
    return flags == [1] * (pages - 1) + [0]


@check("history.default_page_and_paging")
def default_page_and_paging(env: Env) -> None:
    """11/7/15: limit 0 = 20 newest first; before_id pages to the start; has_more exact at 40."""
    a, b, ids = _conversation(env, 40)
    p1 = hpull(a, ConvKind.USER, b.user_id, 0, 0)
    assert [m.msg_id for m in p1.messages] == ids[:20] and p1.has_more == 1, (
        f"first default page: {len(p1.messages)} messages, has_more {p1.has_more} (want 20, 1)"
    )
    p2 = hpull(a, ConvKind.USER, b.user_id, p1.messages[-1].msg_id, 0)
    assert [m.msg_id for m in p2.messages] == ids[20:], "second page is not the 20 oldest"
    assert p2.has_more == 0, "has_more=1 on the page that holds the oldest message (11: exact)"
    p3 = hpull(a, ConvKind.USER, b.user_id, ids[-1], 0)
    assert not p3.messages and p3.has_more == 0, "messages older than the oldest one"
    msgs, flags = walk(a, ConvKind.USER, b.user_id, 7)
    assert [m.msg_id for m in msgs] == ids, "limit 7 paging does not return the conversation"
    assert _flags_ok(flags, 6), f"has_more per limit-7 page {flags}"


@check("history.limit_100")
def limit_100(env: Env) -> None:
    """7 HISTORY_PULL: limit up to 100 is honoured (101 messages: 100 + 1); 20 by default."""
    a, b, ids = _conversation(env, 101)
    p1 = hpull(a, ConvKind.USER, b.user_id, 0, 100)
    assert len(p1.messages) == 100 and p1.has_more == 1, (
        f"limit 100 of 101: {len(p1.messages)} messages, has_more {p1.has_more}"
    )
    p2 = hpull(a, ConvKind.USER, b.user_id, p1.messages[-1].msg_id, 100)
    assert [m.msg_id for m in p2.messages] == ids[100:] and p2.has_more == 0, (
        f"second page: {len(p2.messages)} messages, has_more {p2.has_more} (want the oldest, 0)"
    )
    n = len(hpull(b, ConvKind.USER, a.user_id).messages)
    assert n == 20, f"limit 0 returned {n} messages, want the default 20"


@check("history.both_participants")
def both_participants(env: Env) -> None:
    """11: both participants of a 1:1 conversation read the same history, with exact records."""
    a, b = env.login(), env.login()
    plan = [(a, b, b"from a", 1), (b, a, b"from b", 1), (a, b, b"\x00\x01", 0x8001)]
    sent = [
        (s, r, body, ct, s.send_msg(r.user_id, body, content_type=ct)) for s, r, body, ct in plan
    ]
    wait_history(b, ConvKind.USER, a.user_id, {x[-1].msg_id for x in sent})
    va = hpull(a, ConvKind.USER, b.user_id, 0, 100).messages
    vb = hpull(b, ConvKind.USER, a.user_id, 0, 100).messages
    assert va == vb, "the two participants see different histories"
    by_id = {m.msg_id: m for m in va}
    for sender, receiver, body, ctype, ack in sent:
        m = by_id[ack.msg_id]
        assert_record(m, ack, sender, 1, receiver.user_id, ctype, body, "history record")


@check("history.before_id_bounds")
def before_id_bounds(env: Env) -> None:
    """11: before_id returns only msg_id < before_id; 2^64-1 acts like 'newest'."""
    a, b, ids = _conversation(env, 10)
    mid = ids[4]
    page = hpull(a, ConvKind.USER, b.user_id, mid, 100)
    assert [m.msg_id for m in page.messages] == ids[5:], "before_id not exclusive"
    page = hpull(a, ConvKind.USER, b.user_id, U64_MAX, 100)
    assert [m.msg_id for m in page.messages] == ids, "before_id 2^64-1 misses messages"


@check("history.notes_to_self")
def notes_to_self(env: Env) -> None:
    """11: conv_id = own id is the notes-to-self conversation."""
    a = env.login()
    ack = a.send_msg(a.user_id, b"memo")
    wait_history(a, ConvKind.USER, a.user_id, {ack.msg_id})
    page = hpull(a, ConvKind.USER, a.user_id, 0, 0)
    assert [m.msg_id for m in page.messages] == [ack.msg_id], "notes-to-self history"


@check("history.unknown_peer_empty")
def unknown_peer_empty(env: Env) -> None:
    """11: a 1:1 conversation is never FORBIDDEN: an unused one is an empty page, has_more 0."""
    a = env.login()
    page = hpull(a, ConvKind.USER, new_user(), 0, 0)
    assert not page.messages and page.has_more == 0, (
        f"unused conversation: {len(page.messages)} messages, has_more {page.has_more}"
    )


@check("history.limit_101")
def limit_101(env: Env) -> None:
    """7 HISTORY_PULL: limit above 100 -> INVALID_FIELD (non-fatal)."""
    c = env.login()
    body = bytes([1]) + u64(new_user()) + u64(0) + bytes([101])
    c.expect_error(raw_frame(FrameType.HISTORY_PULL, body, rid=101), ErrorCode.INVALID_FIELD, 101)
    c.ping()


@check("history.group_not_found")
def group_not_found(env: Env) -> None:
    """11: group history of a group that never existed -> NOT_FOUND."""
    env.login().expect_error(HistoryPull(ConvKind.GROUP, huge_id(), 0, 0), ErrorCode.NOT_FOUND)


@check("history.group_non_member_forbidden")
def group_non_member_forbidden(env: Env) -> None:
    """11: group history for a user who never was a member -> FORBIDDEN."""
    owner = env.login()
    gid = owner.call(GroupCreate("hist", ()), GroupCreated).group_id
    env.login().expect_error(HistoryPull(ConvKind.GROUP, gid, 0, 0), ErrorCode.FORBIDDEN)


@check("history.group_former_member_forbidden")
def group_former_member_forbidden(env: Env) -> None:
    """11: a former member (left, or removed by the owner) gets FORBIDDEN."""
    owner, leaver, removed = env.login(), env.login(), env.login()
    gid = owner.call(GroupCreate("hist", (leaver.user_id, removed.user_id)), GroupCreated).group_id
    hpull(leaver, ConvKind.GROUP, gid)  # a member may read
    leaver.call(GroupRemove(gid, (leaver.user_id,)), GroupRemoveOk)
    owner.call(GroupRemove(gid, (removed.user_id,)), GroupRemoveOk)
    for c in (leaver, removed):
        c.expect_error(HistoryPull(ConvKind.GROUP, gid, 0, 0), ErrorCode.FORBIDDEN)


def _event(m: Message) -> dict[str, object]:
    assert m.content_type == 0, f"content_type {m.content_type} where a group event is expected"
    ev: dict[str, object] = json.loads(m.body)
    return ev


@check("history.group_late_joiner")
def group_late_joiner(env: Env) -> None:
    """11: a member reads from the event that added them; after leave+rejoin only the new span."""
    owner, late = env.login(), env.login()
    gid = owner.call(GroupCreate("late", ()), GroupCreated).group_id
    before = owner.send_msg(gid, b"before", kind=ConvKind.GROUP)
    assert owner.call(GroupAdd(gid, (late.user_id,)), GroupAddOk).count == 1
    after = owner.send_msg(gid, b"after", kind=ConvKind.GROUP)
    wait_history(owner, ConvKind.GROUP, gid, {before.msg_id, after.msg_id})
    msgs, _ = walk(late, ConvKind.GROUP, gid, 100)
    ids = [m.msg_id for m in msgs]
    assert before.msg_id not in ids, "a late joiner sees a message from before they joined"
    assert len(msgs) == 2 and msgs[0].msg_id == after.msg_id, (
        f"late joiner sees {len(msgs)} messages, want [after, added-event]"
    )
    ev = _event(msgs[1])
    members = ev.get("members", [])
    assert isinstance(members, Container), ev
    assert ev.get("event") == "added" and str(late.user_id) in members, ev
    # Leave, miss a message, rejoin: only the new membership's messages.
    late.call(GroupRemove(gid, (late.user_id,)), GroupRemoveOk)
    missed = owner.send_msg(gid, b"missed", kind=ConvKind.GROUP)
    owner.call(GroupAdd(gid, (late.user_id,)), GroupAddOk)
    again = owner.send_msg(gid, b"again", kind=ConvKind.GROUP)
    wait_history(owner, ConvKind.GROUP, gid, {missed.msg_id, again.msg_id})
    msgs, _ = walk(late, ConvKind.GROUP, gid, 100)
    ids = [m.msg_id for m in msgs]
    assert ids[:1] == [again.msg_id] and len(ids) == 2, (
        f"after rejoining: {len(ids)} messages visible, want [again, added-event]"
    )
    assert _event(msgs[1]).get("event") == "added"
    assert missed.msg_id not in ids and after.msg_id not in ids, "old membership span visible"


@check("history.page_size_cap")
def page_size_cap(env: Env) -> str:
    """2/7 HISTORY_PAGE: pages of 65535-byte messages stay within 131072 bytes; paging completes."""
    a, b = env.login(), env.login()
    acks = [a.send_msg(b.user_id, os.urandom(MAX_BODY), content_type=0x8001) for _ in range(3)]
    want = {x.msg_id for x in acks}
    wait_history(a, ConvKind.USER, b.user_id, want, timeout=10.0)
    sizes = []
    before = 0
    got: list[int] = []
    for _ in range(10):
        page = hpull(b, ConvKind.USER, a.user_id, before, 100)
        sizes.append(len(page.messages))
        got += [m.msg_id for m in page.messages]
        if not page.has_more:
            break
        assert page.messages, "empty HISTORY_PAGE with has_more=1: no before_id to continue"
        before = page.messages[-1].msg_id
    assert sorted(got, reverse=True) == got and set(got) == want, "large messages lost in paging"
    return f"page sizes {sizes}"
