"""improto: the binary wire protocol of the improto IM server (spec/PROTOCOL.md)."""

from improto.codec import (
    COMPILED,
    INTERPRETED,
    Codec,
    FrameReader,
    decode,
    decode_payload,
    encode,
    encode_payload,
)
from improto.enums import ClientKind, CloseReason, ContentType, ConvKind, FrameType
from improto.errors import ErrorCode, ProtocolError

__all__ = [
    "COMPILED",
    "INTERPRETED",
    "ClientKind",
    "CloseReason",
    "Codec",
    "ContentType",
    "ConvKind",
    "ErrorCode",
    "FrameReader",
    "FrameType",
    "ProtocolError",
    "decode",
    "decode_payload",
    "encode",
    "encode_payload",
]
__version__ = "0.1.0"
