"""The committed test vectors (spec/vectors) against both codecs, and against their generator."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from improto import vectors
from improto.codec import COMPILED, INTERPRETED, Codec
from improto.enums import FrameType
from improto.errors import ErrorCode, ProtocolError
from improto.frames import FRAME_CLASSES
from improto.jsonform import frame_from_json, frame_to_json
from improto.limits import HEADER_SIZE, LENGTH_PREFIX_SIZE, PROTOCOL_VERSION

VECTOR_DIR = Path(__file__).resolve().parent.parent / "spec" / "vectors"


def _load(name: str) -> list[dict[str, Any]]:
    doc: list[dict[str, Any]] = json.loads((VECTOR_DIR / name).read_text(encoding="utf-8"))
    return doc


V1_VALID = _load("valid.json")
V1_INVALID = _load("invalid.json")
# The post-v1 frames (spec sections 18-20) have files of their own: the v1 files stay as they were.
EXT_VALID = _load("ext-valid.json")
EXT_INVALID = _load("ext-invalid.json")
VALID = V1_VALID + EXT_VALID
INVALID = V1_INVALID + EXT_INVALID
JSON_KEYS = ("type", "type_code", "request_id", "flags", "fields")

CODECS = [pytest.param(COMPILED, id="compiled"), pytest.param(INTERPRETED, id="interpreted")]
valid_vectors = pytest.mark.parametrize("vector", VALID, ids=[v["name"] for v in VALID])
invalid_vectors = pytest.mark.parametrize("vector", INVALID, ids=[v["name"] for v in INVALID])


def test_vector_files_are_not_empty_and_names_are_unique() -> None:
    assert VALID
    assert INVALID
    for doc in (VALID, INVALID):
        names = [v["name"] for v in doc]
        assert len(names) == len(set(names))


def test_every_frame_type_has_a_valid_vector() -> None:
    assert {v["type"] for v in VALID} == set(FrameType.__members__)
    assert {v["type_code"] for v in VALID} == set(FRAME_CLASSES)


def test_v1_files_hold_only_v1_frame_types() -> None:
    post_v1 = {t for t in FrameType if 0x30 <= t <= 0x38 or 0xA3 <= t <= 0xB8}
    assert {FrameType(v["type_code"]) for v in V1_VALID}.isdisjoint(post_v1)
    assert {FrameType(v["type_code"]) for v in EXT_VALID} == post_v1


# ------------------------------------------------------------------------------ valid


@valid_vectors
def test_valid_vector_header_matches_its_json(vector: dict[str, Any]) -> None:
    """Check the prefix and header bytes with plain `struct`, independently of the codec."""
    data = bytes.fromhex(vector["hex"])
    (length,) = struct.unpack_from(">I", data)
    assert length == len(data) - LENGTH_PREFIX_SIZE
    version, ftype, flags, request_id = struct.unpack_from(">BBBI", data, LENGTH_PREFIX_SIZE)
    assert len(data) >= LENGTH_PREFIX_SIZE + HEADER_SIZE
    assert version == PROTOCOL_VERSION
    assert ftype == vector["type_code"] == FrameType[vector["type"]].value
    assert flags == vector["flags"]
    assert request_id == vector["request_id"]


@pytest.mark.parametrize("codec", CODECS)
@valid_vectors
def test_valid_vector_decodes(codec: Codec, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    expected = frame_from_json(vector)
    frame = codec.decode(data)
    assert type(frame) is FRAME_CLASSES[vector["type_code"]]
    assert frame == expected
    # repr also tells bytes from bytearray and tuples from lists, which == does not.
    assert repr(frame) == repr(expected)
    assert codec.decode_payload(data[LENGTH_PREFIX_SIZE:]) == expected


@pytest.mark.parametrize("codec", CODECS)
@valid_vectors
def test_valid_vector_encodes(codec: Codec, vector: dict[str, Any]) -> None:
    frame = frame_from_json(vector)
    assert codec.encode(frame).hex() == vector["hex"]
    assert codec.encode_payload(frame).hex() == vector["hex"][2 * LENGTH_PREFIX_SIZE :]


@pytest.mark.parametrize("codec", CODECS)
@valid_vectors
def test_valid_vector_json_form(codec: Codec, vector: dict[str, Any]) -> None:
    frame = codec.decode(bytes.fromhex(vector["hex"]))
    as_json = frame_to_json(frame)
    assert as_json == {k: vector[k] for k in JSON_KEYS}
    # ... and the JSON form survives a real serialisation round trip.
    assert json.loads(json.dumps(as_json)) == as_json


# ---------------------------------------------------------------------------- invalid


@invalid_vectors
def test_invalid_vector_error_code_is_consistent(vector: dict[str, Any]) -> None:
    assert ErrorCode[vector["error"]].value == vector["error_code"]


@pytest.mark.parametrize("codec", CODECS)
@invalid_vectors
def test_invalid_vector_is_rejected(codec: Codec, vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    # Any exception that is not a ProtocolError escapes pytest.raises and fails the test.
    with pytest.raises(ProtocolError) as info:
        codec.decode(data)
    assert info.value.code.name == vector["error"]
    assert info.value.code.value == vector["error_code"]


@invalid_vectors
def test_invalid_vector_same_error_in_both_codecs(vector: dict[str, Any]) -> None:
    data = bytes.fromhex(vector["hex"])
    errors = []
    for codec in (COMPILED, INTERPRETED):
        with pytest.raises(ProtocolError) as info:
            codec.decode(data)
        errors.append((type(info.value), info.value.code, info.value.request_id))
    assert errors[0] == errors[1]


# ------------------------------------------------------------------------ no drift


def _normalise(doc: Any) -> Any:
    return json.loads(json.dumps(doc, ensure_ascii=False))


def test_committed_vectors_match_the_generator() -> None:
    valid, invalid = vectors.build()
    assert _normalise(valid) == V1_VALID
    assert _normalise(invalid) == V1_INVALID
    ext_valid, ext_invalid = vectors.build_ext()
    assert _normalise(ext_valid) == EXT_VALID
    assert _normalise(ext_invalid) == EXT_INVALID


def test_generator_writes_the_committed_files_byte_for_byte(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert vectors.main([str(tmp_path)]) == 0
    capsys.readouterr()
    for name in ("valid.json", "invalid.json", "ext-valid.json", "ext-invalid.json"):
        assert (tmp_path / name).read_bytes() == (VECTOR_DIR / name).read_bytes(), name
