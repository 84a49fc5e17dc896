"""Output counted in bytes, requests in flight capped, a closed session released, reading
shared fairly between connections and held for a rate-limited peer (session.py).

Unit tests drive the producer calls a transport makes (pauseProducing / resumeProducing) on a
StringTransport; one test over real loopback TCP has a receiver that never reads.
"""

from __future__ import annotations

import gc
import socket
import weakref
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import defer, protocol, reactor
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock, deferLater

from improto.codec import encode
from improto.enums import ConvKind
from improto.errors import ErrorCode
from improto.frames import (
    Error,
    Frame,
    GroupCreate,
    GroupCreated,
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    Message,
    Ping,
    Pong,
    Push,
    PushAck,
    Send,
    SendAck,
    SyncHint,
)
from improto.tokens import mint
from improto_clients.client import IMClient
from improto_clients.conv_keys import conv_key
from improto_server.app import Server
from improto_server.config import Config
from improto_server.service import RequestError
from improto_server.session import (
    BYTES_PER_TURN,
    FRAMES_PER_TURN,
    MAX_PULLS_IN_FLIGHT,
    MAX_RATE_HOLD_S,
    PRELOGIN_BURST,
    PRELOGIN_FRAMES_PER_TURN,
    PRELOGIN_RATE,
    Session,
    SessionFactory,
)
from tests.support.sessions import NOW, Peer, fake_clock, logged_in, session_factory

SECRET = "flow-control-secret-0123456789abcdef"


class SlowService:
    """HISTORY_PULLs answered only when the test says so (other requests never come)."""

    def __init__(self) -> None:
        self.waiting: list[tuple[int, Deferred[None]]] = []

    async def group_create(self, caller: Any, f: GroupCreate) -> Frame:
        d: Deferred[None] = Deferred()
        self.waiting.append((f.request_id, d))
        await d
        return GroupCreated(1000 + f.request_id, request_id=f.request_id)

    async def history_pull(self, caller: Any, f: HistoryPull) -> Frame | bytes:
        d: Deferred[None] = Deferred()
        self.waiting.append((f.request_id, d))
        await d
        return HistoryPage(ConvKind.USER, 8, 0, (), request_id=f.request_id)

    def finish(self, n: int = 1) -> list[int]:
        done, self.waiting = self.waiting[:n], self.waiting[n:]
        for _, d in done:
            d.callback(None)
        return [rid for rid, _ in done]


@pytest.fixture
def clock() -> Clock:
    return fake_clock()


@pytest.fixture
def service() -> SlowService:
    return SlowService()


@pytest.fixture
def factory(clock: Clock, service: SlowService) -> SessionFactory:
    config = Config(idle_timeout=600, heartbeat=20, max_unacked_pushes=5,
                    max_requests_in_flight=2, output_hard_limit_bytes=1000,
                    slow_reader_timeout_s=30)  # fmt: skip
    return session_factory(config, clock, SECRET, service)


def _push(msg_id: int, body: bytes = b"x") -> bytes:
    return encode(Push(Message(msg_id, 1, 8, "d", ConvKind.USER, 7, 1, b"c" * 16, body)))


def test_the_session_is_a_streaming_producer_of_its_transport(factory: SessionFactory) -> None:
    peer = Peer(factory)
    assert peer.transport.producer is peer.session and peer.transport.streaming


def test_a_full_transport_stops_pushes_and_reading_then_sync_hint(
    factory: SessionFactory,
) -> None:
    peer = logged_in(factory)
    session = peer.session
    session.push(1, _push(1))
    session.pauseProducing()  # what Twisted calls when the transport's buffer is full
    assert not peer.reading  # requests are no longer read
    session.push(2, _push(2))  # not written: the inbox keeps it, a SYNC_HINT tells later
    peer.send(Ping(request_id=5), PushAck(1))  # one read's frames wait their turn
    assert [type(f) for f in peer.frames()] == [Push]
    assert session.hint_pending and list(session.unacked or ()) == [1]
    session.resumeProducing()  # drained
    hint, pong = peer.frames()
    assert isinstance(hint, SyncHint) and hint.request_id == 0
    assert isinstance(pong, Pong) and pong.request_id == 5
    assert peer.reading and not session.hint_pending and list(session.unacked or ()) == []
    session.push(3, _push(3))  # pushes flow again
    assert [f.message.msg_id for f in peer.frames() if isinstance(f, Push)] == [3]


def test_the_push_window_and_the_output_both_hold_the_hint(factory: SessionFactory) -> None:
    peer = logged_in(factory)
    session = peer.session
    for msg_id in range(1, 7):  # window 5: the sixth waits in the inbox
        session.push(msg_id, _push(msg_id))
    assert len(peer.frames()) == 5 and session.hint_pending
    session.pauseProducing()
    peer.send(PushAck(1))  # window has room, but the output is stalled: no hint yet...
    assert peer.frames() == [] and session.hint_pending
    session.resumeProducing()  # ...until it drains (the ack was read meanwhile)
    assert [type(f) for f in peer.frames()] == [SyncHint]


def test_past_the_hard_limit_the_connection_is_dropped_without_close(
    factory: SessionFactory, service: SlowService
) -> None:
    peer = logged_in(factory)
    session = peer.session
    peer.send(HistoryPull(ConvKind.USER, 8, 0, 10, request_id=1),
              HistoryPull(ConvKind.USER, 8, 0, 10, request_id=2))  # fmt: skip
    session.pauseProducing()
    for _ in range(60):  # replies still go out (bytes the transport queues)...
        session.send(_push(9, b"y" * 10))
        if session.closing:
            break
    assert session.closing and peer.transport.disconnected  # ...up to the hard limit
    before = peer.transport.value()
    service.finish(2)  # a reply finishing after the drop writes nothing
    assert peer.transport.value() == before
    assert all(isinstance(f, Push) for f in peer.frames())  # no CLOSE to a peer not reading
    assert factory.hub.devices(7) == []


def test_above_the_high_water_mark_too_long_the_connection_is_dropped(
    factory: SessionFactory, clock: Clock
) -> None:
    peer = logged_in(factory)
    peer.session.pauseProducing()
    clock.advance(29.9)
    assert not peer.transport.disconnecting
    clock.advance(0.1)
    assert peer.transport.disconnected and peer.frames() == []
    assert factory.hub.devices(7) == []


def test_a_reader_that_drains_in_time_is_kept(factory: SessionFactory, clock: Clock) -> None:
    peer = logged_in(factory)
    peer.session.pauseProducing()
    clock.advance(20)
    peer.session.resumeProducing()
    clock.advance(20)  # past the first stall's timeout: that stall is over
    peer.session.pauseProducing()
    clock.advance(29)
    assert not peer.transport.disconnecting and peer.reading is False
    peer.session.resumeProducing()
    clock.advance(100)
    assert not peer.transport.disconnecting and peer.reading


def test_requests_in_flight_are_capped(factory: SessionFactory, service: SlowService) -> None:
    peer = logged_in(factory)
    pulls = [HistoryPull(ConvKind.USER, 8, 0, 10, request_id=rid) for rid in (1, 2, 3, 4)]
    peer.send(*pulls, Ping(request_id=9))  # all in one read
    assert [rid for rid, _ in service.waiting] == [1, 2] and not peer.reading
    assert peer.frames() == []  # the PING waits behind the capped requests
    assert service.finish() == [1]
    assert [rid for rid, _ in service.waiting] == [2, 3] and not peer.reading
    assert service.finish(2) == [2, 3]
    assert [rid for rid, _ in service.waiting] == [4]
    assert peer.reading  # one in flight, below the cap: reading again, the PING answered
    assert [(type(f), f.request_id) for f in peer.frames()] == [
        (HistoryPage, 1), (HistoryPage, 2), (HistoryPage, 3), (Pong, 9),
    ]  # fmt: skip
    service.finish()
    assert [(type(f), f.request_id) for f in peer.frames()] == [(HistoryPage, 4)]


def test_page_requests_in_flight_are_capped_lower(clock: Clock, service: SlowService) -> None:
    # Page requests are capped at MAX_PULLS_IN_FLIGHT even below max_requests_in_flight.
    config = Config(idle_timeout=600, heartbeat=20, max_requests_in_flight=32)
    factory = session_factory(config, clock, SECRET, service)
    peer = logged_in(factory)
    n = MAX_PULLS_IN_FLIGHT + 2
    peer.send(*(HistoryPull(ConvKind.USER, 8, 0, 10, request_id=r) for r in range(1, n + 1)))
    assert [rid for rid, _ in service.waiting] == list(range(1, MAX_PULLS_IN_FLIGHT + 1))
    assert not peer.reading
    service.finish()
    assert len(service.waiting) == MAX_PULLS_IN_FLIGHT and not peer.reading
    service.finish(MAX_PULLS_IN_FLIGHT)
    assert [rid for rid, _ in service.waiting] == [n] and peer.reading
    service.finish()
    assert [f.request_id for f in peer.frames()] == list(range(1, n + 1))  # in order


def test_group_requests_share_the_page_request_cap(clock: Clock, service: SlowService) -> None:
    # A pipelined GROUP_CREATE flood puts at most MAX_PULLS_IN_FLIGHT transactions in the
    # store's queue at a time, ahead of other users' SENDs.
    config = Config(idle_timeout=600, heartbeat=20, max_requests_in_flight=32)
    factory = session_factory(config, clock, SECRET, service)
    peer = logged_in(factory)
    n = MAX_PULLS_IN_FLIGHT + 3
    peer.send(*(GroupCreate(f"g{r}", (9,), request_id=r) for r in range(1, n + 1)))
    assert [rid for rid, _ in service.waiting] == list(range(1, MAX_PULLS_IN_FLIGHT + 1))
    assert not peer.reading
    for _ in range(n):
        service.finish()
    assert service.waiting == [] and peer.reading
    assert [(type(f), f.request_id) for f in peer.frames()] == [
        (GroupCreated, r) for r in range(1, n + 1)
    ]


def test_early_pushes_are_bounded_in_bytes(clock: Clock) -> None:
    config = Config(output_high_water_bytes=1000)
    factory = session_factory(config, clock, SECRET)
    session = Peer(factory).session
    for msg_id in range(1, 6):  # before HELLO_OK: kept until it is sent, 400 bytes each
        session.push(msg_id, _push(msg_id, b"z" * 300))
    assert session._early is not None and len(session._early) == 2 and session.hint_pending


def test_a_closed_session_is_freed_by_reference_counting(
    factory: SessionFactory, service: SlowService
) -> None:
    peer = logged_in(factory)
    session = peer.session
    for msg_id in (1, 2, 3):
        session.push(msg_id, _push(msg_id, b"b" * 60_000))  # unacked, unsent
    session.pauseProducing()
    session.push(4, _push(4))
    peer.send(Ping(request_id=1))  # a frame read and not served
    assert session.unacked and session._pending and session.deadline is not None
    ref = weakref.ref(session)
    gc.collect()
    gc.disable()  # no cycle collector: reference counting alone must free it
    try:
        session.connectionLost()
        del session, peer
        assert ref() is None
    finally:
        gc.enable()
    assert len(factory.deadlines) == 0 and factory.hub.devices(7) == []


# ------------------------------------------------------------ fair reading, rate holds


def _answers(peer: Peer) -> list[tuple[type, int]]:
    return [(type(f), f.request_id) for f in peer.frames()]


def _woken_calls(clock: Clock) -> list[Any]:
    """The clock's pending calls that resume a session's reading."""
    return [c for c in clock.getDelayedCalls() if getattr(c.func, "__name__", "") == "_woken"]


def _next_turn(clock: Clock) -> bool:
    """One reactor turn: run the wake-ups due now, not those they schedule (the reactor runs
    those a turn later; task.Clock.advance(0) would run them at once). False if none."""
    due = [c for c in _woken_calls(clock) if c.getTime() <= clock.seconds()]
    for call in due:
        func, args, kw = call.func, call.args, call.kw
        call.cancel()  # out of the clock, then run as the reactor would have
        func(*args, **kw)
    return bool(due)


def test_frames_beyond_the_per_turn_share_are_served_next_turn_in_order(
    factory: SessionFactory, clock: Clock
) -> None:
    peer = logged_in(factory)
    n = 2 * FRAMES_PER_TURN + 5
    peer.send(*(Ping(request_id=rid) for rid in range(1, n + 1)))  # all in one read
    got = _answers(peer)
    assert got == [(Pong, rid) for rid in range(1, FRAMES_PER_TURN + 1)]
    assert not peer.reading and len(_woken_calls(clock)) == 1  # one call, the next turn
    peer.send(Ping(request_id=n + 1))  # read meanwhile (a transport may): waits behind
    assert _next_turn(clock)
    assert got + _answers(peer) == [(Pong, rid) for rid in range(1, 2 * FRAMES_PER_TURN + 1)]
    assert not peer.reading
    assert _next_turn(clock)  # the last five, then the frame read meanwhile
    assert _answers(peer) == [(Pong, rid) for rid in range(2 * FRAMES_PER_TURN + 1, n + 2)]
    assert not _next_turn(clock) and peer.reading
    assert peer.session._wake is None and peer.session._pending is None  # idle: nothing kept


def test_large_frames_are_served_a_byte_budget_per_turn(
    factory: SessionFactory, clock: Clock
) -> None:
    peer = logged_in(factory)
    body = 60_000
    # unknown type 0x7F: answered from the header, whatever the body (PROTOCOL.md 7)
    frames = [
        (7 + body).to_bytes(4, "big") + bytes([1, 0x7F, 0]) + rid.to_bytes(4, "big")
        + b"z" * body
        for rid in range(1, 11)
    ]  # fmt: skip
    peer.send(*frames)  # all in one read
    per_turn = -(-BYTES_PER_TURN // (body + 7))  # the frame crossing the budget is served
    first = _answers(peer)
    assert [rid for _, rid in first] == list(range(1, per_turn + 1))
    assert not peer.reading and _next_turn(clock)
    assert [rid for _, rid in _answers(peer)] == list(range(per_turn + 1, 2 * per_turn + 1))
    while _next_turn(clock):
        pass
    assert peer.reading and peer.session._pending is None


def test_the_per_turn_share_and_the_in_flight_cap_keep_the_order(
    factory: SessionFactory, clock: Clock, service: SlowService
) -> None:
    peer = logged_in(factory)
    pings = [Ping(request_id=rid) for rid in range(100, 100 + FRAMES_PER_TURN + 3)]
    pulls = [HistoryPull(ConvKind.USER, 8, 0, 10, request_id=rid) for rid in (1, 2, 3)]
    peer.send(*pings, *pulls)
    clock.advance(0)  # the rest of the PINGs, then two pulls: the cap (2)
    assert [rid for rid, _ in service.waiting] == [1, 2] and not peer.reading
    service.finish(2)
    assert [rid for rid, _ in service.waiting] == [3]
    service.finish()
    assert _answers(peer) == [
        *((Pong, p.request_id) for p in pings), (HistoryPage, 1), (HistoryPage, 2),
        (HistoryPage, 3),
    ]  # fmt: skip
    assert peer.reading and not _woken_calls(clock)


def test_a_pending_turn_is_cancelled_when_the_connection_is_lost(
    factory: SessionFactory, clock: Clock
) -> None:
    peer = logged_in(factory)
    peer.send(*(Ping(request_id=rid) for rid in range(1, 2 * FRAMES_PER_TURN)))
    assert len(_woken_calls(clock)) == 1
    peer.session.connectionLost()
    assert not _woken_calls(clock) and peer.session._wake is None


def test_before_hello_ok_a_few_frames_per_turn_and_a_budget_per_second(
    factory: SessionFactory, clock: Clock
) -> None:
    peer = Peer(factory)
    n = PRELOGIN_BURST + 3
    peer.send(*(Ping(request_id=rid) for rid in range(1, n + 1)))
    assert _answers(peer) == [(Pong, rid) for rid in range(1, PRELOGIN_FRAMES_PER_TURN + 1)]
    for _ in range(2 * PRELOGIN_BURST):  # turns at the same instant: the burst, no more
        clock.advance(0)
    assert len(peer.frames()) == PRELOGIN_BURST - PRELOGIN_FRAMES_PER_TURN
    assert not peer.reading and len(_woken_calls(clock)) == 1  # waits for the budget
    clock.advance(1 / PRELOGIN_RATE)
    assert _answers(peer) == [(Pong, PRELOGIN_BURST + 1)]  # one more per 1/rate seconds
    clock.advance(2 / PRELOGIN_RATE)
    assert _answers(peer) == [(Pong, PRELOGIN_BURST + 2), (Pong, PRELOGIN_BURST + 3)]
    assert peer.reading and not _woken_calls(clock)
    token = mint(SECRET, 7, "phone", ttl_s=3600, now=NOW)
    peer.send(Hello(1, 1, "phone", token))  # the budget is spent: the HELLO waits for it too
    assert peer.frames() == []
    clock.advance(1 / PRELOGIN_RATE)
    assert [type(f) for f in peer.frames()] == [HelloOk]  # then logs in, with a larger share
    peer.send(*(Ping(request_id=rid) for rid in range(1, FRAMES_PER_TURN + 1)))
    assert len(peer.frames()) == FRAMES_PER_TURN


def test_a_client_that_pings_before_its_hello_is_served_at_once(factory: SessionFactory) -> None:
    peer = Peer(factory)
    token = mint(SECRET, 7, "phone", ttl_s=3600, now=NOW)
    peer.session.dataReceived(encode(Ping(request_id=1)) + encode(Hello(1, 1, "phone", token,
                                                                        request_id=2)))  # fmt: skip
    assert [type(f) for f in peer.frames()] == [Pong, HelloOk]


class RateLimitedService:
    """SENDs refused RATE_LIMITED with the given retry-afters, in turn, then accepted."""

    def __init__(self, *retry_after_s: float) -> None:
        self.refusals = list(retry_after_s)
        self.calls: list[int] = []

    async def send(self, caller: Any, f: Send) -> Frame | bytes:
        self.calls.append(f.request_id)
        if self.refusals:
            wait = self.refusals.pop(0)
            ms = round(wait * 1000)
            raise RequestError(ErrorCode.RATE_LIMITED, f"retry_after_ms={ms} too many",
                               retry_after_s=wait)  # fmt: skip
        return SendAck(f.client_msg_id, f.request_id, int(NOW * 1000), 0, request_id=f.request_id)

    def send_now(self, caller: Any, f: Send) -> Deferred[Frame | bytes]:  # what Session calls
        return Deferred.fromCoroutine(self.send(caller, f))


def _rate_limited_peer(clock: Clock, *retry_after_s: float) -> tuple[Peer, RateLimitedService]:
    service = RateLimitedService(*retry_after_s)
    config = Config(idle_timeout=600, heartbeat=20)
    factory = session_factory(config, clock, SECRET, service)
    peer = logged_in(factory)
    return peer, service


def _send(rid: int) -> Send:
    return Send(rid.to_bytes(16, "big"), ConvKind.USER, 8, 1, b"hi", request_id=rid)


def test_a_rate_limited_connection_is_not_read_for_the_retry_after(clock: Clock) -> None:
    peer, service = _rate_limited_peer(clock, 0.25)
    peer.send(_send(1), _send(2), Ping(request_id=3), _send(4))  # pipelined, one read
    (err,) = peer.frames()  # one refusal; the rest waits, unread
    assert isinstance(err, Error) and err.code == ErrorCode.RATE_LIMITED and err.request_id == 1
    assert service.calls == [1] and not peer.reading
    clock.advance(0.2)
    assert peer.frames() == [] and service.calls == [1]
    clock.advance(0.05)  # the retry-after has passed: served in order, reading again
    assert _answers(peer) == [(SendAck, 2), (Pong, 3), (SendAck, 4)]
    assert service.calls == [1, 2, 4] and peer.reading and not _woken_calls(clock)


def test_the_rate_limit_hold_is_capped_and_does_not_shorten(clock: Clock) -> None:
    peer, _ = _rate_limited_peer(clock, 30.0)
    peer.send(_send(1), _send(2))
    assert [type(f) for f in peer.frames()] == [Error] and not peer.reading
    session = peer.session
    session._hold(0.0)  # a shorter hold meanwhile (the next turn) keeps the longer one
    (call,) = _woken_calls(clock)
    assert call.getTime() == pytest.approx(clock.seconds() + MAX_RATE_HOLD_S)
    clock.advance(MAX_RATE_HOLD_S)
    assert _answers(peer) == [(SendAck, 2)] and peer.reading


def test_other_errors_do_not_hold_reading(clock: Clock) -> None:
    class Refuses(RateLimitedService):
        async def send(self, caller: Any, f: Send) -> Frame | bytes:
            raise RequestError(ErrorCode.FORBIDDEN, "no")

    config = Config(idle_timeout=600, heartbeat=20)
    factory = session_factory(config, clock, SECRET, Refuses())
    peer = logged_in(factory)
    peer.send(_send(1), _send(2))
    assert _answers(peer) == [(Error, 1), (Error, 2)] and peer.reading


# ------------------------------------------------------------------ real loopback TCP

BODY = 30_000
COUNT = 40  # 1.2 MB: well past the high-water mark and the (shrunk) socket buffers


class NeverReads(protocol.Protocol):
    """Logs in, then never reads another byte."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.lost: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        sock = self.transport.getHandle()  # type: ignore[attr-defined]
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.transport.write(encode(Hello(1, 1, "slow", self.token, request_id=1)))
        self.transport.pauseProducing()  # type: ignore[attr-defined]

    def connectionLost(self, reason: Any = None) -> None:
        self.lost.callback(None)


async def _until(check: Any, what: str, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.02)):
        if check():
            return
        await deferLater(reactor, 0.02, lambda: None)
    raise AssertionError(f"timed out waiting for {what}")


async def _within(d: Deferred[Any], what: str, timeout: float = 30.0) -> Any:
    d.addTimeout(timeout, reactor)
    try:
        return await d
    except defer.TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


@pytest_twisted.async_yield_fixture()
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    config = Config(
        listen=["tcp:0:interface=127.0.0.1"], data_dir=str(tmp_path), jwt_secret=SECRET,
        storage="memory", slow_reader_timeout_s=1.0, output_high_water_bytes=256 * 1024,
        send_rate=1e6, send_burst=1e6, send_bytes_rate=1e12, send_bytes_burst=1e12,
    )  # fmt: skip
    s = Server(config, reactor)
    await s.start()
    yield s
    await s.stop()


@pytest_twisted.ensureDeferred
async def test_a_receiver_that_never_reads_is_dropped_and_loses_nothing(server: Server) -> None:
    port = server.bound_ports()[0]
    slow = NeverReads(mint(SECRET, 2, "slow"))
    await protocol.ClientCreator(reactor, lambda: slow).connectTCP("127.0.0.1", port)
    await _until(lambda: (s := server.hub.device(2, "slow")) is not None and s.caller, "login")
    session = server.hub.device(2, "slow")
    assert isinstance(session, Session) and session.transport is not None
    # A small kernel send buffer (no autotuning): the bytes it cannot take queue in the process.
    server_sock = session.transport.getHandle()  # type: ignore[attr-defined]
    server_sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    sender = IMClient(f"tcp:host=127.0.0.1:port={port}", mint(SECRET, 1, "pc"), "pc",
                      reactor=reactor)  # fmt: skip
    await sender.connect()
    try:
        sends = [
            sender.send(ConvKind.USER, 2, b"%06d" % i + b"m" * (BODY - 6), timeout=60)
            for i in range(COUNT)
        ]
        await _within(gatherResults(sends), "the acks")  # every message acknowledged: durable
        await _until(lambda: session._stalled_since is not None or session.closing, "a stall")
        pushed = len(session.unacked or ())
        assert 0 < pushed < COUNT  # it stopped pushing: the rest waits in the inbox
        # dropped after slow_reader_timeout_s (the peer that does not read sees it once it does)
        await _until(lambda: session.transport is None, "the drop")
        assert server.hub.device(2, "slow") is None and not slow.lost.called
        slow.transport.resumeProducing()  # type: ignore[attr-defined]
        await _within(slow.lost, "the peer to see the drop")
    finally:
        await sender.close()
    receiver = IMClient(f"tcp:host=127.0.0.1:port={port}", mint(SECRET, 2, "slow"), "slow",
                        reactor=reactor)  # fmt: skip
    await receiver.connect()
    try:
        await receiver.drain()  # the login sync
        got = [m.body for m in receiver.state.messages(conv_key(ConvKind.USER, 1))]
    finally:
        await receiver.close()
    assert sorted(b[:6] for b in got) == [b"%06d" % i for i in range(COUNT)]  # none lost
