"""Conversation lists and read state (PROTOCOL.md section 18): CONV_LIST, CONV_CHANGES,
READ_MARK, CONV_HIDE, and the read positions that OFFLINE_PAGE unread counts follow.

The gateway never writes conversation state: a mark or a hide is queued (StateJob) beside
the messages of its conversation and applied by the persister, so it shows in the list as
shortly after its reply as a message after its SEND_ACK. The gateway tells the user's other
online devices (READ_UPDATE, CONVERSATIONS) and, for 1:1 read receipts, the peer's
(READ_RECEIPTS) at once.

Large groups (docs/design/large-groups.md, decision 8). A large group's messages go to its
timeline, not into the inboxes, so the stored row of a large group changes only with the
member's own state (read marks, hides, its own messages through the persister's read marks)
and with the messages of the group's small periods. With timelines (`self.timelines`) both
lists merge each of the user's groups that has a timeline (TimelineService.states) at read
time: the row shows the head's message as `last` when it is newer than the stored one,
`unread` = the stored unread (small-period messages above read_id) + the timeline's unread
(done - read_seq), read positions and version as stored, and a hidden row shows again once
the head is newer than the hide (ConvState.hide_id: the store's rule for recorded messages).
A group with a head and no stored row shows as a row of version 1 (NO_ROW_VERSION: the CONV
record's version is an id, 1..2^64-1), read_id 0, not hidden. total_unread adds the
timeline unread of the merged rows that are not hidden (and the stored unread of a hidden
row the head unhides). The stored rows of the large groups are found by reading the user's
rows by version (ConversationStore.changes) until each was seen: the port has no lookup of
given rows, so a list request of a user with large groups costs one pass over its rows.

CONV_LIST orders the merged rows by their merged last_id: the stored page is ordered by the
stale one, so the large groups' stored rows are left out of it and their merged rows put in
by position; only the part of the merge down to the stored page's last row is certain (a
stored row not read yet may come right after it), and the store is read further (from that
row's last_id) while the page would take all of that part. has_more is exact.

CONV_CHANGES returns a large group's row only when its version changed (the member's own
state), carrying the merged values then. A large group's new messages give no version, so
they do not reach a client through CONV_CHANGES: a LARGE_GROUPS client sees them through
TIMELINE_HEADS (spec 20), which its sync loop calls every time.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
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
from improto_server.model import ConvRows, ConvState, StateJob
from improto_server.ports import ConversationStore, GroupStore, PersistQueue, PushRouter
from improto_server.rate_limits import RateLimits
from improto_server.service import RequestError, available, check_rate

# Fold calls one list request makes at most (FOLD_ENTRIES entries each); a user further
# behind than that gets the rest folded by the persister, and the list a little stale.
FOLD_CALLS = 4

# The version shown for a large group's row the store does not have (the member never read,
# hid or wrote there): the lowest one a CONV record may carry. Such a row changes no list
# version, so CONV_CHANGES never returns it; the first stored change gives the row a real one.
NO_ROW_VERSION = 1

if TYPE_CHECKING:
    from improto_server.service import Caller
    from improto_server.timeline_service import LargeState, TimelineService

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
        # the large groups' timelines, when the server has them: lists merge their heads
        self.timelines: TimelineService | None = None

    # ---------------------------------------------------------------- lists

    async def conv_list(self, caller: Caller, req: ConvList) -> bytes:
        await self._fold(caller.user_id)
        limit = req.limit or CONV_PAGE_DEFAULT
        large = await self._large(caller.user_id)
        if large:
            rows = await self._merged_page(caller.user_id, large, req.before_id, limit)
            return _page(FrameType.CONV_PAGE, req.request_id, rows, changes=False)
        rows = await available(
            self.store.by_activity(
                caller.user_id, req.before_id, limit, records.CONV_RECORD_BYTES,
            )
        )  # fmt: skip
        return _page(FrameType.CONV_PAGE, req.request_id, rows, changes=False)

    async def conv_changes(self, caller: Caller, req: ConvChanges) -> bytes:
        await self._fold(caller.user_id)
        large = await self._large(caller.user_id)
        rows = await available(
            self.store.changes(
                caller.user_id, req.since_version, req.limit or CONV_PAGE_DEFAULT,
                records.CONV_RECORD_BYTES,
            )
        )  # fmt: skip
        if large:
            stored = await self._large_rows(caller.user_id, large)
            _take_newer(stored, rows.convs, large)
            convs = tuple(
                _merge(large[c.conv_id], c) if _is_large(c, large) else c for c in rows.convs
            )
            total = rows.total_unread + _large_unread(large, stored)
            rows = ConvRows(rows.version, rows.has_more, total, convs)
        return _page(FrameType.CONV_CHANGES_PAGE, req.request_id, rows, changes=True)

    async def _large(self, user_id: int) -> dict[int, LargeState]:
        """The user's groups that have a timeline, by id (none without timelines)."""
        if self.timelines is None:
            return {}
        return {s.group_id: s for s in await self.timelines.states(user_id)}

    async def _large_rows(
        self, user_id: int, large: Mapping[int, LargeState]
    ) -> dict[int, ConvState]:
        """The stored rows (hidden ones too) of these groups of the user, by group id."""
        convs = [(int(ConvKind.GROUP), g) for g in large]
        found = await available(self.store.rows(user_id, convs))
        return {conv: row for (_, conv), row in found.items()}

    async def _merged_page(
        self, user_id: int, large: Mapping[int, LargeState], before_id: int, limit: int
    ) -> ConvRows:
        """CONV_LIST's page with the large groups merged (see the module docstring)."""
        stored = await self._large_rows(user_id, large)
        nonlarge: list[ConvState] = []  # the other rows in range, a prefix of their order
        cursor = before_id
        first: ConvRows | None = None
        while True:
            # The large groups' rows the stored page may hold: asked for on top, so that the
            # rows left once they are taken out still fill a page (count and bytes).
            skipped = [r for r in stored.values() if not r.hidden and _below(r.last_id, cursor)]
            rows = await available(
                self.store.by_activity(
                    user_id, cursor, limit + len(skipped) + 1,
                    records.CONV_RECORD_BYTES + sum(records.conv_size(r.last) for r in skipped),
                )
            )  # fmt: skip
            if first is None:
                first = rows
            _take_newer(stored, rows.convs, large)
            nonlarge += [c for c in rows.convs if not _is_large(c, large)]
            exhausted = not rows.has_more
            page, known, more = _merge_page(
                nonlarge, exhausted, _visible(large, stored, before_id), limit
            )
            if exhausted or len(page) < known or not rows.convs or not rows.convs[-1].last_id:
                # decided, or all the store has left are rows without a message (the client
                # stops paging at such a row: CONV_CHANGES returns the rest)
                total = first.total_unread + _large_unread(large, stored)
                return ConvRows(first.version, more, total, tuple(page))
            cursor = rows.convs[-1].last_id  # the page would take all that is certain: read on

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


def _is_large(c: ConvState, large: Mapping[int, LargeState]) -> bool:
    return c.conv_kind == ConvKind.GROUP and c.conv_id in large


def _below(last_id: int, before_id: int) -> bool:
    """Within CONV_LIST's range: last_id < before_id (0: no bound)."""
    return not before_id or last_id < before_id


def _take_newer(
    stored: dict[int, ConvState], convs: Sequence[ConvState], large: Mapping[int, LargeState]
) -> None:
    """Keep the later version of a large group's row read twice (a page after the scan)."""
    for c in convs:
        if _is_large(c, large):
            known = stored.get(c.conv_id)
            if known is None or c.version >= known.version:
                stored[c.conv_id] = c


def _merge(state: LargeState, row: ConvState) -> ConvState:
    """A large group's stored row as the lists show it, the timeline's head merged in."""
    head = state.head
    newer = head.last is not None and head.last_msg_id > row.last_id
    return replace(
        row,
        hidden=row.hidden and head.last_msg_id <= row.hide_id,  # a later message unhides
        unread=row.unread + state.unread,
        last_id=head.last_msg_id if newer else row.last_id,
        last=head.last if newer else row.last,
    )


def _merged(state: LargeState, row: ConvState | None) -> ConvState | None:
    """As _merge; without a stored row, a row of NO_ROW_VERSION (None if the timeline has
    no message either)."""
    if row is None:
        if not state.head.last_msg_id:
            return None
        row = ConvState(ConvKind.GROUP, state.group_id, NO_ROW_VERSION, False, 0, 0, 0, 0, None)
    return _merge(state, row)


def _visible(
    large: Mapping[int, LargeState], stored: Mapping[int, ConvState], before_id: int
) -> list[ConvState]:
    """The merged large-group rows that CONV_LIST(before_id) may return."""
    rows = (_merged(s, stored.get(gid)) for gid, s in large.items())
    return [r for r in rows if r is not None and not r.hidden and _below(r.last_id, before_id)]


def _large_unread(large: Mapping[int, LargeState], stored: Mapping[int, ConvState]) -> int:
    """What the large groups add to the store's total_unread: the timeline unread of each
    merged row not hidden, and the stored unread of a hidden row the head shows again (the
    store's total leaves hidden rows out)."""
    extra = 0
    for gid, state in large.items():
        row = stored.get(gid)
        merged = _merged(state, row)
        if merged is None or merged.hidden:
            continue
        extra += state.unread
        if row is not None and row.hidden:
            extra += row.unread
    return extra


def _order(c: ConvState) -> tuple[int, int, int]:
    """CONV_LIST's order, descending (the stores': last_id, then kind and id)."""
    return (c.last_id, c.conv_kind, c.conv_id)


def _merge_page(
    nonlarge: list[ConvState], exhausted: bool, merged: list[ConvState], limit: int
) -> tuple[list[ConvState], int, bool]:
    """(page, how many rows of the merge are certain, has_more) of the stored rows read so
    far that are not large groups' (`nonlarge`: all of them in range if `exhausted`) and the
    merged large-group rows. A row not read yet comes after nonlarge's last: the merge is
    certain down to it."""
    rows = sorted([*nonlarge, *merged], key=_order, reverse=True)
    known = len(rows)
    if not exhausted:
        bound = _order(nonlarge[-1]) if nonlarge else None
        known = sum(1 for r in rows if bound is not None and _order(r) >= bound)
    page = rows[: min(known, limit)]
    page = page[: records.conv_fit(c.last for c in page)]
    return page, known, len(page) < len(rows) or not exhausted


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
