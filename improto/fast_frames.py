"""`struct` shortcuts for the two frames on the server's hot path: decoding SEND and encoding
SEND_ACK.

The construct schema stays the one definition of the layouts: the `struct` formats here are
read off `schema.HEADER` and `schema.BODIES` at import (and the import fails if a layout no
longer fits one format). The codec's construct path stays the reference: each function here
returns None for anything it does not accept (wrong length, a value the spec refuses, an odd
type), and the codec then takes the construct path, so every error comes from there.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable
from typing import Any, NamedTuple

from construct import FormatField, Renamed

from improto.enums import FrameType
from improto.errors import ProtocolError
from improto.fields import Blob, FixedBytes
from improto.frames import Frame, Send, SendAck
from improto.limits import LENGTH_PREFIX_SIZE, PROTOCOL_VERSION
from improto.schema import BODIES, HEADER


class Layout(NamedTuple):
    """A frame's header and body as one `struct` format (network order)."""

    struct: struct.Struct
    fixed_bytes: dict[str, int]  # FixedBytes fields: name -> size
    tail: Blob | None  # a Blob as last field: its length prefix ends `struct`, its bytes follow


def flat_layout(frame_type: FrameType, cls: type[Frame]) -> Layout:
    """The layout of `frame_type` in the construct schema, if it is fixed-width integers and
    FixedBytes, optionally ending with one Blob; any other field raises TypeError. The field
    names must be the header's then `cls`'s, in order (the shortcuts rely on that order)."""
    fields = [*HEADER, *BODIES[frame_type]]
    fmt = ">"
    names: list[str] = []
    fixed: dict[str, int] = {}
    tail: Blob | None = None
    for i, f in enumerate(fields):
        sub = f.subcon if isinstance(f, Renamed) else None
        name = f.name or ""
        if isinstance(sub, FormatField) and sub.fmtstr[0] == ">":
            fmt += sub.fmtstr[1:]
        elif isinstance(sub, FixedBytes):
            fmt += f"{sub.size}s"
            fixed[name] = sub.size
        elif isinstance(sub, Blob) and i == len(fields) - 1:
            fmt += sub.prefix.format[1:]
            tail = sub
        else:
            raise TypeError(f"{frame_type.name}: field {name!r} does not fit one struct format")
        names.append(name)
    body = [f.name for f in dataclasses.fields(cls) if f.name not in ("request_id", "flags")]
    if names != ["version", "type", "flags", "request_id", *body]:
        raise TypeError(f"{frame_type.name}: schema fields {names} do not match {cls.__name__}")
    return Layout(struct.Struct(fmt), fixed, tail)


# ------------------------------------------------------------------------ SEND decoding

_SEND = flat_layout(FrameType.SEND, Send)
assert _SEND.tail is not None  # the body
_SEND_FIXED = _SEND.struct.size  # header + fixed fields + the body's length prefix
_SEND_UNPACK = _SEND.struct.unpack_from
_SEND_TYPE = int(FrameType.SEND)
_BODY_LO, _BODY_HI = _SEND.tail.lo, _SEND.tail.hi


def decode_send(payload: bytes) -> Send | None:
    """The SEND frame of `payload` (header + body), validated; None if the construct path has
    to decide (including every payload it refuses)."""
    # Exactly bytes: the reference gives bytes fields for any buffer; slices of others do not.
    if type(payload) is not bytes or len(payload) < _SEND_FIXED:
        return None
    version, ftype, flags, request_id, cmid, kind, conv_id, content_type, n = _SEND_UNPACK(payload)
    if (
        version != PROTOCOL_VERSION
        or ftype != _SEND_TYPE
        or len(payload) - _SEND_FIXED != n  # truncated or trailing bytes
        or not _BODY_LO <= n <= _BODY_HI
    ):
        return None
    frame = Send(
        cmid, kind, conv_id, content_type, payload[_SEND_FIXED:], request_id=request_id, flags=flags
    )
    try:
        frame.validate()
    except ProtocolError:
        return None  # the reference raises it again, with the header's request_id
    return frame


# ---------------------------------------------------------------------- SEND_ACK encoding

_ACK = flat_layout(FrameType.SEND_ACK, SendAck)
assert _ACK.tail is None
_ACK_PAYLOAD_SIZE = _ACK.struct.size
# The whole frame, length prefix first: one pack, no concatenation.
_ACK_PACK = struct.Struct(">I" + _ACK.struct.format[1:]).pack
assert LENGTH_PREFIX_SIZE == 4
_ACK_TYPE = int(FrameType.SEND_ACK)
_CMID_SIZE = _ACK.fixed_bytes["client_msg_id"]


def encode_send_ack(frame: SendAck) -> bytes | None:
    """The SEND_ACK frame as written to a socket (length prefix included); None if the
    construct path has to decide (including every frame it refuses)."""
    cmid = frame.client_msg_id
    # struct's "16s" pads or cuts other lengths, where the reference refuses them.
    if type(cmid) is not bytes or len(cmid) != _CMID_SIZE:
        return None
    try:
        frame.validate()
        # struct refuses what the reference's range checks refuse (ints out of their field).
        return _ACK_PACK(
            _ACK_PAYLOAD_SIZE,
            PROTOCOL_VERSION,
            _ACK_TYPE,
            frame.flags,
            frame.request_id,
            cmid,
            frame.msg_id,
            frame.server_time,
            frame.duplicate,
        )
    except Exception:
        return None  # any failure: the reference path raises its own error


# What the codec looks up: decoders by the header's type byte, encoders by frame class.
DECODERS: dict[int, Callable[[bytes], Frame | None]] = {_SEND_TYPE: decode_send}
ENCODERS: dict[type[Frame], Callable[[Any], bytes | None]] = {SendAck: encode_send_ack}
