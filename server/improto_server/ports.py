"""The narrow interfaces between the session logic and storage/queueing.

Embedded mode implements them on SQLite and an in-process queue; production mode on RabbitMQ,
Redis and HBase. `tests/contract/` runs one suite against every implementation. All methods
return Deferreds and never block the reactor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from twisted.internet.defer import Deferred

from improto_server.health import Health
from improto_server.hub import Hub, Pushable
from improto_server.model import (
    Accepted,
    ConvKey,
    ConvRows,
    ConvState,
    GroupInfo,
    HistoryRecords,
    InboxIds,
    InboxRecords,
    NotifyJob,
    PersistJob,
    PushTarget,
    QueuedJob,
    StateJob,
    TimelineHead,
    TimelineRecords,
)

BatchHandler = Callable[[Sequence[QueuedJob]], Deferred[None]]
NotifyHandler = Callable[[Sequence[NotifyJob]], Deferred[None]]


class PersistQueue(Protocol):
    """Durable hand-off of accepted messages to the persisters (at-least-once)."""

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        """Make the job durable unless (sender, client_msg_id) was accepted before.

        Atomic: either the job is durably queued and the key remembered, or neither. A
        duplicate returns the original message's id and time with `duplicate=True`.
        """

    def accept_state(self, job: StateJob) -> Deferred[None]:
        """Make a conversation-state change durable (no dedup: applying one twice changes
        nothing). It is queued with the messages of its conversation (`job.history_key`), so
        the consumer gets it in the same queue order as them."""

    def consume(self, handler: BatchHandler, max_batch: int = 1) -> None:
        """Deliver every queued job to `handler` (call once), in batches of 1..`max_batch`
        consecutive jobs, one batch at a time per queue, in queue order. A batch is removed
        only once its Deferred succeeds, so a crash redelivers it and a failure is retried,
        never dropped: delivery resumes, in order, at the failed batch's first job or at an
        earlier one (jobs already handled may come again: handlers must be idempotent).
        Ordering per inbox must not let a later-accepted job's entries overtake an earlier
        one's in a way a reader could observe (the embedded queue delivers in acceptance
        order)."""

    def close(self) -> Deferred[None]: ...


class InboxStore(Protocol):
    """Per-user offline inboxes (write diffusion) and per-device positions."""

    def append(self, job: PersistJob) -> Deferred[None]:
        """Add the job's message to each of `job.inbox_users`' inboxes, assigning each entry a
        cursor above every cursor already assigned in that inbox. Idempotent per (user,
        msg_id)."""

    def append_many(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        """`append` of each job, in order: within one inbox, an earlier job's entry gets the
        lower cursor. Not atomic as a whole; each job's entries are idempotent as above."""

    def page(self, user_id: int, start: int, limit: int, max_bytes: int) -> Deferred[InboxRecords]:
        """Up to `limit` retained entries with cursor > start (start clamped to the head), as
        MESSAGE records: what the pull handler splices into OFFLINE_PAGE. The records' sizes
        sum to at most `max_bytes` (but at least one record is returned if any is due), and the
        store reads no more than that: has_more says whether entries remain after the last
        one returned.

        Retention counts from when an entry was stored. `gap` is true when an entry with a
        cursor above `start` was removed by retention (the highest removed cursor > start)."""

    def ids(self, user_id: int, start: int, limit: int) -> Deferred[InboxIds]:
        """The cursors and msg_ids of the first `limit` retained entries with cursor > start
        (start clamped to the head, as `page`), without reading their records: what `page`
        would return, in the same order. `gap` as `page`; has_more if more such entries
        exist. Reads only: it removes nothing (a page does the trimming)."""

    def position(self, user_id: int, device_id: str) -> Deferred[int]: ...

    def advance(self, user_id: int, device_id: str, cursor: int) -> Deferred[int]:
        """position := max(position, min(cursor, head)); returns the new position."""


class HistoryStore(Protocol):
    """Per-conversation history (read diffusion)."""

    def append(self, key: ConvKey, job: PersistJob) -> Deferred[None]:
        """Store the job's message once under `key`. Idempotent per msg_id."""

    def append_many(self, items: Sequence[tuple[ConvKey, PersistJob]]) -> Deferred[None]:
        """`append` of every item (batched by the store); idempotent as `append`."""

    def page(
        self, key: ConvKey, before_id: int, limit: int, min_id: int, max_bytes: int
    ) -> Deferred[HistoryRecords]:
        """Up to `limit` retained messages with min_id <= msg_id < before_id (0: no upper
        bound), newest first, as MESSAGE records summing to at most `max_bytes` (at least one
        if any), read no further than that; has_more if another such message exists."""


# Messages TimelineStore.join_floor looks at: those with the lowest msg_ids from the join on.
TIMELINE_JOIN_PROBE = 128


class TimelineStore(Protocol):
    """The timelines of large groups (docs/design/large-groups.md): each message stored once
    and numbered per group, seq 1, 2, 3, ... in the order the persister writes them (a group's
    jobs reach one persister, in queue order). Retained like the history."""

    def append(self, jobs: Sequence[PersistJob]) -> Deferred[list[int]]:
        """Number and store these group messages (conv_kind GROUP), in order: each gets its
        group's next seq unless it has one (a redelivered msg_id keeps its seq: exactly on
        SQLite, within the newest TIMELINE_INDEX messages of its group on Redis); returns
        their seqs, one per job. When it fires, each group's done is at least the highest
        seq of its jobs (done never moves back, and no seq at or below done is unreadable)."""

    def after(
        self, group_id: int, after_seq: int, limit: int, max_bytes: int
    ) -> Deferred[TimelineRecords]:
        """The retained messages of seqs after_seq + 1 .. done, oldest first, at most `limit`
        and records summing to at most `max_bytes` (at least one if any), read no further
        than that; has_more if a seq above the page's last, up to done, exists. A seq past
        retention is skipped: first_seq is then above after_seq + 1."""

    def heads(self, group_ids: Sequence[int]) -> Deferred[dict[int, TimelineHead]]:
        """The head of each group that has a timeline (groups without one are left out)."""

    def rank(self, group_id: int, msg_id: int) -> Deferred[int]:
        """How many of the group's timeline messages have a msg_id at or below `msg_id`: a
        read mark's position (unread = done - rank(read_id)); the seq of the newest such
        message where msg_ids rise with seq. Exact on SQLite and, on Redis, within the newest
        TIMELINE_INDEX messages; below those at least the true count (so the unread count is
        then a lower bound)."""

    def join_floor(self, group_id: int, since_id: int) -> Deferred[int | None]:
        """The seqs a member whose window starts at `since_id` (it reads the messages with
        msg_id >= since_id, PROTOCOL.md 20.2) can skip: a pull may start above the returned
        seq. It is min(rank(since_id - 1), s - 1), s the lowest seq among the
        TIMELINE_JOIN_PROBE messages with the lowest msg_ids >= since_id (the join event
        first, when it is in the timeline); rank(since_id - 1) when there is none; 0 for
        since_id 0. Read at one instant (a message numbered meanwhile is all in or all out).

        So it is never above the seq before the first message the member may read, unless
        more than TIMELINE_JOIN_PROBE messages with msg_ids between since_id and that one's
        were numbered after it: rank alone would be (messages from before the join numbered
        after it count, and seq order is not msg_id order), and so would the join event's
        seq (a message accepted just after the join can be numbered before its event).

        None when the store cannot tell: on Redis, when since_id is below every msg_id its
        index still holds and the index dropped some (they may be at or above since_id): a
        pull then must not skip anything. Never None on SQLite."""


class ConversationStore(Protocol):
    """Per-user conversation lists: one row per (user, conversation) with the newest message,
    the read positions and the unread count (PROTOCOL.md section 18). Messages reach the
    rows from the users' inboxes by `fold` (coalesced, never on the gateway's send path) or
    by `record`; read marks and hides by `apply`, from the persister. Rows live as long as
    the history retention after their last change.

    Row of user u for a message m: conversation (USER, peer) with peer = m.conv_id if
    m.sender_id == u else m.sender_id; (GROUP, m.conv_id) for groups. `unread` counts the
    messages from others (sender_id != u) with msg_id > read_id that were recorded: exact
    while a conversation has at most model.MAX_UNREAD_TRACKED unread messages (the store keeps
    their ids), never below the true count of the tracked ones beyond that. Every change
    of a row gives it the user's next version (1, 2, 3, ... per user); a call that changes
    nothing (a redelivered job, a mark that does not move) gives no version.
    """

    def record(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        """For each job and each of `job.inbox_users`, in order: that user's row of the
        message's conversation gets the message as `last` if its msg_id is above last_id,
        unhides if it is newer than the hide, and: from the user itself, read_id :=
        max(read_id, msg_id) (sending reads what came before; unread recounted); from
        others, with msg_id > read_id and not counted yet, unread += 1, and for 1:1
        peer_read_id := max(peer_read_id, msg_id) (the peer's own read position moved so).
        Idempotent per (user, msg_id)."""

    def apply(self, jobs: Sequence[StateJob]) -> Deferred[None]:
        """MARK: read_id := max(read_id, msg_id), unread recounted (the tracked ids above
        it); a row is created if there is none; 1:1 (peer != user): the peer's row (created
        too if missing) gets peer_read_id := max(peer_read_id, msg_id). HIDE: hidden unless
        last_id > msg_id; remembered, so a recorded message with msg_id <= the hide's msg_id
        does not unhide it. Idempotent."""

    def fold(self, user_ids: Sequence[int], *, reader: bool = False) -> Deferred[list[int]]:
        """Bring each user's rows up to its inbox: the entries the user's inbox holds above
        the user's folded position (0 for a user never folded) are applied in cursor order
        exactly as `record` applies their messages for that user, and the folded position
        becomes the cursor of the last entry applied, or the inbox's last assigned cursor
        when none is left above it. At most FOLD_ENTRIES entries per user per call; returns
        the users still behind after the call (to call again). Entries the inbox no longer
        holds (retention, caps) are skipped. Atomic per user: two folds of one user at the
        same time (a gateway's and the persister's) never apply an entry twice. `record`
        and `apply` move no folded position (an entry folded after `record` of its message
        changes nothing: record is idempotent). `reader`: a client waits for this fold (a
        list request), so a store runs it ahead of queued persister writes."""

    def behind(self) -> Deferred[list[int]]:
        """Users whose inbox may hold entries above their folded position, for a persister
        to fold when it starts (after a crash or a stop). It names every user with an entry
        above its folded position, and no user whose last fold left none above it and whose
        inbox got no entry since."""

    def by_activity(
        self, user_id: int, before_id: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        """The user's rows that are not hidden with last_id < before_id (0: no bound), by
        last_id descending (rows without a message last), at most `limit` and whose CONV
        records' sizes (records.conv_size) sum to at most `max_bytes` (at least one if
        any); has_more if another such row exists; version = the user's newest version."""

    def changes(
        self, user_id: int, since_version: int, limit: int, max_bytes: int
    ) -> Deferred[ConvRows]:
        """The rows (hidden ones too) with version > since_version, by version ascending,
        limited as `by_activity`; has_more if another row changed after the last one
        returned; version = the last returned row's version, or for an empty page the
        user's newest version (0 for a user without rows), even when since_version is
        above it (lost data: the client then stores the lower value, as with cursors)."""

    def read_positions(
        self, user_id: int, convs: Sequence[tuple[int, int]]
    ) -> Deferred[dict[tuple[int, int], int]]:
        """read_id of each (conv_kind, conv_id) of the user that has a row with read_id > 0."""

    def rows(
        self, user_id: int, convs: Sequence[tuple[int, int]]
    ) -> Deferred[dict[tuple[int, int], ConvState]]:
        """The user's retained rows (hidden ones too) of these (conv_kind, conv_id), with
        their last records; conversations without a row are left out. Reads only."""


class GroupStore(Protocol):
    def create(self, owner_id: int, name: str, members: tuple[int, ...], since_id: int
               ) -> Deferred[int]:  # fmt: skip
        """Create a group with `owner_id` plus `members` (owner first); returns the new id.
        Raises LimitExceeded (nothing written) past the member or per-user group limits."""

    def add(
        self, group_id: int, users: tuple[int, ...], since_id: int
    ) -> Deferred[tuple[int, ...]]:
        """Add the users not yet in the group; returns those added (ascending). Raises
        LimitExceeded (nothing written) past the member or per-user group limits,
        GroupNotFound for a group that does not exist."""

    def remove(self, group_id: int, users: tuple[int, ...]) -> Deferred[tuple[int, ...]]:
        """Remove the users that are members; returns those removed (ascending). If the owner
        leaves, the remaining member who joined first (lower id on a tie) becomes owner.
        GroupNotFound for a group that does not exist."""

    def info(self, group_id: int) -> Deferred[GroupInfo | None]: ...

    def since(self, group_id: int, user_id: int) -> Deferred[int | None]:
        """The member's since_id, or None if not a current member."""

    def groups_of(self, user_id: int) -> Deferred[tuple[tuple[int, str], ...]]: ...


class PushRouter(Protocol):
    """Live pushes to devices on other gateways, and presence (which gateway holds which
    device). Best effort: delivery is guaranteed by the inboxes, not by pushes."""

    @property
    def node(self) -> int | None:
        """A message-id node leased for this gateway, or None: use the configured one."""

    def start(self, hub: Hub) -> Deferred[None]:
        """Announce this gateway; deliver pushes routed here to `hub`'s sessions."""

    def online(self, conn: Pushable) -> Deferred[None]:
        """`conn` holds its device now (a session of it elsewhere is closed, REPLACED)."""

    def offline(self, conn: Pushable) -> Deferred[None]: ...

    def route(self, users: Iterable[int], msg_id: int, data: bytes) -> Deferred[None]:
        """Write the encoded PUSH to `users`' devices held by other gateways."""

    def notify(self, users: Iterable[int], data: bytes, feature: int) -> Deferred[None]:
        """Write the encoded frame `data` (no push window: READ_UPDATE) to `users`' devices
        held by other gateways whose connection enabled `feature` (improto.enums.Feature)."""

    def online_devices(self, user_ids: Sequence[int]) -> Deferred[dict[int, set[str]]]:
        """The devices of each user connected now, on any gateway (presence: a hint that
        may lag by a few seconds); users with none are absent."""

    def kick(self, user_id: int, device_id: str | None, reason: int) -> Deferred[int]:
        """Close the user's connection of `device_id` (None: all its devices), on whichever
        gateway holds it, with CLOSE `reason` (improto.enums.CloseReason); returns how many
        connections were told to close."""

    def close(self) -> Deferred[None]: ...


class DeviceStore(Protocol):
    """Per-device state beside the inbox positions: push registrations (spec section 19)
    and session revocations (spec 8.2)."""

    def set_target(self, user_id: int, device_id: str, target: PushTarget) -> Deferred[None]:
        """Register (or replace) the device's push target. At most MAX_TARGETS_PER_USER per
        user: registering one more drops the user's oldest registration."""

    def remove_target(
        self, user_id: int, device_id: str, token: str | None = None
    ) -> Deferred[bool]:
        """Remove the device's target; with `token`, only if it is still that token (a
        gateway's dead-token report must not remove a newer registration). True if one
        went."""

    def targets(self, user_ids: Sequence[int]) -> Deferred[dict[int, dict[str, PushTarget]]]:
        """The registered targets of each user, by device; users with none are absent."""

    def revoke(self, user_id: int, at_ms: int) -> Deferred[None]:
        """Tokens of the user issued before `at_ms` are refused from now on (max with an
        earlier revocation)."""

    def revoked_before(self, user_id: int) -> Deferred[int]:
        """The user's revocation time in ms (0: never revoked)."""


class NotifyQueue(Protocol):
    """Durable jobs for the notifier, consumed apart from the persist queue: the persisted
    messages whose receivers may need a notification (PersistJob, from the persister), and
    connected devices that left a PUSH unacknowledged (DeviceNotifyJob, from the gateways)."""

    def put(self, jobs: Sequence[NotifyJob]) -> Deferred[None]:
        """Queue the jobs, in order; durable when the Deferred fires."""

    def consume(self, handler: NotifyHandler, max_batch: int = 1) -> None:
        """As PersistQueue.consume: batches of 1..max_batch in order, one at a time, each
        removed once its Deferred succeeds, redelivered after a failure or a crash."""

    def close(self) -> Deferred[None]: ...


class Backend(Protocol):
    """A storage backend: the four ports, the push router that fits it, lifecycle and
    retention."""

    # read-only members, so that a backend's more specific attribute types satisfy them
    @property
    def queue(self) -> PersistQueue: ...

    @property
    def inbox(self) -> InboxStore: ...

    @property
    def history(self) -> HistoryStore: ...

    @property
    def groups(self) -> GroupStore: ...

    @property
    def conversations(self) -> ConversationStore: ...

    @property
    def devices(self) -> DeviceStore: ...

    @property
    def timeline(self) -> TimelineStore: ...

    @property
    def notify_queue(self) -> NotifyQueue: ...

    def start(self) -> Deferred[None]: ...

    def health(self) -> Deferred[Health]:
        """One cheap call to each storage service (health.Health: each one's state, the
        persist queue's depth)."""

    def push_router(self) -> PushRouter:
        """A new push router for a gateway on this backend (embedded: the local hub alone;
        production: presence in Redis, pushes routed over RabbitMQ)."""

    def close(self) -> Deferred[None]: ...

    def sweep(self) -> Deferred[dict[str, int]]:
        """Remove what is past retention; returns counts per kind."""
