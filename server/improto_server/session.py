"""One client connection: framing, the session state machine, timers and push flow control.

UNAUTHENTICATED --HELLO ok--> AUTHENTICATED --> closed (PROTOCOL.md section 8). Requests are
handed to ChatService; this module only speaks frames.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IReactorTime, ITransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto import records
from improto.codec import FrameReader, check_header, decode_payload, encode
from improto.enums import CloseReason, FrameType
from improto.errors import ErrorCode, FrameTooLarge, ProtocolError
from improto.frames import (
    Close,
    Error,
    Frame,
    Hello,
    HelloOk,
    Ping,
    Pong,
    PushAck,
    SyncHint,
)
from improto.limits import MAX_FRAME_LENGTH
from improto.tokens import Identity, TokenError, verify
from improto_server.config import Config
from improto_server.deadlines import Deadlines
from improto_server.eager_write import eagerly_writable, write_eagerly
from improto_server.hub import Hub, LocalRouter
from improto_server.ports import PushRouter
from improto_server.service import Caller, ChatService, RequestError

log = Logger()

_SYNC_HINT = encode(SyncHint())

# Requests answered by ChatService, by the name of the method that answers them.
_HANDLERS: dict[FrameType, str] = {
    FrameType.SEND: "send",
    FrameType.OFFLINE_PULL: "offline_pull",
    FrameType.OFFLINE_ACK: "offline_ack",
    FrameType.HISTORY_PULL: "history_pull",
    FrameType.GROUP_CREATE: "group_create",
    FrameType.GROUP_ADD: "group_add",
    FrameType.GROUP_REMOVE: "group_remove",
    FrameType.GROUP_MEMBERS: "group_members",
    FrameType.MY_GROUPS: "my_groups",
}


class Session(Protocol):
    # Memory per idle connection (bench/idle.py): slots, containers made on first use, and one
    # deadline for the login, the idle timeout and the token expiry together, kept in the
    # factory's Deadlines instead of a DelayedCall per timer.
    __slots__ = (
        "_eager",
        "_early",
        "_expires_at",
        "_last_rx",
        "caller",
        "closing",
        "connected",
        "deadline",
        "device_id",
        "factory",
        "hint_pending",
        "presence",
        "reader",
        "registered",
        "transport",
        "unacked",
        "user_id",
    )

    def __init__(self, factory: SessionFactory) -> None:
        self.factory = factory
        self.transport: ITransport | None = None  # set by makeConnection (slots hide
        # Protocol's defaults)
        self.connected = 0
        self.reader = FrameReader(MAX_FRAME_LENGTH)
        self.user_id = 0
        self.device_id = ""
        self.caller: Caller | None = None
        self.presence = ""  # this session's presence value (set by the push router)
        self.registered = False  # in the hub (from a valid HELLO until the connection ends)
        self._early: list[tuple[int, bytes]] | None = None  # pushes that came before HELLO_OK
        self.closing = False
        self.unacked: dict[int, None] | None = None  # msg_ids pushed, not yet acknowledged
        self.hint_pending = False
        self._eager = False  # plain TCP: frames are sent at once when nothing is queued
        self._last_rx = 0.0  # when the last whole frame arrived
        self._expires_at: float | None = None  # the token's expiry, once logged in
        self.deadline: float | None = None  # when the timer calls deadline_due (Deadlines)

    def _write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None:  # not connected yet or any more: nothing to write to
            return
        if self._eager:
            write_eagerly(transport, data)
        else:
            transport.write(data)

    @property
    def clock(self) -> IReactorTime:
        return self.factory.clock

    # ------------------------------------------------------------ connection

    def connectionMade(self) -> None:
        self._eager = eagerly_writable(self.transport)  # frames leave now, not next turn
        self._last_rx = self.clock.seconds()
        # PINGs keep a connection alive but do not log it in: HELLO must succeed in time too.
        # Until it does, the deadline is that login deadline (no frame can come due earlier).
        self.factory.deadlines.set(self, self._last_rx + self.factory.config.idle_timeout)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closing = True
        self._cancel_deadline()
        self._gone()

    def dataReceived(self, data: bytes) -> None:
        if self.closing:
            return
        too_large: FrameTooLarge | None = None
        try:
            payloads = self.reader.feed(data)
        except FrameTooLarge as e:
            payloads, too_large = e.frames, e  # serve the whole frames that came before it
        if payloads:  # the timer reads this when it fires: no reschedule per frame
            self._last_rx = self.clock.seconds()
        for payload in payloads:
            if self.closing:
                return
            self._frame_received(payload)
        if too_large is not None:
            self._fatal(too_large.code, str(too_large), 0)

    def _frame_received(self, payload: bytes) -> None:
        # PUSH_ACK, one per delivered message, is read without the codec. Anything unusual
        # (not logged in, msg_id 0, not a PUSH_ACK) takes the full path.
        if self.caller is not None and (msg_id := records.push_ack_msg_id(payload)):
            self._push_acked(msg_id)
            return
        try:
            cls, request_id = check_header(payload)
            if not cls.TYPE.client_to_server:  # spec 13.2: the type is checked before the body
                self.send(Error(ErrorCode.UNKNOWN_FRAME_TYPE, "server-to-client frame type",
                                request_id=request_id))  # fmt: skip
                return
            frame = decode_payload(payload)
        except ProtocolError as e:
            rid = e.request_id or 0
            log.info("bad frame from {peer}: {error}", peer=self._peer(), error=e)
            if e.fatal:
                self._fatal(e.code, e.message, rid)
            else:
                self.send(Error(e.code, e.message[:1024], request_id=rid))
            return
        self._dispatch(frame)

    # -------------------------------------------------------------- dispatch

    def _dispatch(self, f: Frame) -> None:
        if isinstance(f, Ping):
            self.send(Pong(self._now_ms(), request_id=f.request_id))
        elif isinstance(f, Hello):
            self._hello(f)
        elif self.caller is None:
            self.send(Error(ErrorCode.NOT_AUTHENTICATED, "send HELLO first",
                            request_id=f.request_id))  # fmt: skip
        elif isinstance(f, PushAck):
            self._push_acked(f.msg_id)
        else:
            method = getattr(self.factory.service, _HANDLERS[f.TYPE])
            self._run(f.request_id, method(self.caller, f))

    def _run(self, request_id: int, work: Coroutine[Any, Any, Frame | bytes]) -> None:
        d = Deferred.fromCoroutine(work)
        d.addCallbacks(self.send, self._request_failed, errbackArgs=(request_id,))

    def _request_failed(self, failure: Failure, request_id: int) -> None:
        err = failure.value
        if isinstance(err, RequestError):
            self.send(Error(err.code, err.text[:1024], request_id=request_id))
        else:
            log.failure("request {rid} failed", failure, rid=request_id)
            self.send(Error(ErrorCode.INTERNAL, "internal error", request_id=request_id))

    # ------------------------------------------------------------------ auth

    def _hello(self, f: Hello) -> None:
        if self.caller is not None or self.registered:
            self.send(Error(ErrorCode.ALREADY_AUTHENTICATED, "already logged in",
                            request_id=f.request_id))  # fmt: skip
            return
        try:
            ident = verify(self.factory.secret, f.token, f.device_id, now=self.clock.seconds())
        except TokenError as e:
            code = ErrorCode.TOKEN_EXPIRED if e.expired else ErrorCode.AUTH_FAILED
            log.info("login refused from {peer}: {why}", peer=self._peer(), why=e)
            self._fatal(code, str(e), f.request_id)
            return
        self.user_id, self.device_id = ident.user_id, ident.device_id
        old = self.factory.hub.register(self)
        self.registered = True
        if old is not None and isinstance(old, Session):
            old.close(CloseReason.REPLACED, f"device {self.device_id} logged in again")
        # HELLO_OK only once the presence map names this session (at once with one gateway):
        # a message accepted after HELLO_OK is then pushed here from any gateway.
        d = self.factory.router.online(self)
        d.addErrback(lambda e: log.failure("announcing {peer} failed", e, peer=self._peer()))
        d.addCallback(lambda _: self._logged_in(f, ident))

    def _logged_in(self, f: Hello, ident: Identity) -> None:
        if self.closing:  # gone while its presence was written: withdraw it again
            d = self.factory.router.offline(self)
            d.addErrback(lambda e: log.failure("withdrawing presence failed", e))
            return
        config = self.factory.config
        self.caller = Caller(ident.user_id, ident.device_id, self)
        self._expires_at = ident.expires_at
        if self.deadline is None or ident.expires_at < self.deadline:
            self.factory.deadlines.set(self, ident.expires_at)  # due first: move it earlier
        ok = HelloOk(
            ident.user_id,
            self._now_ms(),
            config.heartbeat,
            config.idle_timeout,
            MAX_FRAME_LENGTH,
            request_id=f.request_id,
        )
        self.send(ok)
        early, self._early = self._early, None
        for msg_id, data in early or ():  # pushed while the login was being announced
            self.push(msg_id, data)

    # ----------------------------------------------------------------- pushes

    def push(self, msg_id: int, data: bytes) -> None:
        if self.closing:
            return
        if self.caller is None:  # no PUSH before HELLO_OK: kept until it is sent
            if self._early is None:
                self._early = []
            if len(self._early) < self.factory.config.max_unacked_pushes:
                self._early.append((msg_id, data))
            else:
                self.hint_pending = True
            return
        unacked = self.unacked
        if unacked is None:
            unacked = self.unacked = {}
        if len(unacked) >= self.factory.config.max_unacked_pushes:
            self.hint_pending = True  # the message waits in the inbox; hint once acks resume
            return
        unacked[msg_id] = None
        self._write(data)

    def _push_acked(self, msg_id: int) -> None:
        unacked = self.unacked
        if unacked is None:
            return  # nothing pushed since login: no window to reopen
        unacked.pop(msg_id, None)
        if self.hint_pending and len(unacked) < self.factory.config.max_unacked_pushes:
            self.hint_pending = False
            self._write(_SYNC_HINT)

    # ----------------------------------------------------------------- output

    def send(self, frame: Frame | bytes) -> None:
        """Write a frame; bytes are a whole frame already encoded (the service's pages)."""
        if not self.closing:
            data = frame if isinstance(frame, bytes) else encode(frame)
            self._write(data)

    def close(self, reason: CloseReason, text: str) -> None:
        """Send CLOSE, then close the connection (PROTOCOL.md CLOSE)."""
        self.send(Close(reason, text))
        self._shut()

    def _fatal(self, code: ErrorCode, text: str, request_id: int) -> None:
        self.send(Error(code, text[:1024], request_id=request_id))
        self._shut()

    def _shut(self) -> None:
        if not self.closing:
            self.closing = True
            self._gone()
            if self.transport is not None:
                self.transport.loseConnection()

    def _gone(self) -> None:
        """Leave the hub and the presence map (once)."""
        if self.registered and self.factory.hub.device(self.user_id, self.device_id) is self:
            self.factory.hub.unregister(self)
            d = self.factory.router.offline(self)
            d.addErrback(lambda f: log.failure("withdrawing presence failed", f))

    # ---------------------------------------------------------------- timer

    def deadline_due(self) -> None:
        """The deadline came: close for the one that has passed, or set the next one.

        Before a valid HELLO it is the login deadline; after, the earlier of the idle timeout
        (the last frame + idle_timeout) and the token's expiry.
        """
        if not self.registered:
            self._idle_out()
            return
        now = self.clock.seconds()
        expires_at = self._expires_at
        if expires_at is not None and now >= expires_at:
            self.close(CloseReason.AUTH_EXPIRED, "token expired")
            return
        idle_at = self._last_rx + self.factory.config.idle_timeout
        if now >= idle_at:
            self._idle_out()
            return
        next_at = idle_at if expires_at is None else min(idle_at, expires_at)
        self.factory.deadlines.set(self, next_at)

    def _cancel_deadline(self) -> None:
        if self.deadline is not None:
            self.factory.deadlines.set(self, None)

    def _idle_out(self) -> None:
        log.info("closing idle connection {peer}", peer=self._peer())
        self._cancel_deadline()
        self.close(CloseReason.IDLE_TIMEOUT, "no frame received, or no login, in time")

    def _now_ms(self) -> int:
        return int(self.clock.seconds() * 1000)

    def _peer(self) -> str:
        return str(self.transport.getPeer()) if self.transport else "?"


class SessionFactory(Factory):
    def __init__(self, config: Config, service: ChatService, hub: Hub, clock: IReactorTime,
                 secret: str, router: PushRouter | None = None) -> None:  # fmt: skip
        self.config = config
        self.service = service
        self.hub = hub
        self.router: PushRouter = router or LocalRouter()
        self.clock = clock
        self.secret = secret
        self.deadlines = Deadlines(clock)  # every session's timer, on one reactor timer

    def buildProtocol(self, addr: IAddress | None) -> Session:
        return Session(self)
