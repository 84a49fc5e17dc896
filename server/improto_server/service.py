"""The IM logic of PROTOCOL.md sections 9-12, free of transport and storage details.

Each request method takes the caller and a decoded request frame and returns the reply
frame, or raises RequestError with a wire error code.
"""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Awaitable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar, cast

from twisted.internet.defer import Deferred, DeferredList, fail, maybeDeferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto import records
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
    HistoryPull,
    Message,
    MyGroups,
    OfflineAck,
    OfflineAckOk,
    OfflinePull,
    Send,
    SendAck,
)
from improto.limits import (
    CURSOR_RESUME,
    HISTORY_PAGE_DEFAULT,
    OFFLINE_PAGE_DEFAULT,
)
from improto_server import metrics
from improto_server.config import Config
from improto_server.event_retry import EventDelivery, GroupEvent
from improto_server.hub import Hub, LocalRouter, Pushable
from improto_server.ids import IdGenerator
from improto_server.model import (
    Accepted,
    ConvKey,
    DeviceNotifyJob,
    GroupInfo,
    GroupNotFound,
    HistoryRecords,
    InboxRecords,
    LimitExceeded,
    PersistJob,
)
from improto_server.ports import (
    ConversationStore,
    DeviceStore,
    GroupStore,
    HistoryStore,
    InboxStore,
    NotifyQueue,
    PersistQueue,
    PushRouter,
    TimelineStore,
)
from improto_server.rate_limits import RateLimits

if TYPE_CHECKING:
    from improto_server.conversation_service import ConversationService
    from improto_server.push_service import PushService
    from improto_server.timeline_service import TimelineService

log = Logger()
_T = TypeVar("_T")


async def available(d: Awaitable[_T]) -> _T:
    """A storage call whose failure (a service down or restarting) the client should retry:
    UNAVAILABLE, not INTERNAL. Errors the call raises on purpose pass through."""
    try:
        return await d
    except GroupNotFound as e:  # gone since the membership check
        raise RequestError(ErrorCode.NOT_FOUND, str(e)) from None
    except (RequestError, LimitExceeded):
        raise
    except Exception:
        log.failure("storage call failed")
        raise RequestError(ErrorCode.UNAVAILABLE, "storage unavailable; retry") from None


async def _together(first: Deferred[Any] | None, second: Deferred[_T], both: bool = False) -> Any:
    """Two independent storage calls in flight at once (pull handlers): waits for both, then
    fails as `available` would on the first failure. Returns the second's result, or both
    results with `both`."""
    calls = [d for d in (first, second) if d is not None]
    results = await DeferredList(calls, consumeErrors=True)
    for ok, value in results:
        if not ok:
            await available(fail(value))
    if both:
        return tuple(value for _, value in results)
    return results[-1][1]


def _member_list(users: tuple[int, ...]) -> list[str]:
    """A group event's `members` (PROTOCOL.md 12.3): decimal strings, ascending user id."""
    return [str(u) for u in sorted(set(users))]


class RequestError(Exception):
    def __init__(self, code: ErrorCode, text: str = "", *, retry_after_s: float = 0.0) -> None:
        super().__init__(f"{code.name}: {text}")
        self.code = code
        self.text = text
        self.retry_after_s = retry_after_s  # RATE_LIMITED: the wait its text announces


def check_rate(wait_s: float, what: str) -> None:
    """RATE_LIMITED, its retry-after first in the text as PROTOCOL.md 9.4 says, if wait_s > 0."""
    if wait_s > 0.0:
        ms = max(1, math.ceil(wait_s * 1000))
        raise RequestError(
            ErrorCode.RATE_LIMITED, f"retry_after_ms={ms} {what}", retry_after_s=ms / 1000
        )


def _send_refused(failure: Failure) -> Failure:
    if isinstance(failure.value, RequestError):
        metrics.send_refused(failure.value.code)
    return failure


def _refused(failure: Failure, msg_id: int) -> NoReturn:
    log.failure("persistence queue refused message {msg_id}", failure, msg_id=msg_id)
    raise RequestError(ErrorCode.UNAVAILABLE, "message not stored; retry")


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    device_id: str
    connection: Pushable | None = None  # the sending connection gets an ack, not a push


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
        limits: RateLimits | None = None,
        *,
        conversations: ConversationStore | None = None,
        read_receipts: bool = True,
        devices: DeviceStore | None = None,
        push_platforms: Sequence[str] = (),
        notify_queue: NotifyQueue | None = None,
        timeline: TimelineStore | None = None,
        clock: IReactorTime | None = None,
    ) -> None:
        """`clock`: the reactor the background retries of refused group events run on (None:
        the global reactor; a task.Clock in tests). `devices`: the sessions check revocations
        at HELLO (spec 8.2) in it; with `push_platforms` too (the platforms a device may
        register; empty: no push), devices may register for notifications (Feature.PUSH, spec
        19). `notify_queue` (given when notifications are sent): where `ack_overdue` puts its
        jobs for the notifier; the sessions watch their PUSH acknowledgements only with it.
        `timeline`: the large groups' timelines (TIMELINE_HEADS, TIMELINE_PULL: LARGE_GROUPS,
        spec 20)."""
        self.ids = ids
        self.queue = queue
        self.inbox = inbox
        self.history = history
        self.groups = groups
        self.hub = hub
        self.router: PushRouter = router or LocalRouter()
        if clock is None:
            from twisted.internet import reactor

            clock = cast(IReactorTime, reactor)
        if limits is None:  # the default settings, on the service's clock
            limits = RateLimits(Config(), clock)
        self.limits = limits
        # group events the queue refused: accepted later, in each group's order (12.2)
        self.events = EventDelivery(lambda job, cmid: self.queue.accept(job, cmid), clock)
        self.conversations = conversations
        self.read_receipts = read_receipts  # READ_RECEIPTS may be enabled (config)
        # CONV_LIST, CONV_CHANGES, READ_MARK, CONV_HIDE: with a conversation store only
        self.convs: ConversationService | None = None
        if conversations is not None:
            from improto_server.conversation_service import ConversationService  # uses ours

            self.convs = ConversationService(
                conversations, ids, queue, groups, hub, self.router, limits, read_receipts
            )
        self.devices = devices
        # PUSH_REGISTER, PUSH_UNREGISTER: with a device store and platforms to register only
        self.push: PushService | None = None
        if devices is not None and push_platforms:
            from improto_server.push_service import PushService  # uses ours

            self.push = PushService(devices, limits, push_platforms)
        self.notify_queue = notify_queue
        # TIMELINE_HEADS, TIMELINE_PULL: with a timeline store only
        self.timelines: TimelineService | None = None
        if timeline is not None:
            from improto_server.timeline_service import TimelineService  # uses ours

            self.timelines = TimelineService(timeline, groups, conversations)
            if self.convs is not None:  # lists show large groups' heads (spec 20)
                self.convs.timelines = self.timelines
        # per connection: fires once its latest SEND has taken its msg_id
        self._id_gates: dict[object, Deferred[None]] = {}

    # ------------------------------------------------------------------ sending

    async def send(self, caller: Caller, req: Send) -> SendAck:
        try:
            ack = await self._send(caller, req)
        except RequestError as e:
            metrics.send_refused(e.code)
            raise
        metrics.send_accepted(bool(ack.duplicate))
        return ack

    def send_now(self, caller: Caller, req: Send) -> Deferred[SendAck]:
        """`send` as one Deferred chain, without a coroutine, when nothing must be waited for
        before the id: a 1:1 message while no earlier SEND of the connection waits for its
        group lookup (the common SEND: the coroutine machinery was a large share of its
        CPU). Otherwise `send` itself."""
        key = caller.connection if caller.connection is not None else caller
        if req.conv_kind == ConvKind.GROUP or key in self._id_gates:
            return Deferred.fromCoroutine(self.send(caller, req))
        try:
            inbox_users = tuple(sorted({caller.user_id, req.conv_id}))
            wait = self.limits.send(caller.user_id, None, len(inbox_users), len(req.body))
            check_rate(wait, "sending too fast")
            job, accepting = self._queue(caller, req, inbox_users, False)
        except RequestError as e:
            metrics.send_refused(e.code)
            return fail(e)
        except Exception:
            return fail()
        return accepting.addCallbacks(self._acked, _send_refused, callbackArgs=(job, caller, req))

    def _acked(self, accepted: Accepted, job: PersistJob, caller: Caller, req: Send) -> SendAck:
        ack = self._accepted(accepted, job, caller, req, job.inbox_users)
        metrics.send_accepted(bool(ack.duplicate))
        return ack

    async def _send(self, caller: Caller, req: Send) -> SendAck:
        # The SENDs of one connection take their ids in the order they arrived (spec 9.1),
        # although their group lookups can finish in any order: each waits for the previous
        # one's id before taking its own.
        key = caller.connection if caller.connection is not None else caller
        before = self._id_gates.get(key)
        gate: Deferred[None] = Deferred()
        self._id_gates[key] = gate
        try:
            members: int | None = None
            large = False
            if req.conv_kind == ConvKind.GROUP:
                info = await self._group_for_member(req.conv_id, caller.user_id)
                receivers, members, large = info.members, len(info.members), info.large
            else:
                receivers = (caller.user_id, req.conv_id)
            inbox_users = tuple(sorted(set(receivers)))
            # Before the id and the queue: a refused SEND leaves nothing behind, so the
            # client's retry with the same client_msg_id is a first attempt.
            wait = self.limits.send(caller.user_id, members, len(inbox_users), len(req.body))
            check_rate(wait, "sending too fast")
            if before is not None and not before.called:
                await before
            job, accepting = self._queue(caller, req, inbox_users, large)
        finally:
            if self._id_gates.get(key) is gate:
                del self._id_gates[key]
            gate.callback(None)
        return self._accepted(await accepting, job, caller, req, inbox_users)

    def _queue(
        self, caller: Caller, req: Send, inbox_users: tuple[int, ...], large: bool
    ) -> tuple[PersistJob, Deferred[Accepted]]:
        # The id is taken right before the queue gets the job, with no wait in between, so a
        # gateway queues its messages in id order: one conversation then enters every inbox
        # in msg_id order.
        msg_id, now = self.ids.next()
        message = Message(
            msg_id, now, caller.user_id, caller.device_id, req.conv_kind, req.conv_id,
            req.content_type, req.client_msg_id, req.body,
        )  # fmt: skip
        # A large group's message goes to its timeline, not into the inboxes: the flag read
        # here decides for this message whatever the membership does meanwhile.
        job = PersistJob.for_timeline(message) if large else PersistJob(message, inbox_users)
        return job, self._accept(job, req.client_msg_id)  # queued now

    def _accepted(
        self, accepted: Accepted, job: PersistJob, caller: Caller, req: Send,
        receivers: tuple[int, ...],
    ) -> SendAck:  # fmt: skip
        if not accepted.duplicate:  # a large group's job has no inbox_users: its members
            self._push(job, caller.connection, receivers)
        return SendAck(
            req.client_msg_id,
            accepted.msg_id,
            accepted.server_time,
            int(accepted.duplicate),
            request_id=req.request_id,
        )

    def _accept(self, job: PersistJob, cmid: bytes) -> Deferred[Accepted]:
        """Hand the job to the queue now (before returning: the caller's order is the queue's
        order); a refusal becomes UNAVAILABLE."""
        d: Deferred[Accepted] = maybeDeferred(self.queue.accept, job, cmid)
        d.addErrback(_refused, job.message.msg_id)
        return d

    def _push(self, job: PersistJob, exclude: Pushable | None, receivers: Iterable[int]) -> None:
        data = records.push_frame(job.record)  # the job's record: one frame for every receiver
        users = set(receivers)
        msg_id = job.message.msg_id
        self.hub.push(users, msg_id, data, exclude)
        d = self.router.route(users, msg_id, data)  # other gateways' devices
        d.addErrback(lambda f: log.failure("routing push {msg_id} failed", f, msg_id=msg_id))

    def ack_overdue(self, user_id: int, device_id: str, record: bytes) -> None:
        """A connected device left a PUSH unacknowledged for push_ack_wait_s (its app
        suspended, the socket kept): have the notifier notify it as if offline, of `record`
        (the newest message pushed to it). Fire and forget: a failure is logged."""
        if self.notify_queue is None:
            return
        try:
            job = DeviceNotifyJob.of(user_id, device_id, record)
        except records.CorruptRecord:
            log.failure("not a MESSAGE record for user {user} device {device}",
                        user=user_id, device=device_id)  # fmt: skip
            return
        m = job.message
        if m.sender_id == user_id or m.content_type == ContentType.GROUP_EVENT:
            return  # notifies nobody (as the notifier decides): not worth a queued job
        d = maybeDeferred(self.notify_queue.put, [job])
        d.addErrback(lambda f: log.failure(
            "queueing the notification of user {user} device {device} failed", f,
            user=user_id, device=device_id,
        ))  # fmt: skip

    # ------------------------------------------------------------- offline sync

    async def offline_pull(
        self, caller: Caller, req: OfflinePull, *, read_positions: bool = False
    ) -> bytes:
        """OFFLINE_PAGE; with `read_positions` (the connection enabled CONVERSATIONS) its
        unread counts only messages above the user's read positions (spec 18)."""
        limit = req.limit or OFFLINE_PAGE_DEFAULT
        user, device = caller.user_id, caller.device_id
        moved: Deferred[int] | None = None
        if req.cursor == CURSOR_RESUME:
            start = await available(self.inbox.position(user, device))
        else:
            start = req.cursor
            if start != 0:  # the client confirms it holds everything up to its cursor
                moved = self.inbox.advance(user, device, start)
        # The position and the page do not depend on each other: one round trip, not two.
        # The store reads what the fullest page could hold (no UNREAD entries: all the
        # puller's own messages); the kept prefix is then exact for its real unread list, so
        # the page is as full as 10.3 allows and never above 131072.
        page: InboxRecords = await _together(
            moved, self.inbox.page(user, start, limit, records.OFFLINE_RECORD_BYTES)
        )
        read = None
        if read_positions and self.convs is not None:
            read = await self.convs.read_ids(user, page.records)
        n = records.offline_fit(user, page.records, read_ids=read)
        return records.offline_page(
            req.request_id, user, page.cursors[n - 1] if n else page.start,
            page.has_more or n < len(page.records), page.gap, page.records[:n], read_ids=read,
        )  # fmt: skip

    async def offline_ack(self, caller: Caller, req: OfflineAck) -> OfflineAckOk:
        position = await available(self.inbox.advance(caller.user_id, caller.device_id, req.cursor))
        return OfflineAckOk(position, request_id=req.request_id)

    # ------------------------------------------------------------------ history

    async def history_pull(self, caller: Caller, req: HistoryPull) -> bytes:
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
        raw: HistoryRecords = await available(
            self.history.page(key, req.before_id, limit, min_id, records.HISTORY_RECORD_BYTES)
        )
        n = records.fit(raw.records, records.HISTORY_RECORD_BYTES)  # a store's excess, if any
        return records.history_page(
            req.request_id, req.conv_kind, req.conv_id,
            raw.has_more or n < len(raw.records), raw.records[:n],
        )  # fmt: skip

    # ------------------------------------------------------------------- groups

    async def _group_for_member(self, group_id: int, user_id: int) -> GroupInfo:
        info = await available(self.groups.info(group_id))
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
        *,
        large: bool = False,
        removed: tuple[int, ...] = (),
    ) -> None:
        """Deliver a group event message (PROTOCOL.md 12.3) like any group message: `large`
        (the group's flag before the change) puts it in the group's timeline, and then the
        `removed` users, who can no longer read the timeline, get it in their inboxes."""
        msg_id, now = msg
        # Keys in the order of the 12.3 table, compact: every server emits the same bytes.
        fields: dict[str, object] = {"event": event["event"], "group_id": str(group_id)}
        fields.update((k, v) for k, v in event.items() if k != "event")
        body = json.dumps(fields, separators=(",", ":"))
        message = Message(
            msg_id, now, caller.user_id, caller.device_id, ConvKind.GROUP, group_id,
            ContentType.GROUP_EVENT, uuid.uuid4().bytes, body.encode(),
        )  # fmt: skip
        users = tuple(sorted(set(receivers)))
        job = PersistJob.for_timeline(message) if large else PersistJob(message, users)
        copy = None
        if large and removed:  # the same message (its own dedup key): their inboxes
            copy = PersistJob(message, tuple(sorted(set(removed))), job.record)
        connection = caller.connection
        # The membership change stands whatever happens to its event: a refused event is kept
        # and accepted later in the background (event_retry: same job, same keys, so a retry
        # is idempotent), behind the group's earlier events still pending; it is pushed when
        # accepted. This waits for the first attempt only (or not at all behind a refusal).
        await self.events.deliver(GroupEvent(
            group_id, job, message.client_msg_id, copy, uuid.uuid4().bytes,
            on_accepted=lambda: self._push(job, connection, users),
        ))  # fmt: skip

    async def close(self) -> None:
        """At shutdown, before the queue closes: one last attempt at the group events still
        pending; what remains is logged."""
        await self.events.close()

    def _adding_others(self, users: tuple[int, ...]) -> None:
        """Count the groups others add `users` to (PROTOCOL.md 9.4): LIMIT_EXCEEDED, nothing
        counted, if one of them has been added to too many today."""
        full = self.limits.add_others(users)
        if full is not None:
            raise RequestError(
                ErrorCode.LIMIT_EXCEEDED, f"user {full} was added to too many groups today"
            )

    async def group_create(self, caller: Caller, req: GroupCreate) -> GroupCreated:
        members = tuple(sorted(set(req.members) - {caller.user_id}))
        check_rate(self.limits.group_op(caller.user_id), "too many group changes")
        self._adding_others(members)
        event_id = self.ids.next()
        gid = await self._adding(
            members, self.groups.create(caller.user_id, req.name, members, event_id[0])
        )
        everyone = (caller.user_id, *members)
        await self._group_event(
            caller, gid, event_id, everyone,
            {"event": "created", "name": req.name, "members": _member_list(everyone)},
        )  # fmt: skip
        return GroupCreated(gid, request_id=req.request_id)

    async def _adding(self, users: Iterable[int], write: Deferred[_T]) -> _T:
        """A group store write that adds `users`; if it fails, their allowance of additions
        by others is given back."""
        try:
            return await available(write)
        except LimitExceeded as e:
            self.limits.not_added(users)
            raise RequestError(ErrorCode.LIMIT_EXCEEDED, str(e)) from None
        except BaseException:
            self.limits.not_added(users)
            raise

    async def group_add(self, caller: Caller, req: GroupAdd) -> GroupAddOk:
        info = await self._group_for_member(req.group_id, caller.user_id)
        check_rate(self.limits.group_op(caller.user_id), "too many group changes")
        newcomers = tuple(set(req.members) - set(info.members) - {caller.user_id})
        self._adding_others(newcomers)
        event_id = self.ids.next()
        added = await self._adding(
            newcomers, self.groups.add(req.group_id, tuple(set(req.members)), event_id[0])
        )
        self.limits.not_added(set(newcomers) - set(added))  # joined meanwhile
        if added:
            await self._group_event(
                caller, req.group_id, event_id, (*info.members, *added),
                {"event": "added", "members": _member_list(added)}, large=info.large,
            )  # fmt: skip
        return GroupAddOk(req.group_id, len(added), request_id=req.request_id)

    async def group_remove(self, caller: Caller, req: GroupRemove) -> GroupRemoveOk:
        info = await self._group_for_member(req.group_id, caller.user_id)
        targets = set(req.members)
        if caller.user_id != info.owner_id and targets != {caller.user_id}:
            raise RequestError(ErrorCode.FORBIDDEN, "only the owner removes other members")
        if targets != {caller.user_id}:  # leaving is free: one can only leave what one joined
            check_rate(self.limits.group_op(caller.user_id), "too many group changes")
        event_id = self.ids.next()
        removed = await available(self.groups.remove(req.group_id, tuple(targets)))
        if removed:
            await self._group_event(
                caller, req.group_id, event_id, info.members,  # includes the removed users
                {"event": "removed", "members": _member_list(removed)},
                large=info.large, removed=removed,
            )  # fmt: skip
        return GroupRemoveOk(req.group_id, len(removed), request_id=req.request_id)

    async def group_members(self, caller: Caller, req: GroupMembers) -> GroupMemberList:
        info = await self._group_for_member(req.group_id, caller.user_id)
        return GroupMemberList(
            info.group_id, info.owner_id, info.name, info.members, request_id=req.request_id
        )

    async def my_groups(self, caller: Caller, req: MyGroups) -> GroupList:
        groups = await available(self.groups.groups_of(caller.user_id))
        return GroupList(tuple(GroupSummary(g, n) for g, n in groups), request_id=req.request_id)
