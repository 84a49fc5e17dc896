"""The IM logic of PROTOCOL.md sections 9-12, free of transport and storage details.

Each request method takes the caller and a decoded request frame and returns the reply
frame, or raises RequestError with a wire error code.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.codec import encode
from improto.enums import ContentType, ConvKind
from improto.errors import ErrorCode
from improto.frames import (
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
    HistoryPage,
    HistoryPull,
    Message,
    MyGroups,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Push,
    Send,
    SendAck,
    UnreadCount,
)
from improto.limits import (
    CURSOR_RESUME,
    HISTORY_PAGE_DEFAULT,
    MAX_FRAME_LENGTH,
    OFFLINE_PAGE_DEFAULT,
    OFFLINE_PAGE_MAX,
)
from improto_server import records
from improto_server.hub import Hub, LocalRouter, Pushable
from improto_server.ids import IdGenerator
from improto_server.model import Accepted, ConvKey, GroupInfo, LimitExceeded, PersistJob
from improto_server.ports import GroupStore, HistoryStore, InboxStore, PersistQueue, PushRouter
from improto_server.records import HistoryRecords, InboxRecords

log = Logger()
_T = TypeVar("_T")

# Bytes of a page frame that are not message records: header 7, fixed fields, list counts,
# and the largest possible unread list (one 11-byte entry per message).
_OFFLINE_OVERHEAD = 7 + 8 + 1 + 1 + 2 + 2 + 11 * OFFLINE_PAGE_MAX
_HISTORY_OVERHEAD = 7 + 1 + 8 + 1 + 2


def record_size(m: Message) -> int:
    """Encoded size of a MESSAGE record (PROTOCOL.md section 6)."""
    return 8 + 8 + 8 + 1 + len(m.sender_device.encode()) + 1 + 8 + 2 + 16 + 2 + len(m.body)


def _fit(messages: list[Message], budget: int) -> int:
    """How many leading messages fit in `budget` bytes (at least one, if any)."""
    return records.fit_sizes(map(record_size, messages), budget)


async def _available(d: Awaitable[_T]) -> _T:
    """A storage call whose failure (a service down or restarting) the client should retry:
    UNAVAILABLE, not INTERNAL. Errors the call raises on purpose pass through."""
    try:
        return await d
    except (RequestError, LimitExceeded, KeyError):
        raise
    except Exception:
        log.failure("storage call failed")
        raise RequestError(ErrorCode.UNAVAILABLE, "storage unavailable; retry") from None


async def _together(first: Deferred[Any] | None, second: Deferred[_T], both: bool = False) -> Any:
    """Two independent storage calls in flight at once (pull handlers): waits for both, then
    fails as `_available` would on the first failure. Returns the second's result, or both
    results with `both`."""
    calls = [d for d in (first, second) if d is not None]
    results = await DeferredList(calls, consumeErrors=True)
    for ok, value in results:
        if not ok:
            await _available(fail(value))
    if both:
        return tuple(value for _, value in results)
    return results[-1][1]


class RequestError(Exception):
    def __init__(self, code: ErrorCode, text: str = "") -> None:
        super().__init__(f"{code.name}: {text}")
        self.code = code
        self.text = text


def _refused(failure: Failure, msg_id: int) -> NoReturn:
    log.failure("persistence queue refused message {msg_id}", failure, msg_id=msg_id)
    raise RequestError(ErrorCode.UNAVAILABLE, "message not stored; retry")


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    device_id: str
    connection: Pushable | None = None  # the sending connection gets an ack, not a push


def peer_of(m: Message, me: int) -> tuple[int, int]:
    """The conversation as user `me` sees it (PROTOCOL.md section 6)."""
    if m.conv_kind == ConvKind.GROUP:
        return ConvKind.GROUP, m.conv_id
    return ConvKind.USER, (m.conv_id if m.sender_id == me else m.sender_id)


class ChatService:
    def __init__(
        self,
        ids: IdGenerator,
        queue: PersistQueue,
        inbox: InboxStore,
        history: HistoryStore,
        groups: GroupStore,
        hub: Hub,
        router: PushRouter | None = None,
    ) -> None:
        self.ids = ids
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.groups = groups
        self.hub = hub
        self.router: PushRouter = router or LocalRouter()
        # per connection: fires once its latest SEND has taken its msg_id
        self._id_gates: dict[object, Deferred[None]] = {}

    # ------------------------------------------------------------------ sending

    async def send(self, caller: Caller, req: Send) -> SendAck:
        # The SENDs of one connection take their ids in the order they arrived (spec 9.1),
        # although their group lookups can finish in any order: each waits for the previous
        # one's id before taking its own.
        key = caller.connection if caller.connection is not None else caller
        before = self._id_gates.get(key)
        gate: Deferred[None] = Deferred()
        self._id_gates[key] = gate
        try:
            if req.conv_kind == ConvKind.GROUP:
                info = await self._group_for_member(req.conv_id, caller.user_id)
                receivers = info.members
            else:
                receivers = (caller.user_id, req.conv_id)
            if before is not None and not before.called:
                await before
            # The id is taken right before the queue gets the job, with no wait in between,
            # so a gateway queues its messages in id order: one conversation then enters
            # every inbox in msg_id order.
            msg_id, now = self.ids.next()
            message = Message(
                msg_id, now, caller.user_id, caller.device_id, req.conv_kind, req.conv_id,
                req.content_type, req.client_msg_id, req.body,
            )  # fmt: skip
            accepting = self._accept(message, receivers, req.client_msg_id)  # queued now
        finally:
            if self._id_gates.get(key) is gate:
                del self._id_gates[key]
            gate.callback(None)
        accepted = await accepting
        if not accepted.duplicate:
            self._push(message, receivers, caller.connection)
        return SendAck(
            req.client_msg_id,
            accepted.msg_id,
            accepted.server_time,
            int(accepted.duplicate),
            request_id=req.request_id,
        )

    def _accept(
        self, message: Message, receivers: tuple[int, ...], cmid: bytes
    ) -> Deferred[Accepted]:
        """Hand the job to the queue now (before returning: the caller's order is the queue's
        order); a refusal becomes UNAVAILABLE."""
        job = PersistJob(message, tuple(sorted(set(receivers))))
        d: Deferred[Accepted] = maybeDeferred(self.queue.accept, job, cmid)
        d.addErrback(_refused, message.msg_id)
        return d

    def _push(self, message: Message, receivers: tuple[int, ...], exclude: Pushable | None) -> None:
        data = encode(Push(message))  # encoded once for every receiver
        users = set(receivers)
        self.hub.push(users, message.msg_id, data, exclude)
        d = self.router.route(users, message.msg_id, data)  # other gateways' devices
        d.addErrback(lambda f: log.failure("routing push {msg_id} failed", f,
                                           msg_id=message.msg_id))  # fmt: skip

    # ------------------------------------------------------------- offline sync

    async def offline_pull(self, caller: Caller, req: OfflinePull) -> OfflinePage | bytes:
        limit = req.limit or OFFLINE_PAGE_DEFAULT
        user, device = caller.user_id, caller.device_id
        moved: Deferred[int] | None = None
        if req.cursor == CURSOR_RESUME:
            start = await _available(self.inbox.position(user, device))
        else:
            start = req.cursor
            if start != 0:  # the client confirms it holds everything up to its cursor
                moved = self.inbox.advance(user, device, start)
        read = getattr(self.inbox, "page_records", None)
        if read is None:  # a store without records: pages of Message objects
            if moved is not None:
                await _available(moved)
            return await self._offline_page(caller, req, start, limit)
        # The position and the page do not depend on each other: one round trip, not two.
        page: InboxRecords = await _together(moved, read(user, start, limit))
        n = records.fit(page.records, MAX_FRAME_LENGTH - _OFFLINE_OVERHEAD)
        return records.offline_page(
            req.request_id, user, page.cursors[n - 1] if n else page.start,
            page.has_more or n < len(page.records), page.gap, list(page.records[:n]),
        )  # fmt: skip

    async def _offline_page(
        self, caller: Caller, req: OfflinePull, start: int, limit: int
    ) -> OfflinePage:
        user = caller.user_id
        page = await _available(self.inbox.page(user, start, limit))
        messages = [m for _, m in page.entries]
        n = _fit(messages, MAX_FRAME_LENGTH - _OFFLINE_OVERHEAD)
        has_more = page.has_more or n < len(messages)
        cursor = page.entries[n - 1][0] if n else page.start
        messages = messages[:n]
        counts: dict[tuple[int, int], int] = {}
        for m in messages:
            if m.sender_id != user:
                key = peer_of(m, user)
                counts[key] = counts.get(key, 0) + 1
        unread = tuple(UnreadCount(k, c, n) for (k, c), n in counts.items())
        return OfflinePage(
            cursor, int(has_more), int(page.gap), tuple(messages), unread,
            request_id=req.request_id,
        )  # fmt: skip

    async def offline_ack(self, caller: Caller, req: OfflineAck) -> OfflineAckOk:
        position = await _available(
            self.inbox.advance(caller.user_id, caller.device_id, req.cursor)
        )
        return OfflineAckOk(position, request_id=req.request_id)

    # ------------------------------------------------------------------ history

    async def history_pull(self, caller: Caller, req: HistoryPull) -> HistoryPage | bytes:
        limit = req.limit or HISTORY_PAGE_DEFAULT
        if req.conv_kind == ConvKind.GROUP:
            # Both lookups at once; a missing group still answers NOT_FOUND before FORBIDDEN.
            info, since = await _together(
                self.groups.info(req.conv_id), self.groups.since(req.conv_id, caller.user_id),
                both=True,
            )  # fmt: skip
            if info is None:
                raise RequestError(ErrorCode.NOT_FOUND, f"no group {req.conv_id}")
            if since is None:
                raise RequestError(ErrorCode.FORBIDDEN, f"not a member of group {req.conv_id}")
            key, min_id = ConvKey.group(req.conv_id), since
        else:
            key, min_id = ConvKey.direct(caller.user_id, req.conv_id), 0
        read = getattr(self.history, "page_records", None)
        if read is not None:
            raw: HistoryRecords = await _available(read(key, req.before_id, limit, min_id))
            n = records.fit(raw.records, MAX_FRAME_LENGTH - _HISTORY_OVERHEAD)
            return records.history_page(
                req.request_id, req.conv_kind, req.conv_id,
                raw.has_more or n < len(raw.records), list(raw.records[:n]),
            )  # fmt: skip
        page = await _available(self.history.page(key, req.before_id, limit, min_id))
        messages = list(page.messages)
        n = _fit(messages, MAX_FRAME_LENGTH - _HISTORY_OVERHEAD)
        return HistoryPage(
            req.conv_kind, req.conv_id, int(page.has_more or n < len(messages)),
            tuple(messages[:n]), request_id=req.request_id,
        )  # fmt: skip

    # ------------------------------------------------------------------- groups

    async def _group_for_member(self, group_id: int, user_id: int) -> GroupInfo:
        info = await _available(self.groups.info(group_id))
        if info is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no group {group_id}")
        if user_id not in info.members:
            raise RequestError(ErrorCode.FORBIDDEN, f"not a member of group {group_id}")
        return info

    async def _group_event(
        self,
        caller: Caller,
        group_id: int,
        msg: tuple[int, int],
        receivers: tuple[int, ...],
        event: dict[str, object],
    ) -> None:
        """Deliver a group event message (PROTOCOL.md 12.3) like any group message."""
        msg_id, now = msg
        body = json.dumps({"group_id": str(group_id), **event}, separators=(",", ":"))
        message = Message(
            msg_id, now, caller.user_id, caller.device_id, ConvKind.GROUP, group_id,
            ContentType.GROUP_EVENT, uuid.uuid4().bytes, body.encode(),
        )  # fmt: skip
        try:
            await self._accept(message, receivers, message.client_msg_id)
        except RequestError:
            return  # logged in _accept; the membership change itself stands
        self._push(message, receivers, caller.connection)

    async def group_create(self, caller: Caller, req: GroupCreate) -> GroupCreated:
        members = tuple(sorted(set(req.members) - {caller.user_id}))
        event_id = self.ids.next()
        try:
            gid = await _available(
                self.groups.create(caller.user_id, req.name, members, event_id[0])
            )
        except LimitExceeded as e:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, str(e)) from None
        everyone = (caller.user_id, *members)
        await self._group_event(
            caller, gid, event_id, everyone,
            {"event": "created", "name": req.name, "members": [str(u) for u in everyone]},
        )  # fmt: skip
        return GroupCreated(gid, request_id=req.request_id)

    async def group_add(self, caller: Caller, req: GroupAdd) -> GroupAddOk:
        info = await self._group_for_member(req.group_id, caller.user_id)
        event_id = self.ids.next()
        try:
            added = await _available(
                self.groups.add(req.group_id, tuple(set(req.members)), event_id[0])
            )
        except LimitExceeded as e:
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, str(e)) from None
        if added:
            await self._group_event(
                caller, req.group_id, event_id, (*info.members, *added),
                {"event": "added", "members": [str(u) for u in added]},
            )  # fmt: skip
        return GroupAddOk(req.group_id, len(added), request_id=req.request_id)

    async def group_remove(self, caller: Caller, req: GroupRemove) -> GroupRemoveOk:
        info = await self._group_for_member(req.group_id, caller.user_id)
        targets = set(req.members)
        if caller.user_id != info.owner_id and targets != {caller.user_id}:
            raise RequestError(ErrorCode.FORBIDDEN, "only the owner removes other members")
        event_id = self.ids.next()
        removed = await _available(self.groups.remove(req.group_id, tuple(targets)))
        if removed:
            await self._group_event(
                caller, req.group_id, event_id, info.members,  # includes the removed users
                {"event": "removed", "members": [str(u) for u in removed]},
            )  # fmt: skip
        return GroupRemoveOk(req.group_id, len(removed), request_id=req.request_id)

    async def group_members(self, caller: Caller, req: GroupMembers) -> GroupMemberList:
        info = await self._group_for_member(req.group_id, caller.user_id)
        return GroupMemberList(
            info.group_id, info.owner_id, info.name, info.members, request_id=req.request_id
        )

    async def my_groups(self, caller: Caller, req: MyGroups) -> GroupList:
        groups = await _available(self.groups.groups_of(caller.user_id))
        return GroupList(tuple(GroupSummary(g, n) for g, n in groups), request_id=req.request_id)
