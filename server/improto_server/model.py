"""Value types shared by the service logic and every storage backend."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from improto import records
from improto.enums import ConvKind
from improto.frames import Message


@dataclass(frozen=True, slots=True, order=True)
class ConvKey:
    """A conversation's identity in storage: 1:1 keys are (USER, low id, high id)."""

    kind: int
    a: int
    b: int = 0

    @staticmethod
    def direct(user_a: int, user_b: int) -> ConvKey:
        lo, hi = sorted((user_a, user_b))
        return ConvKey(ConvKind.USER, lo, hi)

    @staticmethod
    def group(group_id: int) -> ConvKey:
        return ConvKey(ConvKind.GROUP, group_id)

    @staticmethod
    def of_message(m: Message) -> ConvKey:
        if m.conv_kind == ConvKind.GROUP:
            return ConvKey.group(m.conv_id)
        return ConvKey.direct(m.sender_id, m.conv_id)

    def __str__(self) -> str:
        return f"u:{self.a}:{self.b}" if self.kind == ConvKind.USER else f"g:{self.a}"


_JOB_HEAD = struct.Struct(">BI")  # storage format, receiver count
_U32 = struct.Struct(">I")
TIMELINE_JOB_FORMAT = 5  # a queued timeline job's first byte (a large group's message)


@dataclass(frozen=True, slots=True)
class PersistJob:
    """One accepted message and where it must be written: every inbox, and its history; or,
    for a large group's message (`timeline`), its group's timeline and its history, no inbox
    (docs/design/large-groups.md: decided at accept and carried by the job)."""

    message: Message
    inbox_users: tuple[int, ...]
    # The message's MESSAGE record (improto.records): what the PUSH frame, the queue, the inbox
    # entries and the history cells carry. Packed once (or kept from the job's bytes).
    _record: bytes | None = field(default=None, compare=False, repr=False)
    timeline: bool = False  # a large group's message: inbox_users is empty

    @staticmethod
    def for_timeline(message: Message, record: bytes | None = None) -> PersistJob:
        return PersistJob(message, (), record, timeline=True)

    @property
    def history_key(self) -> ConvKey:
        return ConvKey.of_message(self.message)

    @property
    def record(self) -> bytes:
        if self._record is None:
            object.__setattr__(self, "_record", records.record_of(self.message))
        assert self._record is not None
        return self._record

    @property
    def stored_record(self) -> bytes:
        """The record as stores keep it (with its storage format)."""
        return records.stored(self.record)

    # Wire form for queues (storage format 2): u8 format, u32 user count, u64 user ids, then
    # the record. Timeline jobs (format TIMELINE_JOB_FORMAT): u8 format, then the record.
    # Format 1 (before formats were numbered): u32 count, u64 ids, then a version-1 PUSH
    # payload; `from_bytes` reads all three.
    def to_bytes(self) -> bytes:
        if self.timeline:
            return bytes((TIMELINE_JOB_FORMAT,)) + self.record
        n = len(self.inbox_users)
        head = _JOB_HEAD.pack(records.STORE_FORMAT, n)
        return head + struct.pack(f">{n}Q", *self.inbox_users) + self.record

    @staticmethod
    def from_bytes(data: bytes) -> PersistJob:
        if data[:1] == bytes((TIMELINE_JOB_FORMAT,)):
            record = data[1:]
            message = records.unpack_record(record)
            if message.conv_kind != ConvKind.GROUP:
                raise records.CorruptRecord("a timeline job of a message to no group")
            return PersistJob.for_timeline(message, record)
        try:
            if data[0] == records.STORE_FORMAT:
                _, n = _JOB_HEAD.unpack_from(data)
                start = _JOB_HEAD.size
            else:  # format 1: its u32 count's first byte is 0 (counts are far below 2**24)
                (n,) = _U32.unpack_from(data)
                start = _U32.size
            users = struct.unpack_from(f">{n}Q", data, start)
        except (IndexError, struct.error):
            raise records.CorruptRecord("truncated persistence job") from None
        rest = data[start + 8 * n :]
        record = rest if data[0] == records.STORE_FORMAT else records.record_of_stored(rest)
        return PersistJob(records.unpack_record(record), users, record)


@dataclass(frozen=True, slots=True)
class Accepted:
    """Result of accepting a SEND: the message's id/time, and whether it was a resend."""

    msg_id: int
    server_time: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class InboxRecords:
    """A page of an offline inbox: MESSAGE records (improto.records) and their cursors."""

    cursors: tuple[int, ...]  # ascending, one per record
    records: tuple[bytes, ...]
    start: int  # the start S actually used (after clamping to the head)
    has_more: bool
    gap: bool


@dataclass(frozen=True, slots=True)
class HistoryRecords:
    """A page of a conversation's history: MESSAGE records, newest first."""

    records: tuple[bytes, ...]
    has_more: bool


@dataclass(frozen=True, slots=True)
class TimelineRecords:
    """A page of a large group's timeline (TimelineStore.after): the MESSAGE records of the
    seqs first_seq, first_seq + 1, ... in order (contiguous), none above `done`."""

    first_seq: int  # the seq of records[0]; after_seq + 1 when the page is empty
    records: tuple[bytes, ...]
    has_more: bool  # seqs above the page's last, up to done, exist
    done: int  # the group's done when read: every seq up to it is readable


@dataclass(frozen=True, slots=True)
class TimelineHead:
    """A large group's timeline as lists and sync need it (TimelineStore.heads)."""

    done: int  # the highest seq whose record is written, every one below it too (0: none)
    last_msg_id: int  # the msg_id of seq `done`'s message (0: none)
    last: bytes | None  # its MESSAGE record (None: none)


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_id: int
    name: str
    owner_id: int
    members: tuple[int, ...]  # ascending
    # read-diffused (docs/design/large-groups.md): its messages go to its timeline, not into
    # the members' inboxes; set and cleared with the membership (GroupStore, hysteresis)
    large: bool = False


class LimitExceeded(Exception):
    """A group would exceed MAX_GROUP_MEMBERS, or a user MAX_GROUPS_PER_USER."""


class GroupNotFound(LookupError):
    """A group id that was never created (or was deleted): the GroupStore's typed miss."""

    def __init__(self, group_id: int) -> None:
        super().__init__(f"no group {group_id}")
        self.group_id = group_id


# ------------------------------------------------------------ conversation state (issue 13)

MAX_UNREAD_TRACKED = 1000  # unread msg_ids a conversation row keeps (ConversationStore)
TIMELINE_INDEX = 10_000  # a large group's newest msg_id -> seq entries Redis keeps (TimelineStore)
# Inbox entries ConversationStore.fold applies per user per call: bounds one call's work.
FOLD_ENTRIES = 1000

# Push registrations (spec section 19; DeviceStore).
MAX_PUSH_TOKEN = 4096  # UTF-8 bytes of a push token
MAX_PLATFORM = 32  # bytes of a platform name ([a-z0-9._-])
MAX_TARGETS_PER_USER = 64  # registered devices kept per user; the oldest go first


@dataclass(frozen=True, slots=True)
class PushTarget:
    """Where a device gets notifications: the platform's name (apns, fcm or one the server
    allows), its push token, and whether a notification may show the message text."""

    platform: str
    token: str
    preview: bool


STATE_JOB_FORMAT = 3  # a queued StateJob's first byte (messages: records.STORE_FORMAT)
_STATE_HEAD = struct.Struct(">BBQBQQB")  # format, kind, user, conv kind, conv id, msg id, len


@dataclass(frozen=True, slots=True)
class StateJob:
    """A change of one user's conversation state, queued like a message and applied by the
    persister (never on the gateway): a read marker, or hiding the conversation.

    MARK: the user's read position in the conversation := max(position, msg_id); for 1:1 also
    the peer's row learns it (peer_read_id). HIDE: the row is hidden unless its last message is
    newer than msg_id (the newest id when the user hid it); a later message unhides it."""

    MARK = 1
    HIDE = 2

    kind: int
    user_id: int
    conv_kind: int
    conv_id: int  # the conversation as user_id sees it: the peer (1:1) or the group
    msg_id: int
    device_id: str = ""

    @property
    def history_key(self) -> ConvKey:
        """The conversation's storage key: a state job is queued beside its messages."""
        if self.conv_kind == ConvKind.GROUP:
            return ConvKey.group(self.conv_id)
        return ConvKey.direct(self.user_id, self.conv_id)

    def to_bytes(self) -> bytes:
        dev = self.device_id.encode()
        head = _STATE_HEAD.pack(
            STATE_JOB_FORMAT, self.kind, self.user_id, self.conv_kind, self.conv_id,
            self.msg_id, len(dev),
        )  # fmt: skip
        return head + dev

    @staticmethod
    def from_bytes(data: bytes) -> StateJob:
        try:
            fmt, kind, user, ck, cid, mid, n = _STATE_HEAD.unpack_from(data)
        except struct.error:
            raise records.CorruptRecord("truncated state job") from None
        dev = data[_STATE_HEAD.size : _STATE_HEAD.size + n]
        if fmt != STATE_JOB_FORMAT or len(dev) != n or kind not in (StateJob.MARK, StateJob.HIDE):
            raise records.CorruptRecord("not a state job")
        return StateJob(kind, user, ck, cid, mid, dev.decode())


QueuedJob = PersistJob | StateJob


def job_from_bytes(data: bytes) -> QueuedJob:
    """A queued job of either kind, from its bytes (the queues store both)."""
    if data[:1] == bytes((STATE_JOB_FORMAT,)):
        return StateJob.from_bytes(data)
    return PersistJob.from_bytes(data)


NOTIFY_DEVICE_FORMAT = 4  # a queued DeviceNotifyJob's first byte (notify queues only)
_DEVICE_HEAD = struct.Struct(">BQB")  # format, user, device id length


@dataclass(frozen=True, slots=True)
class DeviceNotifyJob:
    """A notification for one device, whatever its presence: the gateway puts it on the notify
    queue when the device, connected, left a PUSH unacknowledged for push_ack_wait_s (its app
    suspended, the socket kept). `message` is the newest message pushed to it; `record` its
    MESSAGE record, kept as it came (no repacking)."""

    user_id: int
    device_id: str
    message: Message
    record: bytes = field(repr=False)

    @staticmethod
    def of(user_id: int, device_id: str, record: bytes) -> DeviceNotifyJob:
        """The job for `record` (CorruptRecord if it is not one whole MESSAGE record)."""
        return DeviceNotifyJob(user_id, device_id, records.unpack_record(record), record)

    # Wire form (storage format NOTIFY_DEVICE_FORMAT): u8 format, u64 user, u8 device id
    # length, the device id (UTF-8), then the record.
    def to_bytes(self) -> bytes:
        dev = self.device_id.encode()
        return _DEVICE_HEAD.pack(NOTIFY_DEVICE_FORMAT, self.user_id, len(dev)) + dev + self.record

    @staticmethod
    def from_bytes(data: bytes) -> DeviceNotifyJob:
        try:
            fmt, user, n = _DEVICE_HEAD.unpack_from(data)
        except struct.error:
            raise records.CorruptRecord("truncated device notify job") from None
        start = _DEVICE_HEAD.size + n
        dev = data[_DEVICE_HEAD.size : start]
        if fmt != NOTIFY_DEVICE_FORMAT or len(dev) != n:
            raise records.CorruptRecord("not a device notify job")
        try:
            device = dev.decode()
        except UnicodeDecodeError:
            raise records.CorruptRecord("device notify job with a malformed device id") from None
        return DeviceNotifyJob.of(user, device, data[start:])


NotifyJob = PersistJob | DeviceNotifyJob


def notify_job_from_bytes(data: bytes) -> NotifyJob:
    """A notify queue's job of either kind, from its bytes (the notify queues hold both)."""
    if data[:1] == bytes((NOTIFY_DEVICE_FORMAT,)):
        return DeviceNotifyJob.from_bytes(data)
    return PersistJob.from_bytes(data)


@dataclass(frozen=True, slots=True)
class ConvState:
    """One row of a user's conversation list (PROTOCOL.md section 18: the CONV record)."""

    conv_kind: int
    conv_id: int  # as the user sees it: the peer's user id (1:1), the group id
    version: int  # the user's list version at the row's last change (1, 2, 3, ...)
    hidden: bool
    read_id: int  # the user's read position (a msg_id; 0: none)
    peer_read_id: int  # 1:1: the peer's read position (0: none); groups: 0
    unread: int  # messages from others with msg_id > read_id
    last_id: int  # the newest message's msg_id (0: none)
    last: bytes | None  # that message's MESSAGE record (improto.records), None if none
    # The newest hide's msg_id (0: none): a message above it unhides the row. Not part of
    # the CONV record (nor of equality): the lists merge large groups' heads by it.
    hide_id: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class ConvRows:
    """A page of a user's conversation list."""

    version: int  # by_activity: the user's list version when read; changes: see the port
    has_more: bool
    total_unread: int  # the sum of `unread` over the user's rows that are not hidden
    convs: tuple[ConvState, ...]


@dataclass(frozen=True, slots=True)
class InboxIds:
    """The ids of a run of inbox entries, without their records (notices, login watch)."""

    start: int  # the start actually used (clamped to the head)
    cursors: tuple[int, ...]  # ascending
    msg_ids: tuple[int, ...]  # one per cursor
    has_more: bool
    gap: bool  # as InboxStore.page: an entry above `start` was removed by retention or caps
