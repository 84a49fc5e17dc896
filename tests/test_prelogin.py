"""Before HELLO_OK: the HELLO-sized frame limit, the login deadline, per-address caps; devices
per user; the listen backlog and the open-file limit (session.py, admission.py, app.py)."""

from __future__ import annotations

import resource
import struct

import pytest

from twisted.internet.task import Clock

from improto.codec import encode
from improto.enums import CloseReason, FrameType
from improto.errors import ErrorCode
from improto.frames import Close, Error, Hello, Ping, Pong
from improto.limits import MAX_DEVICE_ID, MAX_FRAME_LENGTH, MAX_HELLO_FRAME, MAX_TOKEN
from improto_server.app import raise_open_file_limit, with_backlog
from improto_server.config import Config
from improto_server.session import SessionFactory
from tests.support.sessions import Peer, fake_clock, logged_in, session_factory

SECRET = "prelogin-secret-0123456789abcdef0123"


@pytest.fixture
def clock() -> Clock:
    return fake_clock()


@pytest.fixture
def factory(clock: Clock) -> SessionFactory:
    config = Config(idle_timeout=60, heartbeat=20, login_timeout_s=10,
                    max_connections_per_address=3, max_prelogin_per_address=2,
                    max_devices_per_user=2)  # fmt: skip
    return session_factory(config, clock, SECRET)


def _padded_ping(length: int) -> bytes:
    """A PING whose body has length - 7 bytes too many: MALFORMED_FRAME once it is read."""
    return struct.pack(">IBBBI", length, 1, FrameType.PING, 0, 3) + bytes(length - 7)


def test_the_largest_hello_is_the_prelogin_frame_limit() -> None:
    largest = encode(Hello(1, 1, "d" * MAX_DEVICE_ID, "t" * MAX_TOKEN))
    assert len(largest) - 4 == MAX_HELLO_FRAME == 4172


def test_a_largest_hello_is_read_before_login(factory: SessionFactory) -> None:
    peer = Peer(factory)
    peer.send(Hello(1, 1, "d" * MAX_DEVICE_ID, "t" * MAX_TOKEN, request_id=4))
    (err,) = peer.frames()  # read and refused for its token, not its size
    assert isinstance(err, Error) and (err.code, err.request_id) == (ErrorCode.AUTH_FAILED, 4)


def test_a_longer_prefix_before_login_is_fatal_before_its_body(factory: SessionFactory) -> None:
    peer = Peer(factory)
    peer.send(encode(Ping(request_id=1)) + struct.pack(">I", MAX_HELLO_FRAME + 1))
    pong, err = peer.frames()
    assert isinstance(pong, Pong)
    assert isinstance(err, Error) and (err.code, err.request_id) == (ErrorCode.FRAME_TOO_LARGE, 0)
    assert peer.closed


def test_after_hello_ok_the_normal_frame_limit_applies(factory: SessionFactory) -> None:
    peer = logged_in(factory)
    peer.send(_padded_ping(MAX_HELLO_FRAME + 1000))
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.MALFORMED_FRAME and not peer.closed
    peer.send(struct.pack(">I", MAX_FRAME_LENGTH + 1))
    (err,) = peer.frames()
    assert isinstance(err, Error) and err.code == ErrorCode.FRAME_TOO_LARGE and peer.closed


def test_the_login_deadline_is_its_own(factory: SessionFactory, clock: Clock) -> None:
    peer = Peer(factory)
    clock.advance(9.9)
    peer.send(Ping(request_id=1))  # PINGs do not log in
    assert not peer.closed
    clock.advance(0.1)
    pong, close = peer.frames()
    assert isinstance(pong, Pong)
    assert isinstance(close, Close) and close.reason == CloseReason.IDLE_TIMEOUT
    assert peer.closed


def test_a_login_in_time_moves_to_the_idle_timeout(factory: SessionFactory, clock: Clock) -> None:
    peer = Peer(factory)
    clock.advance(9)
    peer.login()
    clock.advance(59)
    assert not peer.closed
    clock.advance(1)
    (close,) = peer.frames()
    assert isinstance(close, Close) and close.reason == CloseReason.IDLE_TIMEOUT


def test_prelogin_connections_per_address_are_capped(factory: SessionFactory) -> None:
    first, second = Peer(factory), Peer(factory)
    third = Peer(factory)  # a third not logged in from the same address: refused at once
    assert third.transport.disconnected and third.transport.value() == b""
    assert third.transport.producer is None and factory.admission.refused == 1
    other = Peer(factory, host="192.0.2.2")  # another address has its own count
    assert not other.closed
    first.login(device="a")
    fourth = Peer(factory)  # one logged in: room again
    assert not fourth.closed and factory.admission.prelogin["192.0.2.1"] == 2
    assert factory.admission.connections["192.0.2.1"] == 3
    fifth = Peer(factory)  # 3 connections from the address: refused
    assert fifth.transport.disconnected and factory.admission.refused == 2
    for peer in (first, second, third, fourth, fifth, other):
        peer.session.connectionLost()
    assert factory.admission.connections == {} and factory.admission.prelogin == {}


def test_devices_per_user_are_bounded(factory: SessionFactory) -> None:
    phone, tablet, laptop = Peer(factory), Peer(factory), Peer(factory, host="192.0.2.9")
    phone.login(device="phone")
    tablet.login(device="tablet")
    (err,) = laptop.hello(device="laptop")
    assert isinstance(err, Error) and err.code == ErrorCode.LIMIT_EXCEEDED
    assert err.request_id == 1 and not laptop.closed  # not fatal: it may try again
    assert {s.device_id for s in factory.hub.devices(7)} == {"phone", "tablet"}  # type: ignore[attr-defined]
    again = Peer(factory, host="192.0.2.9")
    again.login(device="phone")  # an online device logging in again replaces itself
    assert phone.closed
    phone.session.connectionLost()
    tablet.session.connectionLost()
    laptop.login(device="laptop")  # room again, on the same connection


def test_the_listen_backlog_is_added_where_none_is_set() -> None:
    assert with_backlog("tcp:5555:interface=127.0.0.1", 1024) == (
        "tcp:5555:interface=127.0.0.1:backlog=1024"
    )
    assert with_backlog("tcp:5555:backlog=7", 1024) == "tcp:5555:backlog=7"
    assert (
        with_backlog("ssl:443:privateKey=a\\:b.pem", 9) == "ssl:443:privateKey=a\\:b.pem:backlog=9"
    )
    assert with_backlog("unix:/tmp/s", 9) == "unix:/tmp/s"


def test_the_open_file_limit_is_raised_to_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    lowered = min(soft, hard, 256)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowered, hard))
    try:
        got = raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (got, hard)
        assert got == hard or hard == resource.RLIM_INFINITY
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
