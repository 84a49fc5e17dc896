"""Session state machine over in-memory transports and a fake clock (no storage involved)."""

from __future__ import annotations

import struct
from typing import Any

import pytest

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from improto.codec import encode
from improto.enums import CloseReason, ConvKind, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    Close,
    Error,
    Hello,
    HelloOk,
    Message,
    Ping,
    Pong,
    Push,
    PushAck,
    Send,
    SyncHint,
)
from improto.limits import MAX_FRAME_LENGTH, U64_MAX
from improto.tokens import mint
from improto_server.config import Config
from improto_server.hub import Hub
from improto_server.session import Session, SessionFactory
from tests.support.sessions import NOW, Peer, fake_clock, logged_in, session_factory

SECRET = "session-test-secret-0123456789abcdef"


@pytest.fixture
def clock() -> Clock:
    return fake_clock()


@pytest.fixture
def factory(clock: Clock) -> SessionFactory:
    config = Config(idle_timeout=60, heartbeat=20, max_unacked_pushes=2)
    # These tests never reach the service: requests that need storage are not sent.
    return session_factory(config, clock, SECRET)


def test_hello_ok_and_registration(factory: SessionFactory) -> None:
    peer = Peer(factory)
    ok = peer.login(user=7)
    assert (ok.user_id, ok.heartbeat_s, ok.idle_timeout_s, ok.max_frame) == (
        7, 20, 60, MAX_FRAME_LENGTH,
    )  # fmt: skip
    assert ok.server_time == int(NOW * 1000)
    assert factory.hub.devices(7) == [peer.session]


@pytest.mark.parametrize(
    ("token_args", "code"),
    [
        (("wrong-secret-wrong-secret-wrong-secret", 7, "phone", 3600), ErrorCode.AUTH_FAILED),
        ((SECRET, 7, "other-device", 3600), ErrorCode.AUTH_FAILED),
        ((SECRET, 7, "phone", -1), ErrorCode.TOKEN_EXPIRED),
    ],
)
def test_bad_token_is_fatal(factory: SessionFactory, token_args: tuple, code: ErrorCode) -> None:
    peer = Peer(factory)
    secret, user, device, ttl = token_args
    peer.send(Hello(1, 1, "phone", mint(secret, user, device, ttl_s=ttl, now=NOW), request_id=9))
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == code and err.request_id == 9
    assert peer.closed
    assert factory.hub.devices(7) == []


def test_garbage_token_is_auth_failed(factory: SessionFactory) -> None:
    peer = Peer(factory)
    peer.send(Hello(1, 1, "phone", "not-a-jwt", request_id=3))
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.AUTH_FAILED and peer.closed


def test_only_hello_and_ping_before_login(factory: SessionFactory) -> None:
    peer = Peer(factory)
    peer.send(Ping(request_id=4))
    peer.send(Send(b"k" * 16, ConvKind.USER, 8, 1, b"hi", request_id=5))
    pong, err = peer.frames()
    assert isinstance(pong, Pong) and pong.request_id == 4
    assert isinstance(err, Error) and err.code == ErrorCode.NOT_AUTHENTICATED
    assert err.request_id == 5 and not peer.closed


def test_second_hello_is_refused(factory: SessionFactory) -> None:
    peer = logged_in(factory)
    peer.send(Hello(1, 1, "phone", mint(SECRET, 7, "phone", now=NOW), request_id=2))
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.ALREADY_AUTHENTICATED
    assert not peer.closed


def test_unknown_and_server_types_keep_the_connection(factory: SessionFactory) -> None:
    peer = logged_in(factory)
    peer.send(struct.pack(">IBBBI", 7, 1, 0x7E, 0, 11))
    peer.send(encode(SyncHint(request_id=12)))
    peer.send(Ping(request_id=13))
    e1, e2, pong = peer.frames()
    assert isinstance(e1, Error) and (e1.code, e1.request_id) == (ErrorCode.UNKNOWN_FRAME_TYPE, 11)
    assert isinstance(e2, Error) and (e2.code, e2.request_id) == (ErrorCode.UNKNOWN_FRAME_TYPE, 12)
    assert isinstance(pong, Pong) and not peer.closed


def test_malformed_body_is_not_fatal(factory: SessionFactory) -> None:
    peer = Peer(factory)
    peer.send(encode(Ping(request_id=1)) + struct.pack(">IBBBIB", 8, 1, 2, 0, 21, 0))
    first, err = peer.frames()
    assert isinstance(first, Pong)
    assert isinstance(err, Error) and (err.code, err.request_id) == (ErrorCode.MALFORMED_FRAME, 21)
    assert not peer.closed


def test_oversize_prefix_closes_before_the_body(factory: SessionFactory) -> None:
    peer = Peer(factory)
    # A whole PING, then only the 4-byte prefix of an oversize frame: the PING is answered,
    # then the error comes without waiting for any body byte.
    peer.send(encode(Ping(request_id=1)) + struct.pack(">I", MAX_FRAME_LENGTH + 1))
    pong, err = peer.frames()
    assert isinstance(pong, Pong)
    assert isinstance(err, Error) and err.code == ErrorCode.FRAME_TOO_LARGE
    assert peer.closed


def test_unsupported_version_is_fatal(factory: SessionFactory) -> None:
    peer = Peer(factory)
    peer.send(struct.pack(">IBBBI", 7, 2, FrameType.PING, 0, 5))
    (err,) = peer.frames()
    assert isinstance(err, Error) and (err.code, err.request_id) == (
        ErrorCode.UNSUPPORTED_VERSION, 5,
    )  # fmt: skip
    assert peer.closed


def test_frames_split_byte_by_byte(factory: SessionFactory) -> None:
    peer = Peer(factory)
    for byte in encode(Ping(request_id=77)) * 2:
        peer.send(bytes([byte]))
    assert [f.request_id for f in peer.frames()] == [77, 77]


def test_idle_timeout_and_activity(factory: SessionFactory, clock: Clock) -> None:
    peer = logged_in(factory)
    clock.advance(59)
    peer.send(Ping(request_id=1))  # resets the timer
    clock.advance(59)
    assert not peer.closed
    peer.frames()
    clock.advance(2)
    (close,) = peer.frames()
    assert isinstance(close, Close) and close.reason == CloseReason.IDLE_TIMEOUT
    assert peer.closed


def test_idle_timeout_applies_before_login(factory: SessionFactory, clock: Clock) -> None:
    peer = Peer(factory)
    clock.advance(61)
    (close,) = peer.frames()
    assert isinstance(close, Close) and close.reason == CloseReason.IDLE_TIMEOUT


def test_token_expiry_closes_the_session(factory: SessionFactory, clock: Clock) -> None:
    factory.config.idle_timeout = 10_000
    peer = logged_in(factory, ttl=100)
    clock.advance(99)
    assert not peer.closed
    clock.advance(1)
    (close,) = peer.frames()
    assert isinstance(close, Close) and close.reason == CloseReason.AUTH_EXPIRED
    assert peer.closed and factory.hub.devices(7) == []


def test_same_device_login_replaces_the_old_connection(factory: SessionFactory) -> None:
    old, new = Peer(factory), Peer(factory)
    old.login(device="phone")
    other = logged_in(factory, device="tablet")
    new.login(device="phone")
    (close,) = old.frames()
    assert isinstance(close, Close) and close.reason == CloseReason.REPLACED
    assert old.closed and not new.closed and not other.closed
    assert set(factory.hub.devices(7)) == {new.session, other.session}
    # The replaced connection going away must not unregister its successor.
    old.session.connectionLost()
    assert set(factory.hub.devices(7)) == {new.session, other.session}


def _push(msg_id: int) -> bytes:
    return encode(Push(Message(msg_id, 1, 8, "d", 1, 7, 1, b"c" * 16, b"x")))


def test_push_window_then_sync_hint(factory: SessionFactory) -> None:
    peer = logged_in(factory)
    session: Session = peer.session
    for msg_id in (1, 2, 3):  # window is 2: the third is not written
        session.push(msg_id, _push(msg_id))
    assert [f.message.msg_id for f in peer.frames() if isinstance(f, Push)] == [1, 2]
    peer.send(PushAck(99))  # unknown id: no answer, no change
    assert peer.frames() == []
    peer.send(PushAck(1))
    (hint,) = peer.frames()
    assert isinstance(hint, SyncHint) and hint.request_id == 0
    session.push(4, _push(4))  # window has room again
    assert [f.message.msg_id for f in peer.frames()] == [4]


def test_push_ack_fast_path_matches_the_codec(factory: SessionFactory) -> None:
    """PUSH_ACK is read without the codec when logged in; flags and request ids are carried
    like any frame's, and msg_id 0 still gets the codec's INVALID_FIELD."""
    peer = Peer(factory)
    early = PushAck(5)
    peer.send(early)  # before HELLO: the full path answers NOT_AUTHENTICATED
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.NOT_AUTHENTICATED
    peer.login()
    session: Session = peer.session
    session.push(U64_MAX, _push(U64_MAX))
    session.push(2, _push(2))
    assert len(peer.frames()) == 2 and session.unacked is not None
    peer.send(PushAck(U64_MAX, flags=0x80, request_id=0xFFFFFFFF))
    assert peer.frames() == [] and list(session.unacked) == [2]
    peer.transport.clear()
    session.dataReceived(b"\x00\x00\x00\x0f\x01\x04\x00\x00\x00\x00\x07" + bytes(8))
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.INVALID_FIELD and err.request_id == 7


def test_pings_do_not_extend_the_login_deadline(factory: SessionFactory, clock: Clock) -> None:
    peer = Peer(factory)
    for _ in range(5):
        clock.advance(15)
        peer.send(Ping(request_id=1))
    closes = [f for f in peer.frames() if isinstance(f, Close)]
    assert [c.reason for c in closes] == [CloseReason.IDLE_TIMEOUT] and peer.closed


def test_login_cancels_the_login_deadline(factory: SessionFactory, clock: Clock) -> None:
    peer = Peer(factory)
    clock.advance(5)  # within login_timeout_s (10)
    peer.login()
    for _ in range(4):
        clock.advance(30)
        peer.send(Ping(request_id=2))
    assert not peer.closed
    assert all(isinstance(f, Pong) for f in peer.frames())


def test_server_type_is_refused_before_its_body(factory: SessionFactory) -> None:
    peer = logged_in(factory)
    # A HISTORY_PAGE (server-to-client) whose has_more is 2: the type is the first problem.
    peer.send(struct.pack(">IBBBIBQBH", 7 + 12, 1, FrameType.HISTORY_PAGE, 0, 31, 1, 1002, 2, 0))
    (err,) = peer.frames()
    assert isinstance(err, Error) and (err.code, err.request_id) == (
        ErrorCode.UNKNOWN_FRAME_TYPE, 31,
    )  # fmt: skip


class SlowRouter:
    """A push router whose presence writes finish only when the test says so."""

    node = None

    def __init__(self) -> None:
        self.pending: list[Any] = []
        self.withdrawn: list[str] = []

    def online(self, conn: Any) -> Any:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d

    def offline(self, conn: Any) -> Any:
        self.withdrawn.append(conn.device_id)
        return succeed(None)


def test_hello_ok_waits_for_presence_and_nothing_is_pushed_before_it(clock: Clock) -> None:
    config = Config(idle_timeout=60, heartbeat=20, max_unacked_pushes=2)
    router = SlowRouter()
    hub = Hub()
    factory = SessionFactory(config, None, hub, clock, SECRET, router)  # type: ignore[arg-type]
    peer = Peer(factory)
    token = mint(SECRET, 7, "phone", ttl_s=3600, now=NOW)
    peer.send(Hello(1, 1, "phone", token, request_id=1))
    assert peer.frames() == [] and len(router.pending) == 1  # presence not written yet
    data = encode(Push(Message(5, 6, 8, "pc", ConvKind.USER, 7, 1, b"c" * 16, b"early")))
    assert hub.push([7], 5, data) == 1  # the hub already routes to the session...
    peer.send(Send(b"s" * 16, ConvKind.USER, 8, 1, b"x", request_id=2))
    (refused,) = peer.frames()  # ...but nothing is written before HELLO_OK
    assert isinstance(refused, Error) and refused.code == ErrorCode.NOT_AUTHENTICATED
    peer.send(Hello(1, 1, "phone", token, request_id=3))
    (again,) = peer.frames()
    assert isinstance(again, Error) and again.code == ErrorCode.ALREADY_AUTHENTICATED
    router.pending[0].callback(None)
    ok, push = peer.frames()
    assert isinstance(ok, HelloOk) and ok.request_id == 1
    assert isinstance(push, Push) and push.message.body == b"early"


def test_a_connection_lost_while_presence_is_written_withdraws_it_after(clock: Clock) -> None:
    config = Config(idle_timeout=60, heartbeat=20, max_unacked_pushes=2)
    router, hub = SlowRouter(), Hub()
    factory = SessionFactory(config, None, hub, clock, SECRET, router)  # type: ignore[arg-type]
    peer = Peer(factory)
    peer.send(Hello(1, 1, "phone", mint(SECRET, 7, "phone", ttl_s=3600, now=NOW), request_id=1))
    peer.session.connectionLost()
    assert hub.device(7, "phone") is None and router.withdrawn == ["phone"]
    router.pending[0].callback(None)  # the claim lands after the loss...
    assert router.withdrawn == ["phone", "phone"]  # ...so it is withdrawn again
    assert peer.frames() == []  # and no HELLO_OK goes out
