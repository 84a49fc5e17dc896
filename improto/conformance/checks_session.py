"""Session and authentication: spec sections 7 (HELLO, HELLO_OK, PING, CLOSE) and 8."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

import jwt

from improto.conformance.conn import (
    Conn,
    Env,
    describe,
    new_device,
    new_user,
    raw_frame,
    str8,
    str16,
)
from improto.conformance.runner import Skip, check
from improto.enums import ClientKind, CloseReason, ConvKind, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    Close,
    Error,
    GroupAdd,
    GroupCreate,
    GroupMembers,
    GroupRemove,
    Hello,
    HelloOk,
    HistoryPull,
    MyGroups,
    OfflineAck,
    OfflinePull,
    Ping,
    Pong,
    PushAck,
    Send,
)
from improto.limits import MAX_FRAME_LENGTH

CLOSE_WAIT = 3.0  # seconds a fatal ERROR / CLOSE may take to be followed by the close


def expect_fatal(c: Conn, code: int, rid: int, what: str) -> None:
    """ERROR `code` echoing `rid`, then the server closes the connection (spec 13.1 fatal)."""
    got = c.reply(rid, f"ERROR {code} to {what}")
    assert isinstance(got, Error) and got.code == code, (
        f"{what} answered by {describe(got)}, expected ERROR {ErrorCode(code).name} (fatal)"
    )
    assert c.closed_within(CLOSE_WAIT), (
        f"{what}: ERROR {ErrorCode(code).name} is fatal but the connection stayed open "
        f"{CLOSE_WAIT}s (13.1)"
    )


_HS256_HEADER = b'{"alg":"HS256","typ":"JWT"}'


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def hand_signed(secret: str, payload: str) -> str:
    """An HS256 JWT over `payload` taken verbatim: JSON encoders refuse NaN, 1e400 or a
    duplicate claim, which the checks must be able to send."""
    signing_input = f"{_b64(_HS256_HEADER)}.{_b64(payload.encode())}"
    mac = hmac.new(secret.encode(), signing_input.encode("ascii"), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def hello_with(env: Env, token: str, device: str, code: int, what: str) -> None:
    c = env.connect()
    rid = c.send(Hello(1, ClientKind.IOS, device, token))
    expect_fatal(c, code, rid, what)


@check("session.ping_before_hello")
def ping_before_hello(env: Env) -> None:
    """8.1/7 PING: PING is answered with PONG (request_id echoed) before HELLO."""
    c = env.connect()
    rid = c.send(Ping())
    got = c.reply(rid, "PONG")
    assert isinstance(got, Pong), f"PING before HELLO answered by {describe(got)}"
    assert got.server_time > 1_577_836_800_000, f"PONG server_time {got.server_time} before 2020"
    c.login(env.secret, new_user(), new_device())  # and the connection can still log in


@check("session.requests_before_hello")
def requests_before_hello(env: Env) -> None:
    """8.1: every request but HELLO/PING before HELLO_OK -> NOT_AUTHENTICATED; conn stays."""
    c = env.connect()
    requests = [
        Send(b"\x01" * 16, ConvKind.USER, new_user(), 1, b"x"),
        PushAck(12345),
        OfflinePull(0, 0),
        OfflineAck(1),
        HistoryPull(ConvKind.USER, new_user(), 0, 0),
        GroupCreate("g", ()),
        GroupAdd(1, (new_user(),)),
        GroupRemove(1, (new_user(),)),
        GroupMembers(1),
        MyGroups(),
    ]
    for req in requests:
        c.expect_error(req, ErrorCode.NOT_AUTHENTICATED)
    c.ping()
    c.login(env.secret, new_user(), new_device())  # the connection stays usable


@check("session.hello_ok_fields")
def hello_ok_fields(env: Env) -> str:
    """7 HELLO_OK: user_id is the token's sub, max_frame is 131072, request_id echoed."""
    user = new_user()
    c = env.connect()
    ok = c.login(env.secret, user, new_device(), ClientKind.ANDROID)
    assert ok.user_id == user, f"HELLO_OK user_id {ok.user_id}, token sub {user}"
    assert ok.max_frame == MAX_FRAME_LENGTH, f"HELLO_OK max_frame {ok.max_frame}, not 131072"
    assert ok.server_time > 1_577_836_800_000, f"HELLO_OK server_time {ok.server_time}"
    env.info.update(heartbeat_s=ok.heartbeat_s, idle_timeout_s=ok.idle_timeout_s)
    return f"heartbeat_s={ok.heartbeat_s} idle_timeout_s={ok.idle_timeout_s}"


@check("session.all_client_kinds")
def all_client_kinds(env: Env) -> None:
    """7 HELLO: client_kind 0..4 are accepted; 5 -> INVALID_FIELD (non-fatal, 13.1)."""
    for kind in ClientKind:
        env.connect().login(env.secret, new_user(), new_device(), kind)
    c = env.connect()
    user, dev = new_user(), new_device()
    body = bytes([1, 5]) + str8(dev.encode()) + str16(env.token(user, dev).encode())
    c.expect_error(raw_frame(FrameType.HELLO, body, rid=77), ErrorCode.INVALID_FIELD, rid=77)
    c.login(env.secret, user, dev)


@check("session.token_wrong_secret")
def token_wrong_secret(env: Env) -> None:
    """8.2: a token signed with another secret -> AUTH_FAILED, then close."""
    user, dev = new_user(), new_device()
    token = jwt.encode(
        {"sub": str(user), "dev": dev, "exp": int(time.time()) + 600},
        env.secret + "-forged",
        algorithm="HS256",
    )
    hello_with(env, token, dev, ErrorCode.AUTH_FAILED, "HELLO with a forged token")


@check("session.token_expired")
def token_expired(env: Env) -> None:
    """8.2: a genuine token whose exp has passed -> TOKEN_EXPIRED, then close."""
    user, dev = new_user(), new_device()
    token = env.token(user, dev, ttl_s=-60)
    hello_with(env, token, dev, ErrorCode.TOKEN_EXPIRED, "HELLO with an expired token")


@check("session.token_other_device")
def token_other_device(env: Env) -> None:
    """8.2: a token whose dev differs from HELLO's device_id -> AUTH_FAILED, then close."""
    user = new_user()
    token = env.token(user, "some-other-device")
    hello_with(env, token, new_device(), ErrorCode.AUTH_FAILED, "HELLO with another device's token")


@check("session.token_missing_claims")
def token_missing_claims(env: Env) -> None:
    """8.2: a valid HS256 JWT lacking dev, sub or exp -> AUTH_FAILED, then close."""
    user, dev = new_user(), new_device()
    full = {"sub": str(user), "dev": dev, "exp": int(time.time()) + 600}
    for missing in ("dev", "sub", "exp"):
        claims = {k: v for k, v in full.items() if k != missing}
        token = jwt.encode(claims, env.secret, algorithm="HS256")
        hello_with(env, token, dev, ErrorCode.AUTH_FAILED, f"HELLO with a token without {missing}")


@check("session.token_bad_sub")
def token_bad_sub(env: Env) -> None:
    """8.2: sub outside 1..2^64-1 (0, 2^64, not decimal) -> AUTH_FAILED, then close."""
    dev = new_device()
    for sub in ("0", str(1 << 64), "abc"):
        claims = {"sub": sub, "dev": dev, "exp": int(time.time()) + 600}
        token = jwt.encode(claims, env.secret, algorithm="HS256")
        hello_with(env, token, dev, ErrorCode.AUTH_FAILED, f"HELLO with sub={sub!r}")


@check("session.token_sub_ascii_digits")
def token_sub_ascii_digits(env: Env) -> None:
    """8.2: sub is ASCII [1-9][0-9]* (no other Unicode digits, sign or leading zero), and a
    JSON string -> else AUTH_FAILED (an ERROR, not a dropped connection), then close."""
    dev = new_device()
    exp = int(time.time()) + 600
    subs = ["\uff15", "\u0665", "\u00b2", "0", "-1", "+5", "05", " 5", "18446744073709551616"]
    for sub in subs:
        payload = f'{{"sub":"{sub}","dev":"{dev}","exp":{exp}}}'
        token = hand_signed(env.secret, payload)
        hello_with(env, token, dev, ErrorCode.AUTH_FAILED, f"HELLO with sub={sub!r}")
    for sub in ("5", "5.0", "true"):  # a number, not a string
        token = hand_signed(env.secret, f'{{"sub":{sub},"dev":"{dev}","exp":{exp}}}')
        hello_with(env, token, dev, ErrorCode.AUTH_FAILED, f"HELLO with sub {sub} (no string)")
    user = new_user()
    token = hand_signed(env.secret, f'{{"sub":"{user}","dev":"{dev}","exp":{exp}}}')
    ok = env.connect().call(Hello(1, ClientKind.IOS, dev, token), HelloOk)
    assert ok.user_id == user, f"HELLO_OK user_id {ok.user_id}, token sub {user}"


@check("session.token_exp_finite_integer")
def token_exp_finite_integer(env: Env) -> None:
    """8.2: exp is a JSON integer within the maximum lifetime; NaN, Infinity, 1e400, 10^400,
    a fraction, a string or a bool -> AUTH_FAILED (not TOKEN_EXPIRED, not a drop), close."""
    user, dev = new_user(), new_device()
    soon = int(time.time()) + 600
    far = int(time.time()) + 400 * 86400  # beyond the 30-day maximum lifetime
    for exp in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1" + "0" * 400,
                f"{soon}.5", f"{soon}.0", f'"{soon}"', "true", "null", str(far)):  # fmt: skip
        token = hand_signed(env.secret, f'{{"sub":"{user}","dev":"{dev}","exp":{exp}}}')
        hello_with(env, token, dev, ErrorCode.AUTH_FAILED, f"HELLO with exp {exp[:24]}")
    # The same hand-built token with a sound exp logs in: the refusals above were the exp.
    token = hand_signed(env.secret, f'{{"sub":"{user}","dev":"{dev}","exp":{soon}}}')
    ok = env.connect().call(Hello(1, ClientKind.IOS, dev, token), HelloOk)
    assert ok.user_id == user, f"HELLO_OK user_id {ok.user_id}, token sub {user}"


@check("session.token_not_hs256")
def token_not_hs256(env: Env) -> None:
    """8.2: not an HS256 JWT (garbage, alg none, HS512 with the right secret) -> AUTH_FAILED."""
    user, dev = new_user(), new_device()
    claims = {"sub": str(user), "dev": dev, "exp": int(time.time()) + 600}
    tokens = {
        "garbage": "not-a-jwt",
        "alg none": jwt.encode(claims, "", algorithm="none"),  # PyJWT: "" is no key
        "HS512": jwt.encode(claims, env.secret, algorithm="HS512"),
    }
    for what, token in tokens.items():
        hello_with(env, token, dev, ErrorCode.AUTH_FAILED, f"HELLO with a {what} token")


@check("session.token_too_long_nonfatal")
def token_too_long_nonfatal(env: Env) -> None:
    """7 HELLO/13.2: a 4097-byte token is INVALID_FIELD (body check), not fatal AUTH_FAILED."""
    c = env.connect()
    dev = new_device()
    body = bytes([1, ClientKind.WEB]) + str8(dev.encode()) + str16(b"x" * 4097)
    c.expect_error(raw_frame(FrameType.HELLO, body, rid=9), ErrorCode.INVALID_FIELD, rid=9)
    c.login(env.secret, new_user(), dev)


@check("session.second_hello")
def second_hello(env: Env) -> None:
    """8.1: a second HELLO -> ALREADY_AUTHENTICATED and changes nothing (still the first user)."""
    user = new_user()
    c = env.connect()
    c.login(env.secret, user, new_device())
    other, dev2 = new_user(), new_device()
    c.expect_error(Hello(1, 1, dev2, env.token(other, dev2)), ErrorCode.ALREADY_AUTHENTICATED)
    watcher = env.login(user)  # another device of the first user
    c.ping()
    # The identity did not change: a message sent now is from `user`, seen on user's other device.
    ack2 = c.send_msg(user, b"still me")
    m = watcher.push_for(ack2.msg_id)
    assert m.sender_id == user, f"after a refused 2nd HELLO the sender is {m.sender_id}, not {user}"
    assert m.sender_device == c.device_id, f"sender_device became {m.sender_device!r}"


@check("session.replaced_same_device")
def replaced_same_device(env: Env) -> None:
    """8.3/7 CLOSE: HELLO for a connected (user, device) -> old gets CLOSE 1 then is closed."""
    user, dev = new_user(), new_device()
    old = env.connect("old")
    old.login(env.secret, user, dev)
    other_device = env.login(user)
    new = env.connect("new")
    new.login(env.secret, user, dev)
    f = old.wait_for(lambda f: isinstance(f, Close), what="CLOSE REPLACED")
    assert isinstance(f, Close) and f.reason == CloseReason.REPLACED, (
        f"old connection got {describe(f)}, expected CLOSE reason 1"
    )
    assert f.request_id == 0, f"CLOSE carries request_id {f.request_id}, not 0 (3)"
    assert old.closed_within(CLOSE_WAIT), "old connection still open after CLOSE REPLACED"
    new.ping()
    ack = new.send_msg(new_user())
    other_device.push_for(ack.msg_id)  # the other device of the same user was not replaced
    other_device.ping()


@check("session.token_expires_in_session")
def token_expires_in_session(env: Env) -> None:
    """8.2: when exp passes during a session the server sends CLOSE AUTH_EXPIRED (3), closes."""
    user, dev = new_user(), new_device()
    c = env.connect()
    ok = c.call(Hello(1, 1, dev, env.token(user, dev, ttl_s=2.0)), HelloOk)
    assert ok.user_id == user
    f = c.wait_for(lambda f: isinstance(f, Close), timeout=6.0, what="CLOSE AUTH_EXPIRED")
    assert isinstance(f, Close) and f.reason == CloseReason.AUTH_EXPIRED, (
        f"got {describe(f)}, expected CLOSE reason 3"
    )
    assert c.closed_within(CLOSE_WAIT), "connection still open after CLOSE AUTH_EXPIRED"


def _idle_timeout(env: Env) -> int:
    if "idle_timeout_s" not in env.info:
        c = env.connect()
        ok = c.login(env.secret, new_user(), new_device())
        env.info["idle_timeout_s"] = ok.idle_timeout_s
        c.close()
    t = int(env.info["idle_timeout_s"])
    if t > 10:
        raise Skip(f"idle_timeout_s={t}: too long to wait for (run the server with <= 10 s)")
    return t


def _expect_idle_close(c: Conn, deadline: float, what: str) -> None:
    f = c.wait_for(
        lambda f: isinstance(f, Close),
        timeout=max(0.1, deadline - time.monotonic()),
        what=f"CLOSE IDLE_TIMEOUT ({what})",
    )
    assert isinstance(f, Close) and f.reason == CloseReason.IDLE_TIMEOUT, (
        f"{what}: got {describe(f)}, expected CLOSE reason 4"
    )
    assert c.closed_within(CLOSE_WAIT), f"{what}: still open after CLOSE IDLE_TIMEOUT"


@check("session.idle_timeout")
def idle_timeout(env: Env) -> str:
    """8.1/7 PING: silent connections (with or without HELLO) get CLOSE 4; PINGs keep one open."""
    t = _idle_timeout(env)
    start = time.monotonic()
    silent_unauth = env.connect("silent unauthenticated")
    silent_auth = env.login()
    pinging = env.login()
    # Keep one connection busy past the timeout with a PING every t/3 seconds.
    while time.monotonic() - start < t + 1.5:
        pinging.ping()
        time.sleep(max(0.2, t / 3))
    pinging.ping()
    assert not pinging.queue or not any(isinstance(f, Close) for f in pinging.queue), (
        "a connection sending PINGs was closed for idleness (7 PING: every frame resets the timer)"
    )
    deadline = start + t + 3.0
    _expect_idle_close(silent_unauth, deadline, "silent connection without HELLO")
    _expect_idle_close(silent_auth, deadline, "silent authenticated connection")
    return f"idle_timeout_s={t}"


@check("session.hello_deadline")
def hello_deadline(env: Env) -> str:
    """8.1: a connection without HELLO for idle_timeout_s is closed, even if it PINGs."""
    t = _idle_timeout(env)
    start = time.monotonic()
    c = env.connect("pinging without HELLO")
    while time.monotonic() - start < t + 2.5 and not c.eof:
        try:
            c.send(Ping())
        except OSError:
            break
        c.drain(max(0.2, t / 4))
    closes = [f for f in c.queue if isinstance(f, Close)]
    assert closes and c.eof, (
        f"a connection that sent only PINGs and no HELLO was still open after {t + 2.5:.1f}s "
        f"(idle_timeout_s={t}; 8.1 'has not completed HELLO ... for idle_timeout_s')"
    )
    assert closes[0].reason == CloseReason.IDLE_TIMEOUT, f"got {describe(closes[0])}"
    return f"closed after {time.monotonic() - start:.1f}s"
