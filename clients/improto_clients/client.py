"""The improto client library: one device's session with an improto server, on Twisted.

Everything here is non-blocking: methods return Deferreds (the coroutines inside are run with
`Deferred.fromCoroutine`), so they can be awaited from other coroutines or chained with
callbacks. The layers, one module each:

- `state.ClientState`: what the device keeps between sessions (offline cursor, messages per
  conversation, outbox of unacknowledged SENDs), optionally persisted as one JSON file;
  `conv_keys` names conversations ("user:1002", "group:7").
- `protocol.IMClientProtocol`: one TCP connection: framing, request/reply matching by
  request_id, heartbeats; it hands unsolicited frames (PUSH, SYNC_HINT, unmatched replies) to
  its client.
- `sync.sync_offline`: the offline sync loop, and its `SyncResult`.
- `IMClient` (here): the session API: connect + HELLO, sync after login and on hints, sends
  with retries, history, groups, and (optionally) reconnecting with backoff.
- `errors`: the exceptions (ServerError, SessionClosed, NotConnected, StateMismatch).

Every public name is importable from this module too.

PROTOCOL.md sections 8-12 and the client checklist (section 17) are what this implements.

    client = IMClient("tcp:host=127.0.0.1:port=5555", token, "laptop",
                      state=ClientState.load("laptop.json"))
    client.on_message = lambda conv, m: print(conv, m.body)
    await client.connect()                      # HELLO, then sync + outbox resend
    ack = await client.send_text(ConvKind.USER, 1002, "hi")
"""

from __future__ import annotations

import random
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable

from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.endpoints import clientFromString, connectProtocol
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.codec import encode
from improto.enums import ClientKind, CloseReason, ContentType
from improto.frames import (
    Frame,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupList,
    GroupMemberList,
    GroupMembers,
    GroupRemove,
    GroupRemoveOk,
    GroupSummary,
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    Message,
    MyGroups,
    OfflineAck,
    OfflineAckOk,
    Ping,
    Pong,
    PushAck,
    Send,
    SendAck,
)
from improto.limits import OFFLINE_PAGE_MAX, PROTOCOL_VERSION
from improto_clients.conv_keys import conv_key, message_conv, parse_conv_key
from improto_clients.errors import NotConnected, ServerError, SessionClosed, StateMismatch
from improto_clients.protocol import F, IMClientProtocol
from improto_clients.reactor_types import IClientReactor, default_reactor
from improto_clients.state import ClientState
from improto_clients.sync import SyncResult, sync_offline

__all__ = [
    "ClientState",
    "IMClient",
    "IMClientProtocol",
    "NotConnected",
    "ServerError",
    "SessionClosed",
    "StateMismatch",
    "SyncResult",
    "conv_key",
    "message_conv",
    "parse_conv_key",
]

log = Logger()


class IMClient:
    """A device's session. `token` may be a callable, called for a fresh token per login.

    Callbacks (attributes, all optional):
    - `on_login(hello_ok)`: a connection is logged in (connect() or a reconnect);
    - `on_message(conv, message)`: a new message arrived by PUSH (duplicates are not repeated);
    - `on_sync(result)`: a sync the client ran by itself (after login, SYNC_HINT, pushes);
    - `on_resend(send, ack_or_exception)`: an outbox SEND resent after login finished;
    - `on_close(exc)`: the logged-in connection ended (`SessionClosed` with the CLOSE reason);
    - `on_error(exc)`: an unsolicited ERROR or a failure of a background task.
    """

    def __init__(self, server: str, token: str | Callable[[], str], device_id: str, *,
                 state: ClientState | None = None, reactor: IClientReactor | None = None,
                 client_kind: int = ClientKind.DESKTOP, request_timeout: float = 10.0,
                 reconnect: bool = False, push_sync_delay: float | None = 5.0) -> None:  # fmt: skip
        self.server = server
        self.token = token
        self.device_id = device_id
        self.state = state if state is not None else ClientState()
        self.reactor = reactor if reactor is not None else default_reactor()
        self.client_kind = client_kind
        self.request_timeout = request_timeout
        self.reconnect = reconnect
        self.push_sync_delay = push_sync_delay
        self.rng = random.Random()

        self.on_login: Callable[[HelloOk], None] | None = None
        self.on_message: Callable[[str, Message], None] | None = None
        self.on_sync: Callable[[SyncResult], None] | None = None
        self.on_resend: Callable[[Send, SendAck | BaseException], None] | None = None
        self.on_close: Callable[[SessionClosed], None] | None = None
        self.on_error: Callable[[BaseException], None] | None = None

        self.protocol: IMClientProtocol | None = None  # set once HELLO_OK arrived
        self.hello: HelloOk | None = None
        self.last_close: SessionClosed | None = None
        self._sync_lock = DeferredLock()
        self._sync_queued = False
        self._tasks: set[Deferred[None]] = set()
        self._closing = False
        self._attempt = 0
        self._reconnect_call: IDelayedCall | None = None
        self._push_sync_call: IDelayedCall | None = None

    @property
    def user_id(self) -> int | None:
        return self.state.user_id

    @property
    def connected(self) -> bool:
        return self.protocol is not None and self.protocol.usable

    @property
    def reconnecting(self) -> bool:
        """A reconnect is scheduled (true inside on_close when one will follow)."""
        return self._reconnect_call is not None and self._reconnect_call.active()

    def conv_of(self, m: Message) -> str:
        assert self.user_id is not None
        return message_conv(self.user_id, m)

    # --- session

    def connect(self) -> Deferred[HelloOk]:
        """Connect, HELLO, and on HELLO_OK start the sync loop and the outbox resend in the
        background (their outcome goes to on_sync/on_resend). Fires with the HELLO_OK."""
        return Deferred.fromCoroutine(self._connect())

    async def _connect(self) -> HelloOk:
        self._closing = False
        proto = IMClientProtocol(self)
        await connectProtocol(clientFromString(self.reactor, self.server), proto)
        token = self.token() if callable(self.token) else self.token
        try:
            hello = Hello(PROTOCOL_VERSION, self.client_kind, self.device_id, token)
            ok = await proto.call(hello, HelloOk, self.request_timeout)
            self.state.bind(ok.user_id)
            if self._closing:  # close() was called while this (re)connect was under way
                raise NotConnected("closed by the application")
        except BaseException:
            if proto.connected:
                proto.tcp.loseConnection()
            raise
        self.protocol, self.hello, self._attempt = proto, ok, 0
        proto.start_heartbeat(ok.heartbeat_s)
        if self.on_login:
            self.on_login(ok)
        # Snapshot now: a send() started after this login delivers its own message.
        self._spawn(self._after_login(list(self.state.outbox.values())))
        return ok

    async def _after_login(self, unacked: list[Send]) -> None:
        # Checklist: on HELLO_OK run the sync loop, then resend unacknowledged SENDs.
        try:
            result = await self.sync()
        except Exception as e:
            self._report(e)
        else:
            if self.on_sync:
                self.on_sync(result)
        for frame in unacked:
            if frame.client_msg_id not in self.state.outbox:
                continue  # acknowledged meanwhile (a late SEND_ACK)
            outcome: SendAck | BaseException
            try:
                outcome = await self._deliver(frame, self.request_timeout, 3)
            except Exception as e:
                outcome = e
            if self.on_resend:
                self.on_resend(frame, outcome)
            if isinstance(outcome, SessionClosed | NotConnected):
                break  # the rest waits for the next login

    def close(self) -> Deferred[None]:
        """Close the connection (no reconnect); fires once it is closed."""
        self._closing = True
        if self._reconnect_call is not None and self._reconnect_call.active():
            self._reconnect_call.cancel()
        proto = self.protocol
        if proto is None or not proto.connected:
            return defer.succeed(None)
        d = proto.when_lost()
        proto.tcp.loseConnection()
        return d

    def drain(self) -> Deferred[None]:
        """Fires when no background task (auto sync, resend) is running."""

        async def wait() -> None:
            while self._tasks:
                await defer.DeferredList(list(self._tasks), consumeErrors=True)

        return Deferred.fromCoroutine(wait())

    def _proto(self) -> IMClientProtocol:
        if self.protocol is None or not self.protocol.usable:
            raise NotConnected("not connected")
        return self.protocol

    def _request(self, frame: Frame, reply: type[F], timeout: float | None = None) -> Deferred[F]:
        try:
            proto = self._proto()
        except NotConnected as e:
            return defer.fail(e)
        return proto.call(frame, reply, self.request_timeout if timeout is None else timeout)

    def _spawn(self, coro: Coroutine[Deferred[object], object, None]) -> None:
        d = Deferred.fromCoroutine(coro)
        self._tasks.add(d)

        def done(result: Failure | None) -> None:
            self._tasks.discard(d)
            # A lost connection is reported once, through on_close, not per task it broke.
            if isinstance(result, Failure) and not result.check(SessionClosed, NotConnected):
                self._report(_exception(result))

        d.addBoth(done)

    def _report(self, e: BaseException) -> None:
        if self.on_error:
            self.on_error(e)
        else:
            log.warn("background failure: {error!r}", error=e)

    # --- events from the protocol

    def _on_push(self, proto: IMClientProtocol, m: Message) -> None:
        try:
            new = self.state.add(m)
            if new:
                self.state.save()
        except Exception:
            log.failure("cannot store pushed message {id}: not acknowledging it", id=m.msg_id)
            return  # unacked: it still waits in the inbox for the next sync
        proto.send_frame(PushAck(m.msg_id))  # acked even when it is a duplicate
        if not new:
            return
        if self.on_message:
            self.on_message(self.conv_of(m), m)
        # Section 10.2: sync some seconds after pushes so that the offline cursor follows.
        if self.push_sync_delay is not None and self._push_sync_call is None:
            self._push_sync_call = self.reactor.callLater(self.push_sync_delay, self._push_sync)

    def _push_sync(self) -> None:
        self._push_sync_call = None
        self._request_sync()

    def _request_sync(self) -> None:
        """Run the sync loop in the background; at most one waits behind a running one."""
        if self._sync_queued:
            return
        self._sync_queued = True

        async def run() -> None:
            result = await self.sync()
            if self.on_sync:
                self.on_sync(result)

        self._spawn(run())

    def _on_server_error(self, err: ServerError) -> None:
        self._report(err)

    def _on_unmatched(self, frame: Frame) -> None:
        # A SEND_ACK whose request timed out still acknowledges its message (section 9.1.5).
        if isinstance(frame, SendAck) and frame.client_msg_id in self.state.outbox:
            self._acked(self.state.outbox[frame.client_msg_id], frame)
        else:
            log.debug("unmatched {type} request_id={rid}", type=frame.TYPE.name,
                      rid=frame.request_id)  # fmt: skip

    def _on_connection_lost(self, proto: IMClientProtocol, exc: SessionClosed) -> None:
        if proto is not self.protocol:
            return  # never logged in: connect() reports that
        self.protocol = None
        self.last_close = exc
        if self._push_sync_call is not None and self._push_sync_call.active():
            self._push_sync_call.cancel()
        self._push_sync_call = None
        if self.reconnect and not self._closing and self._may_reconnect(exc):
            self._schedule_reconnect()
        if self.on_close:
            self.on_close(exc)

    # --- reconnecting (section 8.4)

    def _may_reconnect(self, exc: SessionClosed) -> bool:
        if exc.reason == CloseReason.REPLACED:
            return False  # another instance of this device took over
        if exc.reason == CloseReason.AUTH_EXPIRED or (exc.error and exc.error.code // 100 == 2):
            return callable(self.token)  # only with a fresh token
        return exc.error is None or not exc.error.fatal

    def _schedule_reconnect(self) -> None:
        base = min(60.0, 2.0**self._attempt)  # 1, 2, 4 ... 60 s
        delay = base / 2 + self.rng.uniform(0, base / 2)  # jitter spreads a mass reconnect
        self._attempt += 1
        log.info("reconnecting in {delay:.1f} s", delay=delay)
        self._reconnect_call = self.reactor.callLater(delay, self._reconnect_now)

    def _reconnect_now(self) -> None:
        self._reconnect_call = None

        def failed(f: Failure) -> None:
            err = _exception(f)
            self._report(err)
            if isinstance(err, StateMismatch) or (
                isinstance(err, ServerError) and err.code // 100 == 2 and not callable(self.token)
            ):
                return  # retrying cannot help
            if not self._closing:
                self._schedule_reconnect()

        self.connect().addErrback(failed)

    # --- offline sync (section 10)

    def sync(self, limit: int = OFFLINE_PAGE_MAX) -> Deferred[SyncResult]:
        """Run the offline sync loop; runs wait for each other (one loop per connection)."""
        return self._sync_lock.run(self._sync_loop, limit)

    async def _sync_loop(self, limit: int) -> SyncResult:
        self._sync_queued = False  # a SYNC_HINT from now on needs another run
        return await sync_offline(self._proto(), self.state, limit, self.request_timeout)

    # --- sending (section 9.1)

    def send(self, conv_kind: int, conv_id: int, body: bytes | str,
             content_type: int = ContentType.TEXT, client_msg_id: bytes | None = None,
             timeout: float = 10.0, retries: int = 3) -> Deferred[SendAck]:  # fmt: skip
        """Send a message; it stays in the outbox until a SEND_ACK arrives.

        A timeout or a 5xx ERROR is retried `retries` times with the same client_msg_id (the
        server deduplicates). Fails with ServerError when refused (the message leaves the
        outbox), or with TimeoutError/SessionClosed/NotConnected (it stays in the outbox and
        is resent after the next login).
        """
        if isinstance(body, str):
            body = body.encode("utf-8")
        cmid = client_msg_id if client_msg_id is not None else uuid.uuid4().bytes
        frame = Send(cmid, conv_kind, conv_id, content_type, body)
        return Deferred.fromCoroutine(self._send(frame, timeout, retries))

    def send_text(self, conv_kind: int, conv_id: int, text: str, *,
                  client_msg_id: bytes | None = None, timeout: float = 10.0,
                  retries: int = 3) -> Deferred[SendAck]:  # fmt: skip
        return self.send(conv_kind, conv_id, text, ContentType.TEXT, client_msg_id, timeout,
                         retries)  # fmt: skip

    async def _send(self, frame: Send, timeout: float, retries: int) -> SendAck:
        encode(frame)  # refuse an invalid message before it enters the outbox
        self.state.outbox[frame.client_msg_id] = frame
        self.state.save()
        return await self._deliver(frame, timeout, retries)

    async def _deliver(self, frame: Send, timeout: float, retries: int) -> SendAck:
        attempt = 0
        while True:
            try:
                ack = await self._request(frame, SendAck, timeout)
            except NotConnected:
                raise NotConnected("not connected: it goes out after the next login") from None
            except defer.TimeoutError:
                if attempt >= retries:
                    raise
            except ServerError as e:
                if e.code // 100 in (1, 3):  # refused or malformed: a resend cannot succeed
                    self.state.outbox.pop(frame.client_msg_id, None)
                    self.state.save()
                    raise
                if not e.retriable or attempt >= retries:
                    raise
                await deferLater(self.reactor, min(2.0**attempt, 30.0))  # "retry later"
            else:
                self._acked(frame, ack)
                return ack
            attempt += 1

    def _acked(self, frame: Send, ack: SendAck) -> None:
        """Leave the outbox and store one's own message (a later sync page deduplicates it)."""
        self.state.outbox.pop(frame.client_msg_id, None)
        if self.user_id is not None:
            f = frame
            mine = Message(ack.msg_id, ack.server_time, self.user_id, self.device_id,
                           f.conv_kind, f.conv_id, f.content_type, f.client_msg_id,
                           f.body)  # fmt: skip
            self.state.add(mine)
        self.state.save()

    # --- history (section 11)

    def history(self, conv_kind: int, conv_id: int, before_id: int = 0,
                limit: int = 0) -> Deferred[HistoryPage]:  # fmt: skip
        """One page, newest first; messages are also stored locally (deduplicated)."""

        async def run() -> HistoryPage:
            page = await self._request(
                HistoryPull(conv_kind, conv_id, before_id, limit), HistoryPage
            )
            if sum(self.state.add(m) for m in page.messages):
                self.state.save()
            return page

        return Deferred.fromCoroutine(run())

    async def history_pages(self, conv_kind: int, conv_id: int, before_id: int = 0,
                            limit: int = 0, max_pages: int | None = None,
                            ) -> AsyncIterator[HistoryPage]:  # fmt: skip
        """Pages backwards (before_id = the last msg_id of the previous page) until has_more=0."""
        n = 0
        while True:
            page = await self.history(conv_kind, conv_id, before_id, limit)
            yield page
            n += 1
            # An empty page with has_more=1 would loop forever on the same before_id.
            if not page.has_more or not page.messages or (max_pages and n >= max_pages):
                return
            before_id = page.messages[-1].msg_id

    def history_all(self, conv_kind: int, conv_id: int, before_id: int = 0, limit: int = 0,
                    max_pages: int | None = None) -> Deferred[list[Message]]:  # fmt: skip
        """Every message of the conversation older than before_id, newest first."""

        async def run() -> list[Message]:
            out: list[Message] = []
            async for page in self.history_pages(conv_kind, conv_id, before_id, limit, max_pages):
                out += page.messages
            return out

        return Deferred.fromCoroutine(run())

    # --- groups (section 12) and ping

    def create_group(self, name: str, members: Iterable[int] = ()) -> Deferred[int]:
        """Fires with the new group id."""
        d = self._request(GroupCreate(name, tuple(members)), GroupCreated)
        return d.addCallback(lambda r: r.group_id)

    def add_members(self, group_id: int, members: Iterable[int]) -> Deferred[int]:
        """Fires with how many were added (members already in are skipped)."""
        d = self._request(GroupAdd(group_id, tuple(members)), GroupAddOk)
        return d.addCallback(lambda r: r.count)

    def remove_members(self, group_id: int, members: Iterable[int]) -> Deferred[int]:
        """Fires with how many were removed; removing oneself is leaving."""
        d = self._request(GroupRemove(group_id, tuple(members)), GroupRemoveOk)
        return d.addCallback(lambda r: r.count)

    def group_members(self, group_id: int) -> Deferred[GroupMemberList]:
        return self._request(GroupMembers(group_id), GroupMemberList)

    def my_groups(self) -> Deferred[tuple[GroupSummary, ...]]:
        return self._request(MyGroups(), GroupList).addCallback(lambda r: r.groups)

    def ping(self) -> Deferred[Pong]:
        return self._request(Ping(), Pong)

    def ack_cursor(self) -> Deferred[int]:
        """OFFLINE_ACK the stored cursor; fires with the device's position on the server."""
        d = self._request(OfflineAck(self.state.cursor), OfflineAckOk)
        return d.addCallback(lambda r: r.cursor)


def _exception(f: Failure) -> BaseException:
    assert f.value is not None  # a Failure always carries its exception
    return f.value
