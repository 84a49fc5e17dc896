"""Check spec/vectors with the independent reader of tests/spec_reader.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from spec_reader import ERROR_CODES, SpecError, decode, encode

VECTORS = Path(__file__).parent.parent / "spec" / "vectors"


def _load(name: str) -> list:
    return json.loads((VECTORS / name).read_text(encoding="utf-8"))


# Version 1 and the post-v1 frames of sections 18-20 (ext-*.json).
VALID = _load("valid.json") + _load("ext-valid.json")
INVALID = _load("invalid.json") + _load("ext-invalid.json")


def _ids(entries: list[dict]) -> list[str]:
    return [entry["name"] for entry in entries]


def test_vector_names_unique() -> None:
    for entries in (VALID, INVALID):
        names = _ids(entries)
        assert len(names) == len(set(names))


@pytest.mark.parametrize("entry", VALID, ids=_ids(VALID))
def test_decode_valid(entry: dict) -> None:
    got = decode(bytes.fromhex(entry["hex"]))
    assert got == {
        "type": entry["type"],
        "type_code": entry["type_code"],
        "request_id": entry["request_id"],
        "flags": entry["flags"],
        "fields": entry["fields"],
    }


@pytest.mark.parametrize("entry", VALID, ids=_ids(VALID))
def test_encode_valid(entry: dict) -> None:
    assert encode(entry).hex() == entry["hex"]


@pytest.mark.parametrize("entry", INVALID, ids=_ids(INVALID))
def test_decode_invalid(entry: dict) -> None:
    assert ERROR_CODES[entry["error"]] == entry["error_code"]
    with pytest.raises(SpecError) as info:
        decode(bytes.fromhex(entry["hex"]))
    assert info.value.code_name == entry["error"], info.value.detail


# ---------------------------------------------------------------------------------------------
# Readings of PROTOCOL.md that the vectors do not exercise. Each case writes down one
# interpretation (see the module docstring of spec_reader.py); None means "must decode".
# ---------------------------------------------------------------------------------------------

CMID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")


def _frame(type_code: int, body: bytes, request_id: int = 1) -> bytes:
    return struct.pack(">IBBBI", 7 + len(body), 1, type_code, 0, request_id) + body


def _message(
    *, msg_id: int = 77, conv_kind: int = 1, content_type: int = 1, body: bytes = b"hi"
) -> bytes:
    return (
        struct.pack(">QQQ", msg_id, 1764201600000, 1001)
        + b"\x03ios"
        + struct.pack(">BQH", conv_kind, 1002, content_type)
        + CMID
        + struct.pack(">H", len(body))
        + body
    )


def _hello(protocol_version: int, client_kind: int, device: bytes, token: bytes) -> bytes:
    body = struct.pack(">BBB", protocol_version, client_kind, len(device)) + device
    return _frame(0x01, body + struct.pack(">H", len(token)) + token)


def _send(content_type: int, body: bytes, conv_id: int = 1002, pad: bytes = b"") -> bytes:
    head = CMID + struct.pack(">BQH", 1, conv_id, content_type)
    return _frame(0x03, head + struct.pack(">H", len(body)) + body + pad)


EXTRA = [
    # Value ranges stated in section 6/7 but not covered by a vector.
    (
        "unread_count_0",
        _frame(0x85, bytes(8) + b"\0\0\0\0\0\x01\x02" + struct.pack(">QH", 5, 0)),
        "INVALID_FIELD",
    ),
    (
        "history_pull_conv_kind_3",
        _frame(0x07, b"\x03" + struct.pack(">QQB", 5, 0, 0)),
        "INVALID_FIELD",
    ),
    ("message_conv_kind_0", _frame(0xA0, _message(conv_kind=0), 0), "INVALID_FIELD"),
    (
        "group_event_body_bad_utf8",
        _frame(0xA0, _message(content_type=0, body=b"\xff"), 0),
        "BAD_UTF8",
    ),
    ("app_body_not_utf8_ok", _frame(0xA0, _message(content_type=2, body=b"\xff"), 0), None),
    ("text_body_above_10ffff", _send(1, b"\xf4\x90\x80\x80"), "BAD_UTF8"),
    ("bom_is_an_ordinary_character", _hello(1, 1, b"\xef\xbb\xbfd", b"t"), None),
    ("token_4097", _hello(1, 1, b"d", b"t" * 4097), "INVALID_FIELD"),
    (
        "group_add_1001_members",
        _frame(0x11, struct.pack(">QH", 5, 1001) + struct.pack(">Q", 9) * 1001),
        "INVALID_FIELD",
    ),
    (
        "group_list_name_129",
        _frame(0x94, struct.pack(">HQB", 1, 5, 129) + b"n" * 129),
        "INVALID_FIELD",
    ),
    (
        "owner_id_0_is_invalid",
        _frame(0x93, struct.pack(">QQB", 5, 0, 1) + b"n" + struct.pack(">H", 0)),
        "INVALID_FIELD",
    ),
    ("close_unknown_reason", _frame(0xA1, b"\x09\x00\x00", 0), None),
    ("error_unknown_code", _frame(0xFF, struct.pack(">HH", 999, 0), 0), None),
    ("push_request_id_not_0", _frame(0xA0, _message(), 5), None),
    (
        "length_max_is_not_too_large",
        struct.pack(">IBBBI", 131072, 1, 0x02, 0, 1) + bytes(131065),
        "MALFORMED_FRAME",
    ),
    # Check order (section 13.2); each case has two problems on purpose.
    ("order_prefix_range_before_truncation", _frame(0x01, b"\x01\x01\x41abc"), "INVALID_FIELD"),
    (
        "order_text_field_utf8_before_truncation",
        _frame(0x01, b"\x01\x01\x01\xff\x00\x09t"),
        "BAD_UTF8",
    ),
    ("order_padding_before_text_body", _send(1, b"\xff", pad=b"\0"), "MALFORMED_FRAME"),
    ("order_padding_before_values", _send(0, b"hi", pad=b"\0"), "MALFORMED_FRAME"),
    ("order_values_in_wire_order_hello", _hello(2, 9, b"d", b"t"), "UNSUPPORTED_VERSION"),
    ("order_values_in_wire_order_send", _send(1, b"\xff", conv_id=0), "INVALID_FIELD"),
    ("order_version_before_type", bytes.fromhex("0000000702000000000001"), "UNSUPPORTED_VERSION"),
]


@pytest.mark.parametrize(("frame", "error"), [c[1:] for c in EXTRA], ids=[c[0] for c in EXTRA])
def test_spec_reading(frame: bytes, error: str | None) -> None:
    if error is None:
        decoded = decode(frame)
        assert encode(decoded) == frame
    else:
        with pytest.raises(SpecError) as info:
            decode(frame)
        assert info.value.code_name == error, info.value.detail
