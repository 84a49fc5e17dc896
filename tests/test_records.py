"""Pages spliced from stored records (server/records.py) are byte for byte the codec's."""

from __future__ import annotations

import random

import pytest

from improto.codec import encode, encode_payload
from improto.enums import ConvKind
from improto.frames import HistoryPage, Message, OfflinePage, Push, UnreadCount
from improto.limits import U64_MAX
from improto_server import records
from improto_server.service import peer_of

ME = 1001


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


def _record(m: Message) -> bytes:
    return records.record_of_push(encode_payload(Push(m)))


@pytest.mark.parametrize("seed", range(20))
def test_offline_page_matches_codec(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _messages(rng, rng.randrange(0, 201))
    counts: dict[tuple[int, int], int] = {}
    for m in msgs:
        if m.sender_id != ME:
            key = peer_of(m, ME)
            counts[key] = counts.get(key, 0) + 1
    unread = tuple(UnreadCount(k, c, n) for (k, c), n in counts.items())
    cursor, more, gap, rid = rng.randrange(U64_MAX), rng.randrange(2), rng.randrange(2), seed
    want = encode(OfflinePage(cursor, more, gap, tuple(msgs), unread, request_id=rid))
    got = records.offline_page(rid, ME, cursor, bool(more), bool(gap), [_record(m) for m in msgs])
    assert got == want


@pytest.mark.parametrize("seed", range(20))
def test_history_page_matches_codec(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _messages(rng, rng.randrange(0, 101))
    want = encode(HistoryPage(ConvKind.GROUP, 5, 1, tuple(msgs), request_id=seed))
    got = records.history_page(seed, ConvKind.GROUP, 5, True, [_record(m) for m in msgs])
    assert got == want


def test_packed_columns_equal_the_codec_record() -> None:
    for m in _messages(random.Random(1), 50):
        packed = records.pack_record(
            m.msg_id, m.server_time, m.sender_id, m.sender_device, m.conv_kind, m.conv_id,
            m.content_type, m.client_msg_id, m.body,
        )  # fmt: skip
        assert packed == _record(m)
        assert records.message_of(packed) == m


def test_fit_counts_record_bytes() -> None:
    recs = [b"a" * 10, b"b" * 10, b"c" * 10]
    assert records.fit(recs, 25) == 2
    assert records.fit(recs, 5) == 1  # at least one
    assert records.fit(recs, 30) == 3
    assert records.fit([], 5) == 0


def test_broken_records_are_refused() -> None:
    good = _record(_messages(random.Random(2), 1)[0])
    for bad in (good[:-1], good + b"x", good[:20]):
        with pytest.raises(records.CorruptRecord):
            records.conversation_of(bad)
    with pytest.raises(records.CorruptRecord):
        records.record_of_push(b"\x01\x85" + good)
