"""Large groups' timelines (PROTOCOL.md section 20, LARGE_GROUPS): TIMELINE_HEADS and
TIMELINE_PULL (whose `held` msg_ids, the messages the client already has, are left out of
the page but covered by its position).

A large group's messages are not in its members' inboxes; each member reaches them through
the group's timeline (TimelineStore), numbered 1, 2, 3, ... per group. A member's read
position there is computed when asked, not stored: the rank of its read mark (the
conversation row's read_id, moved by READ_MARK and by its own messages) once it is past the
member's join, else the join floor (TimelineStore.join_floor: the seqs before the first
message the member may read). So a mark made on one device is every device's read_seq.

Seq order (the persister's) is not msg_id order (gateways' clocks, and the time between a
group change's event id and its enqueue), so the join floor is not rank(since_id - 1): a
message from before the join numbered after the join event would lift that above the join
event and the messages numbered between, and no pull would ever serve them. The floor is
never above the first seq the member may read (within the store's probe, see join_floor); a
lower floor only costs reading records the window then leaves out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar, cast

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.python.failure import Failure

from improto import records
from improto.enums import ConvKind
from improto.errors import ErrorCode
from improto.frames import TimelineHeads, TimelinePull
from improto.limits import TIMELINE_PAGE_DEFAULT, U64_MAX
from improto_server.model import TimelineHead as StoredHead
from improto_server.model import TimelineRecords
from improto_server.ports import ConversationStore, GroupStore, TimelineStore
from improto_server.service import RequestError, _together, available

if TYPE_CHECKING:
    from improto_server.service import Caller

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class LargeState:
    """A user's view of one of its groups that has a timeline."""

    group_id: int
    head: StoredHead
    read_seq: int  # the user's read position there (at most head.done)

    @property
    def unread(self) -> int:
        return self.head.done - self.read_seq


class TimelineService:
    def __init__(
        self,
        store: TimelineStore,
        groups: GroupStore,
        conversations: ConversationStore | None,
    ) -> None:
        self.store = store
        self.groups = groups
        self.conversations = conversations

    async def heads(self, caller: Caller, req: TimelineHeads) -> bytes:
        """One entry per group of the caller that has a timeline (large now, or before and
        still retained), ascending group id."""
        entries = [
            (st.group_id, st.head.done, st.read_seq, st.head.last_msg_id)
            for st in await self.states(caller.user_id)
        ]
        return records.timeline_heads_page(req.request_id, entries)

    async def heads_of(self, user: int) -> dict[int, StoredHead]:
        """The heads of the user's groups that have a timeline (no read positions: the
        login watch's reads, timeline_watch.py)."""
        gids = [g for g, _ in await available(self.groups.groups_of(user))]
        return await available(self.store.heads(gids)) if gids else {}

    async def states(self, user: int) -> list[LargeState]:
        """The user's groups that have a timeline, ascending id, each with its head and the
        user's position (what TIMELINE_HEADS and the conversation list show)."""
        mine = await available(self.groups.groups_of(user))
        gids = [g for g, _ in mine]
        found: dict[int, StoredHead] = await available(self.store.heads(gids)) if gids else {}
        large = sorted(found)
        reads = await self._read_seqs(user, large, found)
        return [  # a group the user left since groups_of has no read_seq: left out
            LargeState(gid, found[gid], reads[gid]) for gid in large if gid in reads
        ]

    async def _read_seqs(
        self, user: int, gids: Sequence[int], heads: dict[int, StoredHead]
    ) -> dict[int, int]:
        """Each group's read_seq for `user`: max(rank(read_id), the seqs before its join),
        at most done; groups the user is no longer in are left out."""
        if not gids:
            return {}
        read_ids: dict[tuple[int, int], int] = {}
        if self.conversations is not None:
            convs = [(int(ConvKind.GROUP), g) for g in gids]
            read_ids = await available(self.conversations.read_positions(user, convs))
        sinces = await _all([self.groups.since(g, user) for g in gids])
        rank_calls = []
        wanted: list[tuple[int, int, int]] = []  # (gid, read_id, since)
        for gid, since in zip(gids, sinces, strict=True):
            if since is None:
                continue
            read_id = read_ids.get((ConvKind.GROUP, gid), 0)
            wanted.append((gid, read_id, since))
            rank_calls.append(Deferred.fromCoroutine(self._position(gid, read_id, since)))
        seqs = await _all(rank_calls)
        return {
            gid: min(seq, heads[gid].done) for (gid, _, _), seq in zip(wanted, seqs, strict=True)
        }

    async def _position(self, gid: int, read_id: int, since: int) -> int:
        """The seq a member has read up to: its read mark's rank once it read past its join,
        else the seqs before its join (the join floor, which is never above the rank of a
        later read mark: that counts every message the floor skips)."""
        if read_id > since:
            return await self.store.rank(gid, read_id)
        floor = await self.store.join_floor(gid, since)
        if floor is None:  # a join older than the store's index: its rank, at least the
            floor = await self.store.rank(gid, since - 1)  # true floor (as a read mark's)
        return floor

    async def pull(self, caller: Caller, req: TimelinePull) -> bytes:
        gid = req.group_id
        info, since = await _together(
            self.groups.info(gid), self.groups.since(gid, caller.user_id), both=True
        )
        if info is None:
            raise RequestError(ErrorCode.NOT_FOUND, f"no group {gid}")
        if since is None:
            raise RequestError(ErrorCode.FORBIDDEN, f"not a member of group {gid}")
        limit = req.limit or TIMELINE_PAGE_DEFAULT
        # The floor skips the seqs before the member's first readable one (messages numbered
        # before its join); when the store cannot tell where that is, nothing is skipped:
        # the window below leaves the older messages out all the same, a page at a time.
        heads, floor = await _together(
            self.store.heads([gid]), self.store.join_floor(gid, since), both=True
        )
        head = heads.get(gid)
        done = head.done if head is not None else 0
        start = max(min(req.after_seq, U64_MAX - 1), floor or 0)
        if start >= done:  # nothing (more) the member may read: it is at the head
            return records.timeline_page(req.request_id, gid, done, done, False, ())
        page: TimelineRecords = await available(
            self.store.after(gid, start, limit, records.TIMELINE_RECORD_BYTES)
        )
        # a message accepted before the join (a clock a little behind) is covered, not sent;
        # so are the ones the client holds (got by PUSH): the page is the same without them
        position, has_more, visible = records.timeline_window(
            start,
            page.first_seq,
            page.records,
            page.has_more,
            page.done,
            min_msg_id=since,
            held=frozenset(req.held),
        )
        return records.timeline_page(req.request_id, gid, position, page.done, has_more, visible)


async def _all(calls: Sequence[Deferred[_T]]) -> list[_T]:
    """The results of storage calls made at once, in order (UNAVAILABLE on a failure)."""
    results = await DeferredList(list(calls), consumeErrors=True)
    for ok, value in results:
        if not ok:
            await available(fail(cast(Failure, value)))
    return [value for _, value in results]
