"""Sending, real-time push, dedup and flow control: spec sections 6, 7 (SEND, PUSH) and 9."""

from __future__ import annotations

import itertools
import os
import time

from improto.codec import encode
from improto.conformance.conn import (
    Conn,
    Env,
    describe,
    eventually,
    new_device,
    new_user,
    sync,
)
from improto.conformance.runner import check
from improto.enums import ContentType, ConvKind
from improto.frames import HistoryPage, HistoryPull, Message, PushAck, Send, SendAck, SyncHint
from improto.limits import MAX_BODY

QUIET = 0.5  # seconds to wait before concluding that no (further) push is coming


def assert_record(
    m: Message,
    ack: SendAck,
    sender: Conn,
    conv_kind: int,
    conv_id: int,
    content_type: int,
    body: bytes,
    where: str,
) -> None:
    """The MESSAGE record equals what was sent and acknowledged (spec 6)."""
    want = Message(
        ack.msg_id,
        ack.server_time,
        sender.user_id,
        sender.device_id,
        conv_kind,
        conv_id,
        content_type,
        ack.client_msg_id,
        body,
    )
    if m != want:
        diffs = [
            f"{name}={getattr(m, name)!r:.60} (want {getattr(want, name)!r:.60})"
            for name in Message.__dataclass_fields__
            if getattr(m, name) != getattr(want, name)
        ]
        raise AssertionError(f"{where}: record differs: {', '.join(diffs)}")


def assert_no_push(conns: list[Conn], msg_id: int, seconds: float = QUIET) -> None:
    """No (further) PUSH of `msg_id` arrives on any of `conns`."""
    deadline = time.monotonic() + seconds
    for c in conns:
        c.drain(max(0.0, deadline - time.monotonic()))
        extra = c.queued_pushes(msg_id)
        assert not extra, f"{c.label} got {len(extra)} unexpected PUSH(es) of msg_id {msg_id}"


def history(c: Conn, kind: int, conv: int, limit: int = 100) -> HistoryPage:
    return c.call(HistoryPull(kind, conv, 0, limit), HistoryPage)


@check("send.ack_fields")
def ack_fields(env: Env) -> None:
    """7 SEND_ACK: echoes client_msg_id and request_id, duplicate=0, msg_id is an id, sane time."""
    a = env.login()
    cmid = os.urandom(16)
    before = int(time.time() * 1000)
    rid = a.send(Send(cmid, ConvKind.USER, new_user(), ContentType.TEXT, b"hello"))
    ack = a.reply(rid, "SEND_ACK")
    assert isinstance(ack, SendAck), f"SEND answered by {describe(ack)}"
    assert ack.client_msg_id == cmid, "SEND_ACK client_msg_id is not the SEND's"
    assert ack.duplicate == 0, "first SEND of a client_msg_id acknowledged with duplicate=1"
    assert ack.msg_id >= 1, "msg_id 0"
    skew = abs(ack.server_time - before)
    assert skew < 300_000, f"server_time {ack.server_time} is {skew} ms away from the local clock"


@check("send.push_to_receiver_devices")
def push_to_receiver_devices(env: Env) -> None:
    """9.2/6: each online device of the receiver gets exactly one PUSH with the exact record."""
    a = env.login()
    bob = new_user()
    b1, b2 = env.login(bob), env.login(bob)
    body = "héllo wörld ✓".encode()
    ack = a.send_msg(bob, body)
    for b in (b1, b2):
        m = b.push_for(ack.msg_id)
        assert_record(m, ack, a, ConvKind.USER, bob, ContentType.TEXT, body, f"PUSH on {b.label}")
    assert_no_push([b1, b2], ack.msg_id)


@check("send.push_to_sender_other_devices")
def push_to_sender_other_devices(env: Env) -> None:
    """9.2: the sender's other devices get the PUSH; the sending connection only the SEND_ACK."""
    alice = new_user()
    a1, a2, a3 = env.login(alice), env.login(alice), env.login(alice)
    bob = new_user()
    ack = a1.send_msg(bob, b"to bob")
    for other in (a2, a3):
        m = other.push_for(ack.msg_id)
        assert_record(m, ack, a1, ConvKind.USER, bob, 1, b"to bob", f"PUSH on {other.label}")
    assert_no_push([a1, a2, a3], ack.msg_id)


@check("send.duplicate_resend")
def duplicate_resend(env: Env) -> None:
    """9.1(4): resend with the same client_msg_id -> duplicate=1, original id/time, no new push."""
    alice, bob = new_user(), new_user()
    a1, a2 = env.login(alice), env.login(alice)
    b1 = env.login(bob)
    cmid = os.urandom(16)
    first = a1.send_msg(bob, b"original", cmid=cmid)
    b1.push_for(first.msg_id)
    a2.push_for(first.msg_id)
    again = a1.send_msg(bob, b"changed body", cmid=cmid)
    assert again.duplicate == 1, "resend of an accepted client_msg_id acknowledged with duplicate=0"
    assert (again.msg_id, again.server_time) == (first.msg_id, first.server_time), (
        f"resend got msg_id/server_time {again.msg_id}/{again.server_time}, "
        f"original {first.msg_id}/{first.server_time}"
    )
    assert_no_push([a1, a2, b1], first.msg_id)
    others = [m for c in (a1, a2, b1) for m in c.queued_pushes() if m.client_msg_id == cmid]
    assert not others, f"the resend was pushed as a new message (msg_id {others[0].msg_id})"

    def one_in_history() -> None:
        page = history(b1, ConvKind.USER, alice)
        same = [m for m in page.messages if m.client_msg_id == cmid]
        assert len(same) == 1, f"history holds {len(same)} messages with the client_msg_id"
        assert same[0].body == b"original", f"history body {same[0].body!r}: first version wins"

    eventually(one_in_history)
    fresh = env.login(bob)

    def one_in_inbox() -> None:  # the two stores are written independently (spec 11)
        inbox = [m for m in sync(fresh).messages if m.client_msg_id == cmid]
        assert len(inbox) == 1, f"receiver's inbox holds the message {len(inbox)} times (9.1(4))"

    eventually(one_in_inbox)


@check("send.duplicate_other_connection")
def duplicate_other_connection(env: Env) -> None:
    """9.1(4): dedup is per (sender user, client_msg_id): resend on a new connection or device."""
    alice, bob = new_user(), new_user()
    dev = new_device()
    a = env.login(alice, dev)
    cmid = os.urandom(16)
    first = a.send_msg(bob, b"x", cmid=cmid)
    a.close()
    again = env.login(alice, dev).send_msg(bob, b"x", cmid=cmid)  # reconnect, same device
    other = env.login(alice).send_msg(bob, b"x", cmid=cmid)  # another device of the sender
    for what, ack in (("after a reconnect", again), ("from another device", other)):
        assert ack.duplicate == 1 and ack.msg_id == first.msg_id, (
            f"resend {what}: duplicate={ack.duplicate} msg_id={ack.msg_id}, "
            f"want duplicate=1 msg_id={first.msg_id}"
        )
        assert ack.server_time == first.server_time, f"resend {what}: server_time changed"


@check("send.dedup_scoped_to_sender")
def dedup_scoped_to_sender(env: Env) -> None:
    """9.1(4): another user's SEND with the same client_msg_id is a new message (duplicate=0)."""
    bob = new_user()
    cmid = os.urandom(16)
    first = env.login().send_msg(bob, b"one", cmid=cmid)
    second = env.login().send_msg(bob, b"two", cmid=cmid)
    assert second.duplicate == 0, "another sender's client_msg_id was treated as a duplicate"
    assert second.msg_id != first.msg_id, "two senders' messages got the same msg_id"


@check("send.to_self")
def to_self(env: Env) -> None:
    """9.1(2)/6: a note to self reaches my other devices (sender == conv_id), one inbox entry."""
    me = new_user()
    a1, a2 = env.login(me), env.login(me)
    ack = a1.send_msg(me, b"note to self")
    m = a2.push_for(ack.msg_id)
    assert_record(m, ack, a1, ConvKind.USER, me, 1, b"note to self", "PUSH on the other device")
    assert_no_push([a1, a2], ack.msg_id)
    fresh = env.login(me)

    def once_in_inbox() -> None:
        r = sync(fresh)
        hits = [x for x in r.messages if x.msg_id == ack.msg_id]
        assert len(hits) == 1, f"inbox holds the note to self {len(hits)} times (10.1: once)"
        assert not any(u.count for p in r.pages for u in p.unread), (
            f"unread counts own message: {[p.unread for p in r.pages]}"
        )

    eventually(once_in_inbox)


@check("send.opaque_content_types")
def opaque_content_types(env: Env) -> None:
    """6/14: content types 2..65535 are opaque: binary bodies are delivered byte-exact."""
    a, b = env.login(), env.login()
    for ctype in (2, 0x8001, 0xFFFF):
        body = os.urandom(300) + b"\xff\xfe\xc0\xaf\x00"  # not UTF-8
        ack = a.send_msg(b.user_id, body, content_type=ctype)
        m = b.push_for(ack.msg_id)
        assert_record(m, ack, a, ConvKind.USER, b.user_id, ctype, body, f"type {ctype:#06x}")


@check("send.empty_body")
def empty_body(env: Env) -> None:
    """7 SEND/16: a body of 0 bytes is accepted and delivered empty (text and opaque)."""
    a, b = env.login(), env.login()
    for ctype in (ContentType.TEXT, 0x8001):
        ack = a.send_msg(b.user_id, b"", content_type=ctype)
        m = b.push_for(ack.msg_id)
        assert_record(m, ack, a, ConvKind.USER, b.user_id, ctype, b"", f"empty type {ctype}")


@check("send.max_body")
def max_body(env: Env) -> None:
    """7 SEND/16: a 65535-byte body (text and opaque) is accepted and delivered intact."""
    a, b = env.login(), env.login()
    for ctype, body in (
        (ContentType.TEXT, "é".encode() * 32767 + b"x"),
        (0x8001, os.urandom(MAX_BODY)),
    ):
        assert len(body) == MAX_BODY
        ack = a.send_msg(b.user_id, body, content_type=ctype)
        m = b.push_for(ack.msg_id)
        assert_record(m, ack, a, ConvKind.USER, b.user_id, ctype, body, f"65535 bytes type {ctype}")


@check("send.msg_ids_increase")
def msg_ids_increase(env: Env) -> None:
    """5: msg_ids of sequential SENDs on one connection strictly increase."""
    a = env.login()
    peer = new_user()
    ids = [a.send_msg(peer, b"%d" % i).msg_id for i in range(30)]
    bad = [(x, y) for x, y in itertools.pairwise(ids) if y <= x]
    assert not bad, f"msg_id did not increase: {bad[0][0]} then {bad[0][1]}"


@check("send.pipelined")
def pipelined(env: Env) -> None:
    """3/9.1(5): 100 SENDs in flight are each acknowledged (matched by request_id, cmid)."""
    a = env.login()
    peer = new_user()
    sent: dict[int, bytes] = {}
    data = b""
    for i in range(100):
        cmid = os.urandom(16)
        rid = a.next_rid()
        sent[rid] = cmid
        data += encode(Send(cmid, ConvKind.USER, peer, 1, b"p%d" % i, request_id=rid))
    a.send_raw(data)
    ids = set()
    for rid, cmid in sent.items():
        ack = a.reply(rid, "SEND_ACK")
        assert isinstance(ack, SendAck), f"pipelined SEND answered by {describe(ack)}"
        assert ack.client_msg_id == cmid, f"SEND_ACK for request_id {rid} has another client_msg_id"
        assert ack.duplicate == 0, f"request_id {rid}: first SEND acknowledged as duplicate"
        ids.add(ack.msg_id)
    assert len(ids) == 100, f"100 messages got {len(ids)} distinct msg_ids"


@check("send.push_flow_control")
def push_flow_control(env: Env) -> str:
    """9.3: at most 1000 unacknowledged pushes per connection; after PUSH_ACKs one SYNC_HINT."""
    total = 1010
    a = env.login()
    b = env.login()
    data = b"".join(
        encode(Send(os.urandom(16), ConvKind.USER, b.user_id, 1, b"w%d" % i, request_id=i + 1))
        for i in range(total)
    )
    a.send_raw(data)
    for i in range(total):
        ack = a.reply(i + 1, "SEND_ACK", timeout=20.0)
        assert isinstance(ack, SendAck), f"SEND {i} answered by {describe(ack)}"
    # Collect whatever the server pushes without acknowledging anything.
    last = -1
    while len(b.queued_pushes()) != last:
        last = len(b.queued_pushes())
        b.drain(QUIET)
    pushed = b.queued_pushes()
    assert len(pushed) <= 1000, f"{len(pushed)} pushes without any PUSH_ACK (window is 1000)"
    assert len(pushed) < total, f"all {total} pushed while none was acknowledged"
    hints_before = sum(isinstance(f, SyncHint) for f in b.queue)
    assert hints_before == 0, "SYNC_HINT before the client acknowledged anything (9.3)"
    b.send_raw(b"".join(encode(PushAck(m.msg_id)) for m in pushed))
    hint = b.wait_for(lambda f: isinstance(f, SyncHint), what="SYNC_HINT after PUSH_ACKs")
    assert hint.request_id == 0, f"SYNC_HINT carries request_id {hint.request_id}, not 0 (3)"
    b.drain(QUIET)
    hints = sum(isinstance(f, SyncHint) for f in b.queue)
    assert hints == 0, f"{hints + 1} SYNC_HINTs after one round of PUSH_ACKs (9.3: one)"

    def all_in_inbox() -> None:
        got = len(sync(b).messages)
        assert got == total, f"sync after SYNC_HINT returned {got} of {total} messages"

    eventually(all_in_inbox, timeout=10.0)
    return f"{len(pushed)} of {total} pushed before the window closed"
