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


@dataclass(frozen=True, slots=True)
class PersistJob:
    """One accepted message and where it must be written: every inbox, and its history."""

    message: Message
    inbox_users: tuple[int, ...]
    # The message's MESSAGE record (improto.records): what the PUSH frame, the queue, the inbox
    # entries and the history cells carry. Packed once (or kept from the job's bytes).
    _record: bytes | None = field(default=None, compare=False, repr=False)

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
    # the record. Format 1 (before formats were numbered): u32 count, u64 ids, then a
    # version-1 PUSH payload; `from_bytes` reads both.
    def to_bytes(self) -> bytes:
        n = len(self.inbox_users)
        head = _JOB_HEAD.pack(records.STORE_FORMAT, n)
        return head + struct.pack(f">{n}Q", *self.inbox_users) + self.record

    @staticmethod
    def from_bytes(data: bytes) -> PersistJob:
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
class GroupInfo:
    group_id: int
    name: str
    owner_id: int
    members: tuple[int, ...]  # ascending


class LimitExceeded(Exception):
    """A group would exceed MAX_GROUP_MEMBERS, or a user MAX_GROUPS_PER_USER."""


class GroupNotFound(LookupError):
    """A group id that was never created (or was deleted): the GroupStore's typed miss."""

    def __init__(self, group_id: int) -> None:
        super().__init__(f"no group {group_id}")
        self.group_id = group_id
