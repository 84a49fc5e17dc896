"""The struct shortcuts of improto.fast_frames (SEND decoding, SEND_ACK encoding) against the
construct path they shortcut.

`COMPILED` (what the server uses) takes the shortcuts, `REFERENCE` is the same compiled codec
without them and `INTERPRETED` the interpreted construct reference. On every input the
shortcut codec must give exactly what `REFERENCE` gives: the same frame (same repr), the same
bytes, or the same exception (type, code, message, request_id); and the same outcome as
`INTERPRETED` up to the text of construct's own error messages.
"""

from __future__ import annotations

import json
import struct
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

import improto.codec
from improto import fast_frames
from improto.codec import COMPILED, INTERPRETED, REFERENCE, Codec
from improto.enums import ContentType, FrameType
from improto.errors import MalformedFrame, ProtocolError
from improto.frames import Hello, Send, SendAck
from improto.jsonform import frame_from_json
from improto.limits import HEADER_SIZE, LENGTH_PREFIX_SIZE, MAX_BODY, U64_MAX
from tests.support.mutations import BYTE_MUTATIONS, mutate

VECTOR_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors"
SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _vectors(kind: str, frame_type: FrameType) -> list[dict[str, Any]]:
    """The vectors of `kind` (valid, invalid) in every vector file whose type byte is
    frame_type's."""
    out: list[dict[str, Any]] = []
    for prefix in ("", "ext-"):
        doc = json.loads((VECTOR_DIR / f"{prefix}{kind}.json").read_text(encoding="utf-8"))
        for v in doc:
            data = bytes.fromhex(v["hex"])
            if len(data) > LENGTH_PREFIX_SIZE + 1 and data[LENGTH_PREFIX_SIZE + 1] == frame_type:
                out.append(v)
    return out


VALID_SENDS = _vectors("valid", FrameType.SEND)
VALID_ACKS = _vectors("valid", FrameType.SEND_ACK)
INVALID = _vectors("invalid", FrameType.SEND) + _vectors("invalid", FrameType.SEND_ACK)


def _names(vectors: list[dict[str, Any]]) -> list[str]:
    return [v["name"] for v in vectors]


# -------------------------------------------------------------------------- outcomes


def _decoded(codec: Codec, payload: bytes) -> tuple[Any, ...]:
    """What codec.decode_payload does with payload; anything but a ProtocolError propagates."""
    try:
        frame = codec.decode_payload(payload)
    except ProtocolError as e:
        return ("error", type(e), e.code, e.request_id, e.message, str(e))
    return ("ok", frame, repr(frame))


def _coarse(outcome: tuple[Any, ...]) -> tuple[Any, ...]:
    """An outcome without the error's message (construct's texts differ between its
    compiled and interpreted parsers)."""
    return outcome if outcome[0] == "ok" else outcome[:4]


def check_decode(payload: bytes) -> tuple[Any, ...]:
    """The shortcut codec decodes payload (and the whole frame) exactly as the reference."""
    fast = _decoded(COMPILED, payload)
    assert fast == _decoded(REFERENCE, payload)
    assert _coarse(fast) == _coarse(_decoded(INTERPRETED, payload))
    whole = struct.pack(">I", len(payload)) + payload
    assert _whole(COMPILED, whole) == _whole(REFERENCE, whole)
    shortcut = fast_frames.decode_send(payload)
    if fast[0] == "ok" and isinstance(fast[1], Send):
        # a valid SEND is the shortcut's own result, not the fallback's
        assert shortcut is not None
        assert shortcut == fast[1]
        assert repr(shortcut) == fast[2]
    else:
        assert shortcut is None  # errors come from the reference path only
    return fast


def _whole(codec: Codec, data: bytes) -> tuple[Any, ...]:
    try:
        frame = codec.decode(data)
    except ProtocolError as e:
        return ("error", type(e), e.code, e.request_id, str(e))
    return ("ok", frame, repr(frame))


def _encoded(codec: Codec, frame: Any) -> tuple[Any, ...]:
    """What codec.encode and encode_payload do with frame. A frame holding nonsense (None, a
    float, a str) may fail with any exception: the shortcut must fail with the same one."""
    try:
        return ("ok", codec.encode(frame), codec.encode_payload(frame))
    except Exception as e:
        return (
            "error",
            type(e),
            str(e),
            getattr(e, "code", None),
            getattr(e, "request_id", None),
        )


def _event(outcome: tuple[Any, ...]) -> None:
    """Hypothesis statistics: how often each outcome came up."""
    event("ok" if outcome[0] == "ok" else f"refused: {outcome[1].__name__}")


def check_encode(frame: SendAck) -> tuple[Any, ...]:
    fast = _encoded(COMPILED, frame)
    assert fast == _encoded(REFERENCE, frame)
    interpreted = _encoded(INTERPRETED, frame)
    assert fast[:2] == interpreted[:2]
    if fast[0] == "ok":
        assert fast[2] == fast[1][LENGTH_PREFIX_SIZE:]
        assert interpreted == fast
        assert fast_frames.encode_send_ack(frame) == fast[1]
        assert COMPILED.decode(fast[1]) == frame
    else:
        assert fast_frames.encode_send_ack(frame) is None
    return fast


# ------------------------------------------------------------------ (a) the vectors


def test_vectors_cover_send_and_send_ack() -> None:
    assert len(VALID_SENDS) >= 4
    assert len(VALID_ACKS) >= 2
    assert len(INVALID) >= 10


@pytest.mark.parametrize("vector", VALID_SENDS, ids=_names(VALID_SENDS))
def test_valid_send_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    payload = data[LENGTH_PREFIX_SIZE:]
    expected = frame_from_json(vector)
    shortcut = fast_frames.decode_send(payload)
    assert shortcut == expected
    assert repr(shortcut) == repr(expected)
    for codec in (COMPILED, REFERENCE, INTERPRETED):
        assert repr(codec.decode_payload(payload)) == repr(expected)
        assert repr(codec.decode(data)) == repr(expected)
    assert check_decode(payload)[0] == "ok"


@pytest.mark.parametrize("vector", VALID_ACKS, ids=_names(VALID_ACKS))
def test_valid_send_ack_vector(vector: dict[str, Any]) -> None:
    frame = frame_from_json(vector)
    assert isinstance(frame, SendAck)
    assert fast_frames.encode_send_ack(frame) == bytes.fromhex(vector["hex"])
    for codec in (COMPILED, REFERENCE, INTERPRETED):
        assert codec.encode(frame).hex() == vector["hex"]
        assert codec.encode_payload(frame).hex() == vector["hex"][2 * LENGTH_PREFIX_SIZE :]
    assert check_encode(frame)[0] == "ok"


@pytest.mark.parametrize("vector", INVALID, ids=_names(INVALID))
def test_invalid_vector(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    outcome = check_decode(data[LENGTH_PREFIX_SIZE:])
    assert outcome[0] == "error"
    assert outcome[2].name == vector["error"]
    errors = []
    for codec in (COMPILED, REFERENCE):
        with pytest.raises(ProtocolError) as info:
            codec.decode(data)
        e = info.value
        errors.append((type(e), e.code, e.request_id, e.message))
    assert errors[0] == errors[1]


SHORT = [b"", b"\x01", b"\x01\x03", b"\x01\x03\x00\x00\x00\x00\x07", b"\x02\x03" + bytes(34)]


@pytest.mark.parametrize("payload", SHORT, ids=[str(len(p)) for p in SHORT])
def test_short_and_foreign_payloads(payload: bytes) -> None:
    assert check_decode(payload)[0] == "error"


def test_invalid_send_ack_values_are_refused_alike() -> None:
    ack = frame_from_json(VALID_ACKS[0])
    assert isinstance(ack, SendAck)
    for bad in (
        replace(ack, duplicate=2),
        replace(ack, msg_id=0),
        replace(ack, msg_id=U64_MAX + 1),
        replace(ack, server_time=-1),
        replace(ack, request_id=2**32),
        replace(ack, flags=256),
        replace(ack, client_msg_id=ack.client_msg_id[:15]),
        replace(ack, client_msg_id=bytearray(ack.client_msg_id)),
    ):
        assert check_encode(bad)[0] == "error"


# ------------------------------------------------------------- (b) property tests

u8 = st.integers(0, 0xFF)
u32 = st.integers(0, 0xFFFFFFFF)
u64 = st.integers(0, U64_MAX)
ids = st.integers(1, U64_MAX)
client_msg_ids = st.binary(min_size=16, max_size=16)
# 0 (GROUP_EVENT) is refused in a SEND: drawn too, for the refusal
content_types = st.one_of(st.sampled_from([0, 1, 2, 3, 0x7FFF, 0xFFFF]), st.integers(0, 0xFFFF))
body_sizes = st.one_of(
    st.sampled_from([0, 1, 2, MAX_BODY - 3, MAX_BODY - 1, MAX_BODY]), st.integers(0, MAX_BODY)
)


def _fill_utf8(chunk: str, size: int) -> bytes:
    """chunk repeated to at most size bytes of UTF-8, cut on a character boundary."""
    unit = chunk.encode("utf-8")
    raw = (unit * (size // len(unit) + 1))[:size]
    return raw.decode("utf-8", errors="ignore").encode("utf-8")


def send_bodies(content_type: int) -> st.SearchStrategy[bytes]:
    """Bodies of 0..MAX_BODY bytes; UTF-8 (any code point) where the content type says
    text. Long bodies repeat a short drawn chunk, which keeps the examples small."""
    if content_type <= ContentType.TEXT:
        short = st.text(max_size=60).map(lambda s: s.encode("utf-8"))
        long = st.builds(_fill_utf8, st.text(min_size=1, max_size=4), body_sizes)
    else:
        short = st.binary(max_size=200)
        long = st.builds(
            lambda chunk, n: (chunk * (n // len(chunk) + 1))[:n],
            st.binary(min_size=1, max_size=8),
            body_sizes,
        )
    return st.one_of(short, long)


@st.composite
def sends(draw: st.DrawFn) -> Send:
    content_type = draw(content_types)
    return Send(
        draw(client_msg_ids),
        draw(st.sampled_from([1, 2])),
        draw(ids),
        content_type,
        draw(send_bodies(content_type)),
        request_id=draw(u32),
        flags=draw(u8),
    )


def _payload(send: Send) -> bytes:
    """The payload of a SEND, valid or not (REFERENCE's builder refuses what `validate`
    refuses, so the layout is packed here)."""
    head = struct.pack(">BBBI16sBQHH", 1, FrameType.SEND, send.flags, send.request_id,
                       send.client_msg_id, send.conv_kind, send.conv_id, send.content_type,
                       len(send.body))  # fmt: skip
    return head + send.body


@settings(SETTINGS, max_examples=1000)
@given(sends())
def test_random_sends(send: Send) -> None:
    payload = _payload(send)
    outcome = check_decode(payload)
    _event(outcome)
    if send.content_type != ContentType.GROUP_EVENT:
        assert outcome[0] == "ok"
        assert outcome[1] == send
        assert COMPILED.encode_payload(send) == payload
    else:
        assert outcome[0] == "error"


@settings(SETTINGS, max_examples=200)
@given(sends(), st.sampled_from(["bytearray", "memoryview"]))
def test_sends_in_other_buffers(send: Send, kind: str) -> None:
    """A buffer that is not bytes goes to the reference path, which still gives bytes."""
    payload = _payload(send)
    buf: Any = bytearray(payload) if kind == "bytearray" else memoryview(payload)
    assert fast_frames.decode_send(buf) is None
    assert _decoded(COMPILED, buf) == _decoded(REFERENCE, buf)


# Mutations of a valid payload: random edits, and edits of the fields that decide validity.
mutations = st.one_of(
    *BYTE_MUTATIONS,
    # version, type, conv_kind: one byte at a fixed offset
    st.tuples(st.just("set_at"), st.sampled_from([0, 1, 23]), u8),
    # conv_id, content_type, body length: the whole field
    st.tuples(st.just("field"), st.just((24, ">Q")), st.sampled_from([0, 1, U64_MAX])),
    st.tuples(st.just("field"), st.just((32, ">H")), st.sampled_from([0, 1, 2, 0xFFFF])),
    st.tuples(st.just("field"), st.just((34, ">H")), st.integers(0, 0xFFFF)),
    # invalid UTF-8 in the body: a lone continuation, an overlong, a surrogate, a truncation
    st.tuples(
        st.just("body"),
        st.integers(0),
        st.sampled_from([b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf4\x90\x80\x80"]),
    ),
)


def _mutate(payload: bytes, m: tuple[Any, ...]) -> bytes:
    kind = m[0]
    if kind == "field":
        (offset, fmt), value = m[1], m[2]
        if len(payload) < offset + struct.calcsize(fmt):
            return payload
        return payload[:offset] + struct.pack(fmt, value) + payload[offset + struct.calcsize(fmt) :]
    if kind == "body":  # spliced into the body, its length prefix kept consistent
        if len(payload) < 36:
            return payload
        body = payload[36:]
        pos = m[1] % (len(body) + 1)
        body = body[:pos] + m[2] + body[pos:]
        return payload[:34] + struct.pack(">H", len(body) % 0x10000) + body
    if kind == "set_at":  # a fixed offset
        return mutate(payload, ("set", m[1], m[2]))
    return mutate(payload, m)


@settings(SETTINGS, max_examples=2000)
@given(sends(), st.lists(mutations, min_size=1, max_size=3))
@example(  # a text body that stops inside a character, its length prefix consistent
    Send(bytes(16), 1, 1, 1, "€".encode(), request_id=9),
    [("truncate", 38), ("field", (34, ">H"), 2)],
)
def test_mutated_sends(send: Send, muts: list[tuple[Any, ...]]) -> None:
    payload = _payload(send)
    for m in muts:
        payload = _mutate(payload, m)
    outcome = check_decode(payload)
    _event(outcome)
    if outcome[0] == "error" and len(payload) >= HEADER_SIZE:
        assert outcome[3] == struct.unpack_from(">I", payload, 3)[0]


@settings(SETTINGS, max_examples=500)
@given(sends(), st.data())
def test_truncated_sends(send: Send, data: st.DataObject) -> None:
    payload = _payload(send)
    cut = data.draw(st.integers(0, len(payload) - 1), label="cut")
    outcome = check_decode(payload[:cut])
    assert outcome[:2] == ("error", MalformedFrame)


@settings(SETTINGS, max_examples=500)
@given(sends(), st.binary(min_size=1, max_size=16))
def test_extended_sends(send: Send, extra: bytes) -> None:
    outcome = check_decode(_payload(send) + extra)
    assert outcome[:2] == ("error", MalformedFrame)


# SEND_ACK values: in range, at and past the limits, and of the wrong type.
wild_ints = st.one_of(
    st.integers(-(2**65), 2**65),
    st.booleans(),
    st.floats(allow_nan=True),
    st.none(),
    st.text(max_size=2),
)
wild_cmids = st.one_of(
    st.binary(max_size=20),
    client_msg_ids.map(bytearray),
    st.none(),
    st.text(min_size=16, max_size=16),
)


send_acks = st.builds(
    SendAck, client_msg_ids, ids, u64, st.sampled_from([0, 1]), request_id=u32, flags=u8
)
# Per field: values at and past its limits, and of other types.
WILD: dict[str, st.SearchStrategy[Any]] = {
    "client_msg_id": wild_cmids,
    "msg_id": st.one_of(st.sampled_from([0, U64_MAX, U64_MAX + 1]), wild_ints),
    "server_time": st.one_of(st.sampled_from([-1, U64_MAX, U64_MAX + 1]), wild_ints),
    "duplicate": st.one_of(st.integers(-1, 300), wild_ints),
    "request_id": st.one_of(st.sampled_from([-1, 2**32 - 1, 2**32]), wild_ints),
    "flags": st.one_of(st.sampled_from([-1, 255, 256]), wild_ints),
}


@st.composite
def wild_send_acks(draw: st.DrawFn) -> SendAck:
    """A valid SEND_ACK with up to two fields replaced by wild values."""
    ack = draw(send_acks)
    for name in draw(st.lists(st.sampled_from(sorted(WILD)), max_size=2, unique=True)):
        ack = replace(ack, **{name: draw(WILD[name], label=name)})
    return ack


@settings(SETTINGS, max_examples=1000)
@given(send_acks)
def test_random_send_acks(ack: SendAck) -> None:
    assert check_encode(ack)[0] == "ok"


@settings(SETTINGS, max_examples=2000)
@given(wild_send_acks())
@example(SendAck(bytes(16), 1, 0, True, request_id=0, flags=0))
@example(SendAck(bytes(16), 1.0, 0, 0))  # type: ignore[arg-type]
@example(SendAck(bytes(16), 1, 0, 0, request_id=None))  # type: ignore[arg-type]
def test_wild_send_acks(ack: SendAck) -> None:
    _event(check_encode(ack))


# ------------------------------------------------------- (c) the shortcuts are used


def _refuse(*args: object) -> Any:
    raise AssertionError("construct path taken")


@pytest.fixture
def no_construct_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPILED's and REFERENCE's construct parser of SEND and builder of SEND_ACK fail."""
    for codec in (COMPILED, REFERENCE):
        monkeypatch.setitem(codec._parsers, Send, _refuse)
        monkeypatch.setitem(codec._builders, SendAck, _refuse)


@pytest.mark.usefixtures("no_construct_path")
def test_send_and_send_ack_skip_construct() -> None:
    send = frame_from_json(VALID_SENDS[0])
    ack = frame_from_json(VALID_ACKS[0])
    payload = bytes.fromhex(VALID_SENDS[0]["hex"])[LENGTH_PREFIX_SIZE:]
    # the module-level functions are the server's (session.py imports them)
    assert improto.codec.decode_payload(payload) == send
    assert improto.codec.decode(struct.pack(">I", len(payload)) + payload) == send
    assert improto.codec.encode(ack).hex() == VALID_ACKS[0]["hex"]
    assert improto.codec.encode_payload(ack).hex() == VALID_ACKS[0]["hex"][8:]
    # ... and the patch does reach the construct path: the reference takes it
    with pytest.raises(AssertionError, match="construct path taken"):
        REFERENCE.decode_payload(payload)
    with pytest.raises(AssertionError, match="construct path taken"):
        REFERENCE.encode(ack)


@pytest.mark.usefixtures("no_construct_path")
def test_refused_input_takes_the_construct_path() -> None:
    payload = bytes.fromhex(VALID_SENDS[0]["hex"])[LENGTH_PREFIX_SIZE:]
    with pytest.raises(AssertionError, match="construct path taken"):
        COMPILED.decode_payload(payload + b"\x00")
    ack = frame_from_json(VALID_ACKS[0])
    assert isinstance(ack, SendAck)
    with pytest.raises(AssertionError, match="construct path taken"):
        COMPILED.encode(replace(ack, server_time=-1))


def test_which_codecs_take_the_shortcuts() -> None:
    assert COMPILED.fast_paths
    assert Codec().fast_paths
    assert not REFERENCE.fast_paths
    assert not INTERPRETED.fast_paths
    assert not Codec(compiled=False).fast_paths
    assert improto.codec.decode_payload.__self__ is COMPILED
    assert improto.codec.encode.__self__ is COMPILED


def test_the_server_uses_the_shortcut_codec() -> None:
    from improto_server import session

    assert session.decode_payload.__self__ is COMPILED
    assert session.encode.__self__ is COMPILED


# ----------------------------------------------------------- the layouts read off construct


def test_layouts_are_the_specs() -> None:
    """PROTOCOL.md sections 3 and 7: header, then SEND's and SEND_ACK's fields."""
    # construct spells u32 "L"; with ">" it is "I" (standard sizes)
    send = fast_frames.flat_layout(FrameType.SEND, Send)
    assert send.struct.format.replace("L", "I") == ">BBBI16sBQHH"
    assert send.fixed_bytes == {"client_msg_id": 16}
    assert send.tail is not None
    assert (send.tail.lo, send.tail.hi) == (0, MAX_BODY)
    ack = fast_frames.flat_layout(FrameType.SEND_ACK, SendAck)
    assert ack.struct.format.replace("L", "I") == ">BBBI16sQQB"
    assert ack.fixed_bytes == {"client_msg_id": 16}
    assert ack.tail is None


def test_layouts_that_do_not_fit_are_refused() -> None:
    with pytest.raises(TypeError, match="does not fit"):
        fast_frames.flat_layout(FrameType.HELLO, Hello)  # strings
    with pytest.raises(TypeError, match="do not match"):
        fast_frames.flat_layout(FrameType.SEND, SendAck)
