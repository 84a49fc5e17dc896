"""Pure encode/decode of frames (v1 and the post-v1 frames of spec 18-20): bytes in, typed
frames out, no I/O.

Decoding checks, in this order: length prefix, header length, version, frame type, body
layout (truncation, trailing bytes, string bounds, UTF-8), then the spec's value ranges
(`Frame.validate`). Anything wrong raises a `ProtocolError` subclass carrying the wire
error code; a frame that decodes re-encodes to exactly the same bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import fields
from io import BytesIO
from typing import IO, Any, TypeAlias, TypeVar

from construct import ConstructError, Container

from improto.enums import FrameType
from improto.errors import (
    EncodeError,
    FrameTooLarge,
    MalformedFrame,
    ProtocolError,
    UnknownFrameType,
    UnsupportedVersion,
)
from improto.fast_frames import DECODERS as FAST_DECODERS
from improto.fast_frames import ENCODERS as FAST_ENCODERS
from improto.frames import (
    FRAME_CLASSES,
    ConvEntry,
    Frame,
    GroupSummary,
    Message,
    Push,
    TimelineHead,
    UnreadCount,
)
from improto.limits import HEADER_SIZE, LENGTH_PREFIX_SIZE, MAX_FRAME_LENGTH, PROTOCOL_VERSION
from improto.schema import FRAME, compiled_frame_struct, frame_struct

_LENGTH = struct.Struct(">I")
_REQUEST_ID = struct.Struct(">I")

# Fields whose wire value is a list of records, and the record class of its entries.
Record: TypeAlias = Message | UnreadCount | GroupSummary | ConvEntry | TimelineHead
R = TypeVar("R", Message, UnreadCount, GroupSummary, ConvEntry, TimelineHead)

# A parsed frame or record: field name -> value (construct's Container, or a plain dict).
Wire: TypeAlias = Mapping[str, Any]

_RECORDS: dict[str, type[Record]] = {
    "messages": Message,
    "unread": UnreadCount,
    "groups": GroupSummary,
    "convs": ConvEntry,
    "heads": TimelineHead,
}
_RECORD_FIELDS: dict[type[Record], tuple[str, ...]] = {
    cls: tuple(f.name for f in fields(cls))
    for cls in (Message, UnreadCount, GroupSummary, ConvEntry, TimelineHead)
}
# Plain lists of integers: the dataclasses hold them as tuples.
_INT_LISTS = frozenset({"members", "features", "msg_ids", "held"})


def _record(cls: type[R], c: Wire) -> R:
    values = [c[n] for n in _RECORD_FIELDS[cls]]
    if cls is ConvEntry:  # the one record holding records: its `last` message
        values[-1] = tuple([_record(Message, m) for m in values[-1]])
    return cls(*values)


def _record_dict(rec: Record) -> dict[str, Any]:
    d = {n: getattr(rec, n) for n in _RECORD_FIELDS[type(rec)]}
    if isinstance(rec, ConvEntry):
        d["last"] = [_record_dict(m) for m in rec.last]
    return d


def _field_converters(cls: type[Frame]) -> tuple[tuple[str, Callable[[Any], Any] | None], ...]:
    """Per body field: how a parsed value becomes the dataclass value (None: as is)."""
    out: list[tuple[str, Callable[[Any], Any] | None]] = []
    for f in fields(cls):
        name = f.name
        if name in ("request_id", "flags"):
            continue
        conv: Callable[[Any], Any] | None = None
        if name in _RECORDS:
            rcls = _RECORDS[name]
            conv = lambda v, rcls=rcls: tuple([_record(rcls, x) for x in v])  # noqa: E731
        elif name in _INT_LISTS:
            conv = tuple
        out.append((name, conv))
    return tuple(out)


_CONVERTERS = {cls: _field_converters(cls) for cls in FRAME_CLASSES.values()}
_BODY_FIELDS = {cls: tuple(n for n, _ in convs) for cls, convs in _CONVERTERS.items()}


def _from_wire(cls: type[Frame], c: Wire, request_id: int, flags: int) -> Frame:
    if cls is Push:  # the record's fields are inline in PUSH
        return Push(_record(Message, c), request_id=request_id, flags=flags)
    kw = {n: (c[n] if conv is None else conv(c[n])) for n, conv in _CONVERTERS[cls]}
    return cls(**kw, request_id=request_id, flags=flags)


def _to_wire(frame: Frame) -> dict[str, Any]:
    d: dict[str, Any] = {
        "version": PROTOCOL_VERSION,
        "type": frame.TYPE.value,
        "flags": frame.flags,
        "request_id": frame.request_id,
    }
    for n in _BODY_FIELDS[type(frame)]:
        v = getattr(frame, n)
        if n == "message":
            d.update(_record_dict(v))
            continue
        if n in _RECORDS:
            v = [_record_dict(x) for x in v]
        d[n] = v
    return d


def check_header(payload: bytes) -> tuple[type[Frame], int]:
    """Validate the fixed header; return the frame class and request id."""
    if len(payload) < HEADER_SIZE:
        raise MalformedFrame(f"frame of {len(payload)} bytes is shorter than the header")
    (request_id,) = _REQUEST_ID.unpack_from(payload, 3)
    if payload[0] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"protocol version {payload[0]} is not supported", request_id)
    cls = FRAME_CLASSES.get(payload[1])
    if cls is None:
        raise UnknownFrameType(f"unknown frame type 0x{payload[1]:02x}", request_id)
    return cls, request_id


# construct's generated code reads `_params`, `_index` and `_` from the context it is given.
def _context() -> dict[str, Any]:
    return {"_params": None, "_index": None, "_": {}}


def _direct_parser(
    parseall: Callable[[IO[bytes], dict[str, Any]], Container],
) -> Callable[[bytes], Container]:
    """Call the generated parser directly: Compiled.parse sets up a full context per call."""

    def parse(payload: bytes) -> Container:
        return parseall(BytesIO(payload), _context())

    return parse


def _direct_builder(
    buildall: Callable[[Wire, IO[bytes], dict[str, Any]], object],
) -> Callable[[Wire], bytes]:
    def build(obj: Wire) -> bytes:
        out = BytesIO()
        buildall(obj, out, _context())
        return out.getvalue()

    return build


class Codec:
    """Encoder/decoder over the construct schema, compiled (fast) or interpreted (reference).

    `fast_paths` (default: when compiled) also decodes SEND and encodes SEND_ACK with the
    `struct` shortcuts of `improto.fast_frames`; whatever they do not accept takes the
    construct path, which stays the reference (`REFERENCE`: compiled, no shortcuts).
    """

    def __init__(self, compiled: bool = True, fast_paths: bool | None = None) -> None:
        self.compiled = compiled
        self.fast_paths = compiled if fast_paths is None else fast_paths
        self._fast_decoders = dict(FAST_DECODERS) if self.fast_paths else {}
        self._fast_encoders = dict(FAST_ENCODERS) if self.fast_paths else {}
        self._parsers: dict[type[Frame], Callable[[bytes], Container]] = {}
        self._builders: dict[type[Frame], Callable[[Wire], bytes]] = {}
        for code, cls in FRAME_CLASSES.items():
            if compiled:
                module = compiled_frame_struct(FrameType(code)).compile().module
                self._parsers[cls] = _direct_parser(module.parseall)
                self._builders[cls] = _direct_builder(module.buildall)
            else:
                st = frame_struct(FrameType(code))
                self._parsers[cls] = st.parse
                self._builders[cls] = st.build

    def decode_payload(self, payload: bytes) -> Frame:
        """Decode the bytes after the length prefix (what a framing receiver hands over)."""
        # A shortcut checks the header itself; whatever it leaves takes the whole path below.
        if len(payload) > 1 and (fast := self._fast_decoders.get(payload[1])) is not None:
            frame = fast(payload)
            if frame is not None:
                return frame
        cls, request_id = check_header(payload)
        try:
            if self.compiled:
                c = self._parsers[cls](payload)
                body = c
            else:
                c = FRAME.parse(payload)
                body = c["body"]
            frame = _from_wire(cls, body, request_id, c["flags"])
            frame.validate()
        except ProtocolError as e:
            e.request_id = request_id
            raise
        except (ConstructError, struct.error) as e:
            raise MalformedFrame(
                f"{cls.TYPE.name}: body does not match layout ({e})", request_id
            ) from None
        return frame

    def decode(self, data: bytes) -> Frame:
        """Decode exactly one whole frame, length prefix included."""
        if len(data) < LENGTH_PREFIX_SIZE:
            raise MalformedFrame("shorter than the length prefix")
        (length,) = _LENGTH.unpack_from(data)
        if length > MAX_FRAME_LENGTH:
            raise FrameTooLarge(f"length {length} exceeds {MAX_FRAME_LENGTH}")
        if length != len(data) - LENGTH_PREFIX_SIZE:
            raise MalformedFrame(
                f"length prefix says {length} bytes, {len(data) - LENGTH_PREFIX_SIZE} follow"
            )
        return self.decode_payload(data[LENGTH_PREFIX_SIZE:])

    def encode_payload(self, frame: Frame) -> bytes:
        """Encode a frame without its length prefix."""
        fast = self._fast_encoders.get(type(frame))
        if fast is not None and (data := fast(frame)) is not None:
            return data[LENGTH_PREFIX_SIZE:]
        return self._build_payload(frame)

    def _build_payload(self, frame: Frame) -> bytes:
        """The construct path of `encode_payload`."""
        frame.validate()
        if not 0 <= frame.request_id <= 0xFFFFFFFF or not 0 <= frame.flags <= 0xFF:
            raise EncodeError("request_id or flags out of range")
        try:
            payload: bytes = self._builders[type(frame)](_to_wire(frame))
        except ProtocolError:
            raise
        except (ConstructError, struct.error, TypeError, AttributeError, UnicodeError) as e:
            raise EncodeError(f"{frame.TYPE.name}: cannot encode ({e})") from None
        if len(payload) > MAX_FRAME_LENGTH:
            raise EncodeError(f"{frame.TYPE.name}: {len(payload)} bytes exceed {MAX_FRAME_LENGTH}")
        return payload

    def encode(self, frame: Frame) -> bytes:
        """Encode a frame with its 4-byte length prefix, ready to write to a socket."""
        fast = self._fast_encoders.get(type(frame))
        if fast is not None and (data := fast(frame)) is not None:
            return data
        payload = self._build_payload(frame)
        return _LENGTH.pack(len(payload)) + payload


class FrameReader:
    """Splits a byte stream into frame payloads; refuses an oversize length before buffering."""

    def __init__(self, max_length: int = MAX_FRAME_LENGTH) -> None:
        self.max_length = max_length
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= LENGTH_PREFIX_SIZE:
            (length,) = _LENGTH.unpack_from(self._buf)
            if length > self.max_length:
                err = FrameTooLarge(f"length {length} exceeds {self.max_length}")
                err.frames = out  # complete frames that arrived before the oversize one
                raise err
            end = LENGTH_PREFIX_SIZE + length
            if len(self._buf) < end:
                break
            out.append(bytes(self._buf[LENGTH_PREFIX_SIZE:end]))
            del self._buf[:end]
        return out

    @property
    def buffered(self) -> int:
        return len(self._buf)


COMPILED = Codec(compiled=True)  # with the struct shortcuts: what the server uses
INTERPRETED = Codec(compiled=False)
REFERENCE = Codec(compiled=True, fast_paths=False)  # the construct path only

encode = COMPILED.encode
decode = COMPILED.decode
encode_payload = COMPILED.encode_payload
decode_payload = COMPILED.decode_payload
