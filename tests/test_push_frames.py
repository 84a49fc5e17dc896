"""The push registration frames (spec section 19) in both codecs and in the independent spec
reader, the order of their checks (13.2), and the optional `iat` claim of login tokens (8.2)
that revocations compare with."""

from __future__ import annotations

import struct
import warnings

import jwt
import pytest

from improto.codec import COMPILED, INTERPRETED, Codec
from improto.enums import REQUEST_FEATURES, Feature, FrameType
from improto.errors import BadUtf8, EncodeError, InvalidField, MalformedFrame, ProtocolError
from improto.frames import PushRegister, PushRegisterOk, PushUnregister, PushUnregisterOk
from improto.limits import MAX_PLATFORM, MAX_PUSH_TOKEN
from improto.tokens import Identity, mint, verify
from tests import spec_reader

CODECS = [pytest.param(COMPILED, id="compiled"), pytest.param(INTERPRETED, id="interpreted")]


def _register(
    platform: bytes, token: bytes, options: int, rid: int = 9, pad: bytes = b"", cut: int = 0
) -> bytes:
    """PUSH_REGISTER by hand; `pad` bytes after the body, or its last `cut` bytes cut off
    (the length prefix consistent)."""
    body = struct.pack(">B", len(platform)) + platform + struct.pack(">H", len(token)) + token
    body = (body + struct.pack(">B", options) + pad)[: -cut or None]
    return struct.pack(">IBBBI", 7 + len(body), 1, 0x35, 0, rid) + body


def test_types_and_the_feature_that_enables_them() -> None:
    assert (FrameType.PUSH_REGISTER, FrameType.PUSH_UNREGISTER) == (0x35, 0x36)
    assert (FrameType.PUSH_REGISTER_OK, FrameType.PUSH_UNREGISTER_OK) == (0xB5, 0xB6)
    assert REQUEST_FEATURES[FrameType.PUSH_REGISTER] is Feature.PUSH
    assert REQUEST_FEATURES[FrameType.PUSH_UNREGISTER] is Feature.PUSH
    assert REQUEST_FEATURES[FrameType.CONV_HIDE] is Feature.CONVERSATIONS


@pytest.mark.parametrize("codec", CODECS)
def test_round_trip_and_layout(codec: Codec) -> None:
    f = PushRegister("apns", "t\u00e9", PushRegister.PREVIEW, request_id=9)
    data = codec.encode(f)
    assert data == _register(b"apns", "t\u00e9".encode(), 1)
    assert codec.decode(data) == f and f.preview
    assert not PushRegister("fcm", "t").preview
    longest = PushRegister("p" * MAX_PLATFORM, "t" * MAX_PUSH_TOKEN, request_id=1)
    assert codec.decode(codec.encode(longest)) == longest
    for empty in (PushRegisterOk(request_id=3), PushUnregister(request_id=4), PushUnregisterOk()):
        data = codec.encode(empty)
        assert len(data) == 11 and codec.decode(data) == empty


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(
    "frame",
    [
        PushRegister("", "t"),
        PushRegister("p" * (MAX_PLATFORM + 1), "t"),
        PushRegister("Apns", "t"),
        PushRegister("ap ns", "t"),
        PushRegister("apns\n", "t"),
        PushRegister("\u00e9", "t"),
        PushRegister("apns", ""),
        PushRegister("apns", "t" * (MAX_PUSH_TOKEN + 1)),
        PushRegister("apns", "t", 2),
        PushRegister("apns", "t", 0xFF),
    ],
)
def test_encoding_refuses_what_the_spec_refuses(codec: Codec, frame: PushRegister) -> None:
    with pytest.raises((InvalidField, EncodeError)):
        codec.encode(frame)


# Each case has one problem or two (13.2: structure before values, values in wire order).
CASES = [
    ("ok", _register(b"app.voip-1_x", b"\x00tok", 1), None),
    ("options_bit_7", _register(b"apns", b"t", 0x80), InvalidField),
    ("platform_dot_only_ok", _register(b".", b"t", 0), None),
    ("token_utf8_before_platform_chars", _register(b"APNS", b"\xff", 0), BadUtf8),
    ("platform_utf8_before_token_length", _register(b"\xff", b"", 0), BadUtf8),
    ("platform_chars_before_options", _register(b"AP", b"t", 4), InvalidField),
    ("token_length_before_truncation", _register(b"apns", b"t" * 4097, 0, cut=9), InvalidField),
    ("padding_before_values", _register(b"APNS", b"t", 2, pad=b"\x00"), MalformedFrame),
]


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize(("data", "error"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_decoding_order_matches_the_spec_reader(
    codec: Codec, data: bytes, error: type[ProtocolError] | None
) -> None:
    if error is None:
        assert codec.encode(codec.decode(data)) == data
        assert spec_reader.encode(spec_reader.decode(data)) == data
        return
    with pytest.raises(error) as info:
        codec.decode(data)
    assert info.value.request_id == 9
    with pytest.raises(spec_reader.SpecError) as spec:
        spec_reader.decode(data)
    assert spec.value.code == info.value.code


# ------------------------------------------------------------------- the iat claim

SECRET = "push-frames-test-secret-0123456789abcdef"
NOW = 1_800_000_000.0


def test_mint_adds_iat_and_verify_returns_it() -> None:
    ident = verify(SECRET, mint(SECRET, 7, "phone", ttl_s=60, now=NOW + 0.75), "phone", now=NOW)
    assert ident == Identity(7, "phone", NOW + 60, issued_at=NOW)  # whole seconds
    bare = mint(SECRET, 7, "phone", ttl_s=60, now=NOW, with_iat=False)
    assert "iat" not in jwt.decode(bare, SECRET, algorithms=["HS256"])
    assert verify(SECRET, bare, "phone", now=NOW).issued_at is None


@pytest.mark.parametrize("iat", ["1800000000", 1.8e9, True, None, [1]])
def test_an_iat_that_is_not_an_integer_is_no_issue_time(iat: object) -> None:
    """Such tokens were accepted before revocations existed, and still are; they count as
    issued before any revocation."""
    claims = {"sub": "7", "dev": "phone", "exp": int(NOW) + 60, "iat": iat}
    with warnings.catch_warnings():  # PyJWT checks iat's type when encoding some of these
        warnings.simplefilter("ignore")
        token = _unchecked_encode(claims)
    assert verify(SECRET, token, "phone", now=NOW).issued_at is None


def _unchecked_encode(claims: dict[str, object]) -> str:
    """An HS256 token whatever the claims hold (PyJWT's encode refuses some iat values)."""
    import base64
    import hashlib
    import hmac
    import json

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    head = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64(sig)}"
