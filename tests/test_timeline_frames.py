"""The frames of large groups (PROTOCOL.md section 20): TIMELINE_HEADS, TIMELINE_HEADS_PAGE,
TIMELINE_PULL, TIMELINE_PAGE. Round trips through both codecs, the value rules, and the
record-splicing builders of improto.records byte for byte against the codec."""

from __future__ import annotations

import random
import re
from dataclasses import replace
from pathlib import Path

import pytest

from improto import records
from improto.codec import COMPILED, INTERPRETED, decode, encode, encode_payload
from improto.enums import POST_V1_REQUESTS, REQUEST_FEATURES, ConvKind, Feature, FrameType
from improto.errors import EncodeError, InvalidField, MalformedFrame
from improto.frames import (
    FRAME_CLASSES,
    Message,
    Push,
    TimelineHead,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto.jsonform import frame_from_json, frame_to_json
from improto.limits import (
    MAX_FRAME_LENGTH,
    MAX_GROUPS_PER_USER,
    MAX_TIMELINE_HEADS,
    OFFLINE_PAGE_DEFAULT,
    OFFLINE_PAGE_MAX,
    TIMELINE_HELD_MAX,
    TIMELINE_PAGE_DEFAULT,
    TIMELINE_PAGE_MAX,
    U64_MAX,
)
from improto.schema import BODIES, TIMELINE_HEAD_FIELDS

GROUP = 5003
U32_MAX = 2**32 - 1


def _msg(msg_id: int, body: bytes = b"hi", group: int = GROUP, **kw: object) -> Message:
    base = Message(msg_id, 1_764_201_600_000 + msg_id, 1004, "phone", ConvKind.GROUP, group, 1,
                   msg_id.to_bytes(16, "big"), body)  # fmt: skip
    return replace(base, **kw) if kw else base


def _record(m: Message) -> bytes:
    return encode_payload(Push(m))[7:]


def _messages(rng: random.Random, n: int, group: int = GROUP) -> list[Message]:
    out = []
    for i in range(n):
        body = rng.choice((b"", "h\u00e9llo".encode(), b"x" * rng.randrange(400)))
        device = rng.choice(("d", "\u00e9" * 32, "phone-1"))
        out.append(Message(i + 1, rng.randrange(U64_MAX), rng.choice((1001, U64_MAX)), device,
                           ConvKind.GROUP, group, rng.choice((0, 1, 2, 65535)),
                           rng.randbytes(16), body))  # fmt: skip
    return out


# ----------------------------------------------------------------- types and limits


def test_the_types_are_post_v1_requests_of_large_groups() -> None:
    assert Feature.LARGE_GROUPS == 5
    assert FrameType.TIMELINE_HEADS == 0x37 and FrameType.TIMELINE_HEADS_PAGE == 0xB7
    assert FrameType.TIMELINE_PULL == 0x38 and FrameType.TIMELINE_PAGE == 0xB8
    for t in (FrameType.TIMELINE_HEADS, FrameType.TIMELINE_PULL):
        assert REQUEST_FEATURES[t] is Feature.LARGE_GROUPS
        assert t in POST_V1_REQUESTS and t.client_to_server
        assert FrameType(t | 0x80) in FRAME_CLASSES and not FrameType(t | 0x80).client_to_server


def test_pages_mirror_the_offline_pages() -> None:
    assert (TIMELINE_PAGE_DEFAULT, TIMELINE_PAGE_MAX) == (OFFLINE_PAGE_DEFAULT, OFFLINE_PAGE_MAX)
    assert MAX_TIMELINE_HEADS == MAX_GROUPS_PER_USER
    # The fixed part of a TIMELINE_PAGE: header, group_id, position, done, has_more, count.
    assert records.TIMELINE_FIXED == 7 + 8 + 8 + 8 + 1 + 2
    assert records.TIMELINE_RECORD_BYTES == MAX_FRAME_LENGTH - records.TIMELINE_FIXED
    assert len(encode(TimelinePage(GROUP, 0, 0, 0, ()))) == 4 + records.TIMELINE_FIXED


# ------------------------------------------------------------------------ round trips

FRAMES = [
    TimelineHeads(request_id=80),
    TimelineHeadsPage((), request_id=81),
    TimelineHeadsPage(
        (TimelineHead(5003, 1042, 1040, 2, 77), TimelineHead(5007, 310, 310, 0, 9)),
        request_id=82,
        flags=0x80,
    ),
    TimelinePull(GROUP),
    TimelinePull(GROUP, U64_MAX, TIMELINE_PAGE_MAX, request_id=2**32 - 1),
    TimelinePull(GROUP, 1040, 0, (1, 2**40, U64_MAX), request_id=91),
    TimelinePull(GROUP, 0, 0, tuple(range(U64_MAX - TIMELINE_HELD_MAX + 1, U64_MAX + 1))),
    TimelinePage(GROUP, 0, 0, 0, ()),
    TimelinePage(GROUP, 1041, 1500, 1, (_msg(1), _msg(2, "\u00e7a va".encode())), request_id=9),
    TimelinePage(U64_MAX, U64_MAX, U64_MAX, 0, (_msg(U64_MAX, group=U64_MAX, server_time=0),)),
]


@pytest.mark.parametrize("frame", FRAMES, ids=lambda f: type(f).__name__)
def test_round_trip_in_both_codecs_and_the_json_form(frame: object) -> None:
    data = COMPILED.encode(frame)  # type: ignore[arg-type]
    assert INTERPRETED.encode(frame) == data  # type: ignore[arg-type]
    for codec in (COMPILED, INTERPRETED):
        assert codec.decode(data) == frame
    as_json = frame_to_json(decode(data))
    assert frame_from_json(as_json) == frame
    if isinstance(frame, TimelinePage | TimelinePull):
        assert isinstance(as_json["fields"]["group_id"], str)  # u64: a decimal string


def test_timeline_pull_defaults_to_the_start_and_the_default_size() -> None:
    assert TimelinePull(GROUP) == TimelinePull(GROUP, 0, 0) == TimelinePull(GROUP, 0, 0, ())


def test_timeline_pull_held_layout() -> None:
    """held is an optional trailing list16 of u64: none held, it is left out (the layout
    before held existed); otherwise count then ids."""
    assert len(encode(TimelinePull(GROUP))) == 4 + 7 + 8 + 8 + 2
    data = encode(TimelinePull(GROUP, 1040, 0, (7, 9), request_id=91))
    assert data[-18:] == bytes.fromhex("000200000000000000070000000000000009")
    as_json = frame_to_json(decode(data))
    assert as_json["fields"]["held"] == ["7", "9"]  # u64s: decimal strings


def test_a_timeline_pull_with_an_empty_held_count_holds_none() -> None:
    """`00 00` after the limit is accepted as none held (not the canonical form)."""
    short = encode(TimelinePull(GROUP, 1040, 0, request_id=5))
    explicit = (len(short) - 4 + 2).to_bytes(4, "big") + short[4:] + b"\x00\x00"
    for codec in (COMPILED, INTERPRETED):
        assert codec.decode(explicit) == TimelinePull(GROUP, 1040, 0, (), request_id=5)
        assert codec.decode(short) == TimelinePull(GROUP, 1040, 0, (), request_id=5)


@pytest.mark.parametrize("tail", [b"\x00", b"\x00\x01", b"\x00\x01" + bytes(7)])
def test_a_timeline_pull_with_a_cut_held_list_is_malformed(tail: bytes) -> None:
    short = encode(TimelinePull(GROUP, 1040, 0))
    cut = (len(short) - 4 + len(tail)).to_bytes(4, "big") + short[4:] + tail
    for codec in (COMPILED, INTERPRETED):
        with pytest.raises(MalformedFrame):
            codec.decode(cut)


@pytest.mark.parametrize(
    "frame",
    [
        TimelinePull(0),
        TimelinePull(GROUP, 0, TIMELINE_PAGE_MAX + 1),
        TimelinePull(GROUP, 0, 0, (5, 4)),
        TimelinePull(GROUP, 0, 0, (5, 5)),
        TimelinePull(GROUP, 0, 0, (0, 5)),
        TimelinePull(GROUP, 0, 0, tuple(range(1, TIMELINE_HELD_MAX + 2))),
        TimelineHeadsPage((TimelineHead(0, 1, 0, 1, 1),)),
        TimelineHeadsPage((TimelineHead(GROUP, 10, 11, 0, 1),)),
        TimelineHeadsPage((TimelineHead(7, 1, 0, 1, 1), TimelineHead(6, 1, 0, 1, 1))),
        TimelineHeadsPage((TimelineHead(7, 1, 0, 1, 1), TimelineHead(7, 1, 0, 1, 1))),
        TimelinePage(0, 0, 0, 0, ()),
        TimelinePage(GROUP, 11, 10, 0, ()),
        TimelinePage(GROUP, 10, 10, 2, ()),
        TimelinePage(GROUP, 10, 10, 0, (_msg(1, group=GROUP + 1),)),
        TimelinePage(GROUP, 10, 10, 0, (_msg(1, conv_kind=ConvKind.USER),)),
        TimelinePage(GROUP, 10, 10, 0, (_msg(1),) * (TIMELINE_PAGE_MAX + 1)),
    ],
    ids=[
        "pull_group_0", "pull_limit_201", "held_descending", "held_repeated", "held_0",
        "held_1001", "head_group_0", "head_read_above_done",
        "heads_descending", "heads_repeated", "page_group_0", "page_position_above_done",
        "page_has_more_2", "page_other_group", "page_user_message", "page_201_messages",
    ],
)  # fmt: skip
def test_the_value_rules_refuse_to_encode(frame: object) -> None:
    with pytest.raises(InvalidField):
        encode(frame)  # type: ignore[arg-type]


# ---------------------------------------------------------------- spliced builders


@pytest.mark.parametrize("seed", range(20))
def test_timeline_page_matches_the_codec(seed: int) -> None:
    rng = random.Random(seed)
    msgs = _messages(rng, rng.randrange(0, TIMELINE_PAGE_MAX + 1))
    done = rng.randrange(U64_MAX)
    position, more = rng.randrange(done + 1), rng.random() < 0.5
    rid = rng.randrange(2**32)
    built = records.timeline_page(
        rid, GROUP, position, done, more, [records.record_of(m) for m in msgs]
    )
    assert built == encode(TimelinePage(GROUP, position, done, int(more), tuple(msgs),
                                        request_id=rid))  # fmt: skip


def test_timeline_page_fills_a_frame_to_131072() -> None:
    full = [_msg(101, b"\x00" * 65535, content_type=2, sender_device="d"),
            _msg(102, b"\x01" * 65393, content_type=2, sender_device="d")]  # fmt: skip
    raw = [records.record_of(m) for m in full]
    assert sum(map(len, raw)) == records.TIMELINE_RECORD_BYTES
    assert records.timeline_fit(raw) == 2
    frame = records.timeline_page(90, GROUP, 2, 2, False, raw)
    assert len(frame) - 4 == MAX_FRAME_LENGTH
    assert frame == encode(TimelinePage(GROUP, 2, 2, 0, tuple(full), request_id=90))
    one_more = [*raw[:1], records.record_of(replace(full[1], body=b"\x01" * 65394))]
    assert records.timeline_fit(one_more) == 1
    with pytest.raises(EncodeError):
        records.timeline_page(90, GROUP, 2, 2, False, one_more)


def test_timeline_page_refuses_what_the_codec_refuses() -> None:
    ours = records.record_of(_msg(1))
    for bad in (
        lambda: records.timeline_page(1, GROUP, 11, 10, False, [ours]),
        lambda: records.timeline_page(1, GROUP + 1, 10, 10, False, [ours]),
        lambda: records.timeline_page(1, GROUP, 10, 10, False, [ours] * (TIMELINE_PAGE_MAX + 1)),
        lambda: records.timeline_page(1, GROUP, 10, 10, False, [ours[:-1]]),
        lambda: records.timeline_page(1, GROUP, 10, 10, False,
                                      [records.record_of(_msg(1, conv_kind=ConvKind.USER))]),
    ):  # fmt: skip
        with pytest.raises((EncodeError, records.CorruptRecord)):
            bad()


@pytest.mark.parametrize("seed", range(10))
def test_timeline_heads_page_matches_the_codec(seed: int) -> None:
    rng = random.Random(seed)
    groups = rng.sample(range(1, 10_000), rng.randrange(0, 40))
    rows = []
    for g in groups:
        done = rng.choice((0, rng.randrange(1000), rng.randrange(U64_MAX)))
        rows.append((g, done, rng.randrange(done + 1), rng.randrange(U64_MAX)))
    built = records.timeline_heads_page(7, rows)  # any order in, ascending out
    heads = tuple(TimelineHead(g, done, read, min(done - read, U32_MAX), last)
                  for g, done, read, last in sorted(rows))  # fmt: skip
    assert built == encode(TimelineHeadsPage(heads, request_id=7))


def test_timeline_heads_page_saturates_unread_and_clamps_read_seq() -> None:
    built = records.timeline_heads_page(3, [(9, 2**40, 0, 5), (8, 10, 12, 4)])
    assert decode(built) == TimelineHeadsPage(
        (TimelineHead(8, 10, 10, 0, 4), TimelineHead(9, 2**40, 0, U32_MAX, 5)), request_id=3
    )


def test_timeline_heads_page_at_the_limit_and_refusals() -> None:
    rows = [(g, U64_MAX, 0, U64_MAX) for g in range(1, MAX_TIMELINE_HEADS + 1)]
    assert len(decode(records.timeline_heads_page(1, rows)).heads) == MAX_TIMELINE_HEADS  # type: ignore[attr-defined]
    with pytest.raises(EncodeError):
        records.timeline_heads_page(1, [*rows, (MAX_TIMELINE_HEADS + 1, 1, 0, 1)])
    with pytest.raises(EncodeError):
        records.timeline_heads_page(1, [(5, 1, 0, 1), (5, 2, 0, 1)])
    with pytest.raises(EncodeError):
        records.timeline_heads_page(1, [(0, 1, 0, 1)])


# ------------------------------------------------------------------ timeline_window


def _raw(*msg_ids: int, body: bytes = b"hi") -> list[bytes]:
    return [records.record_of(_msg(i, body)) for i in msg_ids]


def test_window_positions_follow_the_store_page() -> None:
    raw = _raw(11, 12, 13)
    # seqs 41..43 of done 43: caught up
    assert records.timeline_window(40, 41, raw, False, 43) == (43, False, raw)
    # more in the store: position is the last seq, has_more
    assert records.timeline_window(40, 41, raw, True, 90) == (43, True, raw)
    # seqs past retention skipped: the page starts later, the position covers them
    assert records.timeline_window(10, 41, raw, False, 43) == (43, False, raw)


def test_window_of_an_empty_store_page() -> None:
    assert records.timeline_window(43, 44, [], False, 43) == (43, False, [])
    # after_seq above done (a position from lost server data): position = done, lower
    assert records.timeline_window(99, 100, [], False, 43) == (43, False, [])
    # a group that never had a timeline
    assert records.timeline_window(0, 1, [], False, 0) == (0, False, [])
    assert records.timeline_window(5, 6, [], False, 0) == (0, False, [])


def test_window_skips_messages_before_the_members_join_but_covers_them() -> None:
    raw = _raw(11, 12, 13, 14)
    assert records.timeline_window(0, 1, raw, True, 10, min_msg_id=13) == (4, True, raw[2:])
    assert records.timeline_window(0, 1, raw, True, 10, min_msg_id=99) == (4, True, [])
    assert records.timeline_window(0, 1, raw, False, 4, min_msg_id=99) == (4, False, [])


def test_window_cuts_to_the_byte_budget() -> None:
    raw = _raw(1, 2, 3, body=b"x" * 60_000)
    position, more, kept = records.timeline_window(0, 1, raw, False, 3)
    assert (position, more, kept) == (2, True, raw[:2])
    frame = records.timeline_page(1, GROUP, position, 3, more, kept)
    assert len(frame) - 4 <= MAX_FRAME_LENGTH
    assert records.timeline_window(0, 1, raw, False, 3, budget=1) == (1, True, raw[:1])


def test_window_leaves_held_records_out_but_covers_them() -> None:
    raw = _raw(11, 12, 13, 14)
    # the same run, position and has_more as without held ids; only the records differ
    assert records.timeline_window(40, 41, raw, True, 90) == (44, True, raw)
    assert records.timeline_window(40, 41, raw, True, 90, held={12, 14}) == (
        44, True, [raw[0], raw[2]])  # fmt: skip
    # all held: no messages, caught up all the same
    assert records.timeline_window(40, 41, raw, False, 44, held={11, 12, 13, 14}) == (
        44, False, [])  # fmt: skip
    # held ids not in the run (below it, above it, not in the timeline) are ignored
    assert records.timeline_window(40, 41, raw, False, 44, held={1, 99, 2**64 - 1}) == (
        44, False, raw)  # fmt: skip


def test_window_with_held_ids_and_the_window_and_the_budget() -> None:
    raw = _raw(11, 12, 13, 14)
    # outside the window or held: either way covered, not sent
    assert records.timeline_window(0, 1, raw, True, 10, min_msg_id=12, held={13}) == (
        4, True, [raw[1], raw[3]])  # fmt: skip
    # held records still count against the budget: the run does not grow by omission
    big = _raw(1, 2, 3, body=b"x" * 60_000)
    assert records.timeline_window(0, 1, big, False, 3, held={1}) == (2, True, big[1:2])
    frame = records.timeline_page(1, GROUP, 2, 3, True, big[1:2])
    assert decode(frame) == TimelinePage(GROUP, 2, 3, 1, (_msg(2, b"x" * 60_000),),
                                         request_id=1)  # fmt: skip


def test_window_never_passes_done() -> None:
    raw = _raw(1, 2)
    # a store page reaching beyond done (it must not): nothing above done is sent
    assert records.timeline_window(0, 1, raw, True, 1) == (1, False, raw[:1])


# ------------------------------------------------------------------- the spec's tables

SPEC = Path(__file__).resolve().parents[1] / "spec" / "PROTOCOL.md"


def _section(text: str, start: str, end: str) -> str:
    return text[text.index(start) : text.index(end)]


def test_the_catalogue_of_section_7_lists_every_frame_type() -> None:
    catalogue = _section(SPEC.read_text(encoding="utf-8"), "## 7. Frame catalogue", "### 0x01")
    rows = re.findall(r"^\| 0x([0-9A-F]{2}) \| ([A-Z_]+) \|", catalogue, re.M)
    assert sorted((int(code, 16), name) for code, name in rows) == sorted(
        (t.value, t.name) for t in FrameType
    )


def test_the_layout_tables_of_section_20_are_the_schemas() -> None:
    layouts = _section(SPEC.read_text(encoding="utf-8"), "### 20.3", "### 20.4")
    tables: dict[str, list[str]] = {}
    name = ""
    for line in layouts.splitlines():
        if m := re.match(r"^(TIMELINE_[A-Z_]+) (?:\(0x|record)", line):
            name = m.group(1)
            tables[name] = []
        elif m := re.match(r"^\| `([a-z_]+)` \|", line):
            tables[name].append(m.group(1))
    expected = {t.name: [f.name for f in BODIES[t]] for t in FrameType if 0x37 <= t & 0x7F <= 0x38}
    expected["TIMELINE_HEAD"] = [f.name for f in TIMELINE_HEAD_FIELDS]
    assert {k: v for k, v in tables.items() if v} == {k: v for k, v in expected.items() if v}
    assert set(tables) == set(expected)  # the empty bodies are named too
