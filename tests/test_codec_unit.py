"""Focused tests of the codec: the traps it guards against, error details, encode limits."""

from __future__ import annotations

import struct
from dataclasses import fields
from itertools import pairwise
from typing import Any

import pytest
from construct import (
    Bytes,
    FormatField,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    PascalString,
    StreamError,
    Struct,
)

from improto.codec import COMPILED, INTERPRETED, Codec, FrameReader
from improto.enums import FrameType
from improto.errors import (
    BadUtf8,
    EncodeError,
    ErrorCode,
    FrameTooLarge,
    InvalidField,
    MalformedFrame,
    ProtocolError,
    UnknownFrameType,
    UnsupportedVersion,
)
from improto.fields import PackedRun, Utf8
from improto.frames import (
    FRAME_CLASSES,
    Close,
    Error,
    Frame,
    GroupAdd,
    GroupCreate,
    GroupList,
    GroupMemberList,
    GroupRemove,
    GroupSummary,
    Hello,
    HistoryPull,
    Message,
    OfflinePage,
    OfflinePull,
    Ping,
    Pong,
    Push,
    Send,
    SendAck,
    UnreadCount,
)
from improto.limits import (
    HEADER_SIZE,
    LENGTH_PREFIX_SIZE,
    MAX_BODY,
    MAX_DEVICE_ID,
    MAX_FRAME_LENGTH,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_NAME,
    MAX_GROUPS_PER_USER,
    MAX_IDS_PER_REQUEST,
    MAX_TEXT,
    MAX_TOKEN,
    U64_MAX,
)
from improto.schema import (
    BODIES,
    GROUP_SUMMARY_FIELDS,
    HEADER,
    MESSAGE_FIELDS,
    UNREAD_FIELDS,
    compiled_frame_struct,
    frame_struct,
    merge_runs,
)

CODECS = [pytest.param(COMPILED, id="compiled"), pytest.param(INTERPRETED, id="interpreted")]
CMID = bytes.fromhex("00112233445566778899aabbccddeeff")
RID = 0xDEADBEEF


# ------------------------------------------------------ raw frames, built by hand here


def payload(ftype: int, body: bytes = b"", *, version: int = 1, flags: int = 0, rid: int = RID
            ) -> bytes:  # fmt: skip
    return struct.pack(">BBBI", version, ftype, flags, rid) + body


def whole(p: bytes) -> bytes:
    return struct.pack(">I", len(p)) + p


def s8(raw: bytes) -> bytes:
    return struct.pack(">B", len(raw)) + raw


def s16(raw: bytes) -> bytes:
    return struct.pack(">H", len(raw)) + raw


def hello_body(device: bytes = b"dev-1", token: bytes = b"0123456789", kind: int = 1,
               version: int = 1) -> bytes:  # fmt: skip
    return struct.pack(">BB", version, kind) + s8(device) + s16(token)


def send_body(conv_kind: int = 1, conv_id: int = 1002, ctype: int = 1, body: bytes = b"hi"
              ) -> bytes:  # fmt: skip
    return CMID + struct.pack(">BQH", conv_kind, conv_id, ctype) + s16(body)


def decode_error(codec: Codec, data: bytes, *, whole_frame: bool = True) -> ProtocolError:
    """The ProtocolError decoding raises; any other exception fails the test."""
    with pytest.raises(ProtocolError) as info:
        if whole_frame:
            codec.decode(data)
        else:
            codec.decode_payload(data)
    return info.value


def encode_error(codec: Codec, frame: Frame) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        codec.encode(frame)
    return info.value


# ---------------------------------------------------- the compiled-construct truncation trap


def test_plain_compiled_construct_accepts_truncated_strings() -> None:
    """The trap: construct's compiled parsers read with a bare io.read(n).

    The HELLO tests below rely on it: should a construct upgrade fix this, this test fails
    and tells that they no longer exercise a live trap.
    """
    token = PascalString(Int16ub, "utf8")
    short = struct.pack(">H", 10) + b"01234567"  # says 10 bytes, holds 8
    assert token.compile().parse(short) == "01234567"  # silently accepted
    with pytest.raises(StreamError):
        token.parse(short)  # the interpreted parser does notice
    assert Bytes(16).compile().parse(b"x" * 10) == b"x" * 10


def test_plain_compiled_construct_accepts_a_truncated_hello() -> None:
    """The same HELLO bytes as the next test, through a plain-construct compiled layout."""
    plain = Struct(
        "version" / Int8ub, "type" / Int8ub, "flags" / Int8ub, "request_id" / Int32ub,
        "protocol_version" / Int8ub, "client_kind" / Int8ub,
        "device_id" / PascalString(Int8ub, "utf8"), "token" / PascalString(Int16ub, "utf8"),
    ).compile()  # fmt: skip
    truncated = payload(FrameType.HELLO, hello_body(token=b"0123456789")[:-2])
    assert plain.parse(truncated).token == "01234567"


@pytest.mark.parametrize("codec", CODECS)
def test_hello_with_truncated_last_string_is_malformed(codec: Codec) -> None:
    p = payload(FrameType.HELLO, hello_body(token=b"0123456789")[:-2])
    data = whole(p)  # the outer length prefix agrees with the bytes that follow
    assert struct.unpack_from(">I", data)[0] == len(data) - LENGTH_PREFIX_SIZE
    err = decode_error(codec, data)
    assert type(err) is MalformedFrame
    assert err.code is ErrorCode.MALFORMED_FRAME
    assert err.request_id == RID
    assert type(decode_error(codec, p, whole_frame=False)) is MalformedFrame
    # The untruncated frame is fine, so it is the truncation that is caught.
    assert codec.decode(whole(payload(FrameType.HELLO, hello_body()))) == Hello(
        1, 1, "dev-1", "0123456789", request_id=RID
    )


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "p",
    [
        pytest.param(
            payload(FrameType.HELLO, struct.pack(">BB", 1, 1) + b"\x05dev"), id="device_id_short"
        ),
        pytest.param(payload(FrameType.HELLO, hello_body()[:-11]), id="token_prefix_cut"),
        pytest.param(payload(FrameType.SEND_ACK, CMID[:10]), id="client_msg_id_short"),
        pytest.param(payload(FrameType.SEND, send_body(body=b"hello")[:-1]), id="send_body_short"),
        pytest.param(payload(FrameType.SEND_ACK, CMID + b"\x00" * 15), id="send_ack_int_cut"),
        pytest.param(
            payload(FrameType.GROUP_ADD, struct.pack(">QHQ", 1, 2, 5)), id="members_short"
        ),
        pytest.param(
            payload(FrameType.GROUP_ADD, struct.pack(">QHQ", 1, 1, 5)[:-3]), id="members_cut"
        ),
        pytest.param(
            payload(FrameType.GROUP_LIST, struct.pack(">HQ", 1, 1) + b"\x04ab"),
            id="groups_name_short",
        ),
        pytest.param(
            payload(FrameType.ERROR, struct.pack(">HH", 300, 5) + b"oops"), id="error_text_short"
        ),
    ],
)
def test_other_truncations_are_malformed(codec: Codec, p: bytes) -> None:
    err = decode_error(codec, whole(p))
    assert type(err) is MalformedFrame
    assert err.request_id == RID


# ----------------------------------------------------------------------- trailing bytes


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("p", "extra"),
    [
        pytest.param(payload(FrameType.PING), b"\x00", id="ping"),
        pytest.param(payload(FrameType.SYNC_HINT), b"\xff\xff", id="sync_hint"),
        pytest.param(payload(FrameType.SEND, send_body()), b"\x00", id="send"),
        pytest.param(payload(FrameType.HELLO, hello_body()), b"x", id="hello"),
        pytest.param(
            payload(FrameType.GROUP_ADD, struct.pack(">QHQ", 1, 1, 5)),
            struct.pack(">Q", 6),
            id="group_add_extra_id",
        ),
        pytest.param(
            payload(FrameType.ERROR, struct.pack(">H", 300) + s16(b"oops")), b"!", id="error"
        ),
    ],
)
def test_trailing_bytes_in_payload_are_rejected(codec: Codec, p: bytes, extra: bytes) -> None:
    codec.decode(whole(p))  # without the extra bytes it decodes
    err = decode_error(codec, whole(p + extra))
    assert type(err) is MalformedFrame
    assert err.request_id == RID
    assert type(decode_error(codec, p + extra, whole_frame=False)) is MalformedFrame


@pytest.mark.parametrize("codec", CODECS)
def test_bytes_after_the_delimited_frame_are_rejected(codec: Codec) -> None:
    frame = codec.encode(Ping(request_id=5))
    assert codec.decode(frame) == Ping(request_id=5)
    for extra in (b"\x00", frame):
        err = decode_error(codec, frame + extra)
        assert type(err) is MalformedFrame


# ------------------------------------------------------------------- FrameTooLarge


@pytest.mark.parametrize("codec", CODECS)
def test_decode_refuses_a_length_over_the_maximum(codec: Codec) -> None:
    for length in (MAX_FRAME_LENGTH + 1, 0xFFFFFFFF):
        data = struct.pack(">I", length) + payload(FrameType.PING)
        err = decode_error(codec, data)
        assert type(err) is FrameTooLarge
        assert err.code is ErrorCode.FRAME_TOO_LARGE
        assert err.fatal
        assert err.request_id is None


@pytest.mark.parametrize("codec", CODECS)
def test_frame_of_exactly_the_maximum_length(codec: Codec) -> None:
    # OFFLINE_PAGE: 7 header + 8 + 1 + 1 + 2 + 2 (unread count) = 21 bytes, plus per message
    # 54 fixed bytes + device id + body.
    def page(second_body: int) -> OfflinePage:
        msgs = tuple(
            Message(i + 1, 0, 1, "d", 1, 2, 2, CMID, b"\xab" * n)
            for i, n in enumerate((MAX_BODY, second_body))
        )
        return OfflinePage(1, 0, 0, msgs, ())

    second = MAX_FRAME_LENGTH - 21 - 2 * 55 - MAX_BODY
    largest = page(second)
    data = codec.encode(largest)
    assert len(data) == LENGTH_PREFIX_SIZE + MAX_FRAME_LENGTH
    assert codec.decode(data) == largest
    assert FrameReader().feed(data) == [data[LENGTH_PREFIX_SIZE:]]
    err = encode_error(codec, page(second + 1))
    assert type(err) is EncodeError


def test_frame_reader_refuses_before_the_body_arrives() -> None:
    reader = FrameReader()
    with pytest.raises(FrameTooLarge) as info:
        reader.feed(struct.pack(">I", MAX_FRAME_LENGTH + 1))  # only the prefix
    assert info.value.code is ErrorCode.FRAME_TOO_LARGE
    assert info.value.request_id is None


def test_frame_reader_refuses_once_the_fourth_prefix_byte_arrives() -> None:
    reader = FrameReader()
    prefix = struct.pack(">I", 0xFFFFFFFF)
    for i in range(3):
        assert reader.feed(prefix[i : i + 1]) == []
    with pytest.raises(FrameTooLarge):
        reader.feed(prefix[3:])


def test_frame_reader_waits_for_a_frame_of_the_maximum_length() -> None:
    reader = FrameReader()
    assert reader.feed(struct.pack(">I", MAX_FRAME_LENGTH)) == []
    assert reader.buffered == LENGTH_PREFIX_SIZE
    body = b"\x00" * (MAX_FRAME_LENGTH - 1)
    assert reader.feed(body) == []
    assert reader.feed(b"\x01") == [body + b"\x01"]
    assert reader.buffered == 0


def test_frame_reader_custom_limit() -> None:
    reader = FrameReader(max_length=8)
    assert reader.feed(struct.pack(">I", 8) + b"12345678") == [b"12345678"]
    with pytest.raises(FrameTooLarge):
        reader.feed(struct.pack(">I", 9))


def test_frame_reader_delivers_zero_length_payloads() -> None:
    """Framing does not judge payloads: an empty one is the decoder's to reject."""
    reader = FrameReader()
    assert reader.feed(b"\x00\x00\x00\x00" * 2) == [b"", b""]
    err = decode_error(COMPILED, b"", whole_frame=False)
    assert type(err) is MalformedFrame


# ----------------------------------------------------------- request_id on errors


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("p", "exc"),
    [
        (payload(FrameType.PING, version=2), UnsupportedVersion),
        (payload(FrameType.PING, version=0), UnsupportedVersion),
        (payload(0x7E), UnknownFrameType),
        (payload(0x00), UnknownFrameType),
        (payload(FrameType.SEND, send_body()[:-1]), MalformedFrame),
        (payload(FrameType.SEND), MalformedFrame),
        (payload(FrameType.PING, b"\x00"), MalformedFrame),
        (payload(FrameType.SEND, send_body(conv_kind=3)), InvalidField),
        (payload(FrameType.SEND, send_body(ctype=0)), InvalidField),
        (payload(FrameType.HELLO, hello_body(device=b"d" * 65)), InvalidField),
        (payload(FrameType.HELLO, hello_body(kind=9)), InvalidField),
        (payload(FrameType.HELLO, hello_body(version=2)), UnsupportedVersion),
        (payload(FrameType.SEND, send_body(body=b"\xff")), BadUtf8),
        (payload(FrameType.HELLO, hello_body(device=b"\xc3")), BadUtf8),
    ],
    ids=[
        "version_2", "version_0", "type_0x7e", "type_0x00", "send_truncated", "send_empty",
        "ping_padded", "conv_kind_3", "content_type_0", "device_id_65", "client_kind_9",
        "hello_version_2", "body_bad_utf8", "device_id_bad_utf8",
    ],
)  # fmt: skip
def test_errors_after_the_header_carry_its_request_id(
    codec: Codec, p: bytes, exc: type[ProtocolError]
) -> None:
    for data, whole_frame in ((whole(p), True), (p, False)):
        err = decode_error(codec, data, whole_frame=whole_frame)
        assert type(err) is exc
        assert err.code is exc.code
        assert err.request_id == RID


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00\x07", whole(b""), whole(b"\x01\x02\x00\x00\x00\x00"), whole(b"\x01")],
    ids=["empty", "short_prefix", "empty_payload", "six_byte_payload", "one_byte_payload"],
)
def test_header_less_errors_have_no_request_id(codec: Codec, data: bytes) -> None:
    err = decode_error(codec, data)
    assert type(err) is MalformedFrame
    assert err.request_id is None
    if len(data) >= LENGTH_PREFIX_SIZE:
        err = decode_error(codec, data[LENGTH_PREFIX_SIZE:], whole_frame=False)
        assert type(err) is MalformedFrame
        assert err.request_id is None


# ------------------------------------------------- order of checks (PROTOCOL.md 13.2)
# Length prefix, version, type, then the body field by field in wire order (data running
# out or left over, length/count prefix out of range, text not UTF-8), then the values.
# Each input below has two defects; the first in that order must be reported.


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    ("data", "exc"),
    [
        pytest.param(
            struct.pack(">I", MAX_FRAME_LENGTH + 1) + payload(0x7E, version=2), FrameTooLarge,
            id="too_large_before_version",
        ),
        pytest.param(whole(payload(0x7E, version=2)), UnsupportedVersion, id="version_before_type"),
        pytest.param(whole(payload(0x08, b"\xff" * 3)), UnknownFrameType, id="type_before_body"),
        pytest.param(
            whole(payload(FrameType.HELLO, b"\x01\x01\x41" + b"d" * 10)), InvalidField,
            id="string_length_prefix_before_running_out",
        ),
        pytest.param(
            whole(payload(FrameType.HELLO, hello_body(device=b"\xff", version=2))), BadUtf8,
            id="text_field_before_values",
        ),
        pytest.param(
            whole(payload(FrameType.HELLO, hello_body(device=b"\xff") + b"\x00")), BadUtf8,
            id="text_field_before_left_over",
        ),
        pytest.param(
            whole(payload(FrameType.SEND, send_body(conv_kind=3) + b"\x00")), MalformedFrame,
            id="left_over_before_values",
        ),
        pytest.param(
            whole(payload(FrameType.HELLO, hello_body(version=2) + b"\x00")), MalformedFrame,
            id="left_over_before_hello_version",
        ),
        pytest.param(
            whole(payload(FrameType.SEND, send_body(body=b"\xff\xff\xff")[:-1])),
            MalformedFrame, id="running_out_before_text_body",
        ),
        pytest.param(
            whole(payload(FrameType.HISTORY_PAGE, struct.pack(">BQBH", 1, 1, 2, 1))),
            MalformedFrame, id="running_out_before_bool",
        ),
    ],
)  # fmt: skip
def test_first_problem_in_check_order_is_reported(
    codec: Codec, data: bytes, exc: type[ProtocolError]
) -> None:
    assert type(decode_error(codec, data)) is exc


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(
            whole(payload(FrameType.GROUP_ADD, struct.pack(">QH", 5001, 0) + b"\x00")),
            id="group_add_count_0_then_left_over",
        ),
        pytest.param(
            whole(payload(FrameType.GROUP_MEMBER_LIST,
                          struct.pack(">QQ", 5001, 1001) + s8(b"g") + struct.pack(">H", 10001))),
            id="member_list_count_10001_then_running_out",
        ),
        pytest.param(
            whole(payload(FrameType.OFFLINE_PAGE, struct.pack(">QBBH", 1, 0, 0, 201))),
            id="offline_page_count_201_then_running_out",
        ),
    ],
)  # fmt: skip
def test_list_count_prefix_out_of_range_is_reported_at_the_prefix(
    codec: Codec, data: bytes
) -> None:
    """PROTOCOL.md 13.2: a count prefix out of range is INVALID_FIELD, found in wire order.

    So it comes before the data running out or being left over after the list, just as a
    string length prefix out of range does (string_length_prefix_before_running_out above).
    """
    err = decode_error(codec, data)
    assert err.code is ErrorCode.INVALID_FIELD, f"{type(err).__name__}: {err}"


# ---------------------------------------------------------------------- encode limits


def _msg(body: bytes = b"hi", **kw: Any) -> Message:
    base: dict[str, Any] = {
        "msg_id": 1, "server_time": 2, "sender_id": 3, "sender_device": "dev", "conv_kind": 1,
        "conv_id": 4, "content_type": 2, "client_msg_id": CMID, "body": body,
    }  # fmt: skip
    base.update(kw)
    return Message(**base)


# Values that do not fit their wire field: EncodeError.
WIRE_OVERFLOWS: list[tuple[str, Frame]] = [
    ("flags_256", Ping(flags=256)),
    ("flags_negative", Ping(flags=-1)),
    ("request_id_2_32", Ping(request_id=2**32)),
    ("request_id_negative", Ping(request_id=-1)),
    ("u64_overflow", Pong(2**64)),
    ("u64_negative", Pong(-1)),
    ("u16_overflow", Send(CMID, 1, 1, 0x10000, b"")),
    ("u8_overflow_close_reason", Close(256, "")),
    ("client_msg_id_15", Send(CMID[:15], 1, 1, 2, b"")),
    ("client_msg_id_17", SendAck(CMID + b"\x00", 1, 1, 0)),
    ("device_id_65", Hello(1, 1, "d" * (MAX_DEVICE_ID + 1), "t")),
    ("device_id_65_bytes_33_chars", Hello(1, 1, "é" * 32 + "d", "t")),
    ("device_id_empty", Hello(1, 1, "", "t")),
    ("token_4097", Hello(1, 1, "d", "t" * (MAX_TOKEN + 1))),
    ("token_empty", Hello(1, 1, "d", "")),
    ("sender_device_65", Push(_msg(sender_device="d" * 65))),
    ("group_name_129", GroupCreate("n" * (MAX_GROUP_NAME + 1))),
    ("group_name_empty", GroupCreate("")),
    ("group_summary_name_129", GroupList((GroupSummary(1, "g" * 129),))),
    ("error_text_1025", Error(300, "e" * (MAX_TEXT + 1))),
    ("close_text_1025", Close(1, "€" * 341 + "cc")),
    ("body_65536", Send(CMID, 1, 1, 2, b"\x00" * (MAX_BODY + 1))),
    ("push_body_65536", Push(_msg(b"\x00" * (MAX_BODY + 1)))),
    ("frame_over_max", OfflinePage(1, 0, 0, tuple(_msg(b"\x00" * MAX_BODY) for _ in range(3)), ())),
    ("unread_count_u16_overflow", OfflinePage(1, 0, 0, (), (UnreadCount(1, 1, 0x10000),))),
    ("body_not_bytes", Send(CMID, 1, 1, 2, "text")),  # type: ignore[arg-type]
    ("name_not_str", GroupCreate(5)),  # type: ignore[arg-type]
]  # fmt: skip

# Values that fit their wire field but break a range of the spec: InvalidField, as when decoding.
RANGE_VIOLATIONS: list[tuple[str, Frame]] = [
    ("offline_limit_201", OfflinePull(0, 201)),
    ("history_limit_101", HistoryPull(1, 1, 0, 101)),
    ("group_list_501", GroupList(tuple(GroupSummary(i + 1, "g") for i in range(501)))),
    ("group_create_1001_members", GroupCreate("g", tuple(range(1, MAX_IDS_PER_REQUEST + 2)))),
    ("group_add_no_members", GroupAdd(1, ())),
    ("group_remove_member_0", GroupRemove(1, (0,))),
    ("member_list_10001", GroupMemberList(1, 1, "g", tuple(range(1, MAX_GROUP_MEMBERS + 2)))),
    ("conv_kind_3", Send(CMID, 3, 1, 2, b"")),
    ("conv_id_0", Send(CMID, 1, 0, 2, b"")),
    ("send_group_event", Send(CMID, 1, 1, 0, b"")),
    ("duplicate_2", SendAck(CMID, 1, 1, 2)),
    ("msg_id_0", Push(_msg(msg_id=0))),
    ("unread_count_0", OfflinePage(1, 0, 0, (), (UnreadCount(1, 1, 0),))),
    ("offline_page_201", OfflinePage(1, 0, 0, tuple(_msg() for _ in range(201)), ())),
    ("has_more_2", OfflinePage(1, 2, 0, (), ())),
    ("client_kind_9", Hello(1, 9, "d", "t")),
    ("group_id_0", GroupList((GroupSummary(0, "g"),))),
    ("group_id_2_64", GroupList((GroupSummary(2**64, "g"),))),
]


def assert_both_codecs_refuse(frame: Frame, error: type[ProtocolError]) -> None:
    """Both codecs refuse to encode `frame` with the same `error` (code INVALID_FIELD)."""
    errors = [encode_error(codec, frame) for codec in (COMPILED, INTERPRETED)]
    assert all(isinstance(e, error) for e in errors), errors
    assert type(errors[0]) is type(errors[1])
    assert errors[0].code is ErrorCode.INVALID_FIELD


@pytest.mark.parametrize(("name", "frame"), WIRE_OVERFLOWS, ids=[n for n, _ in WIRE_OVERFLOWS])
def test_encode_rejects_values_that_do_not_fit_with_encode_error(name: str, frame: Frame) -> None:
    assert_both_codecs_refuse(frame, EncodeError)
    for codec in (COMPILED, INTERPRETED):
        with pytest.raises(EncodeError):
            codec.encode_payload(frame)


@pytest.mark.parametrize(("name", "frame"), RANGE_VIOLATIONS, ids=[n for n, _ in RANGE_VIOLATIONS])
def test_encode_rejects_out_of_range_values_with_invalid_field(name: str, frame: Frame) -> None:
    assert_both_codecs_refuse(frame, InvalidField)


@pytest.mark.parametrize("codec", CODECS)
def test_encode_accepts_the_largest_in_range_values(codec: Codec) -> None:
    frames: list[Frame] = [
        Ping(request_id=2**32 - 1, flags=0xFF),
        Hello(1, 4, "é" * 32, "t" * MAX_TOKEN),
        OfflinePull(U64_MAX, 200),
        HistoryPull(2, U64_MAX, U64_MAX, 100),
        Send(CMID, 2, U64_MAX, 0xFFFF, b"\x00" * MAX_BODY),
        GroupList(tuple(GroupSummary(i + 1, "g" * MAX_GROUP_NAME)
                        for i in range(MAX_GROUPS_PER_USER))),
        Close(255, "c" * MAX_TEXT),
    ]  # fmt: skip
    for frame in frames:
        assert codec.decode(codec.encode(frame)) == frame


@pytest.mark.parametrize(
    "frame",
    [
        pytest.param(Hello(1, 1, "\ud800", "t"), id="device_id"),
        pytest.param(Error(300, "\ud83d"), id="error_text"),
    ],
)
def test_encode_rejects_unencodable_text_with_encode_error(frame: Frame) -> None:
    """A str holding a lone surrogate has no UTF-8 form: it does not fit a UTF-8 field."""
    for codec in (COMPILED, INTERPRETED):
        with pytest.raises(EncodeError):
            codec.encode(frame)


@pytest.mark.parametrize(
    "frame",
    [
        Send(CMID, 1, 1, 2, bytearray(b"ab")),  # type: ignore[arg-type]
        Push(_msg(memoryview(b"ab"))),  # type: ignore[arg-type]
    ],
    ids=["bytearray_body", "memoryview_body"],
)
def test_compiled_and_interpreted_agree_on_a_non_bytes_body(frame: Frame) -> None:
    """The dataclasses declare bytes; the two codecs must not disagree about anything else."""
    outcomes = []
    for codec in (COMPILED, INTERPRETED):
        try:
            outcomes.append(codec.encode(frame))
        except ProtocolError as e:
            outcomes.append(type(e))
    assert outcomes[0] == outcomes[1]


# ------------------------------------------------------------------ UTF-8 of bodies


def _record_bytes(content_type: int, body: bytes) -> bytes:
    return (
        struct.pack(">QQQ", 77, 1, 1001) + s8(b"dev")
        + struct.pack(">BQH", 2, 5001, content_type) + CMID + s16(body)
    )  # fmt: skip


NOT_UTF8 = [b"\xff", b"caf\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"ok\xe2\x82"]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("content_type", [0, 1, 2, 0x8001, 0xFFFF])
def test_only_text_and_group_event_bodies_must_be_utf8(codec: Codec, content_type: int) -> None:
    must_be_text = content_type in (0, 1)
    for body in NOT_UTF8:
        data = whole(payload(FrameType.PUSH, _record_bytes(content_type, body), rid=0))
        message = Message(77, 1, 1001, "dev", 2, 5001, content_type, CMID, body)
        if must_be_text:
            err = decode_error(codec, data)
            assert type(err) is BadUtf8
            assert err.code is ErrorCode.BAD_UTF8
            with pytest.raises(BadUtf8):
                codec.encode(Push(message))
        else:
            assert codec.decode(data) == Push(message)
            assert codec.encode(Push(message)) == data
    text = "Grüße, 世界 👋".encode()
    data = whole(payload(FrameType.PUSH, _record_bytes(content_type, text), rid=0))
    assert codec.decode(data).message.body == text  # type: ignore[attr-defined]


# ------------------------------------------------------------------------- flags


@pytest.mark.parametrize("codec", CODECS)
def test_unknown_flag_bits_are_preserved(codec: Codec) -> None:
    for flags in range(256):
        data = whole(payload(FrameType.PING, flags=flags))
        frame = codec.decode(data)
        assert frame == Ping(request_id=RID, flags=flags)
        assert codec.encode(frame) == data
    send = Send(CMID, 2, 9, 1, "✓".encode(), request_id=1, flags=0xFE)
    data = codec.encode(send)
    assert data[LENGTH_PREFIX_SIZE + 2] == 0xFE
    assert codec.decode(data).flags == 0xFE


# ------------------------------------------------------------ schema and dataclasses


def _names(constructs: list[Any]) -> list[str]:
    return [c.name for c in constructs]


def _body_field_names(cls: type[Frame]) -> list[str]:
    return [f.name for f in fields(cls) if f.name not in ("request_id", "flags")]


def test_frame_classes_cover_every_frame_type() -> None:
    assert set(FRAME_CLASSES) == {t.value for t in FrameType}
    assert set(BODIES) == set(FrameType)
    for code, cls in FRAME_CLASSES.items():
        assert cls.TYPE.value == code


def test_header_fields() -> None:
    assert _names(HEADER) == ["version", "type", "flags", "request_id"]
    assert sum(c.sizeof() for c in HEADER) == HEADER_SIZE


@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_dataclass_fields_match_the_schema(frame_type: FrameType) -> None:
    cls = FRAME_CLASSES[frame_type.value]
    schema = _names(BODIES[frame_type])
    if frame_type is FrameType.PUSH:
        assert _body_field_names(cls) == ["message"]
        assert schema == [f.name for f in fields(Message)]
    else:
        assert _body_field_names(cls) == schema
    assert all(schema), "every body field is named"


def test_record_fields_match_the_schema() -> None:
    assert _names(MESSAGE_FIELDS) == [f.name for f in fields(Message)]
    assert _names(UNREAD_FIELDS) == [f.name for f in fields(UnreadCount)]
    assert _names(GROUP_SUMMARY_FIELDS) == [f.name for f in fields(GroupSummary)]


def test_header_fields_are_keyword_only() -> None:
    for cls in FRAME_CLASSES.values():
        by_name = {f.name: f for f in fields(cls)}
        assert by_name["request_id"].kw_only and by_name["flags"].kw_only
        assert by_name["request_id"].default == 0 and by_name["flags"].default == 0


# ------------------------------------------------------------------------ merge_runs


def test_compiled_push_struct_uses_packed_runs() -> None:
    subcons = compiled_frame_struct(FrameType.PUSH).subcons
    runs = [c for c in subcons if isinstance(c, PackedRun)]
    assert [r.names for r in runs] == [
        ["version", "type", "flags", "request_id", "msg_id", "server_time", "sender_id"],
        ["conv_kind", "conv_id", "content_type"],
    ]
    assert [r.fmt.size for r in runs] == [7 + 24, 1 + 8 + 2]
    assert not any(isinstance(c, PackedRun) for c in frame_struct(FrameType.PUSH).subcons)


def test_merge_runs_groups_adjacent_named_integers_only() -> None:
    text = "s" / Utf8("s", 1, 0, 10)
    merged = merge_runs(["a" / Int8ub, "b" / Int16ub, text, "c" / Int64ub])
    assert isinstance(merged[0], PackedRun)
    assert merged[0].names == ["a", "b"]
    assert merged[0].fmt.format == ">BH"
    assert merged[1] is text
    assert merged[2].name == "c"
    assert not isinstance(merged[2], PackedRun)


@pytest.mark.parametrize("frame_type", list(FrameType), ids=lambda t: t.name)
def test_no_adjacent_integers_left_unmerged(frame_type: FrameType) -> None:
    subcons = compiled_frame_struct(frame_type).subcons
    flat_ints = [
        isinstance(getattr(c, "subcon", None), FormatField) and bool(c.name) for c in subcons
    ]
    assert not any(a and b for a, b in pairwise(flat_ints))


def test_merged_layout_builds_the_same_bytes_as_the_reference() -> None:
    msg = _msg("ünïcode".encode(), content_type=1, msg_id=U64_MAX, conv_kind=2)
    cases: list[tuple[FrameType, dict[str, Any]]] = [
        (FrameType.PUSH, {
            "version": 1, "type": FrameType.PUSH.value, "flags": 3, "request_id": 7,
            **{f.name: getattr(msg, f.name) for f in fields(Message)},
        }),
        (FrameType.HISTORY_PULL, {
            "version": 1, "type": FrameType.HISTORY_PULL.value, "flags": 0, "request_id": 1,
            "conv_kind": 2, "conv_id": 99, "before_id": U64_MAX, "limit": 100,
        }),
    ]  # fmt: skip
    for frame_type, obj in cases:
        reference = frame_struct(frame_type).build(obj)
        merged = compiled_frame_struct(frame_type).compile()
        assert merged.build(obj) == reference
        parsed = merged.parse(reference)
        assert {k: parsed[k] for k in obj} == obj
