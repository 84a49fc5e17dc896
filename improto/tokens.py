"""Login tokens as PROTOCOL.md section 8.2 defines them: HS256 JWTs with sub, dev and exp,
and an optional iat that a server compares with the user's revocation time.

verify() is a strict JWS/JWT reader of its own rather than PyJWT's decode: section 8.2 fixes
the claim types (exp an integer, sub ASCII digits) and the order of the checks, and every
malformed input must end as TokenError (AUTH_FAILED), never as another exception that drops
the connection without an ERROR. Nothing the sender controls is parsed before the signature
is checked, so only the identity system can reach the JSON parser.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import time
from dataclasses import dataclass
from typing import Any, NoReturn

import jwt

from improto.limits import MAX_DEVICE_ID, U64_MAX

ALGORITHM = "HS256"
# The longest validity a token may claim: exp more than this (plus CLOCK_LEEWAY_S) after the
# server's clock is AUTH_FAILED, so a leaked token, or one minted with a bogus exp, cannot
# stay valid for ever.
MAX_TOKEN_LIFETIME_S = 30 * 86400
# Clock skew tolerated between the identity system and the server, for nbf and for the
# lifetime bound. exp itself has none: a token is expired from exp on (section 8.2).
CLOCK_LEEWAY_S = 30

_SEGMENT = re.compile(r"[A-Za-z0-9_-]*")
_USER_ID = re.compile(r"[1-9][0-9]{0,19}")  # [0-9], not \d: no other Unicode digits


class TokenError(Exception):
    """The token is not acceptable; `expired` tells TOKEN_EXPIRED from AUTH_FAILED."""

    def __init__(self, message: str, expired: bool = False) -> None:
        super().__init__(message)
        self.expired = expired


@dataclass(frozen=True, slots=True)
class Identity:
    user_id: int
    device_id: str
    expires_at: float  # seconds since the Unix epoch
    # the `iat` claim (seconds since the Unix epoch) if the token has one as an integer, else
    # None: such a token counts as issued before any revocation (section 8.2)
    issued_at: float | None = None


def mint(secret: str, user_id: int, device_id: str, ttl_s: float = 86400.0,
         now: float | None = None, *, with_iat: bool = True) -> str:  # fmt: skip
    """A token for development and tests (production tokens come from the identity system).
    `with_iat`: carry the issue time (`iat`), so that a revocation older than it does not
    refuse the token (the test vectors' token has none: their bytes stay as they were)."""
    if not 1 <= user_id <= U64_MAX:
        raise ValueError("user id must be 1..2^64-1")
    issued = time.time() if now is None else now
    claims: dict[str, Any] = {"sub": str(user_id), "dev": device_id, "exp": int(issued + ttl_s)}
    if with_iat:
        claims["iat"] = int(issued)
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(
    secret: str,
    token: str,
    device_id: str,
    now: float | None = None,
    max_lifetime_s: float = MAX_TOKEN_LIFETIME_S,
    leeway_s: float = CLOCK_LEEWAY_S,
) -> Identity:
    """Check the token in the order of section 8.2; raise TokenError (and nothing else)."""
    # 1. Shape: three base64url segments. 2. The HMAC-SHA256 signature over the first two.
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        _refuse("not a JWS compact serialisation")
    head, body, sig = (_unbase64(p) for p in parts)
    signed = f"{parts[0]}.{parts[1]}".encode("ascii")
    mac = hmac.new(secret.encode(), signed, hashlib.sha256).digest()
    if not hmac.compare_digest(mac, sig):
        _refuse("bad signature")
    # 3. The header: alg HS256, and no critical extension we would have to understand.
    header = _json_object(head, "header")
    if header.get("alg") != ALGORITHM:
        _refuse("alg is not HS256")
    if "crit" in header:
        _refuse("unsupported crit header")
    # 4. The claims: types first, then their meaning, expiry last (only a token that is
    # genuine and otherwise acceptable is "expired").
    claims = _json_object(body, "payload")
    sub, dev, exp = claims.get("sub"), claims.get("dev"), claims.get("exp")
    if not isinstance(sub, str) or not _USER_ID.fullmatch(sub) or int(sub) > U64_MAX:
        _refuse("sub is not a user id")
    if not isinstance(dev, str) or not 1 <= _utf8_length(dev) <= MAX_DEVICE_ID:
        _refuse("dev claim missing or invalid")
    if type(exp) is not int:  # not bool, not float (so no NaN, Infinity or 1e400)
        _refuse("exp is not an integer")
    nbf = claims.get("nbf")
    if "nbf" in claims and type(nbf) is not int:
        _refuse("nbf is not an integer")
    if "aud" in claims:  # RFC 7519 4.1.3: we are no audience, so an audienced token is refused
        _refuse("aud is not supported")
    if dev != device_id:
        _refuse("token was issued for another device")
    clock = time.time() if now is None else now
    if exp > clock + max_lifetime_s + leeway_s:
        _refuse("exp is further away than the maximum token lifetime")
    if nbf is not None and nbf > clock + leeway_s:
        _refuse("token not valid yet (nbf)")
    if clock >= exp:
        raise TokenError("token expired", expired=True)
    # iat is not checked (an iat of another type was ignored before revocations existed, and
    # still is): only an integer one is an issue time, compared with a revocation by the server
    iat = claims.get("iat")
    return Identity(int(sub), dev, float(exp), float(iat) if type(iat) is int else None)


def _refuse(why: str) -> NoReturn:
    raise TokenError(f"invalid token: {why}")


def _unbase64(segment: str) -> bytes:
    """Strict base64url without padding: only the alphabet, and the canonical encoding."""
    if not _SEGMENT.fullmatch(segment):
        _refuse("a segment is not base64url")
    try:
        raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError):
        _refuse("a segment is not base64url")
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        _refuse("a segment is not canonical base64url")
    return raw


def _no_constant(name: str) -> NoReturn:
    _refuse(f"{name} is not JSON")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)
    if len(out) != len(pairs):  # parsers disagree on which duplicate wins: refuse them all
        _refuse("duplicate member names")
    return out


def _json_object(raw: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(
            raw.decode("utf-8"), parse_constant=_no_constant, object_pairs_hook=_unique_keys
        )
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        _refuse(f"the {what} is not JSON")
    if not isinstance(value, dict):
        _refuse(f"the {what} is not a JSON object")
    return value


def _utf8_length(s: str) -> int:
    try:
        return len(s.encode("utf-8"))
    except UnicodeEncodeError:  # a lone surrogate from a JSON \ud800 escape
        return 0
