"""The post-v1 frames (spec section 18): the records.py fast builders byte for byte against
the codec, the OFFLINE_PAGE unread rule with read positions, and the frames' value rules."""

from __future__ import annotations

import random

import pytest

from improto import records
from improto.codec import COMPILED, INTERPRETED, decode, encode
from improto.enums import ConvKind, FrameType
from improto.errors import EncodeError, InvalidField
from improto.frames import (
    ConvChangesPage,
    ConvEntry,
    ConvList,
    ConvPage,
    Features,
    InboxNotice,
    Message,
    OfflinePage,
    ReadUpdate,
    UnreadCount,
)
from improto.limits import CONV_PAGE_MAX, MAX_FRAME_LENGTH, NOTICE_MAX_IDS, U64_MAX

ME = 1001
U, G = ConvKind.USER, ConvKind.GROUP


def _message(rng: random.Random, msg_id: int, kind: int, conv: int, sender: int) -> Message:
    body = rng.choice((b"", "h\u00e9llo".encode(), b"x" * rng.randrange(400)))
    return Message(msg_id, rng.randrange(U64_MAX), sender, rng.choice(("d", "\u00e9" * 32)),
                   kind, conv, 1, rng.randbytes(16), body)  # fmt: skip


def _entry(rng: random.Random, i: int) -> ConvEntry:
    """A row as user ME sees it; half of them carry their last message."""
    kind = rng.choice((U, G))
    conv = 2000 + i
    last: tuple[Message, ...] = ()
    if rng.randrange(2):
        if kind == G:
            last = (_message(rng, 10_000 + i, G, conv, rng.choice((ME, 3))),)
        else:  # ME's own message names the peer, the peer's names ME
            mine = rng.randrange(2)
            last = (_message(rng, 10_000 + i, U, conv if mine else ME, ME if mine else conv),)
    peer = 0 if kind == G else rng.randrange(U64_MAX)
    return ConvEntry(kind, conv, i + 1, rng.randrange(2), rng.randrange(U64_MAX), peer,
                     rng.randrange(2**32), last)  # fmt: skip


def _row(e: ConvEntry) -> records.ConvRow:
    last = records.record_of(e.last[0]) if e.last else None
    return (e.conv_kind, e.conv_id, e.version, bool(e.hidden), e.read_id, e.peer_read_id,
            e.unread, last)  # fmt: skip


@pytest.mark.parametrize("seed", range(20))
def test_conv_page_matches_codec(seed: int) -> None:
    rng = random.Random(seed)
    entries = tuple(_entry(rng, i) for i in range(rng.randrange(CONV_PAGE_MAX + 1)))
    version, more, total = rng.randrange(U64_MAX), rng.randrange(2), rng.randrange(2**32)
    for cls in (ConvPage, ConvChangesPage):
        want = encode(cls(version, more, total, entries, request_id=seed))
        got = records.conv_page(
            cls.TYPE, seed, version, bool(more), total, [_row(e) for e in entries]
        )
        assert got == want
        assert decode(got) == cls(version, more, total, entries, request_id=seed)


def test_conv_page_saturates_counts_and_refuses_other_types() -> None:
    page = records.conv_page(FrameType.CONV_PAGE, 1, 5, False, 2**40,
                             [(U, 7, 1, False, 0, 0, 2**33, None)])  # fmt: skip
    frame = decode(page)
    assert isinstance(frame, ConvPage)
    assert frame.total_unread == frame.convs[0].unread == 2**32 - 1
    with pytest.raises(ValueError):
        records.conv_page(FrameType.HISTORY_PAGE, 1, 5, False, 0, [])


def test_conv_sizes_and_fit_fill_one_frame() -> None:
    rng = random.Random(7)
    rec = records.record_of(_message(rng, 5, G, 9, ME))
    one = ConvPage(1, 0, 0, (ConvEntry(G, 9, 1, 0, 0, 0, 0, (records.message_of(rec),)),))
    assert records.conv_size(rec) == len(encode(one)) - 4 - records.CONV_PAGE_FIXED
    assert records.conv_size(None) == records.CONV_OVERHEAD == 40
    # Rows of about 1.4 kB: conv_fit takes as many as one frame holds, never more.
    big = Message(9, 1, ME, "d", G, 9, 2, bytes(16), b"b" * 1300)
    lasts = [records.record_of(big)] * 150
    n = records.conv_fit(lasts)
    rows = [(G, 9, 1, False, 0, 0, 0, r) for r in lasts]
    page = records.conv_page(FrameType.CONV_PAGE, 1, 1, True, 0, rows[:n])
    assert len(page) - 4 <= MAX_FRAME_LENGTH < len(page) - 4 + records.conv_size(lasts[0])
    with pytest.raises(EncodeError):
        records.conv_page(FrameType.CONV_PAGE, 1, 1, True, 0, rows[: n + 1])
    assert records.conv_fit([None, None], budget=10) == 1  # at least one
    assert records.conv_fit([]) == 0


@pytest.mark.parametrize("n", [1, 2, 57, NOTICE_MAX_IDS])
def test_inbox_notice_matches_codec(n: int) -> None:
    ids = tuple(U64_MAX - i for i in range(n))
    assert records.inbox_notice(40, 40 + n, ids) == encode(InboxNotice(40, 40 + n, ids))


def test_read_update_matches_codec() -> None:
    assert records.read_update(ME, U, 1002, U64_MAX) == encode(ReadUpdate(ME, U, 1002, U64_MAX))
    assert records.read_update(ME, G, 5, 77) == encode(ReadUpdate(ME, G, 5, 77))


def _msg(msg_id: int, sender: int, kind: int, conv: int) -> bytes:
    return records.record_of(Message(msg_id, 1, sender, "d", kind, conv, 1, bytes(16), b"hi"))


def test_offline_page_unread_follows_read_positions() -> None:
    recs = [
        _msg(10, 1002, U, ME),  # 1:1 with 1002, read up to 11: not unread
        _msg(11, ME, U, 1002),  # own
        _msg(12, 1002, U, ME),  # unread
        _msg(13, 1003, G, 5),  # group 5, read up to 13: nothing unread -> left out
        _msg(14, 1004, U, ME),  # no read position: unread
    ]
    read = {(U, 1002): 11, (G, 5): 13}
    page = decode(records.offline_page(3, ME, 99, False, False, recs, read_ids=read))
    assert isinstance(page, OfflinePage)
    assert page.unread == (UnreadCount(U, 1002, 1), UnreadCount(U, 1004, 1))
    # Without read positions: version-1 semantics, every message from others counts.
    v1 = decode(records.offline_page(3, ME, 99, False, False, recs))
    assert isinstance(v1, OfflinePage)
    assert v1.unread == (UnreadCount(U, 1002, 2), UnreadCount(G, 5, 1), UnreadCount(U, 1004, 1))
    assert records.offline_page(3, ME, 99, False, False, recs, read_ids={}) == records.offline_page(
        3, ME, 99, False, False, recs
    )


def test_offline_fit_counts_unread_entries_by_read_positions() -> None:
    # Each record from another conversation needs an UNREAD entry (11 bytes) unless it is read.
    recs = [_msg(100 + i, 3000 + i, U, ME) for i in range(50)]
    size = len(recs[0])
    limit = records.OFFLINE_FIXED + 50 * size + 10 * 11
    assert records.offline_fit(ME, recs, limit) < 50
    read = {(U, 3000 + i): 100 + i for i in range(50)}
    assert records.offline_fit(ME, recs, limit, read_ids=read) == 50
    page = records.offline_page(1, ME, 1, False, False, recs, read_ids=read)
    assert len(page) - 4 <= limit


@pytest.mark.parametrize("codec", [COMPILED, INTERPRETED], ids=["compiled", "interpreted"])
def test_value_rules(codec: object) -> None:
    m = Message(5, 1, 1002, "d", U, ME, 1, bytes(16), b"hi")
    bad = [
        ConvList(0, CONV_PAGE_MAX + 1),
        Features(tuple(range(33))),
        InboxNotice(5, 5, (1,)),
        InboxNotice(5, 6, ()),
        ConvPage(1, 0, 0, (ConvEntry(U, 1002, 1, 2, 0, 0, 0, ()),)),
        ConvPage(1, 0, 0, (ConvEntry(G, 5, 1, 0, 0, 3, 0, ()),)),
        ConvPage(1, 0, 0, (ConvEntry(U, 1003, 1, 0, 0, 0, 0, (m,)),)),
        ConvPage(1, 0, 0, (ConvEntry(U, 1002, 1, 0, 0, 0, 0, (m, m)),)),
    ]
    for frame in bad:
        with pytest.raises((InvalidField, EncodeError)):
            codec.encode(frame)  # type: ignore[attr-defined]
    # The peer's message in a 1:1 names the receiver: the row is the peer's (1002).
    ok = ConvPage(1, 0, 0, (ConvEntry(U, 1002, 1, 0, 0, 0, 0, (m,)),))
    assert codec.decode(codec.encode(ok)) == ok  # type: ignore[attr-defined]
