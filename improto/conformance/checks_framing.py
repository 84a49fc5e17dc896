"""Framing and protocol errors: spec sections 2, 3, 4, 13 and 14, and spec/vectors/invalid.json."""

from __future__ import annotations

import json
import os
import random
import struct
import time
from importlib.resources import files
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from improto.codec import encode
from improto.conformance.checks_session import CLOSE_WAIT
from improto.conformance.conn import (
    Conn,
    Env,
    describe,
    huge_id,
    ids16,
    new_device,
    new_user,
    raw_frame,
    str8,
    str16,
    u64,
)
from improto.conformance.runner import Skip, check
from improto.enums import ClientKind, ConvKind, FrameType
from improto.errors import FATAL_CODES, ErrorCode
from improto.frames import (
    Close,
    Error,
    Frame,
    GroupAddOk,
    GroupCreated,
    GroupList,
    GroupMemberList,
    GroupMembers,
    GroupRemoveOk,
    GroupSummary,
    Hello,
    HelloOk,
    HistoryPage,
    Message,
    OfflineAckOk,
    OfflinePage,
    Ping,
    Pong,
    Push,
    Send,
    SendAck,
    SyncHint,
)
from improto.limits import MAX_FRAME_LENGTH, MAX_HELLO_FRAME


def vector_file(name: str) -> Traversable:
    """A file of spec/vectors: the copy an installed wheel ships (setup.py), else the work
    tree's spec/vectors, the normative one, that editable installs and the tests read."""
    packaged = files("improto.conformance") / "vectors" / name
    if packaged.is_file():
        return packaged
    return Path(__file__).resolve().parents[2] / "spec" / "vectors" / name


VECTORS = vector_file("invalid.json")


def _expect_reply_error(c: Conn, rid: int, code: int, what: str) -> Error:
    got = c.reply(rid, f"ERROR {ErrorCode(code).name} to {what}")
    assert isinstance(got, Error) and got.code == code, (
        f"{what}: answered by {describe(got)}, expected ERROR {ErrorCode(code).name}"
    )
    return got


def _expect_next_pong(c: Conn, rid: int, what: str) -> None:
    """The very next frame is the PONG with request_id `rid`: nothing else came first."""
    got = c.next_frame()
    assert isinstance(got, Pong) and got.request_id == rid, (
        f"{what}: next frame is {describe(got)}, not the PONG with request_id {rid:#x}"
    )


def _expect_fatal_raw(c: Conn, data: bytes, code: int, rid: int, what: str) -> None:
    c.send_raw(data)
    _expect_reply_error(c, rid, code, what)
    assert c.closed_within(CLOSE_WAIT), (
        f"{what}: ERROR {ErrorCode(code).name} is fatal (13.1) but the connection stayed open"
    )


# ------------------------------------------------------------------ invalid.json vectors


def _vector_plan(v: dict[str, Any]) -> tuple[bytes, int, int, str] | str:
    """(bytes to send, expected code, expected request_id, note) or why it cannot be sent."""
    data = bytes.fromhex(v["hex"])
    if len(data) < 4:
        return "fewer than 4 bytes: on a stream the receiver just waits for the rest of the prefix"
    (length,) = struct.unpack(">I", data[:4])
    if length > MAX_FRAME_LENGTH:
        return data, ErrorCode.FRAME_TOO_LARGE, 0, ""
    if length != len(data) - 4:
        return (
            "the length prefix does not match the bytes that follow: on a TCP stream the "
            "receiver cannot tell that from a frame still arriving or the next frame starting"
        )
    payload = bytearray(data[4:])
    code, rid, note = int(v["error_code"]), 0, ""
    if len(payload) >= 7:  # the header is readable: use a fresh request_id and expect it echoed
        rid = random.randrange(1, 1 << 31)
        payload[3:7] = struct.pack(">I", rid)
        if payload[0] == 1 and payload[1] >= 0x80 and code != ErrorCode.UNKNOWN_FRAME_TYPE:
            # A server-to-client type sent by a client is refused at the type check, before the
            # body is looked at (13.1 UNKNOWN_FRAME_TYPE, 13.2 order); the vector's code is what
            # a client receiving these bytes reports.
            note = (
                f" [type 0x{payload[1]:02x} is server-to-client: a server refuses it at the type "
                f"check, before the body (13.1, 13.2); the vector's {v['error']} is what a "
                f"client receiving these bytes reports]"
            )
            code = ErrorCode.UNKNOWN_FRAME_TYPE
    return struct.pack(">I", len(payload)) + bytes(payload), code, rid, note


def _register_vector(v: dict[str, Any]) -> None:
    plan = _vector_plan(v)
    name = f"framing.vector.{v['name']}"

    def run(env: Env) -> None:
        if isinstance(plan, str):
            raise Skip(plan)
        data, code, rid, note = plan
        c = env.login()
        what = f"vector {v['name']} ({v['description']})"
        try:
            if code in FATAL_CODES:
                _expect_fatal_raw(c, data, code, rid, what)
            else:
                c.send_raw(data)
                _expect_reply_error(c, rid, code, what)
                c.ping()  # non-fatal: the connection stays usable (13.1)
        except AssertionError as e:
            raise AssertionError(f"{e}{note}") from None

    run.__doc__ = (
        f"2/13/vectors: invalid.json {v['name']!r} after HELLO -> ERROR, fatal ones then close."
    )
    check(name)(run)


def _register_vectors() -> None:
    try:
        vectors = json.loads(VECTORS.read_text())
    except OSError:

        def missing(env: Env) -> None:
            """vectors/README.md: the invalid.json vectors (file not found next to the package)."""
            raise Skip(f"{VECTORS} not found")

        check("framing.vectors")(missing)
        return
    for v in vectors:
        _register_vector(v)


_register_vectors()


# ---------------------------------------------------------------------------- framing


@check("framing.oversize_prefix_only")
def oversize_prefix_only(env: Env) -> None:
    """2: length > 131072 is refused on the 4 prefix bytes alone: FRAME_TOO_LARGE (id 0), close."""
    c = env.login()
    c.send_raw(struct.pack(">I", MAX_FRAME_LENGTH + 1))  # and nothing else
    got = c.next_frame()
    assert isinstance(got, Error) and got.code == ErrorCode.FRAME_TOO_LARGE, (
        f"after a bare 131073 length prefix got {describe(got)}, expected FRAME_TOO_LARGE"
    )
    assert got.request_id == 0, f"FRAME_TOO_LARGE carries request_id {got.request_id}, not 0"
    assert c.closed_within(CLOSE_WAIT), "connection still open after FRAME_TOO_LARGE (fatal)"


@check("framing.prelogin_frame_limit")
def prelogin_frame_limit(env: Env) -> None:
    """2/8.1: before HELLO_OK a length above the largest HELLO is FRAME_TOO_LARGE and fatal,
    while a frame of exactly that length is read (and answered as a malformed HELLO)."""
    c = env.connect("prelogin-limit")
    c.send_raw(raw_frame(FrameType.HELLO, bytes(MAX_HELLO_FRAME - 7), rid=77))
    got = c.next_frame()
    assert isinstance(got, Error) and got.code != ErrorCode.FRAME_TOO_LARGE, (
        f"a {MAX_HELLO_FRAME}-byte HELLO before login got {describe(got)}: it fits the limit"
    )
    c = env.connect("prelogin-over")
    c.send_raw(struct.pack(">I", MAX_HELLO_FRAME + 1))  # and nothing else
    got = c.next_frame()
    assert isinstance(got, Error) and got.code == ErrorCode.FRAME_TOO_LARGE, (
        f"a {MAX_HELLO_FRAME + 1} length prefix before login got {describe(got)}, "
        "expected FRAME_TOO_LARGE"
    )
    assert c.closed_within(CLOSE_WAIT), "connection still open after FRAME_TOO_LARGE (fatal)"


@check("framing.max_length_frame")
def max_length_frame(env: Env) -> None:
    """2/14: 131072-byte frames are read whole: unknown type and padded PING refused, non-fatal."""
    c = env.login()
    body = os.urandom(MAX_FRAME_LENGTH - 7)
    c.send_raw(raw_frame(0x7E, body, rid=4242))
    _expect_reply_error(c, 4242, ErrorCode.UNKNOWN_FRAME_TYPE, "131072-byte frame of type 0x7e")
    c.ping()
    c.send_raw(raw_frame(FrameType.PING, bytes(MAX_FRAME_LENGTH - 7), rid=4243))
    _expect_reply_error(c, 4243, ErrorCode.MALFORMED_FRAME, "131072-byte padded PING")
    c.ping()


@check("framing.split_byte_by_byte")
def split_byte_by_byte(env: Env) -> None:
    """2: frames split at every byte (HELLO, PING, SEND one byte per write) are reassembled."""
    c = env.connect()
    user, dev = new_user(), new_device()
    hello = encode(Hello(1, ClientKind.DESKTOP, dev, env.token(user, dev), request_id=1))
    ping = encode(Ping(request_id=2))
    send = encode(Send(os.urandom(16), ConvKind.USER, user, 1, b"split", request_id=3))

    def trickle(data: bytes) -> None:
        for i in range(len(data)):
            c.send_raw(data[i : i + 1])
            if i % 8 == 0:
                time.sleep(0.001)

    trickle(hello + ping)
    ok = c.reply(1, "HELLO_OK")
    assert isinstance(ok, HelloOk), f"split HELLO answered by {describe(ok)}"
    assert isinstance(c.reply(2, "PONG"), Pong), "split PING not answered by PONG"
    trickle(send)  # requests only after HELLO_OK (8.1)
    ack = c.reply(3, "SEND_ACK")
    assert isinstance(ack, SendAck), f"split SEND answered by {describe(ack)}"


@check("framing.many_frames_one_write")
def many_frames_one_write(env: Env) -> None:
    """2: many frames in one TCP write are all processed; each reply echoes its request_id (3)."""
    c = env.login()
    frames = [encode(Ping(request_id=1000 + i)) for i in range(100)]
    frames.append(encode(Send(os.urandom(16), 1, c.user_id, 1, b"x", request_id=5000)))
    frames += [encode(Ping(request_id=2000 + i)) for i in range(100)]
    c.send_raw(b"".join(frames))
    for rid in [*range(1000, 1100), *range(2000, 2100)]:
        got = c.reply(rid, "PONG")
        assert isinstance(got, Pong), f"PING {rid} answered by {describe(got)}"
    got = c.reply(5000, "SEND_ACK")
    assert isinstance(got, SendAck), f"SEND answered by {describe(got)}"


@check("framing.unknown_types")
def unknown_types(env: Env) -> None:
    """14/13.1: undefined types (any body) -> UNKNOWN_FRAME_TYPE echoing request_id; stays open."""
    c = env.login()
    for t in (0x00, 0x08, 0x0F, 0x15, 0x7E, 0x7F, 0x80, 0x84, 0x88, 0xA3, 0xFE):
        rid = random.randrange(1, 1 << 32)
        c.send_raw(raw_frame(t, os.urandom(t % 13), rid=rid))
        _expect_reply_error(c, rid, ErrorCode.UNKNOWN_FRAME_TYPE, f"frame type 0x{t:02x}")
    c.ping()


@check("framing.unknown_type_before_hello")
def unknown_type_before_hello(env: Env) -> None:
    """13.2: type is checked before session state: 0x7e before HELLO -> UNKNOWN_FRAME_TYPE."""
    c = env.connect()
    c.send_raw(raw_frame(0x7E, b"abc", rid=31))
    _expect_reply_error(c, 31, ErrorCode.UNKNOWN_FRAME_TYPE, "type 0x7e before HELLO")
    c.login(env.secret, new_user(), new_device())


def _server_frames() -> list[Frame]:
    msg = Message(1, 1, 1, "d", 1, 2, 1, bytes(16), b"hi")
    return [
        HelloOk(1, 1, 30, 90, MAX_FRAME_LENGTH),
        Pong(1),
        SendAck(bytes(16), 1, 1, 0),
        OfflinePage(0, 0, 0, (), ()),
        OfflineAckOk(0),
        HistoryPage(1, 1, 0, ()),
        GroupCreated(1),
        GroupAddOk(1, 0),
        GroupRemoveOk(1, 0),
        GroupMemberList(1, 1, "g", (1,)),
        GroupList((GroupSummary(1, "g"),)),
        Push(msg),
        Close(2, "bye"),
        SyncHint(),
        Error(100, "x"),
    ]


@check("framing.server_types_from_client")
def server_types_from_client(env: Env) -> None:
    """13.1/7: each server-to-client type (well-formed) sent by a client -> UNKNOWN_FRAME_TYPE."""
    c = env.login()
    for f in _server_frames():
        rid = c.send(f)
        _expect_reply_error(c, rid, ErrorCode.UNKNOWN_FRAME_TYPE, f"client-sent {f.TYPE.name}")
    c.ping()


@check("framing.unknown_flags_ignored")
def unknown_flags_ignored(env: Env) -> None:
    """3: unknown flag bits are ignored: PING/HELLO/SEND with flags set are served normally."""
    c = env.connect()
    rid = c.send(Ping(flags=0xFF))
    assert isinstance(c.reply(rid, "PONG"), Pong), "PING with flags=0xFF not answered by PONG"
    user, dev = new_user(), new_device()
    rid = c.send(Hello(1, 1, dev, env.token(user, dev), flags=0x01))
    got = c.reply(rid, "HELLO_OK")
    assert isinstance(got, HelloOk), f"HELLO with flags=0x01 answered by {describe(got)}"
    rid = c.send(Send(os.urandom(16), 1, user, 1, b"f", flags=0x80))
    got = c.reply(rid, "SEND_ACK")
    assert isinstance(got, SendAck), f"SEND with flags=0x80 answered by {describe(got)}"


@check("framing.request_id_echo")
def request_id_echo(env: Env) -> None:
    """3: request_id is copied unchanged into the reply, including 0 and 0xFFFFFFFF."""
    c = env.connect()
    for rid in (0xFFFFFFFF, 0x80000000, 0, 1):
        c.send(Ping(), rid=rid)
        _expect_next_pong(c, rid, f"PING with request_id {rid:#x}")


@check("framing.push_ack_no_answer")
def push_ack_no_answer(env: Env) -> None:
    """7 PUSH_ACK: no answer at all, not even an ERROR for an unknown msg_id."""
    c = env.login()
    c.send_raw(raw_frame(FrameType.PUSH_ACK, u64(huge_id()), rid=0))
    c.send_raw(raw_frame(FrameType.PUSH_ACK, u64(huge_id()), rid=55))
    rid = c.send(Ping())
    _expect_next_pong(c, rid, "two PUSH_ACKs for unknown msg_ids, then a PING")


@check("framing.push_ack_zero_id")
def push_ack_zero_id(env: Env) -> None:
    """4/7 PUSH_ACK: msg_id is an `id`; 0 where an id is required -> INVALID_FIELD."""
    c = env.login()
    c.send_raw(raw_frame(FrameType.PUSH_ACK, u64(0), rid=66))
    _expect_reply_error(c, 66, ErrorCode.INVALID_FIELD, "PUSH_ACK with msg_id 0")
    c.ping()


def _raw_send(conv_kind: int, conv_id: int, content_type: int, body: bytes) -> bytes:
    """A SEND by hand, with a fresh client_msg_id; `body` is the body field as sent."""
    head = os.urandom(16) + bytes([conv_kind]) + u64(conv_id) + struct.pack(">H", content_type)
    return raw_frame(FrameType.SEND, head + body)


def _cases(user: int) -> list[tuple[str, bytes, int]]:
    return [
        ("GROUP_CREATE name of 129 bytes",
         raw_frame(FrameType.GROUP_CREATE, str8(b"n" * 129) + ids16([])),
         ErrorCode.INVALID_FIELD),
        ("GROUP_CREATE name not UTF-8",
         raw_frame(FrameType.GROUP_CREATE, str8(b"g\xff") + ids16([])), ErrorCode.BAD_UTF8),
        ("GROUP_CREATE with 1001 members",
         raw_frame(FrameType.GROUP_CREATE, str8(b"g") + ids16(list(range(1, 1002)))),
         ErrorCode.INVALID_FIELD),
        ("GROUP_REMOVE with no members",
         raw_frame(FrameType.GROUP_REMOVE, u64(1) + ids16([])), ErrorCode.INVALID_FIELD),
        ("GROUP_ADD with 1001 members",
         raw_frame(FrameType.GROUP_ADD, u64(1) + ids16(list(range(1, 1002)))),
         ErrorCode.INVALID_FIELD),
        ("GROUP_MEMBERS group_id 0", raw_frame(FrameType.GROUP_MEMBERS, u64(0)),
         ErrorCode.INVALID_FIELD),
        ("HISTORY_PULL conv_kind 0",
         raw_frame(FrameType.HISTORY_PULL, bytes([0]) + u64(user) + u64(0) + bytes([0])),
         ErrorCode.INVALID_FIELD),
        ("HISTORY_PULL conv_id 0",
         raw_frame(FrameType.HISTORY_PULL, bytes([1]) + u64(0) + u64(0) + bytes([0])),
         ErrorCode.INVALID_FIELD),
        ("SEND conv_kind 0", _raw_send(0, user, 1, str16(b"x")), ErrorCode.INVALID_FIELD),
        ("SEND text body with a code point above U+10FFFF",
         _raw_send(1, user, 1, str16(b"\xf4\x90\x80\x80")), ErrorCode.BAD_UTF8),
        ("SEND body prefix 5 with 4 bytes",
         _raw_send(1, user, 2, b"\x00\x05abcd"), ErrorCode.MALFORMED_FRAME),
        ("OFFLINE_ACK without its cursor", raw_frame(FrameType.OFFLINE_ACK, b"\x00" * 7),
         ErrorCode.MALFORMED_FRAME),
        ("MY_GROUPS with a body byte", raw_frame(FrameType.MY_GROUPS, b"\x00"),
         ErrorCode.MALFORMED_FRAME),
    ]  # fmt: skip


@check("framing.field_ranges")
def field_ranges(env: Env) -> None:
    """4/7/16: out-of-range lengths, counts, enums, ids, bad UTF-8 -> the 13.1 code; non-fatal."""
    c = env.login()
    for what, data, code in _cases(c.user_id):
        rid = random.randrange(1, 1 << 31)
        patched = data[:7] + struct.pack(">I", rid) + data[11:]
        c.send_raw(patched)
        _expect_reply_error(c, rid, code, what)
    c.ping()
    # The boundary values themselves are accepted.
    body = str8(b"n" * 128) + ids16([])
    c.send_raw(raw_frame(FrameType.GROUP_CREATE, body, rid=900))
    got = c.reply(900, "GROUP_CREATED")
    assert isinstance(got, GroupCreated), f"GROUP_CREATE with a 128-byte name: {describe(got)}"


@check("framing.check_order")
def check_order(env: Env) -> None:
    """13.2: body and value errors are reported before the session state and before meaning."""
    c = env.connect()  # not authenticated: the body errors must still win
    user = new_user()
    cases = [
        ("padded SEND before HELLO",
         _raw_send(1, user, 1, str16(b"x") + b"\x00"), ErrorCode.MALFORMED_FRAME),
        ("SEND conv_kind 3 before HELLO",
         _raw_send(3, user, 1, str16(b"x")), ErrorCode.INVALID_FIELD),
        ("SEND bad UTF-8 text before HELLO",
         _raw_send(1, user, 1, str16(b"\xc3")), ErrorCode.BAD_UTF8),
        ("HELLO device_id not UTF-8 and client_kind 9 (text before value)",
         raw_frame(FrameType.HELLO, bytes([1, 9]) + str8(b"\xff") + str16(b"t")),
         ErrorCode.BAD_UTF8),
        ("HELLO empty device_id then a trailing byte (prefix range before leftover)",
         raw_frame(FrameType.HELLO, bytes([1, 1]) + str8(b"") + str16(b"t") + b"\x00"),
         ErrorCode.INVALID_FIELD),
        ("GROUP_MEMBERS of an unknown group before HELLO",
         raw_frame(FrameType.GROUP_MEMBERS, u64(huge_id())), ErrorCode.NOT_AUTHENTICATED),
    ]  # fmt: skip
    for what, data, code in cases:
        rid = random.randrange(1, 1 << 31)
        c.send_raw(data[:7] + struct.pack(">I", rid) + data[11:])
        _expect_reply_error(c, rid, code, what)
    c.login(env.secret, new_user(), new_device())
    c.expect_error(GroupMembers(huge_id()), ErrorCode.NOT_FOUND)
    # Version is checked before the type: header version 2 with an undefined type.
    _expect_fatal_raw(c, raw_frame(0x7E, b"", rid=8, version=2), ErrorCode.UNSUPPORTED_VERSION, 8,
                      "version 2 header with type 0x7e")  # fmt: skip


@check("framing.error_request_id")
def error_request_id(env: Env) -> None:
    """3/7 ERROR: an ERROR for a readable header carries its request_id whatever the body; 0
    only when no header could be read (length below 7)."""
    c = env.login()
    user = new_user()
    cases = [
        ("truncated SEND", _raw_send(1, user, 1, str16(b"abc"))[:-2], ErrorCode.MALFORMED_FRAME),
        ("padded PING", raw_frame(FrameType.PING, b"\x00"), ErrorCode.MALFORMED_FRAME),
        ("SEND conv_kind 9", _raw_send(9, user, 1, str16(b"x")), ErrorCode.INVALID_FIELD),
        ("SEND text not UTF-8", _raw_send(1, user, 1, str16(b"\xff")), ErrorCode.BAD_UTF8),
        ("OFFLINE_PULL limit 201", raw_frame(FrameType.OFFLINE_PULL, u64(0) + b"\x00\xc9"),
         ErrorCode.INVALID_FIELD),
        ("PUSH_ACK msg_id 0", raw_frame(FrameType.PUSH_ACK, u64(0)), ErrorCode.INVALID_FIELD),
    ]  # fmt: skip
    for what, data, code in cases:
        rid = random.randrange(1, 1 << 31)
        # the length prefix is recomputed: a truncated body is short, not a short stream
        payload = data[4:7] + struct.pack(">I", rid) + data[11:]
        c.send_raw(struct.pack(">I", len(payload)) + payload)
        _expect_reply_error(c, rid, code, f"{what} with request_id {rid}")
    c.send_raw(struct.pack(">I", 5) + b"\x01\x02\x00\x00\x07")  # no header: request_id unknown
    got = _expect_reply_error(c, 0, ErrorCode.MALFORMED_FRAME, "a frame of length 5")
    assert got.request_id == 0
    c.ping()
