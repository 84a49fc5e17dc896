"""Login tokens as PROTOCOL.md section 8.2 defines them: HS256 JWTs with sub, dev and exp."""

from __future__ import annotations

import time
from dataclasses import dataclass

import jwt

from improto.limits import MAX_DEVICE_ID, U64_MAX

ALGORITHM = "HS256"


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


def mint(secret: str, user_id: int, device_id: str, ttl_s: float = 86400.0,
         now: float | None = None) -> str:  # fmt: skip
    """A token for development and tests (production tokens come from the identity system)."""
    if not 1 <= user_id <= U64_MAX:
        raise ValueError("user id must be 1..2^64-1")
    issued = time.time() if now is None else now
    claims = {"sub": str(user_id), "dev": device_id, "exp": int(issued + ttl_s)}
    return jwt.encode(claims, secret, algorithm=ALGORITHM)


def verify(secret: str, token: str, device_id: str, now: float | None = None) -> Identity:
    """Check signature, claims and expiry; raise TokenError otherwise."""
    try:
        claims = jwt.decode(
            token,
            secret,
            algorithms=[ALGORITHM],
            options={"require": ["sub", "exp"], "verify_exp": False},
        )
    except jwt.PyJWTError as e:
        raise TokenError(f"invalid token: {e}") from None
    sub, dev, exp = claims.get("sub"), claims.get("dev"), claims.get("exp")
    if not isinstance(sub, str) or not sub.isdigit() or not 1 <= int(sub) <= U64_MAX:
        raise TokenError("sub is not a user id")
    if not isinstance(dev, str) or not 1 <= len(dev.encode()) <= MAX_DEVICE_ID:
        raise TokenError("dev claim missing or invalid")
    if dev != device_id:
        raise TokenError("token was issued for another device")
    if not isinstance(exp, int | float):
        raise TokenError("exp is not a number")
    # Expiry is checked here, after the signature, so that only a genuine token is "expired".
    if (time.time() if now is None else now) >= exp:
        raise TokenError("token expired", expired=True)
    return Identity(int(sub), dev, float(exp))
