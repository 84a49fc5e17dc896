"""Wire error codes and the typed exceptions the codec raises.

Every problem the codec can find maps to exactly one wire error code, so a server can
answer any decode failure with an ERROR frame without guessing.
"""

from __future__ import annotations

from enum import IntEnum


class ErrorCode(IntEnum):
    """The `code` field of an ERROR frame (spec/PROTOCOL.md, "Error codes")."""

    MALFORMED_FRAME = 100
    FRAME_TOO_LARGE = 101
    UNSUPPORTED_VERSION = 102
    UNKNOWN_FRAME_TYPE = 103
    INVALID_FIELD = 104
    BAD_UTF8 = 105
    NOT_AUTHENTICATED = 200
    AUTH_FAILED = 201
    TOKEN_EXPIRED = 202
    ALREADY_AUTHENTICATED = 203
    FORBIDDEN = 300
    NOT_FOUND = 301
    LIMIT_EXCEEDED = 302
    INTERNAL = 500
    UNAVAILABLE = 503
    RATE_LIMITED = 504  # 5xx: a client that does not know it retries later (spec 13.2)


# Codes after which the server closes the connection (spec: "Fatal errors").
FATAL_CODES = frozenset(
    {
        ErrorCode.FRAME_TOO_LARGE,
        ErrorCode.UNSUPPORTED_VERSION,
        ErrorCode.AUTH_FAILED,
        ErrorCode.TOKEN_EXPIRED,
    }
)


class ProtocolError(Exception):
    """Base of every codec error; `code` is the wire error code to answer with.

    `request_id` is the header's request id when the header could be read, else None,
    so that the ERROR frame can echo it.
    """

    code: ErrorCode = ErrorCode.MALFORMED_FRAME

    def __init__(self, message: str, request_id: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    @property
    def fatal(self) -> bool:
        return self.code in FATAL_CODES


class DecodeError(ProtocolError):
    """Bytes that are not a valid v1 frame."""


class MalformedFrame(DecodeError):
    """The bytes do not match the frame type's layout: truncated, padded, or too short."""

    code = ErrorCode.MALFORMED_FRAME


class FrameTooLarge(DecodeError):
    """The length prefix exceeds MAX_FRAME_LENGTH; raised before the body is buffered."""

    code = ErrorCode.FRAME_TOO_LARGE
    frames: list[bytes] = []  # noqa: RUF012  (FrameReader: whole frames read before this one)


class UnsupportedVersion(DecodeError):
    code = ErrorCode.UNSUPPORTED_VERSION


class UnknownFrameType(DecodeError):
    code = ErrorCode.UNKNOWN_FRAME_TYPE


class InvalidField(ProtocolError):
    """A field holds a value outside the range the spec allows (decode or encode)."""

    code = ErrorCode.INVALID_FIELD


class BadUtf8(ProtocolError):
    """A text field is not valid UTF-8."""

    code = ErrorCode.BAD_UTF8


class EncodeError(InvalidField):
    """A frame object cannot be encoded (a value does not fit its wire field)."""
