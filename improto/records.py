"""MESSAGE records as bytes: the one owner of the stored message layout and of the frames
spliced from it.

A MESSAGE record (PROTOCOL.md section 6) is exactly the body of a PUSH frame. A message is
packed into a record once, with `struct` (no codec pass), when it is accepted; the PUSH frame,
the queued job, the inbox entries, the history cells and the timeline rows all carry those
bytes, and the pull handlers splice stored records into OFFLINE_PAGE, HISTORY_PAGE, CONV_PAGE
and TIMELINE_PAGE frames without decoding them. Every builder here produces the bytes
`improto.codec` would produce for the same frame (tests/test_records.py and
tests/test_timeline_frames.py compare them over generated messages).

Stored records carry a storage format version (STORE_FORMAT) of their own, apart from the wire
protocol's version, so that a later protocol version leaves stored inboxes, history cells and
queued jobs readable: `record_of_stored` reads every format ever written.
"""

from __future__ import annotations

import struct
from collections.abc import Collection, Iterable, Mapping, Sequence

from improto.codec import decode_payload
from improto.enums import ConvKind, FrameType
from improto.errors import EncodeError
from improto.frames import Message, Push
from improto.limits import (
    HEADER_SIZE,
    MAX_FRAME_LENGTH,
    MAX_TIMELINE_HEADS,
    OFFLINE_PAGE_MAX,
    PROTOCOL_VERSION,
    TIMELINE_PAGE_MAX,
)

# Storage formats. 1: a protocol-version-1 PUSH payload (7-byte header, then the record), what
# stores and queues held before formats were numbered; its first byte, the protocol version 1,
# doubles as its format number. 2: the format byte, then the record.
LEGACY_FORMAT = 1
STORE_FORMAT = 2

_LEN = struct.Struct(">I")
_HEAD = struct.Struct(">BBBI")  # version, type, flags, request_id
_U64 = struct.Struct(">Q")
_U16 = struct.Struct(">H")
_SENDER_DEVICE = struct.Struct(">QB").unpack_from
_IDS = struct.Struct(">QQQ")  # msg_id, server_time, sender_id
_TAIL = struct.Struct(">BQH16sH")  # conv_kind, conv_id, content_type, client_msg_id, body len
_UNREAD = struct.Struct(">BQH")
_OFFLINE_FIXED = struct.Struct(">QBBH")  # cursor, has_more, gap, message count
_HISTORY_FIXED = struct.Struct(">BQBH")  # conv_kind, conv_id, has_more, message count
_COUNT = struct.Struct(">H")
_CONV_FIXED = struct.Struct(">QBIH")  # version, has_more, total_unread, conv count
_CONV_HEAD = struct.Struct(">BQQBQQIH")  # a CONV record up to its `last` count
_NOTICE_FIXED = struct.Struct(">QQH")  # from_cursor, to_cursor, msg_id count
_READ_UPDATE = struct.Struct(">QBQQ")  # reader_id, conv_kind, conv_id, msg_id
_TIMELINE_FIXED = struct.Struct(">QQQBH")  # group_id, position, done, has_more, message count
_TIMELINE_HEAD = struct.Struct(">QQQIQ")  # group_id, done, read_seq, unread, last_msg_id
_U32_MAX = 0xFFFFFFFF
_PUSH_HEADER = _HEAD.pack(PROTOCOL_VERSION, FrameType.PUSH, 0, 0)
_PUSH_ACK_SIZE = HEADER_SIZE + 8
_STORE_TAG = bytes((STORE_FORMAT,))

# Bytes of a page frame's `length` that are not message records: header, fixed fields, list
# counts; OFFLINE_PAGE adds one UNREAD per conversation (OFFLINE_OVERHEAD: the most it can be,
# one per message). The *_RECORD_BYTES are the most record bytes a page can hold (an offline
# page whose messages are all the puller's own has no UNREAD): the budget a store reads.
OFFLINE_FIXED = HEADER_SIZE + _OFFLINE_FIXED.size + _COUNT.size
OFFLINE_OVERHEAD = OFFLINE_FIXED + _UNREAD.size * OFFLINE_PAGE_MAX
HISTORY_OVERHEAD = HEADER_SIZE + _HISTORY_FIXED.size
OFFLINE_RECORD_BYTES = MAX_FRAME_LENGTH - OFFLINE_FIXED
HISTORY_RECORD_BYTES = MAX_FRAME_LENGTH - HISTORY_OVERHEAD
# CONV_PAGE / CONV_CHANGES_PAGE (spec 18): version u64, has_more, total_unread u32, count u16;
# a CONV record is CONV_OVERHEAD bytes plus its last message's MESSAGE record, if any.
CONV_PAGE_FIXED = HEADER_SIZE + 8 + 1 + 4 + 2
CONV_OVERHEAD = 1 + 8 + 8 + 1 + 8 + 8 + 4 + 2  # kind, id, version, hidden, read, peer, unread, n
CONV_RECORD_BYTES = MAX_FRAME_LENGTH - CONV_PAGE_FIXED
# TIMELINE_PAGE (spec 20): group_id, position, done u64, has_more, count u16, then records.
TIMELINE_FIXED = HEADER_SIZE + _TIMELINE_FIXED.size
TIMELINE_RECORD_BYTES = MAX_FRAME_LENGTH - TIMELINE_FIXED


def conv_size(last: bytes | None) -> int:
    """The bytes of one CONV record whose last message is `last` (a MESSAGE record)."""
    return CONV_OVERHEAD + (len(last) if last else 0)


class CorruptRecord(ValueError):
    """Stored bytes that are not one whole MESSAGE record of a known storage format."""


def pack_record(
    msg_id: int, server_time: int, sender_id: int, sender_device: str, conv_kind: int,
    conv_id: int, content_type: int, client_msg_id: bytes, body: bytes,
) -> bytes:  # fmt: skip
    """The MESSAGE record of a message given as fields (stores that keep columns)."""
    device = sender_device.encode()
    return b"".join((
        _IDS.pack(msg_id, server_time, sender_id), bytes((len(device),)), device,
        _TAIL.pack(conv_kind, conv_id, content_type, client_msg_id, len(body)), body,
    ))  # fmt: skip


def record_of(m: Message) -> bytes:
    """The MESSAGE record of `m` (validated first, as the codec would)."""
    m.validate()
    if len(m.sender_device.encode()) > 255 or len(m.client_msg_id) != 16:
        raise EncodeError("sender_device longer than 255 bytes or client_msg_id not 16 bytes")
    return pack_record(
        m.msg_id, m.server_time, m.sender_id, m.sender_device, m.conv_kind, m.conv_id,
        m.content_type, m.client_msg_id, m.body,
    )  # fmt: skip


def stored(record: bytes) -> bytes:
    """What a store or a queue keeps for a record: the storage format, then the record."""
    return _STORE_TAG + record


def record_of_stored(data: bytes) -> bytes:
    """The record inside stored bytes of any storage format (checked whole)."""
    fmt = data[:1]
    if fmt == _STORE_TAG:
        record = data[1:]
    elif data[:2] == _PUSH_HEADER[:2]:  # LEGACY_FORMAT
        record = data[HEADER_SIZE:]
    else:
        raise CorruptRecord(f"stored record of unknown format: {data[:7]!r}")
    conversation_of(record)
    return record


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


def sender_and_type(data: bytes, at: int = 0) -> tuple[int, int]:
    """The sender_id and content_type of the record at `at` in `data` (a PUSH frame's: at
    its body), read in place; a truncated record raises CorruptRecord."""
    try:
        sender, n = _SENDER_DEVICE(data, at + 16)  # sender_id, then the device's length
        return sender, _U16.unpack_from(data, at + 34 + n)[0]  # after conv_kind, conv_id
    except struct.error:
        raise CorruptRecord("truncated MESSAGE record") from None


def unpack_record(record: bytes) -> Message:
    """The Message of a record that was packed from a valid message (a queued job), with
    `struct` only; a record that is not whole raises CorruptRecord."""
    try:
        msg_id, server_time, sender = _IDS.unpack_from(record, 0)
        n = record[24]
        device = record[25 : 25 + n].decode()
        kind, conv, ctype, cmid, size = _TAIL.unpack_from(record, 25 + n)
    except (IndexError, struct.error, UnicodeDecodeError):
        raise CorruptRecord("truncated or malformed MESSAGE record") from None
    start = 25 + n + _TAIL.size
    if start + size != len(record):
        raise CorruptRecord("MESSAGE record length does not match its fields")
    return Message(msg_id, server_time, sender, device, kind, conv, ctype, cmid,
                   record[start:])  # fmt: skip


def message_of(record: bytes) -> Message:
    """Decode a record with the strict codec (tests and tools; the server splices)."""
    frame = decode_payload(_PUSH_HEADER + record)
    assert isinstance(frame, Push)
    return frame.message


def push_frame(record: bytes) -> bytes:
    """A whole PUSH frame (length prefix included) carrying `record`."""
    return b"".join((_LEN.pack(HEADER_SIZE + len(record)), _PUSH_HEADER, record))


def push_ack_msg_id(payload: bytes) -> int:
    """The msg_id of a frame payload (length prefix removed) that is a whole version-1
    PUSH_ACK (flags are ignored, PROTOCOL.md section 3), or 0 for anything else: the codec's
    full path decides those."""
    if len(payload) == _PUSH_ACK_SIZE and payload[1] == FrameType.PUSH_ACK and payload[0] == 1:
        return int(_U64.unpack_from(payload, HEADER_SIZE)[0])
    return 0


def fit_sizes(sizes: Iterable[int], budget: int) -> int:
    """How many leading items of these sizes fit in `budget` bytes (at least one, if any)."""
    used = n = 0
    for n, size in enumerate(sizes, 1):
        used += size
        if used > budget:
            return max(n - 1, 1)
    return n


def fit(records: Sequence[bytes], budget: int) -> int:
    """How many leading records fit in `budget` bytes (at least one, if any)."""
    return fit_sizes(map(len, records), budget)


# A user's read position per conversation (kind, id as the user sees it): msg_id, 0 = none.
ReadIds = Mapping[tuple[int, int], int]


def _unread_key(me: int, record: bytes, read_ids: ReadIds | None = None) -> tuple[int, int] | None:
    """The conversation a record counts as unread in for `me` (as `me` sees it), or None for
    `me`'s own message and, given `me`'s read positions (CONVERSATIONS, spec 18.4), for a
    message at or below the read position of its conversation."""
    sender, kind, conv = conversation_of(record)
    if sender == me:
        return None
    key = (kind, conv) if kind == ConvKind.GROUP else (ConvKind.USER, sender)
    if read_ids is not None and _U64.unpack_from(record)[0] <= read_ids.get(key, 0):
        return None
    return key


def offline_fit(
    me: int,
    records: Sequence[bytes],
    max_length: int = MAX_FRAME_LENGTH,
    read_ids: ReadIds | None = None,
) -> int:
    """How many leading records the fullest OFFLINE_PAGE for `me` of length <= `max_length`
    holds (PROTOCOL.md 10.3), counting the unread list those records really need: the largest
    n whose page fits (at least one, if any). Page lengths grow with n, so the first record
    that overflows ends the page. `read_ids` as for `offline_page`."""
    length = OFFLINE_FIXED
    seen: set[tuple[int, int]] = set()
    for n, r in enumerate(records):
        length += len(r)
        key = _unread_key(me, r, read_ids)
        if key is not None and key not in seen:
            seen.add(key)
            length += _UNREAD.size
        if length > max_length:
            return max(n, 1)
    return len(records)


def _frame(kind: FrameType, request_id: int, parts: list[bytes]) -> bytes:
    size = HEADER_SIZE + sum(map(len, parts))
    return b"".join((_LEN.pack(size), _HEAD.pack(PROTOCOL_VERSION, kind, 0, request_id), *parts))


def offline_page(
    request_id: int,
    me: int,
    cursor: int,
    has_more: bool,
    gap: bool,
    records: Sequence[bytes],
    read_ids: ReadIds | None = None,
) -> bytes:
    """A whole OFFLINE_PAGE frame (length prefix included), with its unread counts: per
    conversation as `me` sees it, messages from others, in order of first appearance. Given
    `read_ids` (the connection enabled CONVERSATIONS), only messages above `me`'s read
    position of their conversation count, and a conversation with none is left out."""
    counts: dict[tuple[int, int], int] = {}
    for r in records:
        if (key := _unread_key(me, r, read_ids)) is not None:
            counts[key] = counts.get(key, 0) + 1
    unread = [_UNREAD.pack(k, c, n) for (k, c), n in counts.items()]
    fixed = _OFFLINE_FIXED.pack(cursor, int(has_more), int(gap), len(records))
    return _frame(FrameType.OFFLINE_PAGE, request_id,
                  [fixed, *records, _COUNT.pack(len(unread)), *unread])  # fmt: skip


def history_page(
    request_id: int, conv_kind: int, conv_id: int, has_more: bool, records: Sequence[bytes]
) -> bytes:
    """A whole HISTORY_PAGE frame (length prefix included)."""
    for r in records:
        conversation_of(r)  # each record whole, as the codec would insist
    fixed = _HISTORY_FIXED.pack(conv_kind, conv_id, int(has_more), len(records))
    return _frame(FrameType.HISTORY_PAGE, request_id, [fixed, *records])


# ---------------------------------------------------------------- post-v1 (spec 18)

# One conversation of a CONV_PAGE / CONV_CHANGES_PAGE as a store returns it: conv_kind,
# conv_id (as the user sees it), version, hidden, read_id, peer_read_id, unread, and the
# MESSAGE record of its last message or None.
ConvRow = tuple[int, int, int, bool | int, int, int, int, bytes | None]


def conv_fit(lasts: Iterable[bytes | None], budget: int = CONV_RECORD_BYTES) -> int:
    """How many leading CONV records with these last messages fit in `budget` record bytes
    (at least one, if any): with the default, the fullest page a frame holds."""
    return fit_sizes(map(conv_size, lasts), budget)


def conv_page(
    frame_type: FrameType,
    request_id: int,
    version: int,
    has_more: bool,
    total_unread: int,
    rows: Sequence[ConvRow],
) -> bytes:
    """A whole CONV_PAGE or CONV_CHANGES_PAGE frame (length prefix included), the stored last
    messages spliced in. Counts above 2^32-1 saturate, as the spec says of total_unread."""
    if frame_type not in (FrameType.CONV_PAGE, FrameType.CONV_CHANGES_PAGE):
        raise ValueError(f"{frame_type!r} is not a conversation page")
    parts = [_CONV_FIXED.pack(version, int(has_more), min(total_unread, _U32_MAX), len(rows))]
    for kind, conv, row_version, hidden, read_id, peer_read_id, unread, last in rows:
        if last is not None:
            conversation_of(last)  # whole, as the codec would insist
        n_last = 0 if last is None else 1
        head = (kind, conv, row_version, int(hidden), read_id, peer_read_id)
        parts.append(_CONV_HEAD.pack(*head, min(unread, _U32_MAX), n_last))
        if last is not None:
            parts.append(last)
    frame = _frame(frame_type, request_id, parts)
    if len(frame) - _LEN.size > MAX_FRAME_LENGTH:
        raise EncodeError(
            f"{frame_type.name}: {len(frame) - _LEN.size} bytes exceed the frame limit"
        )
    return frame


def inbox_notice(from_cursor: int, to_cursor: int, msg_ids: Sequence[int]) -> bytes:
    """A whole INBOX_NOTICE frame (request_id 0): the entries in (from, to] are `msg_ids`."""
    fixed = _NOTICE_FIXED.pack(from_cursor, to_cursor, len(msg_ids))
    return _frame(FrameType.INBOX_NOTICE, 0, [fixed, struct.pack(f">{len(msg_ids)}Q", *msg_ids)])


def read_update(reader_id: int, conv_kind: int, conv_id: int, msg_id: int) -> bytes:
    """A whole READ_UPDATE frame (request_id 0)."""
    return _frame(
        FrameType.READ_UPDATE, 0, [_READ_UPDATE.pack(reader_id, conv_kind, conv_id, msg_id)]
    )


# ---------------------------------------------------------------- post-v1 (spec 20)

# One head of a TIMELINE_HEADS_PAGE as the server assembles it: group_id, done (the highest
# readable seq), read_seq (the user's read position as a seq: max(rank(read_id),
# rank(since_id))), last_msg_id (of seq done's message, 0: none).
HeadRow = tuple[int, int, int, int]


def timeline_fit(records: Sequence[bytes], budget: int = TIMELINE_RECORD_BYTES) -> int:
    """How many leading records fit in a TIMELINE_PAGE (at least one, if any): with the
    default budget, the fullest page a frame holds."""
    return fit(records, budget)


def timeline_window(
    after_seq: int,
    first_seq: int,
    records: Sequence[bytes],
    has_more: bool,
    done: int,
    min_msg_id: int = 0,
    budget: int = TIMELINE_RECORD_BYTES,
    held: Collection[int] = (),
) -> tuple[int, bool, list[bytes]]:
    """(position, has_more, records) of the TIMELINE_PAGE answering TIMELINE_PULL(after_seq,
    held) from a store's page (TimelineStore.after: the records of seqs first_seq,
    first_seq + 1, ... up to done, has_more, done), spec 20.4: the leading records that fit in
    `budget`; of those, the ones a member whose window starts at `min_msg_id` may read (msg_id
    >= min_msg_id, HISTORY_PULL's rule) and that the client does not hold (msg_id not in
    `held`, best a set); the others are omitted but covered. The run, and so position and
    has_more, is chosen before anything is omitted: the page is the one of an empty `held`
    without the held records. position: the seq of the last record of the run, or for a page
    without records `done` (also when after_seq is above it: the client then stores the
    lower value), and never above done; has_more: seqs above position, up to done, exist."""
    n = min(timeline_fit(records, budget), max(done - first_seq + 1, 0))  # none above done
    if n:
        position = first_seq + n - 1
        more = has_more or n < len(records)
    else:
        more = has_more
        position = min(after_seq, done) if more else done
    kept = [r for r in records[:n] if _U64.unpack_from(r)[0] >= min_msg_id]
    if held:
        kept = [r for r in kept if _U64.unpack_from(r)[0] not in held]
    return position, more and position < done, kept


def timeline_page(
    request_id: int,
    group_id: int,
    position: int,
    done: int,
    has_more: bool,
    records: Sequence[bytes],
) -> bytes:
    """A whole TIMELINE_PAGE frame (length prefix included), the stored MESSAGE records (of
    group `group_id`, oldest first) spliced in. Refuses what the codec would refuse: a
    record of another conversation, position above done, too many records or bytes."""
    if position > done:
        raise EncodeError(f"TIMELINE_PAGE: position {position} is above done {done}")
    if len(records) > TIMELINE_PAGE_MAX:
        raise EncodeError(f"TIMELINE_PAGE: {len(records)} messages exceed {TIMELINE_PAGE_MAX}")
    for r in records:
        _, kind, conv = conversation_of(r)  # each record whole, as the codec would insist
        if kind != ConvKind.GROUP or conv != group_id:
            raise EncodeError(f"TIMELINE_PAGE: a message of another conversation than {group_id}")
    fixed = _TIMELINE_FIXED.pack(group_id, position, done, int(has_more), len(records))
    frame = _frame(FrameType.TIMELINE_PAGE, request_id, [fixed, *records])
    if len(frame) - _LEN.size > MAX_FRAME_LENGTH:
        raise EncodeError(f"TIMELINE_PAGE: {len(frame) - _LEN.size} bytes exceed the frame limit")
    return frame


def timeline_heads_page(request_id: int, heads: Iterable[HeadRow]) -> bytes:
    """A whole TIMELINE_HEADS_PAGE frame (length prefix included): the heads in ascending
    group_id (sorted here), each with unread = done - read_seq saturating at 2^32-1. A read_seq
    above done (a read mark on a message whose record is not readable yet) is sent as done."""
    rows = sorted(heads)
    if len(rows) > MAX_TIMELINE_HEADS:
        raise EncodeError(f"TIMELINE_HEADS_PAGE: {len(rows)} heads exceed {MAX_TIMELINE_HEADS}")
    parts = [_COUNT.pack(len(rows))]
    previous = 0
    for group_id, done, read_seq, last_msg_id in rows:
        if group_id <= previous:
            raise EncodeError(f"TIMELINE_HEADS_PAGE: group {group_id} is not an id or repeated")
        previous = group_id
        read_seq = min(read_seq, done)
        unread = min(done - read_seq, _U32_MAX)
        parts.append(_TIMELINE_HEAD.pack(group_id, done, read_seq, unread, last_msg_id))
    return _frame(FrameType.TIMELINE_HEADS_PAGE, request_id, parts)
