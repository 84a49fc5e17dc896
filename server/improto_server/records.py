"""Pages built from stored MESSAGE records, without a Message object per message.

A MESSAGE record (PROTOCOL.md section 6) is exactly the body of a PUSH frame, and the stores
already keep messages that way (Redis inbox records and HBase cells hold PUSH payloads) or as
columns that pack into one. The pull handlers splice these bytes into OFFLINE_PAGE and
HISTORY_PAGE frames: no decode into dataclasses and no re-encode through the codec per page.
The bytes are the ones `improto.codec.encode` would produce for the same page; a test
compares both. Records were validated by the strict codec when the message was accepted.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

from improto.codec import decode_payload
from improto.enums import ConvKind, FrameType
from improto.frames import Message, Push
from improto.limits import HEADER_SIZE, PROTOCOL_VERSION

_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">BBBI")  # version, type, flags, request_id
_U64 = struct.Struct(">Q")
_IDS = struct.Struct(">QQQ")  # msg_id, server_time, sender_id
_TAIL = struct.Struct(">BQH16sH")  # conv_kind, conv_id, content_type, client_msg_id, body len
_CONV = struct.Struct(">BQ")
_UNREAD = struct.Struct(">BQH")
_OFFLINE_FIXED = struct.Struct(">QBBH")  # cursor, has_more, gap, message count
_HISTORY_FIXED = struct.Struct(">BQBH")  # conv_kind, conv_id, has_more, message count
_COUNT = struct.Struct(">H")
_PUSH_HEADER = _HEAD.pack(PROTOCOL_VERSION, FrameType.PUSH, 0, 0)


class CorruptRecord(ValueError):
    """A stored record that is not one whole MESSAGE record."""


@dataclass(frozen=True, slots=True)
class InboxRecords:
    """InboxPage with MESSAGE records in place of Message objects."""

    cursors: tuple[int, ...]  # ascending, one per record
    records: tuple[bytes, ...]
    start: int
    has_more: bool
    gap: bool


@dataclass(frozen=True, slots=True)
class HistoryRecords:
    """HistorySlice with MESSAGE records, newest first."""

    records: tuple[bytes, ...]
    has_more: bool


def pack_record(
    msg_id: int, server_time: int, sender_id: int, sender_device: str, conv_kind: int,
    conv_id: int, content_type: int, client_msg_id: bytes, body: bytes,
) -> bytes:  # fmt: skip
    """The MESSAGE record of a message kept as columns."""
    device = sender_device.encode()
    return b"".join((
        _IDS.pack(msg_id, server_time, sender_id), bytes((len(device),)), device,
        _TAIL.pack(conv_kind, conv_id, content_type, client_msg_id, len(body)), body,
    ))  # fmt: skip


def record_of_push(payload: bytes) -> bytes:
    """The record inside a stored PUSH payload (its header checked, not its content)."""
    if payload[:2] != _PUSH_HEADER[:2]:
        raise CorruptRecord(f"stored payload is not a version-1 PUSH: {payload[:7]!r}")
    return payload[HEADER_SIZE:]


def conversation_of(record: bytes) -> tuple[int, int, int]:
    """(sender_id, conv_kind, conv_id) of a record; checks that the record is whole."""
    try:
        sender = _U64.unpack_from(record, 16)[0]
        n = record[24]
        kind, conv, _, _, size = _TAIL.unpack_from(record, 25 + n)
    except (IndexError, struct.error):
        raise CorruptRecord("truncated MESSAGE record") from None
    if 25 + n + _TAIL.size + size != len(record):
        raise CorruptRecord("MESSAGE record length does not match its fields")
    return sender, kind, conv


def message_of(record: bytes) -> Message:
    """Decode a record with the strict codec (the Message-returning `page()` ports)."""
    frame = decode_payload(_PUSH_HEADER + record)
    assert isinstance(frame, Push)
    return frame.message


def fit_sizes(sizes: Iterable[int], budget: int) -> int:
    """How many leading items of these sizes fit in `budget` bytes (at least one, if any)."""
    used = n = 0
    for n, size in enumerate(sizes, 1):
        used += size
        if used > budget:
            return max(n - 1, 1)
    return n


def fit(records: tuple[bytes, ...] | list[bytes], budget: int) -> int:
    """How many leading records fit in `budget` bytes (at least one, if any)."""
    return fit_sizes(map(len, records), budget)


def _frame(kind: FrameType, request_id: int, parts: list[bytes]) -> bytes:
    size = HEADER_SIZE + sum(map(len, parts))
    return b"".join((_LEN.pack(size), _HEAD.pack(PROTOCOL_VERSION, kind, 0, request_id), *parts))


def offline_page(
    request_id: int, me: int, cursor: int, has_more: bool, gap: bool, records: list[bytes]
) -> bytes:
    """A whole OFFLINE_PAGE frame (length prefix included), with its unread counts: per
    conversation as `me` sees it, messages from others, in order of first appearance."""
    counts: dict[tuple[int, int], int] = {}
    for r in records:
        sender, kind, conv = conversation_of(r)
        if sender != me:
            key = (kind, conv) if kind == ConvKind.GROUP else (ConvKind.USER, sender)
            counts[key] = counts.get(key, 0) + 1
    unread = [_UNREAD.pack(k, c, n) for (k, c), n in counts.items()]
    fixed = _OFFLINE_FIXED.pack(cursor, int(has_more), int(gap), len(records))
    return _frame(FrameType.OFFLINE_PAGE, request_id,
                  [fixed, *records, _COUNT.pack(len(unread)), *unread])  # fmt: skip


def history_page(
    request_id: int, conv_kind: int, conv_id: int, has_more: bool, records: list[bytes]
) -> bytes:
    """A whole HISTORY_PAGE frame (length prefix included)."""
    for r in records:
        conversation_of(r)  # each record whole, as the codec would insist
    fixed = _HISTORY_FIXED.pack(conv_kind, conv_id, int(has_more), len(records))
    return _frame(FrameType.HISTORY_PAGE, request_id, [fixed, *records])
