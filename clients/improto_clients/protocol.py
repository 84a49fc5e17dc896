"""One connection of a client to an improto server: framing, request/reply matching, heartbeat.

`IMClientProtocol` matches replies to requests by request_id and hands unsolicited frames
(PUSH, SYNC_HINT, INBOX_NOTICE, READ_UPDATE, unmatched replies, ERRORs without a request) to
its `IMClient`. It counts bytes and frames both ways (`stats`, and the client's `wire`).
"""

from __future__ import annotations

import typing
from dataclasses import replace
from typing import TYPE_CHECKING, TypeVar, cast

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, ITCPTransport
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.codec import FrameReader, decode_payload, encode
from improto.errors import FrameTooLarge, ProtocolError, UnknownFrameType
from improto.frames import (
    FRAME_CLASSES,
    Close,
    Error,
    Frame,
    InboxNotice,
    Ping,
    Push,
    ReadUpdate,
    SyncHint,
)
from improto_clients.errors import NotConnected, ServerError, SessionClosed
from improto_clients.wire_stats import WireStats

if TYPE_CHECKING:
    from improto_clients.client import IMClient

log = Logger()
F = TypeVar("F", bound=Frame)
U32_MAX = 0xFFFFFFFF


class _Disconnecting(typing.Protocol):
    """Twisted's transports (FileDescriptor, StringTransport) set `disconnecting` once
    loseConnection was called; ITransport does not declare it."""

    @property
    def disconnecting(self) -> int: ...


def as_reply(frame: Frame, cls: type[F]) -> F:
    """The reply frame as its class (the protocol already matched the reply type)."""
    assert isinstance(frame, cls)
    return frame


class IMClientProtocol(Protocol):
    """One connection: frames in and out, request matching, heartbeat."""

    def __init__(self, client: IMClient) -> None:
        self.client = client
        self.reactor = client.reactor
        self.connected = False
        self.heartbeat_s = 0
        self.close_frame: Close | None = None  # the server's CLOSE, recorded for on_close
        self.fatal_error: ServerError | None = None
        self.drop_reason = ""  # why this side closed, for SessionClosed.text
        self._reader = FrameReader()
        self._pending: dict[int, tuple[type[Frame], Deferred[Frame]]] = {}
        self._next_id = 0
        self._last_sent = 0.0
        self._heartbeat: IDelayedCall | None = None
        self._deadline: IDelayedCall | None = None  # armed by a heartbeat PING
        self._lost_waiters: list[Deferred[None]] = []
        self.stats = WireStats(track_ids=client.wire.track_ids)  # this connection's
        self._sinks = (self.stats, client.wire)  # and the client's, over its connections

    # --- sending

    @property
    def usable(self) -> bool:
        if not self.connected or self.transport is None:
            return False
        return not cast(_Disconnecting, self.transport).disconnecting

    @property
    def tcp(self) -> ITCPTransport:
        """The transport of a made connection: endpoints connect us over TCP."""
        assert self.transport is not None, "no connection made yet"
        return cast(ITCPTransport, self.transport)

    def next_request_id(self) -> int:
        """A wrapping u32 counter that skips 0 and ids still waiting for their reply."""
        while True:
            self._next_id = self._next_id % U32_MAX + 1
            if self._next_id not in self._pending:
                return self._next_id

    def send_frame(self, frame: Frame) -> None:
        """Write a frame that gets no reply (PUSH_ACK)."""
        self._write(encode(frame), frame.TYPE)

    def request(self, frame: Frame, timeout: float | None = None) -> Deferred[Frame]:
        """Send `frame` with a fresh request_id; fires with the reply frame, or fails with
        ServerError (an ERROR), SessionClosed, NotConnected or defer.TimeoutError."""
        if not self.usable:
            return defer.fail(NotConnected("not connected"))
        rid = self.next_request_id()
        try:
            data = encode(replace(frame, request_id=rid))
        except ProtocolError as e:
            return defer.fail(e)

        def forget(_: Deferred[Frame]) -> None:  # cancelled (timeout): a late reply is unmatched
            self._pending.pop(rid, None)

        d: Deferred[Frame] = Deferred(forget)
        self._pending[rid] = (FRAME_CLASSES[frame.TYPE | 0x80], d)
        self._write(data, frame.TYPE)
        if timeout:
            d.addTimeout(timeout, self.reactor)
        return d

    def call(self, frame: Frame, reply: type[F], timeout: float | None = None) -> Deferred[F]:
        """`request`, typed by the reply class it fires with (the one `frame` expects)."""
        return self.request(frame, timeout).addCallback(as_reply, reply)

    def _write(self, data: bytes, type_code: int) -> None:
        self._last_sent = self.reactor.seconds()
        for s in self._sinks:
            s.sent(type_code, len(data))
        self.tcp.write(data)

    def when_lost(self) -> Deferred[None]:
        if not self.connected:
            return defer.succeed(None)
        d: Deferred[None] = Deferred()
        self._lost_waiters.append(d)
        return d

    def _drop(self, why: str) -> None:
        """Close without waiting for anything more from the server."""
        log.warn("closing the connection: {why}", why=why)
        self.drop_reason = why
        self.tcp.abortConnection()

    # --- receiving

    def connectionMade(self) -> None:
        self.connected = True
        self._last_sent = self.reactor.seconds()

    def dataReceived(self, data: bytes) -> None:
        if self._deadline is not None:  # any bytes prove the connection is alive
            self._deadline.cancel()
            self._deadline = None
        for s in self._sinks:
            s.bytes_in += len(data)
        too_large: FrameTooLarge | None = None
        try:
            payloads = self._reader.feed(data)
        except FrameTooLarge as e:
            payloads, too_large = e.frames, e  # the whole frames before it still count
        for payload in payloads:
            if not self.usable:
                return  # closing: the rest would only be read to be thrown away
            if len(payload) >= 2:  # header: version, type
                for s in self._sinks:
                    s.received(payload[1], len(payload))
            try:
                frame = decode_payload(payload)
            except UnknownFrameType:
                continue  # section 14: a client skips frame types it does not know
            except ProtocolError as e:
                self._bad_frame(e)
                return
            self._dispatch(frame)
        if too_large is not None:
            # Section 2: a client refuses an oversize length before buffering it and closes.
            self._drop(str(too_large))

    def _bad_frame(self, e: ProtocolError) -> None:
        """Section 2: the server never sends an undecodable frame, so the stream is not to be
        trusted any more: close (a reconnecting client then reconnects)."""
        entry = self._pending.pop(e.request_id, None) if e.request_id else None
        if entry is not None:
            entry[1].errback(e)
        self._drop(f"undecodable frame from the server: {e}")

    def _dispatch(self, frame: Frame) -> None:
        if frame.TYPE.client_to_server:
            return  # a client type sent by the server: ignored like an unknown type (section 7)
        for s in self._sinks:
            s.delivered(frame)
        # Unsolicited frames are recognised by type: their request_id (0) matches nothing.
        if isinstance(frame, Push):
            self.client._on_push(self, frame.message)
            return
        if isinstance(frame, SyncHint):
            self.client._request_sync()
            return
        if isinstance(frame, InboxNotice):
            self.client._on_notice(frame)
            return
        if isinstance(frame, ReadUpdate):
            self.client._on_read_update(frame)
            return
        if isinstance(frame, Close):
            self.close_frame = frame  # the server closes the TCP connection next
            return
        entry = self._pending.pop(frame.request_id, None) if frame.request_id else None
        if isinstance(frame, Error):
            err = ServerError(frame.code, frame.text, frame.request_id)
            if err.fatal:
                self.fatal_error = err
            if entry is not None:
                entry[1].errback(err)
            else:
                self.client._on_server_error(err)
            if err.fatal:
                self.tcp.loseConnection()
            return
        if entry is None:
            self.client._on_unmatched(frame)
            return
        expected, d = entry
        if type(frame) is not expected:
            d.errback(ProtocolError(f"expected {expected.TYPE.name}, got {frame.TYPE.name}"))
        else:
            d.callback(frame)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.connected = False
        for call in (self._heartbeat, self._deadline):
            if call is not None and call.active():
                call.cancel()
        self._heartbeat = self._deadline = None
        c = self.close_frame
        exc = SessionClosed(c.reason if c else None, c.text if c else self.drop_reason,
                            self.fatal_error)  # fmt: skip
        pending, self._pending = self._pending, {}
        for _, d in pending.values():
            d.errback(exc)
        self.client._on_connection_lost(self, exc)
        waiters, self._lost_waiters = self._lost_waiters, []
        for w in waiters:
            w.callback(None)

    # --- heartbeat (section 8.4)

    def start_heartbeat(self, heartbeat_s: int) -> None:
        """PING whenever nothing was sent for heartbeat_s; drop the connection if nothing at
        all arrives for 2 x heartbeat_s after a PING. 0 disables it."""
        self.heartbeat_s = heartbeat_s
        if heartbeat_s > 0 and self.connected:
            self._heartbeat = self.reactor.callLater(heartbeat_s, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        hb = self.heartbeat_s
        idle = self.reactor.seconds() - self._last_sent
        if idle >= hb:
            self.request(Ping(), timeout=2 * hb).addErrback(lambda _: None)  # loss is handled
            if self._deadline is None:
                self._deadline = self.reactor.callLater(2 * hb, self._dead)
            idle = 0.0
        self._heartbeat = self.reactor.callLater(hb - idle, self._heartbeat_due)

    def _dead(self) -> None:
        self._deadline = None
        self._drop(f"nothing from the server for {2 * self.heartbeat_s} s after a PING")
