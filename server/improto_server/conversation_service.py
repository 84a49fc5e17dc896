"""Conversation lists and read state (PROTOCOL.md section 18): CONV_LIST, CONV_CHANGES,
READ_MARK, CONV_HIDE, and the read positions that OFFLINE_PAGE unread counts follow.

The gateway never writes conversation state: a mark or a hide is queued (StateJob) beside
the messages of its conversation and applied by the persister, so it shows in the list as
shortly after its reply as a message after its SEND_ACK. The gateway tells the user's other
online devices (READ_UPDATE, CONVERSATIONS) and, for 1:1 read receipts, the peer's
(READ_RECEIPTS) at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from twisted.internet.defer import maybeDeferred
from twisted.logger import Logger

from improto import records
from improto.enums import ConvKind, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import ConvChanges, ConvHide, ConvHideOk, ConvList, ReadMark, ReadMarkOk
from improto.limits import CONV_PAGE_DEFAULT
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import ConvRows, StateJob
from improto_server.ports import ConversationStore, GroupStore, PersistQueue, PushRouter
from improto_server.rate_limits import RateLimits
from improto_server.service import RequestError, available, check_rate

# Fold calls one list request makes at most (FOLD_ENTRIES entries each); a user further
# behind than that gets the rest folded by the persister, and the list a little stale.
FOLD_CALLS = 4

if TYPE_CHECKING:
    from improto_server.service import Caller

log = Logger()


def unread_convs(me: int, page: Sequence[bytes]) -> list[tuple[int, int]]:
    """The conversations (as `me` sees them) of the records from others: the ones an
    OFFLINE_PAGE's unread list may name."""
    seen: dict[tuple[int, int], None] = {}
    for r in page:
        sender, kind, conv = records.conversation_of(r)
        if sender != me:
            seen[(kind, conv) if kind == ConvKind.GROUP else (ConvKind.USER, sender)] = None
    return list(seen)


class ConversationService:
    def __init__(
        self,
        store: ConversationStore,
        ids: IdGenerator,
        queue: PersistQueue,
        groups: GroupStore,
        hub: Hub,
        router: PushRouter,
        limits: RateLimits,
        read_receipts: bool = True,
    ) -> None:
        self.store = store
        self.ids = ids
        self.queue = queue
        self.groups = groups
        self.hub = hub
        self.router = router
        self.limits = limits
        self.read_receipts = read_receipts

    # ---------------------------------------------------------------- lists

    async def conv_list(self, caller: Caller, req: ConvList) -> bytes:
        await self._fold(caller.user_id)
        rows = await available(
            self.store.by_activity(
                caller.user_id, req.before_id, req.limit or CONV_PAGE_DEFAULT,
                records.CONV_RECORD_BYTES,
            )
        )  # fmt: skip
        return _page(FrameType.CONV_PAGE, req.request_id, rows, changes=False)

    async def conv_changes(self, caller: Caller, req: ConvChanges) -> bytes:
        await self._fold(caller.user_id)
        rows = await available(
            self.store.changes(
                caller.user_id, req.since_version, req.limit or CONV_PAGE_DEFAULT,
                records.CONV_RECORD_BYTES,
            )
        )  # fmt: skip
        return _page(FrameType.CONV_CHANGES_PAGE, req.request_id, rows, changes=True)

    async def _fold(self, user_id: int) -> None:
        """Bring the user's rows up to its inbox first: a list is as fresh as the inbox,
        whenever the persister's next fold is due."""
        for _ in range(FOLD_CALLS):
            if not await available(self.store.fold([user_id], reader=True)):
                return

    async def read_ids(self, user_id: int, page: Sequence[bytes]) -> dict[tuple[int, int], int]:
        """The user's read positions in the conversations of an OFFLINE_PAGE's records."""
        convs = unread_convs(user_id, page)
        if not convs:
            return {}
        return await available(self.store.read_positions(user_id, convs))

    # ---------------------------------------------------------- state changes

    async def read_mark(self, caller: Caller, req: ReadMark) -> ReadMarkOk:
        user, kind, conv = caller.user_id, req.conv_kind, req.conv_id
        if kind == ConvKind.GROUP:
            await self._member(conv, user)
        check_rate(self.limits.state_op(user), "too many read marks")
        msg_id = min(req.msg_id, self.ids.next()[0])  # a position is never in the future
        await self._queue(StateJob(StateJob.MARK, user, kind, conv, msg_id, caller.device_id))
        self._notify(
            [user], records.read_update(user, kind, conv, msg_id), Feature.CONVERSATIONS,
            caller,
        )  # fmt: skip
        if kind == ConvKind.USER and conv != user and self.read_receipts:
            receipt = records.read_update(user, ConvKind.USER, user, msg_id)  # as the peer sees it
            self._notify([conv], receipt, Feature.READ_RECEIPTS, None)
        return ReadMarkOk(kind, conv, msg_id, request_id=req.request_id)

    async def conv_hide(self, caller: Caller, req: ConvHide) -> ConvHideOk:
        user = caller.user_id
        check_rate(self.limits.state_op(user), "too many conversation changes")
        # hidden until a message newer than this moment arrives
        job = StateJob(StateJob.HIDE, user, req.conv_kind, req.conv_id, self.ids.next()[0],
                       caller.device_id)  # fmt: skip
        await self._queue(job)
        return ConvHideOk(req.conv_kind, req.conv_id, request_id=req.request_id)

    async def _member(self, group_id: int, user_id: int) -> None:
        """NOT_FOUND for a group that never existed, FORBIDDEN for one the user is not in;
        one lookup when the user is a member."""
        if await available(self.groups.since(group_id, user_id)) is not None:
            return
        if await available(self.groups.info(group_id)) is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no group {group_id}")
        raise RequestError(ErrorCode.FORBIDDEN, f"not a member of group {group_id}")

    async def _queue(self, job: StateJob) -> None:
        try:
            await maybeDeferred(self.queue.accept_state, job)
        except Exception:
            log.failure("persistence queue refused a state change of user {u}", u=job.user_id)
            raise RequestError(ErrorCode.UNAVAILABLE, "change not stored; retry") from None

    def _notify(
        self, users: list[int], data: bytes, feature: Feature, caller: Caller | None
    ) -> None:
        """READ_UPDATE to the users' devices with `feature`, here and on other gateways, but
        not to the connection that made the change."""
        self.hub.notify(users, data, feature, caller.connection if caller else None)
        d = self.router.notify(users, data, feature)
        d.addErrback(lambda f: log.failure("routing a read update failed", f))


def _page(kind: FrameType, request_id: int, rows: ConvRows, *, changes: bool) -> bytes:
    convs = rows.convs
    n = records.conv_fit(c.last for c in convs)  # a store's excess, if any
    version = rows.version
    if changes and n < len(convs):
        version = convs[n - 1].version  # the last row returned: the next page starts there
    return records.conv_page(
        kind, request_id, version, rows.has_more or n < len(convs), rows.total_unread,
        [(c.conv_kind, c.conv_id, c.version, c.hidden, c.read_id, c.peer_read_id, c.unread,
          c.last) for c in convs[:n]],
    )  # fmt: skip
