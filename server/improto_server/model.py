"""Value types shared by the service logic and every storage backend."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from improto.codec import COMPILED
from improto.enums import ConvKind
from improto.frames import Message, Push


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


@dataclass(frozen=True, slots=True)
class PersistJob:
    """One accepted message and where it must be written: every inbox, and its history."""

    message: Message
    inbox_users: tuple[int, ...]
    # The message encoded as a PUSH payload: what the queue, the inbox records and the history
    # cells store. Encoded once (or kept from decoding), never compared.
    _payload: bytes | None = field(default=None, compare=False, repr=False)

    @property
    def history_key(self) -> ConvKey:
        return ConvKey.of_message(self.message)

    @property
    def push_payload(self) -> bytes:
        """The PUSH payload of the message (validated by the strict codec when encoded)."""
        if self._payload is None:
            object.__setattr__(self, "_payload", COMPILED.encode_payload(Push(self.message)))
        assert self._payload is not None
        return self._payload

    # Wire form for queues: u32 user count, u64 user ids, then the PUSH payload of the message
    # (the codec already validates it strictly, so a corrupt job fails loudly).
    def to_bytes(self) -> bytes:
        n = len(self.inbox_users)
        return struct.pack(f">I{n}Q", n, *self.inbox_users) + self.push_payload

    @staticmethod
    def from_bytes(data: bytes) -> PersistJob:
        (n,) = struct.unpack_from(">I", data)
        users = struct.unpack_from(f">{n}Q", data, 4)
        payload = data[4 + 8 * n :]
        frame = COMPILED.decode_payload(payload)
        assert isinstance(frame, Push)
        return PersistJob(frame.message, users, payload)


@dataclass(frozen=True, slots=True)
class Accepted:
    """Result of accepting a SEND: the message's id/time, and whether it was a resend."""

    msg_id: int
    server_time: int
    duplicate: bool


@dataclass(frozen=True, slots=True)
class InboxPage:
    entries: tuple[tuple[int, Message], ...]  # (cursor, message), ascending cursor
    start: int  # the start S actually used (after clamping to the head)
    has_more: bool
    gap: bool


@dataclass(frozen=True, slots=True)
class HistorySlice:
    messages: tuple[Message, ...]  # newest first
    has_more: bool


@dataclass(frozen=True, slots=True)
class GroupInfo:
    group_id: int
    name: str
    owner_id: int
    members: tuple[int, ...]  # ascending


class LimitExceeded(Exception):
    """A group would exceed MAX_GROUP_MEMBERS, or a user MAX_GROUPS_PER_USER."""
