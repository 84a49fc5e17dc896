"""improto.records, the owner of the stored message layout, byte for byte against the codec:
records, PUSH frames, the PUSH_ACK fast path, spliced pages, page overheads, and stored data
and queued jobs of every storage format (the format-1 data written before formats were
numbered stays readable)."""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path

import pytest

from improto import records
from improto.codec import COMPILED, decode_payload, encode, encode_payload
from improto.enums import ConvKind
from improto.errors import EncodeError, ProtocolError
from improto.frames import HistoryPage, Message, OfflinePage, Push, PushAck, UnreadCount
from improto.limits import MAX_FRAME_LENGTH, OFFLINE_PAGE_MAX, U64_MAX
from improto_server.model import (
    NOTIFY_DEVICE_FORMAT,
    TIMELINE_JOB_FORMAT,
    DeviceNotifyJob,
    PersistJob,
    StateJob,
    job_from_bytes,
    notify_job_from_bytes,
)

ME = 1001
REPO = Path(__file__).resolve().parents[1]


def _messages(rng: random.Random, n: int) -> list[Message]:
    out = []
    for i in range(n):
        kind = rng.choice((ConvKind.USER, ConvKind.GROUP))
        sender = rng.choice((ME, 1002, 1003, U64_MAX))
        conv = rng.choice((ME, 1002, 7, U64_MAX)) if kind == ConvKind.USER else rng.choice((5, 6))
        body = rng.choice((b"", "h\u00e9llo".encode(), b"x" * rng.randrange(300)))
        device = rng.choice(("d", "\u00e9" * 32, "phone-1"))
        out.append(Message(i + 1, rng.randrange(U64_MAX), sender, device, kind, conv,
                           rng.choice((1, 2, 65535)), rng.randbytes(16), body))  # fmt: skip
    return out


def _codec_record(m: Message) -> bytes:
    """The record as the codec encodes it: the body of a PUSH frame."""
    return encode_payload(Push(m))[7:]


def _peer(m: Message) -> tuple[int, int]:
    if m.conv_kind == ConvKind.GROUP:
        return ConvKind.GROUP, m.conv_id
    return ConvKind.USER, m.sender_id


@pytest.mark.parametrize("seed", range(20))
def test_offline_page_matches_codec(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _messages(rng, rng.randrange(0, 201))
    counts: dict[tuple[int, int], int] = {}
    for m in msgs:
        if m.sender_id != ME:
            counts[_peer(m)] = counts.get(_peer(m), 0) + 1
    unread = tuple(UnreadCount(k, c, n) for (k, c), n in counts.items())
    cursor, more, gap, rid = rng.randrange(U64_MAX), rng.randrange(2), rng.randrange(2), seed
    want = encode(OfflinePage(cursor, more, gap, tuple(msgs), unread, request_id=rid))
    recs = [records.record_of(m) for m in msgs]
    assert records.offline_page(rid, ME, cursor, bool(more), bool(gap), recs) == want


@pytest.mark.parametrize("seed", range(20))
def test_history_page_matches_codec(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _messages(rng, rng.randrange(0, 101))
    want = encode(HistoryPage(ConvKind.GROUP, 5, 1, tuple(msgs), request_id=seed))
    got = records.history_page(seed, ConvKind.GROUP, 5, True, [records.record_of(m) for m in msgs])
    assert got == want


def test_records_and_push_frames_equal_the_codec() -> None:
    for m in _messages(random.Random(1), 200):
        rec = records.record_of(m)
        assert rec == _codec_record(m)
        assert rec == records.pack_record(
            m.msg_id, m.server_time, m.sender_id, m.sender_device, m.conv_kind, m.conv_id,
            m.content_type, m.client_msg_id, m.body,
        )  # fmt: skip
        assert records.push_frame(rec) == encode(Push(m))
        assert records.message_of(rec) == m
        assert records.unpack_record(rec) == m
        assert records.conversation_of(rec) == (m.sender_id, m.conv_kind, m.conv_id)
        frame = records.push_frame(rec)
        expected = (m.sender_id, m.content_type)
        assert records.sender_and_type(rec) == expected
        assert records.sender_and_type(frame, len(frame) - len(rec)) == expected
    with pytest.raises(records.CorruptRecord):
        records.sender_and_type(rec[:30])


def test_record_of_validates_like_the_codec() -> None:
    good = _messages(random.Random(3), 1)[0]
    bad = (
        Message(0, 1, 2, "d", ConvKind.USER, 3, 1, b"x" * 16, b""),  # msg_id 0
        Message(1, 1, 2, "d", 9, 3, 1, b"x" * 16, b""),  # unknown conv kind
        Message(1, 1, 2, "d", ConvKind.USER, 3, 1, b"x" * 15, b""),  # short client_msg_id
        Message(1, 1, 2, "d" * 256, ConvKind.USER, 3, 1, b"x" * 16, b""),  # device too long
        Message(1, 1, 2, "d", ConvKind.USER, 3, 1, b"x" * 16, b"\xff"),  # text not UTF-8
    )
    records.record_of(good)
    for m in bad:
        with pytest.raises(ProtocolError):
            COMPILED.encode_payload(Push(m))
        with pytest.raises(ProtocolError):
            records.record_of(m)


def test_page_overheads_are_the_largest_non_record_bytes() -> None:
    # An OFFLINE_PAGE of the most messages, each with its own unread entry (the worst case):
    # everything but the records is exactly OFFLINE_OVERHEAD bytes of the frame.
    msgs = [
        Message(i + 1, 1, 2 + i, "", ConvKind.USER, ME, 1, b"x" * 16, b"")
        for i in range(OFFLINE_PAGE_MAX)
    ]
    recs = [records.record_of(m) for m in msgs]
    frame = records.offline_page(1, ME, 5, False, False, recs)
    assert len(frame) - 4 - sum(map(len, recs)) == records.OFFLINE_OVERHEAD
    frame = records.history_page(1, ConvKind.USER, 2, False, recs[:3])
    assert len(frame) - 4 - sum(map(len, recs[:3])) == records.HISTORY_OVERHEAD
    assert records.OFFLINE_OVERHEAD < MAX_FRAME_LENGTH


def test_push_ack_fast_path_agrees_with_the_codec() -> None:
    for msg_id in (1, 2, 255, 1 << 40, U64_MAX):
        for flags in (0, 1, 0x80):
            payload = encode_payload(PushAck(msg_id, request_id=7, flags=flags))
            assert records.push_ack_msg_id(payload) == msg_id
            frame = decode_payload(payload)
            assert isinstance(frame, PushAck) and frame.msg_id == msg_id
    ping = bytes((1, 0x01, 0, 0, 0, 0, 1)) + bytes(8)
    for other in (ping, encode_payload(PushAck(1))[:-1], b"\x02" + encode_payload(PushAck(1))[1:]):
        assert records.push_ack_msg_id(other) == 0


def test_fit_counts_record_bytes() -> None:
    recs = [b"a" * 10, b"b" * 10, b"c" * 10]
    assert records.fit(recs, 25) == 2
    assert records.fit(recs, 5) == 1  # at least one
    assert records.fit(recs, 30) == 3
    assert records.fit([], 5) == 0


def test_stored_records_of_every_format_read_back() -> None:
    for m in _messages(random.Random(4), 50):
        rec = records.record_of(m)
        now = records.stored(rec)
        assert now[0] == records.STORE_FORMAT
        assert records.record_of_stored(now) == rec
        # format 1: the version-1 PUSH payload stores held before formats were numbered
        legacy = encode_payload(Push(m))
        assert legacy[0] == records.LEGACY_FORMAT
        assert records.record_of_stored(legacy) == rec


def test_broken_or_unknown_stored_records_are_refused() -> None:
    good = records.record_of(_messages(random.Random(2), 1)[0])
    for bad in (good[:-1], good + b"x", good[:20]):
        with pytest.raises(records.CorruptRecord):
            records.conversation_of(bad)
        with pytest.raises(records.CorruptRecord):
            records.record_of_stored(records.stored(bad))
        with pytest.raises(records.CorruptRecord):
            records.unpack_record(bad)
    for unknown in (b"\x03" + good, b"\x01\x85" + bytes(5) + good, b"", b"\x00"):
        with pytest.raises(records.CorruptRecord):
            records.record_of_stored(unknown)


def test_jobs_of_every_format_read_back() -> None:
    for m in _messages(random.Random(5), 30):
        users = tuple(sorted({m.sender_id, 3, 4}))
        job = PersistJob(m, users)
        data = job.to_bytes()
        assert data[0] == records.STORE_FORMAT
        back = PersistJob.from_bytes(data)
        assert back == job and back.record == records.record_of(m)
        # format 1, as queues held it before: u32 count, u64 ids, a version-1 PUSH payload
        legacy = struct.pack(f">I{len(users)}Q", len(users), *users) + encode_payload(Push(m))
        old = PersistJob.from_bytes(legacy)
        assert old == job and old.record == job.record
    with pytest.raises(records.CorruptRecord):
        PersistJob.from_bytes(data[:-1])
    with pytest.raises(records.CorruptRecord):
        PersistJob.from_bytes(data[:3])


def test_timeline_jobs_read_back_and_are_told_apart() -> None:
    """Issue 14: a large group's message is queued as format TIMELINE_JOB_FORMAT (no users);
    it reads back as a timeline job (job_from_bytes too), and a format-1 reader (a persister
    from before timeline jobs) cannot mistake it for a job with users."""
    for m in _messages(random.Random(6), 30):
        if m.conv_kind != ConvKind.GROUP:
            continue
        job = PersistJob.for_timeline(m)
        data = job.to_bytes()
        assert data == bytes((TIMELINE_JOB_FORMAT,)) + records.record_of(m)
        for back in (PersistJob.from_bytes(data), job_from_bytes(data)):
            assert back == job and back.timeline and back.inbox_users == ()
        assert PersistJob(m, (1, 2)).to_bytes()[0] == records.STORE_FORMAT  # small: as before
        (count,) = struct.unpack_from(">I", data)
        assert count * 8 > len(data)  # read as format 1 it would be truncated: refused
    with pytest.raises(records.CorruptRecord):
        PersistJob.from_bytes(data[:-1])
    direct = next(m for m in _messages(random.Random(6), 30) if m.conv_kind == ConvKind.USER)
    with pytest.raises(records.CorruptRecord, match="no group"):
        PersistJob.from_bytes(bytes((TIMELINE_JOB_FORMAT,)) + records.record_of(direct))


def test_device_notify_jobs_read_back_and_broken_ones_are_refused() -> None:
    for m in _messages(random.Random(6), 30):
        for device in ("phone", "\u00e9" * 32, ""):
            job = DeviceNotifyJob.of(ME, device, records.record_of(m))
            data = job.to_bytes()
            assert data[0] == NOTIFY_DEVICE_FORMAT
            back = DeviceNotifyJob.from_bytes(data)
            assert back == job and back.message == m and back.record == records.record_of(m)
            assert notify_job_from_bytes(data) == job
    persist = PersistJob(m, (ME, m.sender_id))
    assert notify_job_from_bytes(persist.to_bytes()) == persist  # the other kind the queue holds
    good = DeviceNotifyJob.of(ME, "phone", records.record_of(m)).to_bytes()
    broken = [
        good[:-1],  # the record cut short
        good + b"x",  # or too long
        good[:9],  # the header cut short
        good[:10] + b"pho",  # the device id cut short
        good[:9] + b"\x02\xff\xfe" + good[15:],  # a device id not UTF-8 (the record whole)
        good[:10],  # no record at all
        b"",
    ]
    for bad in broken:
        with pytest.raises(records.CorruptRecord):
            DeviceNotifyJob.from_bytes(bad)
    with pytest.raises(records.CorruptRecord):
        DeviceNotifyJob.from_bytes(bytes((records.STORE_FORMAT,)) + good[1:])  # not its format
    with pytest.raises(records.CorruptRecord):
        DeviceNotifyJob.of(ME, "phone", records.record_of(m)[:-1])
    state = StateJob(StateJob.MARK, ME, ConvKind.USER, 5, 9).to_bytes()
    with pytest.raises(records.CorruptRecord):
        notify_job_from_bytes(state)  # the persist queue's state jobs never go to the notifier


# ------------------------------------------------------------- page fill (PROTOCOL.md 10.3)


def _codec_offline_page(msgs: list[Message], me: int = ME) -> bytes:
    """The OFFLINE_PAGE the codec encodes for these messages, with their unread list (10.3)."""
    counts: dict[tuple[int, int], int] = {}
    for m in msgs:
        if m.sender_id != me:
            counts[_peer(m)] = counts.get(_peer(m), 0) + 1
    unread = tuple(UnreadCount(k, c, n) for (k, c), n in counts.items())
    return encode(OfflinePage(77, 1, 0, tuple(msgs), unread, request_id=25))


def _big_messages(rng: random.Random, n: int) -> list[Message]:
    """Messages large enough that a page holds a few, from several senders and conversations,
    some sized to land within an UNREAD entry (11 bytes) of the frame limit."""
    out = _messages(rng, n)
    for i, m in enumerate(out):
        size = rng.choice((rng.randrange(20_000, 65_536), rng.randrange(100), 65_535))
        out[i] = Message(m.msg_id, m.server_time, m.sender_id, m.sender_device, m.conv_kind,
                         m.conv_id, 2, m.client_msg_id, bytes(size))  # fmt: skip
    return out


@pytest.mark.parametrize("seed", range(40))
def test_offline_fit_is_the_fullest_page_the_codec_allows(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _big_messages(rng, rng.randrange(1, 12))
    recs = [records.record_of(m) for m in msgs]
    n = records.offline_fit(ME, recs)
    assert 1 <= n <= len(msgs)
    page = _codec_offline_page(msgs[:n])
    assert len(page) - 4 <= MAX_FRAME_LENGTH
    assert records.offline_page(25, ME, 77, True, False, recs[:n]) == page
    if n < len(msgs):  # one more entry would not fit, with the unread list it would need
        with pytest.raises(EncodeError, match="exceed 131072"):
            _codec_offline_page(msgs[: n + 1])
    assert sum(map(len, recs[:n])) <= records.OFFLINE_RECORD_BYTES  # what a store is asked for


def _msg(msg_id: int, sender: int, conv: int, size: int) -> Message:
    return Message(msg_id, 5, sender, "d", ConvKind.USER, conv, 2, b"k" * 16, bytes(size))


def test_offline_fit_counts_only_the_unread_entries_the_page_needs() -> None:
    # Two of my own messages (no UNREAD): 65,535 + 65,406 body bytes fill 131072 exactly.
    own = [_msg(101, ME, 1002, 65_535), _msg(102, ME, 1002, 65_406)]
    recs = [records.record_of(m) for m in own]
    assert records.offline_fit(ME, recs) == 2
    assert len(records.offline_page(25, ME, 77, True, False, recs)) - 4 == MAX_FRAME_LENGTH
    assert records.offline_fit(ME, [*recs[:1], records.record_of(_msg(102, ME, 1002, 65_407))]) == 1
    # From someone else: one UNREAD (11 bytes) for both, so 65,535 + 65,395 is the fullest.
    theirs = [_msg(101, 1002, ME, 65_535), _msg(102, 1002, ME, 65_395)]
    recs = [records.record_of(m) for m in theirs]
    assert records.offline_fit(ME, recs) == 2
    assert len(records.offline_page(25, ME, 77, True, False, recs)) - 4 == MAX_FRAME_LENGTH
    # The same sizes from a second sender need a second UNREAD: the second message waits.
    other = [theirs[0], _msg(102, 1003, ME, 65_395)]
    assert records.offline_fit(ME, [records.record_of(m) for m in other]) == 1
    with pytest.raises(EncodeError, match="exceed 131072"):
        _codec_offline_page(other)
    # An entry that fits by its record bytes but not with the UNREAD it adds ends the page.
    mixed = [_msg(101, ME, 1002, 65_535), _msg(102, 1002, ME, 65_406 - 5)]
    recs = [records.record_of(m) for m in mixed]
    assert sum(map(len, recs)) <= records.OFFLINE_RECORD_BYTES
    assert records.offline_fit(ME, recs) == 1
    assert records.offline_fit(ME, []) == 0


def test_offline_fit_builds_the_max_frame_vector() -> None:
    vectors = json.loads((REPO / "spec" / "vectors" / "valid.json").read_text())
    vector = next(v for v in vectors if v["name"] == "offline_page_max_frame")
    frame = decode_payload(bytes.fromhex(vector["hex"])[4:])
    assert isinstance(frame, OfflinePage)
    recs = [records.record_of(m) for m in frame.messages]
    me = frame.messages[0].sender_id  # the vector's page has no unread: the puller's own messages
    assert records.offline_fit(me, recs) == len(recs) == 2
    built = records.offline_page(frame.request_id, me, frame.cursor, True, False, recs)
    assert built.hex() == vector["hex"]
    assert struct.unpack(">I", built[:4])[0] == MAX_FRAME_LENGTH


def test_history_record_budget_fills_a_history_page_exactly() -> None:
    msgs = [_msg(102, ME, 1002, 65_535), _msg(101, 1002, ME, 65_535 - 127)]
    recs = [records.record_of(m) for m in msgs]
    assert sum(map(len, recs)) == records.HISTORY_RECORD_BYTES
    assert records.fit(recs, records.HISTORY_RECORD_BYTES) == 2
    page = records.history_page(1, ConvKind.USER, 1002, False, recs)
    assert len(page) - 4 == MAX_FRAME_LENGTH
    assert page == encode(HistoryPage(ConvKind.USER, 1002, 0, tuple(msgs), request_id=1))
