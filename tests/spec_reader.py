"""Independent reader/writer for improto frames (version 1 and the post-v1 frames of sections
18, 19 and 20), written from spec/PROTOCOL.md alone.

Only the standard library (``struct``) is used; nothing is imported from the project.

``decode(data)`` takes exactly one whole frame (4-byte length prefix included) and returns
``{"type", "type_code", "request_id", "flags", "fields"}`` in the JSON form of
spec/vectors/README.md. ``encode(d)`` is the inverse. Invalid input raises
``SpecError(code_name)`` with a section-13 error name, in the check order of section 13.2:

1. length prefix (FRAME_TOO_LARGE, MALFORMED_FRAME; the input must hold exactly one frame);
2. header version (UNSUPPORTED_VERSION);
3. type (UNKNOWN_FRAME_TYPE);
4. structure, field by field in wire order: MALFORMED_FRAME when data runs out or is left
   over, INVALID_FIELD for a length/count prefix out of range, BAD_UTF8 for a text field;
5. values (INVALID_FIELD, UNSUPPORTED_VERSION for HELLO protocol_version, BAD_UTF8 for a
   text or group-event body). Within this step, problems are reported in wire order
   (an assumption: section 13.2 does not say how value problems are ordered among themselves).

Session and meaning checks (NOT_AUTHENTICATED, FORBIDDEN, ...) are out of scope for a codec.
The reader accepts every defined type in both directions (it does not know which side it is).
"""

from __future__ import annotations

import itertools
import struct

__all__ = ["ERROR_CODES", "MAX_FRAME_LENGTH", "TYPES", "SpecError", "decode", "encode"]

MAX_FRAME_LENGTH = 131072  # section 2: largest value of the u32 length prefix
HEADER_LENGTH = 7  # section 3: version u8, type u8, flags u8, request_id u32
U64_MAX = 2**64 - 1

# Section 13.1.
ERROR_CODES = {
    "MALFORMED_FRAME": 100,
    "FRAME_TOO_LARGE": 101,
    "UNSUPPORTED_VERSION": 102,
    "UNKNOWN_FRAME_TYPE": 103,
    "INVALID_FIELD": 104,
    "BAD_UTF8": 105,
    "NOT_AUTHENTICATED": 200,
    "AUTH_FAILED": 201,
    "TOKEN_EXPIRED": 202,
    "ALREADY_AUTHENTICATED": 203,
    "FORBIDDEN": 300,
    "NOT_FOUND": 301,
    "LIMIT_EXCEEDED": 302,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
}


class SpecError(Exception):
    """A frame the spec says must be refused; ``code_name`` is the section-13 name."""

    def __init__(self, code_name: str, detail: str = "") -> None:
        super().__init__(f"{code_name}: {detail}" if detail else code_name)
        self.code_name = code_name
        self.code = ERROR_CODES[code_name]
        self.detail = detail


# ---------------------------------------------------------------------------------------------
# Layouts. A field is a tuple (name, kind, *params). Kinds:
#   "u8" "u16" "u32" "u64"      plain unsigned integers (u64 in JSON as a decimal string)
#   "id"                        u64 in 1..2^64-1 (section 4), decimal string
#   "bool"                      u8 0/1 (section 4)
#   "enum8", allowed            u8 whose value must be in `allowed`
#   "range8"/"range16", lo, hi  u8/u16 whose value must be in lo..hi
#   "version8"                  HELLO protocol_version: must be 1, else UNSUPPORTED_VERSION
#   "raw16"                     bytes[16], lowercase hex
#   "str8"/"str16", lo, hi      length-prefixed UTF-8 text, byte count in lo..hi
#   "body"                      bytes16[0..65535], hex; must be UTF-8 if content_type is 0 or 1
#   "list", elem, lo, hi        list16 with element count in lo..hi; elem is "id", "u16" or
#                               a record
#   "taillist", elem, lo, hi    a "list" that may be left out as the frame's last field: no
#                               bytes left means [], and [] is written as no bytes (20.3)
#   "rule", check               no bytes: check(fields read so far) -> problem text or None,
#                               a value rule across fields (INVALID_FIELD)
# ---------------------------------------------------------------------------------------------

CONV_KINDS = frozenset({1, 2})  # 1 user, 2 group
CLIENT_KINDS = frozenset({0, 1, 2, 3, 4})  # section 7, HELLO
TEXT_CONTENT_TYPES = frozenset({0, 1})  # 0 group event (JSON, UTF-8), 1 text

# Section 6.
MESSAGE = (
    ("msg_id", "id"),
    ("server_time", "u64"),
    ("sender_id", "id"),
    ("sender_device", "str8", 1, 64),
    ("conv_kind", "enum8", CONV_KINDS),
    ("conv_id", "id"),
    ("content_type", "u16"),
    ("client_msg_id", "raw16"),
    ("body", "body"),
)
# Section 7, OFFLINE_PAGE.
UNREAD = (
    ("conv_kind", "enum8", CONV_KINDS),
    ("conv_id", "id"),
    ("count", "range16", 1, 0xFFFF),
)
# Section 7, GROUP_LIST.
GROUP = (
    ("group_id", "id"),
    ("name", "str8", 1, 128),
)


def _conv_rule(f: dict) -> str | None:
    """Section 18.6, CONV: groups have no peer read position; `last` is this conversation's."""
    if f["conv_kind"] == 2 and f["peer_read_id"] != "0":
        return "peer_read_id of a group"
    for m in f["last"]:
        ours = m["conv_id"] == f["conv_id"] or (
            f["conv_kind"] == 1 and m["sender_id"] == f["conv_id"]
        )
        if m["conv_kind"] != f["conv_kind"] or not ours:
            return "last message of another conversation"
    return None


def _notice_rule(f: dict) -> str | None:
    """Section 18.6, INBOX_NOTICE: to_cursor > from_cursor."""
    return None if int(f["to_cursor"]) > int(f["from_cursor"]) else "to_cursor <= from_cursor"


_PLATFORM_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-")


def _platform_rule(f: dict) -> str | None:
    """Section 19.2, PUSH_REGISTER: the platform is ASCII lowercase letters, digits, . _ -"""
    return None if set(f["platform"]) <= _PLATFORM_CHARS else "platform character not allowed"


def _options_rule(f: dict) -> str | None:
    """Section 19.2, PUSH_REGISTER: only options bit 0 (preview) is defined; others MUST be 0."""
    return None if f["options"] & 0xFE == 0 else "options bits other than bit 0"


def _read_seq_rule(f: dict) -> str | None:
    """Section 20.3, TIMELINE_HEAD: read_seq MUST NOT be above done."""
    return None if int(f["read_seq"]) <= int(f["done"]) else "read_seq above done"


def _heads_rule(f: dict) -> str | None:
    """Section 20.3, TIMELINE_HEADS_PAGE: heads in strictly ascending group_id."""
    ids = [int(h["group_id"]) for h in f["heads"]]
    return None if all(a < b for a, b in itertools.pairwise(ids)) else "heads not ascending"


def _position_rule(f: dict) -> str | None:
    """Section 20.3, TIMELINE_PAGE: position MUST NOT be above done."""
    return None if int(f["position"]) <= int(f["done"]) else "position above done"


def _held_rule(f: dict) -> str | None:
    """Section 20.3, TIMELINE_PULL: held msg_ids strictly ascending (so none repeated)."""
    ids = [int(i) for i in f["held"]]
    return None if all(a < b for a, b in itertools.pairwise(ids)) else "held not ascending"


def _timeline_messages_rule(f: dict) -> str | None:
    """Section 20.3, TIMELINE_PAGE: every message is of the group (conv_kind 2, conv_id)."""
    for m in f["messages"]:
        if m["conv_kind"] != 2 or m["conv_id"] != f["group_id"]:
            return "message of another conversation"
    return None


# Section 18.6.
CONV = (
    ("conv_kind", "enum8", CONV_KINDS),
    ("conv_id", "id"),
    ("version", "id"),
    ("hidden", "bool"),
    ("read_id", "u64"),
    ("peer_read_id", "u64"),
    ("unread", "u32"),
    ("last", "list", MESSAGE, 0, 1),
    ("", "rule", _conv_rule),
)
FEATURES = (("features", "list", "u16", 0, 32),)
CONV_PAGE = (
    ("list_version", "u64"),
    ("has_more", "bool"),
    ("total_unread", "u32"),
    ("convs", "list", CONV, 0, 100),
)
READ_POSITION = (("conv_kind", "enum8", CONV_KINDS), ("conv_id", "id"), ("msg_id", "id"))
# Section 20.3.
TIMELINE_HEAD = (
    ("group_id", "id"),
    ("done", "u64"),
    ("read_seq", "u64"),
    ("", "rule", _read_seq_rule),
    ("unread", "u32"),
    ("last_msg_id", "u64"),
)
CONV_REF = (("conv_kind", "enum8", CONV_KINDS), ("conv_id", "id"))

# Section 7: type code -> (name, body layout).
TYPES: dict[int, tuple[str, tuple]] = {
    0x01: (
        "HELLO",
        (
            ("protocol_version", "version8"),
            ("client_kind", "enum8", CLIENT_KINDS),
            ("device_id", "str8", 1, 64),
            ("token", "str16", 1, 4096),
        ),
    ),
    0x02: ("PING", ()),
    0x03: (
        "SEND",
        (
            ("client_msg_id", "raw16"),
            ("conv_kind", "enum8", CONV_KINDS),
            ("conv_id", "id"),
            ("content_type", "range16", 1, 0xFFFF),
            ("body", "body"),
        ),
    ),
    0x04: ("PUSH_ACK", (("msg_id", "id"),)),
    0x05: ("OFFLINE_PULL", (("cursor", "u64"), ("limit", "range16", 0, 200))),
    0x06: ("OFFLINE_ACK", (("cursor", "u64"),)),
    0x07: (
        "HISTORY_PULL",
        (
            ("conv_kind", "enum8", CONV_KINDS),
            ("conv_id", "id"),
            ("before_id", "u64"),
            ("limit", "range8", 0, 100),
        ),
    ),
    0x10: ("GROUP_CREATE", (("name", "str8", 1, 128), ("members", "list", "id", 0, 1000))),
    0x11: ("GROUP_ADD", (("group_id", "id"), ("members", "list", "id", 1, 1000))),
    0x12: ("GROUP_REMOVE", (("group_id", "id"), ("members", "list", "id", 1, 1000))),
    0x13: ("GROUP_MEMBERS", (("group_id", "id"),)),
    0x14: ("MY_GROUPS", ()),
    0x81: (
        "HELLO_OK",
        (
            ("user_id", "id"),
            ("server_time", "u64"),
            ("heartbeat_s", "u16"),
            ("idle_timeout_s", "u16"),
            ("max_frame", "u32"),
        ),
    ),
    0x82: ("PONG", (("server_time", "u64"),)),
    0x83: (
        "SEND_ACK",
        (
            ("client_msg_id", "raw16"),
            ("msg_id", "id"),
            ("server_time", "u64"),
            ("duplicate", "bool"),
        ),
    ),
    0x85: (
        "OFFLINE_PAGE",
        (
            ("cursor", "u64"),
            ("has_more", "bool"),
            ("gap", "bool"),
            ("messages", "list", MESSAGE, 0, 200),
            ("unread", "list", UNREAD, 0, 200),
        ),
    ),
    0x86: ("OFFLINE_ACK_OK", (("cursor", "u64"),)),
    0x87: (
        "HISTORY_PAGE",
        (
            ("conv_kind", "enum8", CONV_KINDS),
            ("conv_id", "id"),
            ("has_more", "bool"),
            ("messages", "list", MESSAGE, 0, 100),
        ),
    ),
    0x90: ("GROUP_CREATED", (("group_id", "id"),)),
    0x91: ("GROUP_ADD_OK", (("group_id", "id"), ("count", "u16"))),
    0x92: ("GROUP_REMOVE_OK", (("group_id", "id"), ("count", "u16"))),
    0x93: (
        "GROUP_MEMBER_LIST",
        (
            ("group_id", "id"),
            ("owner_id", "id"),
            ("name", "str8", 1, 128),
            ("members", "list", "id", 0, 10000),
        ),
    ),
    0x94: ("GROUP_LIST", (("groups", "list", GROUP, 0, 500),)),
    # PUSH: "The body is one MESSAGE record (section 6), nothing else."
    0xA0: ("PUSH", MESSAGE),
    # CLOSE reason: unknown reasons are treated like 2, so no value is refused.
    0xA1: ("CLOSE", (("reason", "u8"), ("text", "str16", 0, 1024))),
    0xA2: ("SYNC_HINT", ()),
    # ERROR code: unknown codes are treated by their hundred, so no value is refused.
    0xFF: ("ERROR", (("code", "u16"), ("text", "str16", 0, 1024))),
    # Section 18.6 (post-v1).
    0x30: ("FEATURES", FEATURES),
    0xB0: ("FEATURES_OK", FEATURES),
    0x31: ("CONV_LIST", (("before_id", "u64"), ("limit", "range8", 0, 100))),
    0x32: ("CONV_CHANGES", (("since_version", "u64"), ("limit", "range8", 0, 100))),
    0xB1: ("CONV_PAGE", CONV_PAGE),
    0xB2: ("CONV_CHANGES_PAGE", CONV_PAGE),
    0x33: ("READ_MARK", READ_POSITION),
    0xB3: ("READ_MARK_OK", READ_POSITION),
    0x34: ("CONV_HIDE", CONV_REF),
    0xB4: ("CONV_HIDE_OK", CONV_REF),
    0xA3: (
        "INBOX_NOTICE",
        (
            ("from_cursor", "u64"),
            ("to_cursor", "u64"),
            ("msg_ids", "list", "id", 1, 200),
            ("", "rule", _notice_rule),
        ),
    ),
    0xA4: (
        "READ_UPDATE",
        (
            ("reader_id", "id"),
            ("conv_kind", "enum8", CONV_KINDS),
            ("conv_id", "id"),
            ("msg_id", "id"),
        ),
    ),
    # Section 19.2 (post-v1).
    0x35: (
        "PUSH_REGISTER",
        (
            ("platform", "str8", 1, 32),
            ("", "rule", _platform_rule),
            ("token", "str16", 1, 4096),
            ("options", "u8"),
            ("", "rule", _options_rule),
        ),
    ),
    0xB5: ("PUSH_REGISTER_OK", ()),
    0x36: ("PUSH_UNREGISTER", ()),
    0xB6: ("PUSH_UNREGISTER_OK", ()),
    # Section 20.3 (post-v1).
    0x37: ("TIMELINE_HEADS", ()),
    0xB7: (
        "TIMELINE_HEADS_PAGE",
        (("heads", "list", TIMELINE_HEAD, 0, 500), ("", "rule", _heads_rule)),
    ),
    0x38: (
        "TIMELINE_PULL",
        (
            ("group_id", "id"),
            ("after_seq", "u64"),
            ("limit", "range16", 0, 200),
            ("held", "taillist", "id", 0, 1000),
            ("", "rule", _held_rule),
        ),
    ),
    0xB8: (
        "TIMELINE_PAGE",
        (
            ("group_id", "id"),
            ("position", "u64"),
            ("done", "u64"),
            ("", "rule", _position_rule),
            ("has_more", "bool"),
            ("messages", "list", MESSAGE, 0, 200),
            ("", "rule", _timeline_messages_rule),
        ),
    ),
}
TYPE_CODES = {name: code for code, (name, _layout) in TYPES.items()}

_INT_FORMATS = {
    "u8": ">B",
    "u16": ">H",
    "u32": ">I",
    "u64": ">Q",
    "id": ">Q",
    "bool": ">B",
    "enum8": ">B",
    "range8": ">B",
    "range16": ">H",
    "version8": ">B",
}
_U64_KINDS = frozenset({"u64", "id"})


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


class _Reader:
    """Reads a body field by field; value problems are collected, structural ones raised."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.problems: list[tuple[str, str]] = []  # (code name, detail), in wire order

    def take(self, n: int, what: str) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise SpecError("MALFORMED_FRAME", f"{what}: data runs out")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def unpack(self, fmt: str, what: str) -> int:
        (value,) = struct.unpack(fmt, self.take(struct.calcsize(fmt), what))
        return value

    def value_problem(self, code_name: str, detail: str) -> None:
        self.problems.append((code_name, detail))

    def text(self, fmt: str, lo: int, hi: int, what: str) -> str:
        n = self.unpack(fmt, what)
        if not lo <= n <= hi:
            raise SpecError("INVALID_FIELD", f"{what}: length {n} outside {lo}..{hi}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")  # strict: no overlongs, surrogates, > U+10FFFF
        except UnicodeDecodeError:
            raise SpecError("BAD_UTF8", what) from None

    def record(self, layout: tuple, where: str) -> dict:
        out: dict = {}
        for spec in layout:
            name, kind, *params = spec
            what = f"{where}{name}"
            if kind in _INT_FORMATS:
                value = self.unpack(_INT_FORMATS[kind], what)
                self.check_int(kind, params, value, what)
                out[name] = str(value) if kind in _U64_KINDS else value
            elif kind == "raw16":
                out[name] = self.take(16, what).hex()
            elif kind == "str8":
                out[name] = self.text(">B", params[0], params[1], what)
            elif kind == "str16":
                out[name] = self.text(">H", params[0], params[1], what)
            elif kind == "body":
                raw = self.take(self.unpack(">H", what), what)
                if out.get("content_type") in TEXT_CONTENT_TYPES:
                    try:
                        raw.decode("utf-8")
                    except UnicodeDecodeError:
                        self.value_problem("BAD_UTF8", f"{what}: text body")
                out[name] = raw.hex()
            elif kind == "taillist" and self.pos == len(self.data):
                out[name] = []
            elif kind in ("list", "taillist"):
                elem, lo, hi = params
                k = self.unpack(">H", what)
                if not lo <= k <= hi:
                    raise SpecError("INVALID_FIELD", f"{what}: count {k} outside {lo}..{hi}")
                items = []
                for i in range(k):
                    if elem == "id":
                        value = self.unpack(">Q", f"{what}[{i}]")
                        self.check_int("id", (), value, f"{what}[{i}]")
                        items.append(str(value))
                    elif elem == "u16":
                        items.append(self.unpack(">H", f"{what}[{i}]"))
                    else:
                        items.append(self.record(elem, f"{what}[{i}]."))
                out[name] = items
            elif kind == "rule":
                problem = params[0](out)
                if problem is not None:
                    self.value_problem("INVALID_FIELD", f"{where}{problem}")
            else:  # pragma: no cover - layout table error
                raise AssertionError(kind)
        return out

    def check_int(self, kind: str, params: list, value: int, what: str) -> None:
        if kind == "id" and value == 0:
            self.value_problem("INVALID_FIELD", f"{what}: id 0")
        elif kind == "bool" and value not in (0, 1):
            self.value_problem("INVALID_FIELD", f"{what}: bool {value}")
        elif kind == "enum8" and value not in params[0]:
            self.value_problem("INVALID_FIELD", f"{what}: value {value} undefined")
        elif kind in ("range8", "range16") and not params[0] <= value <= params[1]:
            self.value_problem("INVALID_FIELD", f"{what}: {value} outside {params[0]}..{params[1]}")
        elif kind == "version8" and value != 1:
            self.value_problem("UNSUPPORTED_VERSION", f"{what}: {value}")


def decode(data: bytes) -> dict:
    """Decode exactly one whole frame (length prefix included)."""
    data = bytes(data)
    # 1. Length prefix (section 2). FRAME_TOO_LARGE is decided on the 4 prefix bytes alone.
    if len(data) < 4:
        raise SpecError("MALFORMED_FRAME", "no complete length prefix")
    (length,) = struct.unpack_from(">I", data, 0)
    if length > MAX_FRAME_LENGTH:
        raise SpecError("FRAME_TOO_LARGE", f"length {length}")
    if length < HEADER_LENGTH:
        raise SpecError("MALFORMED_FRAME", f"length {length} cannot hold the header")
    if len(data) - 4 != length:
        raise SpecError("MALFORMED_FRAME", f"length {length} but {len(data) - 4} bytes follow")
    # 2. Header version, 3. type (section 3, section 7).
    version, type_code, flags, request_id = struct.unpack_from(">BBBI", data, 4)
    if version != 1:
        raise SpecError("UNSUPPORTED_VERSION", f"header version {version}")
    if type_code not in TYPES:
        raise SpecError("UNKNOWN_FRAME_TYPE", f"type 0x{type_code:02x}")
    name, layout = TYPES[type_code]
    # 4. Body structure field by field, then nothing may be left over.
    reader = _Reader(data[4 + HEADER_LENGTH :])
    fields = reader.record(layout, "")
    if reader.pos != len(reader.data):
        raise SpecError("MALFORMED_FRAME", f"{len(reader.data) - reader.pos} bytes left over")
    # 5. Values.
    if reader.problems:
        raise SpecError(*reader.problems[0])
    return {
        "type": name,
        "type_code": type_code,
        "request_id": request_id,
        "flags": flags,
        "fields": fields,
    }


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _pack_int(fmt: str, value: object, what: str) -> bytes:
    if isinstance(value, bool) or not isinstance(value, int):
        raise SpecError("INVALID_FIELD", f"{what}: not an integer: {value!r}")
    try:
        return struct.pack(fmt, value)
    except struct.error:
        raise SpecError("INVALID_FIELD", f"{what}: {value} does not fit {fmt}") from None


def _u64_from_json(value: object, what: str) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    raise SpecError("INVALID_FIELD", f"{what}: u64 must be a decimal string, got {value!r}")


def _encode_text(value: object, fmt: str, what: str) -> bytes:
    if not isinstance(value, str):
        raise SpecError("INVALID_FIELD", f"{what}: not a string")
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:
        raise SpecError("BAD_UTF8", what) from None
    return _pack_int(fmt, len(raw), what) + raw


def _encode_hex(value: object, what: str) -> bytes:
    if not isinstance(value, str) or value != value.lower():
        raise SpecError("INVALID_FIELD", f"{what}: bytes must be lowercase hex")
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise SpecError("INVALID_FIELD", f"{what}: bad hex") from None


def _encode_record(layout: tuple, values: dict, where: str) -> bytes:
    if not isinstance(values, dict):
        raise SpecError("INVALID_FIELD", f"{where}: not an object")
    expected = {spec[0] for spec in layout if spec[1] != "rule"}
    if set(values) != expected:
        raise SpecError("INVALID_FIELD", f"{where}: fields {sorted(values)} != {sorted(expected)}")
    out = bytearray()
    for spec in layout:
        name, kind, *params = spec
        if kind == "rule":  # checked by decode() at the end of encode()
            continue
        what = f"{where}{name}"
        value = values[name]
        if kind in _U64_KINDS:
            out += _pack_int(">Q", _u64_from_json(value, what), what)
        elif kind in _INT_FORMATS:
            out += _pack_int(_INT_FORMATS[kind], value, what)
        elif kind == "raw16":
            raw = _encode_hex(value, what)
            if len(raw) != 16:
                raise SpecError("INVALID_FIELD", f"{what}: {len(raw)} bytes, not 16")
            out += raw
        elif kind == "str8":
            out += _encode_text(value, ">B", what)
        elif kind == "str16":
            out += _encode_text(value, ">H", what)
        elif kind == "body":
            raw = _encode_hex(value, what)
            out += _pack_int(">H", len(raw), what) + raw
        elif kind in ("list", "taillist"):
            elem = params[0]
            if not isinstance(value, list):
                raise SpecError("INVALID_FIELD", f"{what}: not a list")
            if kind == "taillist" and not value:
                continue
            out += _pack_int(">H", len(value), what)
            for i, item in enumerate(value):
                if elem == "id":
                    out += _pack_int(">Q", _u64_from_json(item, f"{what}[{i}]"), what)
                elif elem == "u16":
                    out += _pack_int(">H", item, f"{what}[{i}]")
                else:
                    out += _encode_record(elem, item, f"{what}[{i}].")
        else:  # pragma: no cover - layout table error
            raise AssertionError(kind)
    return bytes(out)


def encode(d: dict) -> bytes:
    """Build a whole frame (length prefix included) from the decode() dict form.

    The result is checked with decode(), so encode() never returns a frame the spec refuses.
    ``flags`` is written as given (senders MUST send 0, but the vectors carry unknown flags).
    """
    name = d.get("type")
    type_code = d.get("type_code")
    if type_code is None:
        if name not in TYPE_CODES:
            raise SpecError("UNKNOWN_FRAME_TYPE", f"type {name!r}")
        type_code = TYPE_CODES[name]
    if type_code not in TYPES:
        raise SpecError("UNKNOWN_FRAME_TYPE", f"type code {type_code!r}")
    if name is not None and TYPES[type_code][0] != name:
        raise SpecError("UNKNOWN_FRAME_TYPE", f"type {name!r} != code 0x{type_code:02x}")
    layout = TYPES[type_code][1]
    body = _encode_record(layout, d.get("fields", {}), "")
    header = _pack_int(">B", 1, "version")
    header += _pack_int(">B", type_code, "type")
    header += _pack_int(">B", d.get("flags", 0), "flags")
    header += _pack_int(">I", d.get("request_id", 0), "request_id")
    length = len(header) + len(body)
    if length > MAX_FRAME_LENGTH:
        raise SpecError("FRAME_TOO_LARGE", f"length {length}")
    frame = struct.pack(">I", length) + header + body
    decode(frame)  # refuse to produce anything a receiver must refuse
    return frame
