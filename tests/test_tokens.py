"""Login token verification (spec section 8.2): exact claim types, the order of checks, and
that verify() raises nothing but TokenError, whatever the token holds."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from improto.limits import U64_MAX
from improto.tokens import (
    CLOCK_LEEWAY_S,
    MAX_TOKEN_LIFETIME_S,
    Identity,
    TokenError,
    mint,
    verify,
)

SECRET = "token-test-secret-0123456789abcdef0123456789"
NOW = 1_800_000_000
DEV = "phone"
EXP = NOW + 3600
HEADER = '{"alg":"HS256","typ":"JWT"}'


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def sign(header: str, payload: str, secret: str = SECRET) -> str:
    """A JWS built by hand: PyJWT refuses to encode some of these payloads (NaN, 1e400)."""
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def token(claims: dict[str, Any] | None = None, **override: Any) -> str:
    body = {"sub": "7", "dev": DEV, "exp": EXP} if claims is None else dict(claims)
    body.update(override)
    body = {k: v for k, v in body.items() if v is not ...}  # ...: drop the claim
    return sign(HEADER, json.dumps(body, allow_nan=True))


def refused(tok: str, device: str = DEV, now: float = NOW) -> TokenError:
    with pytest.raises(TokenError) as info:
        verify(SECRET, tok, device, now=now)
    return info.value


def auth_failed(tok: str, device: str = DEV, now: float = NOW) -> None:
    err = refused(tok, device, now)
    assert not err.expired, f"{err} should be AUTH_FAILED, not TOKEN_EXPIRED"


def test_a_good_token() -> None:
    assert verify(SECRET, token(), DEV, now=NOW) == Identity(7, DEV, float(EXP))
    assert verify(SECRET, mint(SECRET, U64_MAX, DEV, now=NOW), DEV, now=NOW).user_id == U64_MAX
    assert verify(SECRET, token(sub="1"), DEV, now=NOW).user_id == 1


# The table: other Unicode digits, superscripts, non-finite and huge exp.
@pytest.mark.parametrize(
    "sub",
    ["\uff15", "\u0665", "\u0667", "²", "0", "-1", "+7", " 7", "7 ", "7\n", "07", "1_0", "1e3",
     "0x7", "", str(U64_MAX + 1), "18446744073709551616", "9" * 21, "9" * 5000],
)  # fmt: skip
def test_sub_must_be_ascii_decimal_in_range(sub: str) -> None:
    auth_failed(token(sub=sub))


@pytest.mark.parametrize("sub", [7, 7.0, True, None, ["7"], {"id": "7"}, ...])
def test_sub_must_be_a_string(sub: Any) -> None:
    auth_failed(token(sub=sub))


@pytest.mark.parametrize(
    "exp",
    ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400, f"{EXP}.0", f"{EXP}.5",
     f"{EXP}e0", "true", "false", "null", f'"{EXP}"', f"[{EXP}]", '"²"'],
)  # fmt: skip
def test_exp_must_be_a_finite_integer(exp: str) -> None:
    auth_failed(sign(HEADER, f'{{"sub":"7","dev":"{DEV}","exp":{exp}}}'))


def test_exp_is_required() -> None:
    auth_failed(token(exp=...))


def test_exp_within_the_maximum_lifetime() -> None:
    furthest = NOW + MAX_TOKEN_LIFETIME_S + CLOCK_LEEWAY_S
    assert verify(SECRET, token(exp=furthest), DEV, now=NOW).expires_at == furthest
    auth_failed(token(exp=furthest + 1))
    auth_failed(token(exp=10**400))
    # The bound is a parameter too.
    with pytest.raises(TokenError):
        verify(SECRET, token(exp=NOW + 100), DEV, now=NOW, max_lifetime_s=60, leeway_s=0)


def test_expiry_has_no_leeway_and_is_the_last_check() -> None:
    assert verify(SECRET, token(exp=NOW + 1), DEV, now=NOW).expires_at == NOW + 1
    for exp in (NOW, NOW - 1, 0, -(10**400)):
        assert refused(token(exp=exp)).expired, exp
    # An expired token with anything else wrong is AUTH_FAILED: only a genuine, otherwise
    # acceptable token is TOKEN_EXPIRED.
    old = NOW - 10
    auth_failed(sign(HEADER, json.dumps({"sub": "7", "dev": DEV, "exp": old}), "other-secret"))
    auth_failed(token(exp=old), device="tablet")
    auth_failed(token(exp=old, sub="\uff15"))
    auth_failed(token(exp=old, dev=...))
    auth_failed(token(exp=old, aud="x"))


@pytest.mark.parametrize("dev", ["tablet", "", "x" * 65, "é" * 33, "\ud800", 5, None, ...])
def test_dev_must_be_the_hello_device(dev: Any) -> None:
    auth_failed(token(dev=dev))


def test_dev_of_64_bytes() -> None:
    dev = "é" * 32
    assert verify(SECRET, token(dev=dev), dev, now=NOW).device_id == dev


def test_nbf_honoured_with_leeway() -> None:
    assert verify(SECRET, token(nbf=NOW + CLOCK_LEEWAY_S), DEV, now=NOW).user_id == 7
    auth_failed(token(nbf=NOW + CLOCK_LEEWAY_S + 1))
    for nbf in (float(NOW), "1", None, True, math.inf):
        auth_failed(token(nbf=nbf))


def test_other_claims() -> None:
    auth_failed(token(aud="improto"))  # RFC 7519 4.1.3: not our audience
    extra: dict[str, Any] = {"iat": "whenever", "iss": 5, "jti": None, "x": [1.5, {"y": 10**400}]}
    assert verify(SECRET, token(**extra), DEV, now=NOW).user_id == 7
    auth_failed(token(x=[{"y": math.nan}]))  # NaN is not JSON, wherever it is


def test_duplicate_claims_are_refused() -> None:
    auth_failed(sign(HEADER, f'{{"sub":"7","sub":"8","dev":"{DEV}","exp":{EXP}}}'))
    auth_failed(sign(HEADER, f'{{"sub":"7","dev":"{DEV}","exp":{EXP},"exp":{EXP + 1}}}'))


@pytest.mark.parametrize(
    "header",
    ['{"alg":"HS512"}', '{"alg":"none"}', '{"alg":"hs256"}', '{"typ":"JWT"}', '{"alg":["HS256"]}',
     '{"alg":"HS256","crit":["exp"]}', '{"alg":"HS256","alg":"HS256"}', '["HS256"]', "HS256",
     '{"alg":NaN}', ""],
)  # fmt: skip
def test_header_must_say_hs256(header: str) -> None:
    auth_failed(sign(header, json.dumps({"sub": "7", "dev": DEV, "exp": EXP})))


def test_payload_must_be_a_json_object() -> None:
    for payload in ("[1]", '"x"', "7", "", "{", "\ufeff{}", "[" * 3000 + "]" * 3000):
        auth_failed(sign(HEADER, payload))
    not_utf8 = b64(b"\xff{}")
    signing_input = f"{b64(HEADER.encode())}.{not_utf8}"
    mac = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    auth_failed(f"{signing_input}.{b64(mac)}")


def test_signature_and_shape() -> None:
    good = token()
    head, body, sig = good.split(".")
    assert "_" in sig  # so that the standard alphabet's "/" makes a difference below
    other = sign(HEADER, json.dumps({"sub": "8", "dev": DEV, "exp": EXP}))
    for bad in [
        "", "not-a-jwt", "a.b", "a.b.c.d", good + ".", f"{head}.{body}.", f"{head}.{body}",
        f"{head}.{body}.{sig}=", f"{head}=.{body}.{sig}", f"{head}.{body}.{sig[:-1]}",
        f"{head}.{other.split('.')[1]}.{sig}", f" {good}", f"{good} ", f"{good}\u0660",
        f"{head}.{body}.{sig.replace('_', '/')}",
        sign(HEADER, json.dumps({"sub": "7", "dev": DEV, "exp": EXP}), SECRET + "x"),
    ]:  # fmt: skip
        auth_failed(bad)


def test_non_canonical_base64_is_refused() -> None:
    head, body, sig = token().split(".")
    # The last character of a segment carries unused low bits: setting them gives the same
    # bytes under a lenient decoder, but is not the encoding the signer produced.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    last = alphabet.index(sig[-1])
    tweaked = sig[:-1] + alphabet[last | 1 if last % 2 == 0 else last & ~1]
    assert base64.urlsafe_b64decode(tweaked + "=") == base64.urlsafe_b64decode(sig + "=")
    auth_failed(f"{head}.{body}.{tweaked}")


# ------------------------------------------------------------------------------ fuzzing

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
subs = st.one_of(
    st.integers(-5, U64_MAX + 5).map(str),
    st.text(alphabet=st.characters(categories=("Nd", "No", "Nl")), max_size=22),
    st.text(max_size=22),
    json_values,
)
exps = st.one_of(
    st.integers(NOW - 10, NOW + MAX_TOKEN_LIFETIME_S + 100),
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),
    json_values,
)
FUZZ = settings(deadline=None, max_examples=400, suppress_health_check=[HealthCheck.too_slow])


def check(tok: str, claims: dict[str, Any] | None = None) -> None:
    """verify() either accepts with exact claims or raises TokenError: nothing else."""
    try:
        ident = verify(SECRET, tok, DEV, now=NOW)
    except TokenError:
        return
    assert claims is not None, "an unsigned or mangled token was accepted"
    sub, exp = claims["sub"], claims["exp"]
    assert type(sub) is str and sub.isascii() and str(ident.user_id) == sub
    assert 1 <= ident.user_id <= U64_MAX
    assert type(exp) is int and NOW < exp <= NOW + MAX_TOKEN_LIFETIME_S + CLOCK_LEEWAY_S
    assert ident.expires_at == exp and ident.device_id == DEV == claims["dev"]


@FUZZ
@given(sub=subs, exp=exps, dev=st.one_of(st.just(DEV), json_values), extra=json_values)
@example(sub="\uff15", exp=EXP, dev=DEV, extra=None)
@example(sub="²", exp=EXP, dev=DEV, extra=None)
@example(sub="7", exp=math.nan, dev=DEV, extra=None)
@example(sub="7", exp=math.inf, dev=DEV, extra=None)
@example(sub="7", exp=10**400, dev=DEV, extra=None)
def test_fuzz_signed_claims(sub: Any, exp: Any, dev: Any, extra: Any) -> None:
    claims = {"sub": sub, "dev": dev, "exp": exp, "x": extra}
    check(sign(HEADER, json.dumps(claims, allow_nan=True)), claims)


@FUZZ
@given(payload=st.text(max_size=300), header=st.one_of(st.just(HEADER), st.text(max_size=40)))
def test_fuzz_signed_text(payload: str, header: str) -> None:
    check(sign(header, payload), _claims_or_none(payload))


@FUZZ
@given(st.text(max_size=400))
def test_fuzz_arbitrary_tokens(tok: str) -> None:
    check(tok)


@FUZZ
@given(st.data())
def test_fuzz_mangled_tokens(data: st.DataObject) -> None:
    good = token()
    i = data.draw(st.integers(0, len(good) - 1))
    ch = data.draw(st.characters().filter(lambda c: c != good[i]))
    check(good[:i] + ch + good[i + 1 :])


def _claims_or_none(payload: str) -> dict[str, Any] | None:
    try:
        value = json.loads(payload)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None
