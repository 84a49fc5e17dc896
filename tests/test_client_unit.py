"""The client library against scripted server frames, in memory (no network, no server).

A `Harness` connects an IMClient through a MemoryReactorClock (so `connect()` runs its real
endpoint path) onto a StringTransport; tests feed server frames built with the codec and decode
what the client wrote.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from twisted.internet.defer import Deferred, TimeoutError
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure

from improto.codec import FrameReader, decode_payload, encode
from improto.enums import CloseReason, ConvKind
from improto.errors import ErrorCode
from improto.frames import (
    Close,
    Error,
    Frame,
    GroupCreate,
    GroupCreated,
    GroupMemberList,
    GroupMembers,
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    Message,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Ping,
    Pong,
    Push,
    PushAck,
    Send,
    SendAck,
    SyncHint,
    UnreadCount,
)
from improto_clients.client import (
    MAX_RETRY_AFTER_S,
    ClientState,
    IMClient,
    NotConnected,
    ServerError,
    SessionClosed,
    StateMismatch,
    conv_key,
    message_conv,
    parse_conv_key,
)

ME = 1001
BOB = 1002
SERVER = "tcp:host=127.0.0.1:port=5555"


def msg(msg_id: int, sender: int = BOB, conv_id: int = ME, kind: int = ConvKind.USER,
        text: str = "hi") -> Message:  # fmt: skip
    return Message(msg_id, 1_700_000_000_000 + msg_id, sender, "phone", kind, conv_id, 1,
                   msg_id.to_bytes(16, "big"), text.encode())  # fmt: skip


def result(d: Deferred[Any]) -> Any:
    """The value a Deferred already fired with (raises its failure)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def failure(d: Deferred[Any]) -> BaseException:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "the Deferred has not fired"
    assert isinstance(out[0], Failure), f"expected a failure, got {out[0]!r}"
    return out[0].value


def pending(d: Deferred[Any]) -> bool:
    out: list[Any] = []
    d.addBoth(lambda r: out.append(r) or r)
    return not out


class Harness:
    def __init__(self, state: ClientState | None = None, **kw: Any) -> None:
        self.reactor = MemoryReactorClock()
        kw.setdefault("push_sync_delay", None)
        kw.setdefault("features", ())  # a version-1 client unless a test asks for features
        self.client = IMClient(SERVER, "tok", "laptop", state=state, reactor=self.reactor, **kw)
        self.messages: list[tuple[str, Message]] = []
        self.closes: list[SessionClosed] = []
        self.errors: list[BaseException] = []
        self.client.on_message = lambda conv, m: self.messages.append((conv, m))
        self.client.on_close = self.closes.append
        self.client.on_error = self.errors.append
        self.wire: Protocol | None = None
        self.transport = StringTransport()

    def open(self) -> Deferred[HelloOk]:
        """connect(): the endpoint dials, the connection is made, HELLO goes out."""
        d = self.client.connect()
        self.accept()
        return d

    def accept(self) -> None:
        """Complete the latest dial (connect()'s or a reconnect's) on a fresh transport."""
        host, port, factory, _, _ = self.reactor.tcpClients[-1]
        assert (host, port) == ("127.0.0.1", 5555)
        self.transport = StringTransport()
        self.wire = factory.buildProtocol(None)
        self.wire.makeConnection(self.transport)

    def login(self, heartbeat_s: int = 0, sync: bool = True, dial: bool = True) -> HelloOk:
        """Log in as ME; dial=False completes a reconnect's dial instead of calling connect()."""
        d = self.open() if dial else None
        if d is None:
            self.accept()
        (hello,) = self.sent()
        assert isinstance(hello, Hello)
        ok = HelloOk(ME, 1, heartbeat_s, 90, 131072, request_id=hello.request_id)
        self.feed(ok)
        if d is not None:
            assert result(d) == ok
        if sync:  # answer the sync loop every login starts
            (pull,) = self.sent()
            assert isinstance(pull, OfflinePull)
            self.feed(OfflinePage(pull.cursor, 0, 0, (), (), request_id=pull.request_id))
            (ack,) = self.sent()
            assert isinstance(ack, OfflineAck)
            self.feed(OfflineAckOk(ack.cursor, request_id=ack.request_id))
        return ok

    def sent(self) -> list[Frame]:
        data = self.transport.value()
        self.transport.clear()
        return [decode_payload(p) for p in FrameReader().feed(data)]

    def feed_bytes(self, data: bytes) -> None:
        assert self.wire is not None
        self.wire.dataReceived(data)

    def feed(self, *frames: Frame) -> None:
        self.feed_bytes(b"".join(encode(f) for f in frames))

    def drop(self) -> None:
        assert self.wire is not None
        self.wire.connectionLost(Failure(ConnectionDone()))


@pytest.fixture
def h() -> Harness:
    return Harness()


# ------------------------------------------------------------------- login and requests


def test_connect_sends_hello_and_starts_the_sync_loop_after_hello_ok(h: Harness) -> None:
    h.client.state.cursor = 9000
    d = h.open()
    (hello,) = h.sent()
    assert isinstance(hello, Hello)
    assert (hello.device_id, hello.token, hello.protocol_version) == ("laptop", "tok", 1)
    assert hello.request_id != 0
    assert pending(d)
    h.feed(HelloOk(ME, 1, 30, 90, 131072, request_id=hello.request_id))
    assert result(d).user_id == ME
    assert h.client.user_id == ME
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull)
    assert pull.cursor == 9000


def test_fatal_error_on_hello_fails_connect_and_closes(h: Harness) -> None:
    d = h.open()
    (hello,) = h.sent()
    h.feed(Error(ErrorCode.AUTH_FAILED, "bad token", request_id=hello.request_id))
    err = failure(d)
    assert isinstance(err, ServerError)
    assert err.code == ErrorCode.AUTH_FAILED and err.name == "AUTH_FAILED" and err.fatal
    assert h.transport.disconnecting
    assert h.client.protocol is None


def test_state_of_another_user_is_refused(h: Harness) -> None:
    h.client.state.user_id = 4242
    d = h.open()
    (hello,) = h.sent()
    h.feed(HelloOk(ME, 1, 0, 90, 131072, request_id=hello.request_id))
    assert isinstance(failure(d), StateMismatch)
    assert h.transport.disconnecting


def test_replies_are_matched_by_request_id_not_by_order(h: Harness) -> None:
    h.login()
    d1 = h.client.history(ConvKind.USER, BOB)
    d2 = h.client.history(ConvKind.GROUP, 7)
    p1, p2 = h.sent()
    assert isinstance(p1, HistoryPull) and isinstance(p2, HistoryPull)
    assert len({p1.request_id, p2.request_id, 0}) == 3  # distinct and never 0
    group_msg = msg(5, conv_id=7, kind=ConvKind.GROUP)
    h.feed(HistoryPage(ConvKind.GROUP, 7, 0, (group_msg,), request_id=p2.request_id))
    assert pending(d1)
    assert result(d2).conv_id == 7
    h.feed(HistoryPage(ConvKind.USER, BOB, 0, (msg(4),), request_id=p1.request_id))
    assert result(d1).messages[0].msg_id == 4


def test_request_id_counter_wraps_to_1_and_skips_ids_in_flight(h: Harness) -> None:
    h.login()
    proto = h.client.protocol
    assert proto is not None
    proto._next_id = 0  # the next id is 1 ...
    h.client.ping()  # ... which stays in flight
    proto._next_id = 0xFFFFFFFE
    for _ in range(3):
        h.client.ping()
    ids = [f.request_id for f in h.sent()]
    assert ids == [1, 0xFFFFFFFF, 2, 3]  # u32 wraps past 0, skipping pending id 1


def test_error_fails_only_the_request_it_answers(h: Harness) -> None:
    h.login()
    d_members = h.client.group_members(7)
    d_create = h.client.create_group("team", [BOB])
    members, create = h.sent()
    assert isinstance(members, GroupMembers) and isinstance(create, GroupCreate)
    h.feed(Error(ErrorCode.FORBIDDEN, "not a member", request_id=members.request_id))
    err = failure(d_members)
    assert isinstance(err, ServerError)
    assert (err.code, err.name, err.text) == (300, "FORBIDDEN", "not a member")
    assert not err.fatal and not h.transport.disconnecting
    assert pending(d_create)
    h.feed(GroupCreated(77, request_id=create.request_id))
    assert result(d_create) == 77


def test_unsolicited_fatal_error_is_reported_and_closes(h: Harness) -> None:
    h.login()
    h.feed(Error(ErrorCode.FRAME_TOO_LARGE, "too big"))
    (err,) = h.errors
    assert isinstance(err, ServerError) and err.code == ErrorCode.FRAME_TOO_LARGE
    assert h.transport.disconnecting
    h.drop()
    assert h.closes[0].reason_name == "FRAME_TOO_LARGE"


def test_unknown_error_code_is_named_by_its_hundred() -> None:
    assert ServerError(599).name == "5xx" and ServerError(599).retriable
    assert ServerError(ErrorCode.UNAVAILABLE).name == "UNAVAILABLE"


def test_unknown_frame_types_are_skipped(h: Harness) -> None:
    h.login()
    d = h.client.group_members(7)
    (req,) = h.sent()
    # An undefined type (0xBF) with a body, a client-to-server type carrying the pending
    # request's id (section 7: ignored like an unknown type), then the real reply, in one read.
    unknown = bytes([0, 0, 0, 11, 1, 0xBF, 0, 0, 0, 0, 0, 1, 2, 3, 4])
    wrong_way = encode(Ping(request_id=req.request_id))
    reply = encode(GroupMemberList(7, ME, "team", (ME, BOB), request_id=req.request_id))
    h.feed_bytes(unknown + wrong_way)
    assert pending(d)
    h.feed_bytes(reply)
    assert result(d).members == (ME, BOB)
    assert not h.transport.disconnecting
    assert h.errors == []


def test_oversize_length_prefix_closes_the_connection(h: Harness) -> None:
    h.login()
    d_ping, d_groups = h.client.ping(), h.client.my_groups()
    p, _ = h.sent()
    # The whole frame before the oversize prefix is still handled.
    h.feed_bytes(encode(Pong(9, request_id=p.request_id)) + (131073).to_bytes(4, "big") + b"\1")
    assert result(d_ping).server_time == 9
    assert h.transport.disconnecting
    h.drop()
    assert isinstance(failure(d_groups), SessionClosed)
    assert "131073" in h.closes[0].text


def test_undecodable_frame_fails_its_request_and_closes(h: Harness) -> None:
    h.login()
    d = h.client.group_members(7)
    (req,) = h.sent()
    good = encode(GroupMemberList(7, ME, "team", (ME,), request_id=req.request_id))
    padded = (int.from_bytes(good[:4], "big") + 1).to_bytes(4, "big") + good[4:] + b"\0"
    h.feed_bytes(padded + encode(Push(msg(77))))
    assert failure(d).code == ErrorCode.MALFORMED_FRAME  # type: ignore[attr-defined]
    assert h.transport.disconnecting
    assert h.sent() == []  # the push after it was not read: no PUSH_ACK


# ------------------------------------------------------------------------------ pushes


def test_push_is_stored_once_and_acked_every_time(h: Harness) -> None:
    h.login()
    m = msg(500, text="hello")
    h.feed(Push(m), Push(m))
    acks = h.sent()
    assert acks == [PushAck(500), PushAck(500)]
    assert h.messages == [("user:1002", m)]
    assert h.client.state.messages("user:1002") == [m]


def test_pushes_do_not_move_the_offline_cursor(h: Harness) -> None:
    h.client.state.cursor = 40
    h.login(sync=False)
    (pull,) = h.sent()
    h.feed(Push(msg(999_999)))
    assert h.client.state.cursor == 40
    h.feed(OfflinePage(41, 0, 0, (), (), request_id=pull.request_id))
    assert h.client.state.cursor == 41  # only pages move it


def test_pushes_schedule_a_follow_up_sync() -> None:
    h = Harness(push_sync_delay=5.0)
    h.login()
    h.feed(Push(msg(1)), Push(msg(2)))
    h.sent()
    h.reactor.advance(4.9)
    assert h.sent() == []
    h.reactor.advance(0.1)
    (pull,) = h.sent()  # one sync for the burst
    assert isinstance(pull, OfflinePull)


# ---------------------------------------------------------------------------- sync loop


def test_sync_loop_follows_page_cursors_until_has_more_is_0_then_acks() -> None:
    h = Harness(state=ClientState(cursor=9000))
    syncs: list[Any] = []
    h.client.on_sync = syncs.append
    h.login(sync=False)
    (pull1,) = h.sent()
    assert pull1.cursor == 9000 and pull1.limit == 200
    page1 = (msg(70_001), msg(70_002, sender=2000, conv_id=7, kind=ConvKind.GROUP))
    unread1 = (UnreadCount(1, BOB, 1), UnreadCount(2, 7, 1))
    h.feed(OfflinePage(9412, 1, 0, page1, unread1, request_id=pull1.request_id))
    h.feed(Push(msg(88_888)))  # a push between pages must not become the cursor
    pull2, ack_push = h.sent()
    assert ack_push == PushAck(88_888)
    assert isinstance(pull2, OfflinePull)
    assert pull2.cursor == 9412  # the page's cursor, not a msg_id
    # A short (even empty) page with has_more=1 still loops.
    h.feed(OfflinePage(9413, 1, 0, (), (), request_id=pull2.request_id))
    (pull3,) = h.sent()
    assert pull3.cursor == 9413
    h.feed(OfflinePage(9449, 0, 1, (msg(70_003),), (UnreadCount(1, BOB, 1),),
                       request_id=pull3.request_id))  # fmt: skip
    (ack,) = h.sent()
    assert isinstance(ack, OfflineAck) and ack.cursor == 9449
    assert syncs == []  # not finished before OFFLINE_ACK_OK
    h.feed(OfflineAckOk(9449, request_id=ack.request_id))
    (res,) = syncs
    assert [m.msg_id for m in res.messages] == [70_001, 70_002, 70_003]
    assert res.unread == {"user:1002": 2, "group:7": 1}
    assert (res.pages, res.gap, res.cursor) == (3, True, 9449)
    assert h.client.state.cursor == 9449


def test_sync_skips_messages_already_held(h: Harness) -> None:
    h.login()
    h.feed(Push(msg(10)))
    h.sent()
    d = h.client.sync()
    (pull,) = h.sent()
    h.feed(OfflinePage(3, 0, 0, (msg(10), msg(11)), (), request_id=pull.request_id))
    (ack,) = h.sent()
    h.feed(OfflineAckOk(3, request_id=ack.request_id))
    assert [m.msg_id for m in result(d).messages] == [11]
    assert [m.msg_id for m in h.client.state.messages("user:1002")] == [10, 11]


def test_sync_hint_runs_the_loop_and_one_more_if_it_arrives_mid_loop(h: Harness) -> None:
    h.login()
    h.feed(SyncHint())
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull)
    h.feed(SyncHint(), SyncHint())  # during the loop: queue exactly one more run
    assert h.sent() == []  # one loop at a time
    h.feed(OfflinePage(5, 0, 0, (), (), request_id=pull.request_id))
    (ack,) = h.sent()
    h.feed(OfflineAckOk(5, request_id=ack.request_id))
    (pull2,) = h.sent()
    assert isinstance(pull2, OfflinePull) and pull2.cursor == 5
    h.feed(OfflinePage(5, 0, 0, (), (), request_id=pull2.request_id))
    (ack2,) = h.sent()
    h.feed(OfflineAckOk(5, request_id=ack2.request_id))
    assert h.sent() == []


def test_cursor_does_not_advance_when_the_page_cannot_be_saved(tmp_path: Path) -> None:
    h = Harness(state=ClientState(path=str(tmp_path / "s.json"), cursor=100))
    h.login(sync=False)
    (pull,) = h.sent()
    h.client.state.path = str(tmp_path / "missing-dir" / "s.json")  # save() now fails
    h.feed(OfflinePage(200, 1, 0, (msg(1),), (), request_id=pull.request_id))
    assert h.client.state.cursor == 100
    assert h.sent() == []  # neither the next pull nor an OFFLINE_ACK of an unsaved cursor
    assert len(h.errors) == 1 and isinstance(h.errors[0], OSError)


# ---------------------------------------------------------------------------------- send


def test_send_retry_after_timeout_reuses_the_client_msg_id(h: Harness) -> None:
    h.login()
    cmid = uuid.uuid4().bytes
    d = h.client.send_text(ConvKind.USER, BOB, "hello", client_msg_id=cmid, timeout=10)
    (s1,) = h.sent()
    assert isinstance(s1, Send) and s1.client_msg_id == cmid and s1.body == b"hello"
    assert cmid in h.client.state.outbox
    h.reactor.advance(10)
    (s2,) = h.sent()
    assert isinstance(s2, Send)
    assert s2.client_msg_id == cmid and s2.request_id != s1.request_id
    h.feed(SendAck(cmid, 900, 1234, 1, request_id=s2.request_id))
    ack = result(d)
    assert (ack.msg_id, ack.duplicate) == (900, 1)
    assert h.client.state.outbox == {}
    (mine,) = h.client.state.messages("user:1002")  # one's own message, keyed by the peer
    assert (mine.msg_id, mine.sender_id, mine.body) == (900, ME, b"hello")


def test_send_gives_up_after_retries_but_keeps_the_message_for_the_next_login(
    h: Harness,
) -> None:
    h.login()
    d = h.client.send_text(ConvKind.USER, BOB, "later", timeout=5, retries=2)
    for _ in range(3):
        (s,) = h.sent()
        h.reactor.advance(5)
    assert isinstance(failure(d), TimeoutError)
    assert list(h.client.state.outbox) == [s.client_msg_id]
    h.drop()
    h.login()  # sync first, then the outbox goes out with the same client_msg_id
    (resent,) = h.sent()
    assert isinstance(resent, Send) and resent.client_msg_id == s.client_msg_id
    h.feed(SendAck(s.client_msg_id, 901, 1, 0, request_id=resent.request_id))
    assert h.client.state.outbox == {}


def test_a_late_send_ack_still_empties_the_outbox(h: Harness) -> None:
    h.login()
    d = h.client.send_text(ConvKind.USER, BOB, "x", timeout=5, retries=0)
    (s,) = h.sent()
    h.reactor.advance(5)
    failure(d)
    h.feed(SendAck(s.client_msg_id, 902, 1, 0, request_id=s.request_id))
    assert h.client.state.outbox == {}
    assert h.client.state.has(902)


def test_refused_send_leaves_the_outbox_and_5xx_is_retried(h: Harness) -> None:
    h.login()
    d = h.client.send_text(ConvKind.GROUP, 7, "x")
    (s,) = h.sent()
    h.feed(Error(ErrorCode.FORBIDDEN, request_id=s.request_id))
    assert failure(d).code == ErrorCode.FORBIDDEN  # type: ignore[attr-defined]
    assert h.client.state.outbox == {}

    d = h.client.send_text(ConvKind.USER, BOB, "y")
    (s,) = h.sent()
    h.feed(Error(ErrorCode.UNAVAILABLE, request_id=s.request_id))
    assert pending(d)
    h.reactor.advance(1)
    (again,) = h.sent()
    assert again.client_msg_id == s.client_msg_id
    h.feed(SendAck(s.client_msg_id, 903, 1, 0, request_id=again.request_id))
    assert result(d).msg_id == 903


def _refuse(h: Harness, code: int, text: str, frame: Send | None = None) -> Send:
    """Answer the SEND just written (or `frame`) with ERROR `code` and `text`."""
    if frame is None:
        (frame,) = h.sent()
    assert isinstance(frame, Send)
    h.feed(Error(code, text, request_id=frame.request_id))
    return frame


def _resent_after(h: Harness, seconds: float) -> Send:
    """Nothing goes out until `seconds` have passed; then the SEND again (steps of 1/8 s add
    up exactly in floats)."""
    h.reactor.advance(seconds - 0.125)
    assert h.sent() == [], f"resent before {seconds} s"
    h.reactor.advance(0.125)
    (again,) = h.sent()
    assert isinstance(again, Send)
    return again


def test_a_rate_limited_send_waits_its_retry_after_else_the_backoff(h: Harness) -> None:
    h.login()
    d = h.client.send_text(ConvKind.USER, BOB, "y")
    s = _refuse(h, ErrorCode.RATE_LIMITED, "retry_after_ms=2500 too many sends")
    again = _resent_after(h, 2.5)  # the announced wait, not the first backoff's 1 s
    assert again.client_msg_id == s.client_msg_id
    _refuse(h, ErrorCode.RATE_LIMITED, "retry_after_ms=250", again)  # N alone is well formed
    again = _resent_after(h, 0.25)
    _refuse(h, ErrorCode.RATE_LIMITED, "too many sends", again)  # none: the backoff, 1, 2, 4 s
    again = _resent_after(h, 4)
    h.feed(SendAck(s.client_msg_id, 904, 1, 0, request_id=again.request_id))
    assert result(d).msg_id == 904
    assert h.client.state.outbox == {}


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (ErrorCode.RATE_LIMITED, ""),
        (ErrorCode.RATE_LIMITED, "retry_after_ms=0 too many"),  # N >= 1
        (ErrorCode.RATE_LIMITED, "retry_after_ms=2500x"),  # a space or nothing after N
        (ErrorCode.RATE_LIMITED, "retry_after_ms=2.5 too many"),  # a decimal integer
        (ErrorCode.RATE_LIMITED, "retry_after_ms=-5"),
        (ErrorCode.RATE_LIMITED, "retry_after_ms= 2500"),
        (ErrorCode.RATE_LIMITED, " retry_after_ms=2500"),  # the text starts with it
        (ErrorCode.RATE_LIMITED, "too many: retry_after_ms=2500"),
        (ErrorCode.RATE_LIMITED, "retry_after_ms=\u0662\u0665\u0660\u0660"),  # ASCII digits only
        (ErrorCode.UNAVAILABLE, "retry_after_ms=2500"),  # only RATE_LIMITED announces a wait
    ],
)
def test_a_missing_or_malformed_retry_after_falls_back_to_the_backoff(code: int, text: str) -> None:
    h = Harness()
    h.login()
    d = h.client.send_text(ConvKind.USER, BOB, "y")
    s = _refuse(h, code, text)
    again = _resent_after(h, 1)
    h.feed(SendAck(s.client_msg_id, 905, 1, 0, request_id=again.request_id))
    assert result(d).msg_id == 905


def test_a_retry_after_past_the_cap_waits_the_cap(h: Harness) -> None:
    h.login()
    d = h.client.send_text(ConvKind.USER, BOB, "y")
    s = _refuse(h, ErrorCode.RATE_LIMITED, f"retry_after_ms={10**300} bogus")
    again = _resent_after(h, MAX_RETRY_AFTER_S)
    h.feed(SendAck(s.client_msg_id, 906, 1, 0, request_id=again.request_id))
    assert result(d).msg_id == 906


def test_a_send_still_rate_limited_after_its_retries_fails_but_stays_in_the_outbox(
    h: Harness,
) -> None:
    h.login()
    d = h.client.send_text(ConvKind.USER, BOB, "y", retries=1)
    s = _refuse(h, ErrorCode.RATE_LIMITED, "retry_after_ms=1500 too many sends")
    _refuse(h, ErrorCode.RATE_LIMITED, "retry_after_ms=1500 too many sends", _resent_after(h, 1.5))
    err = failure(d)
    assert isinstance(err, ServerError) and err.retry_after_ms == 1500
    assert list(h.client.state.outbox) == [s.client_msg_id]  # it had no effect: resent later


def test_login_resends_only_what_was_unacked_at_hello_ok(h: Harness) -> None:
    old = Send(b"o" * 16, ConvKind.USER, BOB, 1, b"from last session")
    h.client.state.outbox[old.client_msg_id] = old
    h.login(sync=False)
    (pull,) = h.sent()
    d = h.client.send_text(ConvKind.USER, BOB, "typed during the sync")
    (new,) = h.sent()
    h.feed(OfflinePage(1, 0, 0, (), (), request_id=pull.request_id))
    (ack,) = h.sent()
    h.feed(OfflineAckOk(1, request_id=ack.request_id))
    # After the sync loop: the old message only; the new one is in flight on its own.
    (resent,) = h.sent()
    assert isinstance(resent, Send) and resent.client_msg_id == old.client_msg_id
    h.feed(SendAck(old.client_msg_id, 903, 1, 0, request_id=resent.request_id))
    assert h.sent() == []  # the in-flight one is not sent twice
    h.feed(SendAck(new.client_msg_id, 904, 1, 0, request_id=new.request_id))
    assert result(d).msg_id == 904
    assert h.client.state.outbox == {}


def test_send_without_connection_keeps_the_message(h: Harness) -> None:
    d = h.client.send_text(ConvKind.USER, BOB, "offline")
    assert isinstance(failure(d), NotConnected)
    assert len(h.client.state.outbox) == 1


# ----------------------------------------------------------------------- history paging


def test_history_all_pages_back_with_the_last_msg_id(h: Harness) -> None:
    h.login()
    d = h.client.history_all(ConvKind.USER, BOB)
    (p1,) = h.sent()
    assert (p1.before_id, p1.limit) == (0, 0)
    h.feed(HistoryPage(1, BOB, 1, (msg(30), msg(20)), request_id=p1.request_id))
    (p2,) = h.sent()
    assert p2.before_id == 20
    h.feed(HistoryPage(1, BOB, 0, (msg(10),), request_id=p2.request_id))
    assert [m.msg_id for m in result(d)] == [30, 20, 10]
    assert h.sent() == []


# ---------------------------------------------------------------- heartbeat and closing


def test_ping_after_heartbeat_s_of_silence_and_drop_when_the_server_is_mute(h: Harness) -> None:
    h.login(heartbeat_s=30)  # the login sync wrote its last frame at t=0
    h.reactor.advance(20)
    h.client.ping()  # something sent at t=20 postpones the heartbeat to t=50
    (p,) = h.sent()
    h.feed(Pong(5, request_id=p.request_id))
    h.reactor.advance(29.9)
    assert h.sent() == []
    h.reactor.advance(0.1)
    (hb,) = h.sent()
    assert isinstance(hb, Ping) and hb.request_id != 0
    h.feed(Pong(6, request_id=hb.request_id))  # alive: no drop
    h.reactor.advance(30)
    (hb2,) = h.sent()
    assert isinstance(hb2, Ping)
    assert not h.transport.disconnecting
    h.reactor.advance(60)  # nothing at all from the server for 2 x heartbeat_s
    assert h.transport.disconnecting


def test_close_frame_reason_reaches_on_close_and_pending_requests(h: Harness) -> None:
    h.login()
    d = h.client.ping()
    h.feed(Close(CloseReason.REPLACED, "another login"))
    h.drop()
    err = failure(d)
    assert isinstance(err, SessionClosed) and err.reason == CloseReason.REPLACED
    (closed,) = h.closes
    assert (closed.reason_name, closed.text) == ("REPLACED", "another login")
    assert not h.client.connected


def test_reconnect_with_backoff_but_not_after_replaced() -> None:
    h = Harness(reconnect=True)
    h.login()
    h.feed(Close(CloseReason.SHUTDOWN))
    h.drop()
    assert len(h.reactor.tcpClients) == 1
    h.reactor.advance(1.0)  # first delay is at most 1 s
    assert len(h.reactor.tcpClients) == 2
    h.login(dial=False)
    assert h.client.connected
    h.feed(Close(CloseReason.REPLACED))
    h.drop()
    h.reactor.advance(120)
    assert len(h.reactor.tcpClients) == 2


# --------------------------------------------------------------------------- the state


def test_conversation_key_follows_section_6() -> None:
    assert message_conv(ME, msg(1, sender=BOB, conv_id=ME)) == "user:1002"  # received
    assert message_conv(ME, msg(2, sender=ME, conv_id=BOB)) == "user:1002"  # sent
    assert message_conv(ME, msg(3, sender=ME, conv_id=ME)) == "user:1001"  # notes to self
    assert message_conv(ME, msg(4, sender=BOB, conv_id=7, kind=ConvKind.GROUP)) == "group:7"
    assert parse_conv_key(conv_key(ConvKind.GROUP, 2**64 - 1)) == (ConvKind.GROUP, 2**64 - 1)


def test_state_save_load_round_trip(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    st = ClientState.load(path)  # missing file: a fresh install
    assert st.cursor == 0
    st.bind(ME)
    st.add(msg(2**64 - 1, sender=BOB))
    st.add(msg(5, sender=BOB))
    st.outbox[b"k" * 16] = Send(b"k" * 16, ConvKind.GROUP, 7, 1, b"pending")
    st.store_page([msg(6, sender=ME, conv_id=BOB)], 2**63 + 5)

    loaded = ClientState.load(path)
    assert loaded.user_id == ME
    assert loaded.cursor == 2**63 + 5
    assert [m.msg_id for m in loaded.messages("user:1002")] == [5, 6, 2**64 - 1]
    assert loaded.has(2**64 - 1) and not loaded.add(msg(5))  # dedup survives a restart
    assert loaded.outbox == st.outbox
    doc = json.loads(Path(path).read_text())
    assert doc["cursor"] == str(2**63 + 5)  # u64 as a decimal string


def test_store_page_saves_the_cursor_with_its_messages_or_not_at_all(tmp_path: Path) -> None:
    path = str(tmp_path / "state.json")
    st = ClientState(path=path, user_id=ME, cursor=10)
    st.store_page([msg(1)], 20)
    assert ClientState.load(path).cursor == 20
    assert ClientState.load(path).has(1)

    def broken_save() -> None:
        raise OSError("disk full")

    st.save = broken_save  # type: ignore[method-assign]
    with pytest.raises(OSError):
        st.store_page([msg(2)], 30)
    assert st.cursor == 20  # not ahead of what is stored
    on_disk = ClientState.load(path)
    assert (on_disk.cursor, on_disk.has(2)) == (20, False)
