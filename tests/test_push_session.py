"""Push registrations on sessions (PROTOCOL.md section 19) and revocations at HELLO (8.2):
the PUSH feature and the gating of its types, PUSH_REGISTER / PUSH_UNREGISTER against the real
embedded DeviceStore, their errors, and logins refused for a revoked token. Sessions on
StringTransports with the timers on a fake clock; the store runs on the reactor."""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.internet.task import Clock

from improto.codec import encode
from improto.enums import Feature
from improto.errors import ErrorCode
from improto.frames import (
    ConvHide,
    ConvHideOk,
    Error,
    Features,
    FeaturesOk,
    Frame,
    Hello,
    HelloOk,
    Ping,
    Pong,
    PushRegister,
    PushRegisterOk,
    PushUnregister,
    PushUnregisterOk,
)
from improto.tokens import mint
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.embedded.devices import SQLiteDevices
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import PushTarget
from improto_server.rate_limits import RateLimits
from improto_server.service import ChatService
from improto_server.session import SessionFactory
from tests.support.sessions import NOW, Peer, fake_clock, replies
from tests.support.waiting import eventually

SECRET = "push-session-test-secret-0123456789abcdef"
ALICE, BOB = 31, 32
PREVIEW = PushRegister.PREVIEW
TOKEN = "5f3e1a2b9c8d7e6f00112233445566778899aabbccddeeff0123456789abcdef"


class BrokenDevices:
    """The real store, except that the calls named in `broken` fail (the store is down)."""

    def __init__(self, store: SQLiteDevices, *broken: str) -> None:
        self.store = store
        self.broken = set(broken)

    def __getattr__(self, name: str) -> Any:
        if name in self.broken:
            return lambda *args, **kw: fail(ConnectionError("device store down"))
        return getattr(self.store, name)


@dataclass
class Stack:
    backend: SQLiteBackend
    devices: SQLiteDevices
    clock: Clock
    factory: SessionFactory
    hosts: int = 0

    def connect(self) -> Peer:
        self.hosts += 1  # each from its own address (the per-address caps)
        return Peer(self.factory, host=f"192.0.2.{self.hosts}")

    async def peer(self, user: int, device: str = "phone", features: tuple[int, ...] = ()) -> Peer:
        """A logged-in connection (the HELLO waits for the revocation check) that asked for
        `features`."""
        p = self.connect()
        (ok,) = await hello(p, user, device)
        assert isinstance(ok, HelloOk), ok
        if features:
            p.send(Features(features, request_id=2))
            (got,) = p.frames()
            assert isinstance(got, FeaturesOk), got
        return p


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., object]]:
    made: list[SQLiteBackend] = []

    async def build(
        platforms: tuple[str, ...] = ("apns", "fcm"), broken: tuple[str, ...] = (),
        **settings: object,
    ) -> Stack:  # fmt: skip
        backend = SQLiteBackend(tmp_path / f"db{len(made)}.sqlite3", reactor=reactor)
        await backend.start()
        made.append(backend)
        devices = SQLiteDevices(backend.db, backend.now_ms)
        config = replace(Config(), **settings)  # type: ignore[arg-type]
        clock = fake_clock()
        hub = Hub()
        service = ChatService(
            IdGenerator(1), backend.queue, backend.inbox, backend.history, backend.groups, hub,
            limits=RateLimits(config, clock), conversations=backend.conversations,
            devices=BrokenDevices(devices, *broken) if broken else devices,  # type: ignore[arg-type]
            push_platforms=platforms,
        )  # fmt: skip
        return Stack(backend, devices, clock, SessionFactory(config, service, hub, clock, SECRET))

    yield build
    for b in made:
        await b.close()


async def hello(
    p: Peer, user: int, device: str = "phone", *, issued: float = NOW, iat: bool = True,
    rid: int = 1,
) -> list[Frame]:  # fmt: skip
    token = mint(SECRET, user, device, ttl_s=3600, now=issued, with_iat=iat)
    p.send(Hello(1, 1, device, token, request_id=rid))
    return await replies(p)


async def call(p: Peer, frame: Frame | bytes) -> Frame:
    p.send(frame)
    (got,) = await replies(p)
    return got


def _raw(kind: int, body: bytes, rid: int) -> bytes:
    return struct.pack(">IBBBI", 7 + len(body), 1, kind, 0, rid) + body


def _register_body(platform: bytes, token: bytes, options: int) -> bytes:
    return (
        struct.pack(">B", len(platform)) + platform + struct.pack(">H", len(token)) + token
        + struct.pack(">B", options)
    )  # fmt: skip


def _unknown(kind: int, rid: int) -> Error:
    """The very ERROR a version-1 server sends for an undefined type."""
    return Error(ErrorCode.UNKNOWN_FRAME_TYPE, f"unknown frame type 0x{kind:02x}", request_id=rid)


def is_error(f: Frame, code: ErrorCode, rid: int) -> bool:
    return isinstance(f, Error) and (f.code, f.request_id) == (code, rid)


# ------------------------------------------------------------------ the feature


@pytest_twisted.ensureDeferred
async def test_push_is_enabled_only_by_a_server_with_platforms(make) -> None:
    s = await make()
    p = await s.peer(ALICE)
    p.send(Features((Feature.PUSH, Feature.CONVERSATIONS), request_id=3))
    assert p.frames() == [FeaturesOk((Feature.CONVERSATIONS, Feature.PUSH), request_id=3)]
    off = await make(platforms=())
    q = await off.peer(ALICE)
    q.send(Features((Feature.PUSH, Feature.CONVERSATIONS), request_id=3))
    assert q.frames() == [FeaturesOk((Feature.CONVERSATIONS,), request_id=3)]
    q.send(PushRegister("apns", TOKEN, request_id=4), PushUnregister(request_id=5))
    assert q.frames() == [_unknown(0x35, 4), _unknown(0x36, 5)]


@pytest_twisted.ensureDeferred
async def test_the_types_are_unknown_until_push_is_enabled(make) -> None:
    """Checked on the header's type before the body (13.2): any body, before and after the
    login, with other features enabled, and again after FEATURES dropped PUSH."""
    s = await make()
    pre = s.connect()
    pre.send(_raw(0x35, b"\xff", 6), _raw(0x36, b"", 7))
    assert pre.frames() == [_unknown(0x35, 6), _unknown(0x36, 7)]
    p = await s.peer(ALICE, features=(Feature.CONVERSATIONS, Feature.WIRE_ONCE))
    garbage = (b"", b"\xff" * 5, _register_body(b"APNS", b"\xff", 9))
    p.send(*[_raw(0x35, body, 10 + i) for i, body in enumerate(garbage)], _raw(0x36, b"x", 13))
    assert p.frames() == [*[_unknown(0x35, 10 + i) for i in range(3)], _unknown(0x36, 13)]
    # the replies' types from a client: unknown too (as every server-to-client type)
    p.send(encode(PushRegisterOk(request_id=14)))
    assert [(e.code, e.request_id) for e in p.frames()] == [(ErrorCode.UNKNOWN_FRAME_TYPE, 14)]
    p.send(Features((Feature.PUSH,), request_id=15))
    assert p.frames() == [FeaturesOk((Feature.PUSH,), request_id=15)]
    assert await call(p, PushUnregister(request_id=16)) == PushUnregisterOk(request_id=16)
    p.send(Features((), request_id=17), PushUnregister(request_id=18))
    assert p.frames() == [FeaturesOk((), request_id=17), _unknown(0x36, 18)]
    # and the conversation requests need CONVERSATIONS, not PUSH
    p.send(Features((Feature.PUSH,), request_id=19), ConvHide(1, BOB, request_id=20))
    assert p.frames() == [FeaturesOk((Feature.PUSH,), request_id=19), _unknown(0x34, 20)]


# --------------------------------------------------------------- registrations


@pytest_twisted.ensureDeferred
async def test_register_replaces_and_unregister_removes(make) -> None:
    s = await make()
    phone = await s.peer(ALICE, "phone", (Feature.PUSH,))
    tablet = await s.peer(ALICE, "tablet", (Feature.PUSH,))
    got = await call(phone, PushRegister("apns", TOKEN, PREVIEW, request_id=21))
    assert got == PushRegisterOk(request_id=21)
    assert await s.devices.targets([ALICE]) == {ALICE: {"phone": PushTarget("apns", TOKEN, True)}}
    # a registration replaces the device's previous one (another platform, preview off)
    assert await call(phone, PushRegister("fcm", "f:1", 0, request_id=22)) == PushRegisterOk(
        request_id=22
    )
    assert await call(tablet, PushRegister("fcm", "f:2", PREVIEW, request_id=23)) == (
        PushRegisterOk(request_id=23)
    )
    assert await s.devices.targets([ALICE, BOB]) == {
        ALICE: {"phone": PushTarget("fcm", "f:1", False), "tablet": PushTarget("fcm", "f:2", True)}
    }
    assert await call(phone, PushUnregister(request_id=24)) == PushUnregisterOk(request_id=24)
    assert await s.devices.targets([ALICE]) == {ALICE: {"tablet": PushTarget("fcm", "f:2", True)}}
    # nothing registered: still answered (the device gets no notification either way)
    assert await call(phone, PushUnregister(request_id=25)) == PushUnregisterOk(request_id=25)
    assert not phone.closed and not tablet.closed


@pytest_twisted.ensureDeferred
async def test_refused_registrations_change_nothing(make) -> None:
    s = await make()
    p = await s.peer(ALICE, "phone", (Feature.PUSH,))
    err = await call(p, PushRegister("webpush", TOKEN, request_id=31))
    assert is_error(err, ErrorCode.INVALID_FIELD, 31)
    assert isinstance(err, Error) and err.text == "unknown platform webpush"
    # the codec's checks: characters, options bits, lengths, UTF-8 (with the request id)
    cases = [
        (_register_body(b"Apns", b"t", 0), ErrorCode.INVALID_FIELD),
        (_register_body(b"apns", b"t", 2), ErrorCode.INVALID_FIELD),
        (_register_body(b"apns", b"t" * 4097, 0), ErrorCode.INVALID_FIELD),
        (_register_body(b"", b"t", 0), ErrorCode.INVALID_FIELD),
        (_register_body(b"apns", b"\xc3", 0), ErrorCode.BAD_UTF8),
        (_register_body(b"apns", b"t", 0)[:-1], ErrorCode.MALFORMED_FRAME),
    ]
    p.send(*[_raw(0x35, body, 40 + i) for i, (body, _) in enumerate(cases)])
    got = p.frames()
    assert [(e.code, e.request_id) for e in got] == [
        (code, 40 + i) for i, (_, code) in enumerate(cases)
    ]
    assert await s.devices.targets([ALICE]) == {}
    assert not p.closed
    assert s.factory.service.limits.state_ops.level(ALICE) == Config().state_op_burst


@pytest_twisted.ensureDeferred
async def test_registrations_share_the_state_change_limit(make) -> None:
    s = await make(state_op_rate=1.0, state_op_burst=3.0)
    p = await s.peer(ALICE, "phone", (Feature.PUSH, Feature.CONVERSATIONS))
    assert await call(p, PushRegister("apns", TOKEN, request_id=51)) == PushRegisterOk(
        request_id=51
    )
    assert await call(p, PushUnregister(request_id=52)) == PushUnregisterOk(request_id=52)
    assert await call(p, ConvHide(1, BOB, request_id=53)) == ConvHideOk(1, BOB, request_id=53)
    err = await call(p, PushRegister("apns", TOKEN, request_id=54))
    assert is_error(err, ErrorCode.RATE_LIMITED, 54)
    assert isinstance(err, Error) and err.text.startswith("retry_after_ms=1000 ")
    assert await s.devices.targets([ALICE]) == {}  # refused: not stored
    s.clock.advance(1.0)  # reading resumes after the announced wait; one token back
    assert await call(p, PushUnregister(request_id=55)) == PushUnregisterOk(request_id=55)
    assert s.factory.service.limits.state_op(BOB) == 0.0  # per user


@pytest_twisted.ensureDeferred
async def test_a_store_failure_is_unavailable(make) -> None:
    s = await make(broken=("set_target", "remove_target"))
    p = await s.peer(ALICE, "phone", (Feature.PUSH,))
    p.send(PushRegister("apns", TOKEN, request_id=61), PushUnregister(request_id=62))
    got = await replies(p, 2)
    assert sorted((e.code, e.request_id) for e in got) == [
        (ErrorCode.UNAVAILABLE, 61), (ErrorCode.UNAVAILABLE, 62),
    ]  # fmt: skip
    assert await call(p, Ping(request_id=63)) == Pong(int(NOW * 1000), request_id=63)


# ----------------------------------------------------------------- revocations


@pytest_twisted.ensureDeferred
async def test_a_token_issued_before_the_revocation_is_refused(make) -> None:
    s = await make()
    old = await s.peer(ALICE, "phone")  # logged in before the revocation (the API kicks it)
    await s.devices.revoke(ALICE, int(NOW * 1000))
    for kw in ({"issued": NOW - 60}, {"iat": False}):  # older, and no iat at all
        p = s.connect()
        (err,) = await hello(p, ALICE, "phone", **kw)  # type: ignore[arg-type]
        assert err == Error(ErrorCode.AUTH_FAILED, "token revoked", request_id=1)
        assert p.closed
    # the refused logins replaced nothing: the old connection is still the device's
    assert s.factory.hub.device(ALICE, "phone") is old.session and not old.closed
    assert old.frames() == []
    # a token issued at or after the revocation logs in; other users are not revoked
    for user, kw in ((ALICE, {"issued": NOW}), (BOB, {"iat": False})):
        (ok,) = await hello(s.connect(), user, "tablet", **kw)  # type: ignore[arg-type]
        assert isinstance(ok, HelloOk) and ok.user_id == user


@pytest_twisted.ensureDeferred
async def test_hello_during_the_revocation_check(make) -> None:
    """The check is part of the login: a second HELLO meanwhile is ALREADY_AUTHENTICATED, a
    request NOT_AUTHENTICATED (8.1)."""
    s = await make()
    p = s.connect()
    token = mint(SECRET, ALICE, "phone", ttl_s=3600, now=NOW)
    p.send(Hello(1, 1, "phone", token, request_id=1), Hello(1, 1, "phone", token, request_id=2),
           PushUnregister(request_id=3), Ping(request_id=4))  # fmt: skip
    first = p.frames()
    assert [type(f) for f in first] == [Error, Error, Pong]
    assert is_error(first[0], ErrorCode.ALREADY_AUTHENTICATED, 2)
    assert is_error(first[1], ErrorCode.UNKNOWN_FRAME_TYPE, 3)  # no feature yet: the type
    (ok,) = await replies(p)
    assert isinstance(ok, HelloOk) and ok.request_id == 1


@pytest_twisted.ensureDeferred
async def test_a_revocation_store_failure_is_unavailable_not_fatal(make) -> None:
    s = await make(broken=("revoked_before",))
    p = s.connect()
    (err,) = await hello(p, ALICE)
    assert is_error(err, ErrorCode.UNAVAILABLE, 1) and not p.closed
    assert s.factory.hub.device(ALICE, "phone") is None
    s.factory.service.devices.broken.clear()  # the store is back: the HELLO again succeeds
    (ok,) = await hello(p, ALICE, rid=2)
    assert isinstance(ok, HelloOk) and ok.request_id == 2


@pytest_twisted.ensureDeferred
async def test_a_connection_gone_during_the_check_logs_nothing_in(make) -> None:
    s = await make()
    p = s.connect()
    p.send(Hello(1, 1, "phone", mint(SECRET, ALICE, "phone", now=NOW), request_id=1))
    p.session.connectionLost()
    await eventually(lambda: not p.session._authing)
    assert s.factory.hub.device(ALICE, "phone") is None
    assert p.frames() == []
