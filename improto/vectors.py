"""Generates spec/vectors/valid.json and invalid.json (version 1) and ext-valid.json and
ext-invalid.json (the post-v1 frames of spec sections 18, 19 and 20):
`python -m improto.vectors [DIR]`.

Valid vectors are frame objects encoded by the codec; the test suite re-checks them against
an independent `struct`-based reader written from spec/PROTOCOL.md. Invalid vectors are raw
bytes assembled here by hand, one defect each, so they do not depend on the encoder.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from typing import Any

from improto.codec import encode
from improto.enums import ClientKind, CloseReason, ContentType, ConvKind, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    Close,
    ConvChanges,
    ConvChangesPage,
    ConvEntry,
    ConvHide,
    ConvHideOk,
    ConvList,
    ConvPage,
    Error,
    Features,
    FeaturesOk,
    Frame,
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupList,
    GroupMemberList,
    GroupMembers,
    GroupRemove,
    GroupRemoveOk,
    GroupSummary,
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    InboxNotice,
    Message,
    MyGroups,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Ping,
    Pong,
    Push,
    PushAck,
    PushRegister,
    PushRegisterOk,
    PushUnregister,
    PushUnregisterOk,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
    Send,
    SendAck,
    SyncHint,
    TimelineHead,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
    UnreadCount,
)
from improto.jsonform import frame_to_json
from improto.limits import (
    CURSOR_RESUME,
    MAX_BODY,
    MAX_FRAME_LENGTH,
    MAX_PLATFORM,
    MAX_PUSH_TOKEN,
    MAX_TIMELINE_HEADS,
    TIMELINE_HELD_MAX,
    TIMELINE_PAGE_MAX,
    U64_MAX,
)
from improto.tokens import mint

U, G = ConvKind.USER, ConvKind.GROUP
CMID = bytes.fromhex("0f1e2d3c4b5a69788796a5b4c3d2e1f0")
T0 = 1_764_201_600_000  # 2025-11-27T00:00:00Z in ms
TEXT = b"Hi Bob! Are we still on for lunch tomorrow at noon? The usual place?"
VECTOR_SECRET = "improto-test-vectors-secret-0001"
# A real login token (PROTOCOL.md 8.2) for user 1001 on device ios-3f9a2c, expired on 2025-11-28
# (no iat: the version-1 vector keeps its bytes).
VECTOR_TOKEN = mint(VECTOR_SECRET, 1001, "ios-3f9a2c", ttl_s=86400, now=T0 / 1000,
                    with_iat=False)  # fmt: skip
# An APNs device token (64 hex digits) and an FCM registration token (their usual shapes).
APNS_TOKEN = "5f3e1a2b9c8d7e6f00112233445566778899aabbccddeeff0123456789abcdef"
FCM_TOKEN = "dQw4w9WgXcQ:APA91bHun4MxP5egoKMwt2KZFBaFUH-1RYqx_Ge7_mSm0f3kLwGcSt3o"


def _msg(msg_id: int, sender: int, conv_kind: int, conv_id: int, body: bytes, **kw: Any) -> Message:
    base: dict[str, Any] = {
        "msg_id": msg_id,
        "server_time": T0 + msg_id % 1000,
        "sender_id": sender,
        "sender_device": "ios-3f9a2c",
        "conv_kind": conv_kind,
        "conv_id": conv_id,
        "content_type": ContentType.TEXT,
        "client_msg_id": CMID,
        "body": body,
    }
    base.update(kw)
    return Message(**base)


def _m1() -> Message:
    return _msg(7_301_234_567_890_123_456, 1001, U, 1002, TEXT)


def _m2() -> Message:
    return _msg(7_301_234_567_890_123_457, 1002, U, 1001, "好的\uff0c中午见 👍".encode())


def _mg() -> Message:
    return _msg(7_301_234_567_890_123_460, 1003, G, 5001, "Ça marche — à demain".encode())


def valid_frames() -> list[tuple[str, str, Frame]]:
    m1, m2, mg = _m1(), _m2(), _mg()
    event = _msg(
        7_301_234_567_890_123_400,
        1001,
        G,
        5001,
        b'{"event":"created","group_id":"5001","name":"Lunch","members":["1001","1002","1003"]}',
        content_type=ContentType.GROUP_EVENT,
    )
    big = _msg(U64_MAX, U64_MAX, U, U64_MAX, b"x", server_time=U64_MAX,
               sender_device="d" * 64)  # fmt: skip
    return [
        ("hello", "login from an iOS device (token: HS256 over secret VECTOR_SECRET, expired)",
         Hello(1, ClientKind.IOS, "ios-3f9a2c", VECTOR_TOKEN, request_id=1)),
        ("hello_ok", "login accepted", HelloOk(1001, T0, 30, 90, MAX_FRAME_LENGTH, request_id=1)),
        ("ping", "heartbeat", Ping(request_id=2)),
        ("ping_unknown_flags", "flag bits a v1 receiver does not know are carried and ignored",
         Ping(request_id=3, flags=0x81)),
        ("pong", "heartbeat answer", Pong(T0 + 5, request_id=2)),
        ("send_text_user", "1:1 text message", Send(CMID, U, 1002, ContentType.TEXT, TEXT,
                                                    request_id=7)),
        ("send_group_non_ascii", "group message with non-ASCII text and an emoji",
         Send(CMID, G, 5001, ContentType.TEXT, "Ça marche — à demain 👍 好的".encode(),
              request_id=8)),
        ("send_empty_body", "application content type with an empty body",
         Send(CMID, U, 1002, 2, b"", request_id=9)),
        ("send_max_body", "largest body: 65535 bytes of application content",
         Send(CMID, U, 1002, 0x8001, bytes(i % 251 for i in range(MAX_BODY)), request_id=10)),
        ("send_ack", "the server's id and time for a new message",
         SendAck(CMID, m1.msg_id, m1.server_time, 0, request_id=7)),
        ("send_ack_duplicate", "a resend with the same client_msg_id gets the original ack",
         SendAck(CMID, m1.msg_id, m1.server_time, 1, request_id=11)),
        ("push_text", "a typical 1:1 chat push", Push(m1)),
        ("push_group", "group message push", Push(mg)),
        ("push_group_event", "server-generated group event (content_type 0)", Push(event)),
        ("push_large_ids", "every u64 at its maximum, 64-byte device id", Push(big)),
        ("push_ack", "client acknowledges a push", PushAck(m1.msg_id)),
        ("offline_pull_fresh", "fresh install: cursor 0, default page size",
         OfflinePull(0, 0, request_id=20)),
        ("offline_pull_resume", "start at the server's stored position, page size 200",
         OfflinePull(CURSOR_RESUME, 200, request_id=21)),
        ("offline_page_has_more", "two messages oldest first, more to pull",
         OfflinePage(1042, 1, 0, (m1, m2), (UnreadCount(U, 1002, 1),), request_id=20)),
        ("offline_page_last", "empty last page", OfflinePage(1042, 0, 0, (), (), request_id=22)),
        ("offline_page_gap", "some messages after the cursor expired before this page",
         OfflinePage(3000, 0, 1, (mg,), (UnreadCount(G, 5001, 1),), request_id=23)),
        ("offline_ack", "client has stored everything up to cursor 1042",
         OfflineAck(1042, request_id=24)),
        ("offline_ack_ok", "server stored the position", OfflineAckOk(1042, request_id=24)),
        ("history_pull_newest", "newest page of a 1:1 conversation, default size",
         HistoryPull(U, 1002, 0, 0, request_id=30)),
        ("history_pull_before", "older page of a group before a message id",
         HistoryPull(G, 5001, mg.msg_id, 100, request_id=31)),
        ("history_page", "newest first, more to pull",
         HistoryPage(U, 1002, 1, (m2, m1), request_id=30)),
        ("history_page_end", "no older messages", HistoryPage(G, 5001, 0, (), request_id=31)),
        ("group_create", "create a group with two other members",
         GroupCreate("Lunch 🍜", (1002, 1003), request_id=40)),
        ("group_created", "the new group's id", GroupCreated(5001, request_id=40)),
        ("group_add", "add members", GroupAdd(5001, (1004, 1005), request_id=41)),
        ("group_add_ok", "two were added", GroupAddOk(5001, 2, request_id=41)),
        ("group_remove", "leave the group (remove self)",
         GroupRemove(5001, (1001,), request_id=42)),
        ("group_remove_ok", "one was removed", GroupRemoveOk(5001, 1, request_id=42)),
        ("group_members", "list a group's members", GroupMembers(5001, request_id=43)),
        ("group_member_list", "members in ascending id order",
         GroupMemberList(5001, 1001, "Lunch 🍜", (1001, 1002, 1003), request_id=43)),
        ("my_groups", "list my groups", MyGroups(request_id=44)),
        ("group_list", "two groups",
         GroupList((GroupSummary(5001, "Lunch 🍜"), GroupSummary(5002, "Team")), request_id=44)),
        ("close_replaced", "another login of the same device replaced this connection",
         Close(CloseReason.REPLACED, "device ios-3f9a2c logged in again")),
        ("sync_hint", "run the offline sync loop", SyncHint()),
        ("error", "answer to a request for a group the user is not in",
         Error(ErrorCode.FORBIDDEN, "not a member of group 5001", request_id=32)),
        ("offline_page_max_frame", "a page whose length prefix is exactly 131072",
         OfflinePage(77, 1, 0, (
             _msg(101, 1001, U, 1002, b"\x00" * 65535, content_type=2, sender_device="d"),
             _msg(102, 1001, U, 1002, b"\x01" * 65406, content_type=2, sender_device="d"),
         ), (), request_id=25)),
    ]  # fmt: skip


# ---------------------------------------------------------------- invalid, by hand


def raw_frame(
    ftype: int, body: bytes = b"", rid: int = 0, version: int = 1, flags: int = 0
) -> bytes:
    """Hand-built frame bytes (length prefix included), for values the codec refuses.

    Also the conformance suite's way to send such frames (`improto.conformance.conn`).
    """
    payload = struct.pack(">BBBI", version, ftype, flags, rid) + body
    return struct.pack(">I", len(payload)) + payload


def str8(s: bytes) -> bytes:
    return struct.pack(">B", len(s)) + s


def str16(s: bytes) -> bytes:
    return struct.pack(">H", len(s)) + s


def _frame(ftype: int, body: bytes, *, version: int = 1, flags: int = 0, rid: int = 1) -> bytes:
    """`raw_frame` with the invalid vectors' default request_id, 1."""
    return raw_frame(ftype, body, rid, version, flags)


def _hello(device: bytes = b"ios-3f9a2c", token: bytes = b"tok", version: int = 1,
           kind: int = 1) -> bytes:  # fmt: skip
    return struct.pack(">BB", version, kind) + str8(device) + str16(token)


def _send(conv_kind: int = 1, conv_id: int = 1002, ctype: int = 1, body: bytes = b"hi") -> bytes:
    return CMID + struct.pack(">BQH", conv_kind, conv_id, ctype) + str16(body)


def _record(msg_id: int = 77, body: bytes = b"hi", conv_kind: int = 1, ctype: int = 1,
            conv_id: int = 1002) -> bytes:  # fmt: skip
    return (
        struct.pack(">QQQ", msg_id, T0, 1001) + str8(b"ios")
        + struct.pack(">BQH", conv_kind, conv_id, ctype) + CMID + str16(body)
    )  # fmt: skip


def invalid_frames() -> list[tuple[str, str, bytes, ErrorCode]]:
    M, TL = ErrorCode.MALFORMED_FRAME, ErrorCode.FRAME_TOO_LARGE
    V, UT = ErrorCode.UNSUPPORTED_VERSION, ErrorCode.UNKNOWN_FRAME_TYPE
    I, B = ErrorCode.INVALID_FIELD, ErrorCode.BAD_UTF8  # noqa: E741
    ping = _frame(FrameType.PING, b"")
    return [
        ("short_prefix", "fewer than 4 bytes: no length prefix", b"\x00\x00\x07", M),
        ("length_over_max", "length prefix 131073 > 131072: refuse before reading the body",
         struct.pack(">I", MAX_FRAME_LENGTH + 1) + b"\x01\x02\x00\x00\x00\x00\x01", TL),
        ("length_huge", "length prefix 0xFFFFFFFF", b"\xff\xff\xff\xff\x01\x02", TL),
        ("frame_truncated", "length prefix says 2 bytes more than follow", ping[:-2] + b"", M),
        ("frame_short_header", "a 3-byte frame cannot hold the 7-byte header",
         b"\x00\x00\x00\x03\x01\x02\x00", M),
        ("frame_empty", "length 0", b"\x00\x00\x00\x00", M),
        ("bytes_after_frame", "bytes follow the frame the length prefix delimits",
         ping + b"\x00", M),
        ("unsupported_version", "header version 2", _frame(FrameType.PING, b"", version=2), V),
        ("version_zero", "header version 0", _frame(FrameType.PING, b"", version=0), V),
        ("unknown_type", "frame type 0x7e is not defined", _frame(0x7E, b""), UT),
        ("unknown_type_0", "frame type 0x00 is not defined", _frame(0x00, b""), UT),
        ("body_padded", "PING with one byte of body", _frame(FrameType.PING, b"\x00"), M),
        ("send_padded", "SEND with a byte after the body",
         _frame(FrameType.SEND, _send() + b"\x00"), M),
        ("token_truncated", "HELLO whose last string is 2 bytes shorter than its prefix says "
         "(outer length consistent): the compiled-parser trap",
         _frame(FrameType.HELLO, _hello(token=b"0123456789")[:-2]), M),
        ("body_truncated", "SEND whose body field is 3 bytes short",
         _frame(FrameType.SEND, _send(body=b"hello")[:-3]), M),
        ("header_only_send", "SEND with no body at all", _frame(FrameType.SEND, b""), M),
        ("fixed_field_truncated", "PUSH_ACK with a 7-byte msg_id",
         _frame(FrameType.PUSH_ACK, b"\x00" * 7), M),
        ("array_short", "OFFLINE_PAGE says 2 messages but holds 1",
         _frame(FrameType.OFFLINE_PAGE, struct.pack(">QBBH", 5, 0, 0, 2) + _record()
                + struct.pack(">H", 0)), M),
        ("device_id_bad_utf8", "device_id holds 0xff",
         _frame(FrameType.HELLO, _hello(device=b"ios\xff")), B),
        ("text_body_bad_utf8", "TEXT body with a lone continuation byte",
         _frame(FrameType.SEND, _send(body=b"caf\x80")), B),
        ("text_body_overlong", "TEXT body with an overlong encoding of '/'",
         _frame(FrameType.SEND, _send(body=b"\xc0\xaf")), B),
        ("text_body_surrogate", "TEXT body with a UTF-8-encoded surrogate",
         _frame(FrameType.SEND, _send(body=b"\xed\xa0\x80")), B),
        ("push_body_bad_utf8", "PUSH of a TEXT message whose body is not UTF-8",
         _frame(FrameType.PUSH, _record(body=b"\xfe"), rid=0), B),
        ("error_text_bad_utf8", "ERROR text with 0xc3 at the end",
         _frame(FrameType.ERROR, struct.pack(">H", 300) + str16(b"oops\xc3")), B),
        ("conv_kind_3", "conversation kind 3 is not defined",
         _frame(FrameType.SEND, _send(conv_kind=3)), I),
        ("conv_id_0", "conversation id 0", _frame(FrameType.SEND, _send(conv_id=0)), I),
        ("send_content_type_0", "clients may not send group events",
         _frame(FrameType.SEND, _send(ctype=0)), I),
        ("hello_version_2", "HELLO asks for protocol version 2",
         _frame(FrameType.HELLO, _hello(version=2)), V),
        ("client_kind_9", "client kind 9 is not defined", _frame(FrameType.HELLO, _hello(kind=9)),
         I),
        ("device_id_empty", "empty device id", _frame(FrameType.HELLO, _hello(device=b"")), I),
        ("device_id_too_long", "65-byte device id",
         _frame(FrameType.HELLO, _hello(device=b"d" * 65)), I),
        ("token_empty", "empty token", _frame(FrameType.HELLO, _hello(token=b"")), I),
        ("offline_limit_201", "offline page size above 200",
         _frame(FrameType.OFFLINE_PULL, struct.pack(">QH", 0, 201)), I),
        ("history_limit_101", "history page size above 100",
         _frame(FrameType.HISTORY_PULL, struct.pack(">BQQB", 1, 1002, 0, 101)), I),
        ("has_more_2", "has_more must be 0 or 1",
         _frame(FrameType.HISTORY_PAGE, struct.pack(">BQBH", 1, 1002, 2, 0)), I),
        ("duplicate_2", "SEND_ACK duplicate must be 0 or 1",
         _frame(FrameType.SEND_ACK, CMID + struct.pack(">QQB", 77, T0, 2)), I),
        ("push_msg_id_0", "a message id is never 0", _frame(FrameType.PUSH, _record(msg_id=0)), I),
        ("group_add_no_members", "GROUP_ADD with an empty list",
         _frame(FrameType.GROUP_ADD, struct.pack(">QH", 5001, 0)), I),
        ("group_add_member_0", "user id 0 in a member list",
         _frame(FrameType.GROUP_ADD, struct.pack(">QHQ", 5001, 1, 0)), I),
        ("group_name_empty", "GROUP_CREATE with an empty name",
         _frame(FrameType.GROUP_CREATE, str8(b"") + struct.pack(">H", 0)), I),
        ("token_too_long", "HELLO token of 4097 bytes",
         _frame(FrameType.HELLO, _hello(token=b"t" * 4097)), I),
        ("text_body_above_u10ffff", "TEXT body with F4 90 80 80 (above U+10FFFF)",
         _frame(FrameType.SEND, _send(body=b"\xf4\x90\x80\x80")), B),
        ("history_conv_kind_3", "HISTORY_PULL with conversation kind 3",
         _frame(FrameType.HISTORY_PULL, struct.pack(">BQQB", 3, 1002, 0, 0)), I),
        ("push_conv_kind_0", "a message record with conversation kind 0",
         _frame(FrameType.PUSH, _record(conv_kind=0), rid=0), I),
        ("unread_count_0", "OFFLINE_PAGE with an UNREAD entry of count 0",
         _frame(FrameType.OFFLINE_PAGE, struct.pack(">QBBHHBQH", 5, 0, 0, 0, 1, 1, 1002, 0)), I),
        ("group_event_bad_utf8", "a group event (content_type 0) body that is not UTF-8",
         _frame(FrameType.PUSH, _record(body=b"{\xff}", conv_kind=2, ctype=0), rid=0), B),
        ("group_add_1001_members", "GROUP_ADD with 1001 ids (count checked at the prefix)",
         _frame(FrameType.GROUP_ADD, struct.pack(">QH", 5001, 1001) + b"\x00" * 8), I),
        ("members_count_over_max", "GROUP_MEMBER_LIST declaring 10001 members (no ids follow)",
         _frame(FrameType.GROUP_MEMBER_LIST, struct.pack(">QQ", 5001, 1001) + str8(b"g")
                + struct.pack(">H", 10001)), I),
        ("owner_id_0", "GROUP_MEMBER_LIST with owner 0",
         _frame(FrameType.GROUP_MEMBER_LIST, struct.pack(">QQ", 5001, 0) + str8(b"g")
                + struct.pack(">H", 0)), I),
        ("error_text_too_long", "ERROR text of 1025 bytes",
         _frame(FrameType.ERROR, struct.pack(">H", 300) + str16(b"e" * 1025)), I),
    ]  # fmt: skip


# ------------------------------------------------------------- post-v1 (spec 18)

WIRE_ONCE, CONVERSATIONS, READ_RECEIPTS = (
    Feature.WIRE_ONCE,
    Feature.CONVERSATIONS,
    Feature.READ_RECEIPTS,
)
# User 1001's conversation list: 1:1 with 1002 (1001 sent m1, then read it as the sender; 1002
# read m1 and answered m2, unread), group 5001 (mg unread) and 1:1 with 1004, whose messages
# are past the history retention (a row without a last message).
_ROW_USER = ConvEntry(U, 1002, 41, 0, _m1().msg_id, _m1().msg_id, 1, (_m2(),))
_ROW_GROUP = ConvEntry(G, 5001, 42, 0, 7_301_234_567_890_123_400, 0, 1, (_mg(),))
_ROW_EMPTY = ConvEntry(U, 1004, 7, 0, 0, 0, 0, ())


def ext_valid_frames() -> list[tuple[str, str, Frame]]:
    m1, m2 = _m1(), _m2()
    read_all = ConvEntry(U, 1002, 43, 0, m2.msg_id, m1.msg_id, 0, (m2,))
    hidden = ConvEntry(G, 5001, 44, 1, _ROW_GROUP.read_id, 0, 1, (_mg(),))
    notice_ids = tuple(7_301_234_567_890_124_000 + i for i in range(200))
    return [
        ("features", "enable all three features",
         Features((WIRE_ONCE, CONVERSATIONS, READ_RECEIPTS), request_id=2)),
        ("features_unknown", "unknown numbers and duplicates, in any order: ignored by the server",
         Features((READ_RECEIPTS, 77, WIRE_ONCE, 0xFFFF, WIRE_ONCE), request_id=3)),
        ("features_none", "an empty set: back to version-1 behaviour", Features((), request_id=4)),
        ("features_ok", "all three enabled, ascending",
         FeaturesOk((WIRE_ONCE, CONVERSATIONS, READ_RECEIPTS), request_id=2)),
        ("features_ok_receipts_off", "the server's read_receipts setting is off",
         FeaturesOk((WIRE_ONCE, CONVERSATIONS), request_id=3)),
        ("features_ok_none", "nothing enabled", FeaturesOk((), request_id=4)),
        ("conv_list_first", "first page, newest activity first, default size",
         ConvList(0, 0, request_id=50)),
        ("conv_list_before", "next page: before the last row's last msg_id, 100 rows",
         ConvList(m2.msg_id, 100, request_id=51)),
        ("conv_changes_all", "every row, ascending version, default size",
         ConvChanges(0, 0, request_id=52)),
        ("conv_changes_since", "rows changed after version 42, at most 20",
         ConvChanges(42, 20, request_id=53)),
        ("conv_page", "three rows: a group with its last message, a 1:1 with the peer's read "
         "position, one without a message; more to pull",
         ConvPage(44, 1, 2, (_ROW_GROUP, _ROW_USER, _ROW_EMPTY), request_id=50)),
        ("conv_page_empty", "a user with no conversations", ConvPage(0, 0, 0, (), request_id=51)),
        ("conv_changes_page", "a read mark and a hide since version 42, oldest change first",
         ConvChangesPage(44, 0, 1, (read_all, hidden), request_id=53)),
        ("conv_changes_page_empty", "nothing changed: the newest version is 44",
         ConvChangesPage(44, 0, 1, (), request_id=54)),
        ("read_mark", "mark the 1:1 with 1002 read up to m2",
         ReadMark(U, 1002, m2.msg_id, request_id=60)),
        ("read_mark_ok", "the position recorded (clamped to the newest assigned id)",
         ReadMarkOk(U, 1002, m2.msg_id, request_id=60)),
        ("conv_hide", "hide the group from the list (its history stays)",
         ConvHide(G, 5001, request_id=61)),
        ("conv_hide_ok", "hidden until a newer message arrives",
         ConvHideOk(G, 5001, request_id=61)),
        ("inbox_notice_one", "inbox entry 1043 is m2, already pushed and acknowledged",
         InboxNotice(1042, 1043, (m2.msg_id,))),
        ("inbox_notice_200", "the largest notice: entries 2001..2200",
         InboxNotice(2000, 2200, notice_ids)),
        ("read_update_own", "user 1001 read the 1:1 with 1002 on another device",
         ReadUpdate(1001, U, 1002, m2.msg_id)),
        ("read_update_receipt", "to 1002: user 1001 read 1002's messages up to m2",
         ReadUpdate(1001, U, 1001, m2.msg_id)),
        # section 19
        ("push_register_apns", "register an APNs token; notifications may show the text",
         PushRegister("apns", APNS_TOKEN, PushRegister.PREVIEW, request_id=70)),
        ("push_register_fcm_no_preview", "register an FCM token; no message text in them",
         PushRegister("fcm", FCM_TOKEN, 0, request_id=71)),
        ("push_register_max", "the longest platform name (32 bytes of every allowed character "
         "kind) and a 4096-byte token of non-ASCII text",
         PushRegister("app.voip-push_2." + "x" * (MAX_PLATFORM - 16),
                      "\u00e9" * (MAX_PUSH_TOKEN // 2), 0, request_id=72)),
        ("push_register_ok", "registered (replacing the device's previous registration)",
         PushRegisterOk(request_id=70)),
        ("push_unregister", "no more notifications to this device", PushUnregister(request_id=73)),
        ("push_unregister_ok", "unregistered (also when nothing was registered)",
         PushUnregisterOk(request_id=73)),
        # section 20
        *_timeline_valid_frames(),
    ]  # fmt: skip


# Section 20: user 1001 is in the large group 5003 (1,042 messages in its timeline, 2 of them
# unread) and in 5007, large once and small again since (its timeline stopped at seq 310,
# all read).
LARGE, WAS_LARGE = 5003, 5007


def _mt(msg_id: int, sender: int, body: bytes, **kw: Any) -> Message:
    return _msg(msg_id, sender, G, LARGE, body, **kw)


def _timeline_valid_frames() -> list[tuple[str, str, Frame]]:
    t1 = _mt(7_301_234_567_890_125_001, 1004, b"Release 2.4 is out: notes in the wiki")
    t2 = _mt(7_301_234_567_890_125_002, 1005, "Merci ! 🎉".encode())
    heads = (
        TimelineHead(LARGE, 1042, 1040, 2, t2.msg_id),
        TimelineHead(WAS_LARGE, 310, 310, 0, 7_301_234_567_890_120_310),
    )
    most = tuple(
        TimelineHead(U64_MAX - MAX_TIMELINE_HEADS + 1 + i, U64_MAX, 0, 0xFFFFFFFF, U64_MAX)
        for i in range(MAX_TIMELINE_HEADS)
    )
    held = (t1.msg_id, t2.msg_id)
    most_held = tuple(range(U64_MAX - TIMELINE_HELD_MAX + 1, U64_MAX + 1))
    full = (
        _mt(101, 1004, b"\x00" * 65535, content_type=2, sender_device="d"),
        _mt(102, 1004, b"\x01" * 65393, content_type=2, sender_device="d"),
    )
    return [
        ("timeline_heads", "the heads of my groups' timelines", TimelineHeads(request_id=80)),
        ("timeline_heads_page", "a large group with 2 unread, and a group small again whose "
         "timeline stopped at 310, all read; ascending group_id",
         TimelineHeadsPage(heads, request_id=80)),
        ("timeline_heads_page_empty", "the user is in no large group",
         TimelineHeadsPage((), request_id=81)),
        ("timeline_heads_page_500", "one head for each of 500 groups (the most), every u64 at "
         "its maximum, read_seq 0: unread saturates at 2^32-1",
         TimelineHeadsPage(most, request_id=82)),
        ("timeline_pull_from_read", "a device without a position starts at read_seq, default "
         "page size", TimelinePull(LARGE, 1040, 0, request_id=83)),
        ("timeline_pull_next", "the next page after position 1240, at most 200",
         TimelinePull(LARGE, 1240, 200, request_id=84)),
        ("timeline_pull_start", "from the first seq, one message",
         TimelinePull(LARGE, 0, 1, request_id=85)),
        ("timeline_page", "seqs 1041 and 1042, oldest first: caught up",
         TimelinePage(LARGE, 1042, 1042, 0, (t1, t2), request_id=83)),
        ("timeline_page_has_more", "a page of limit 2 out of 1500: more to pull after 1042",
         TimelinePage(LARGE, 1042, 1500, 1, (t1, t2), request_id=86)),
        ("timeline_page_skipped", "seqs before the member's join are covered without messages",
         TimelinePage(LARGE, 200, 1500, 1, (), request_id=87)),
        ("timeline_page_caught_up", "nothing after the position: position = done",
         TimelinePage(LARGE, 1042, 1042, 0, (), request_id=88)),
        ("timeline_page_never_large", "a group that never had a timeline: position 0, done 0",
         TimelinePage(5001, 0, 0, 0, (), request_id=89)),
        ("timeline_page_max_frame", "a page whose length prefix is exactly 131072",
         TimelinePage(LARGE, 2, 2, 0, full, request_id=90)),
        ("timeline_pull_held", "after 1040, holding the messages of seqs 1041 and 1042 (got by "
         "PUSH): the page leaves them out", TimelinePull(LARGE, 1040, 0, held, request_id=91)),
        ("timeline_page_held", "the answer to timeline_pull_held: both messages held, none "
         "sent, the position covers them", TimelinePage(LARGE, 1042, 1042, 0, (), request_id=91)),
        ("timeline_pull_held_some", "holding seq 1042's message and one above done (pushed, "
         "not in the timeline yet)",
         TimelinePull(LARGE, 1040, 200, (t2.msg_id, t2.msg_id + 8), request_id=92)),
        ("timeline_page_held_some", "the answer to timeline_pull_held_some: seq 1041 sent, 1042 "
         "left out, the id not in the page ignored",
         TimelinePage(LARGE, 1042, 1042, 0, (t1,), request_id=92)),
        ("timeline_pull_held_1000", "1000 held ids (the most), strictly ascending, up to "
         "2^64-1", TimelinePull(LARGE, 1040, 200, most_held, request_id=93)),
    ]  # fmt: skip


def _conv_row(
    kind: int = 1, conv: int = 1002, version: int = 9, hidden: int = 0, peer: int = 0,
    last: tuple[bytes, ...] = (),
) -> bytes:  # fmt: skip
    """A CONV record by hand; `last` are MESSAGE records (from `_record`, conversation 1002)."""
    return struct.pack(">BQQBQQIH", kind, conv, version, hidden, 5, peer, 0, len(last)) + b"".join(
        last
    )


def _conv_page(*rows: bytes, ftype: int = FrameType.CONV_PAGE, count: int | None = None) -> bytes:
    n = len(rows) if count is None else count
    return _frame(ftype, struct.pack(">QBIH", 9, 0, 0, n) + b"".join(rows))


def ext_invalid_frames() -> list[tuple[str, str, bytes, ErrorCode]]:
    M, UT, I = ErrorCode.MALFORMED_FRAME, ErrorCode.UNKNOWN_FRAME_TYPE, ErrorCode.INVALID_FIELD  # noqa: E741
    B = ErrorCode.BAD_UTF8
    notice = FrameType.INBOX_NOTICE
    read_update = struct.pack(">QBQQ", 1001, 1, 1002, 77)
    reg = FrameType.PUSH_REGISTER
    return [
        ("unknown_type_0x39", "frame type 0x39 is not defined (post-v1 types are 0x30..0x38)",
         _frame(0x39, b""), UT),
        ("unknown_type_0xb9", "frame type 0xb9 is not defined (post-v1 replies are 0xb0..0xb8)",
         _frame(0xB9, b""), UT),
        ("conv_list_limit_101", "conversation page size above 100",
         _frame(FrameType.CONV_LIST, struct.pack(">QB", 0, 101)), I),
        ("conv_changes_limit_255", "conversation page size 255",
         _frame(FrameType.CONV_CHANGES, struct.pack(">QB", 0, 255)), I),
        ("conv_list_truncated", "CONV_LIST without its limit byte",
         _frame(FrameType.CONV_LIST, struct.pack(">Q", 0)), M),
        ("features_33", "33 features (count checked at the prefix)",
         _frame(FrameType.FEATURES, struct.pack(">H", 33) + b"\x00\x01" * 33), I),
        ("features_odd_byte", "FEATURES whose last entry is 1 byte",
         _frame(FrameType.FEATURES, struct.pack(">HHB", 2, 1, 0)), M),
        ("features_ok_padded", "FEATURES_OK with a byte after its list",
         _frame(FrameType.FEATURES_OK, struct.pack(">HH", 1, 1) + b"\x00"), M),
        ("notice_to_equals_from", "INBOX_NOTICE whose to is not above from",
         _frame(notice, struct.pack(">QQHQ", 1042, 1042, 1, 77), rid=0), I),
        ("notice_to_below_from", "INBOX_NOTICE with to < from",
         _frame(notice, struct.pack(">QQHQ", 1042, 1000, 1, 77), rid=0), I),
        ("notice_no_ids", "INBOX_NOTICE with no ids",
         _frame(notice, struct.pack(">QQH", 1042, 1043, 0), rid=0), I),
        ("notice_201_ids", "INBOX_NOTICE declaring 201 ids (count checked at the prefix)",
         _frame(notice, struct.pack(">QQH", 0, 201, 201), rid=0), I),
        ("notice_msg_id_0", "INBOX_NOTICE listing msg_id 0",
         _frame(notice, struct.pack(">QQHQ", 1042, 1043, 1, 0), rid=0), I),
        ("notice_ids_short", "INBOX_NOTICE says 2 ids but holds 1",
         _frame(notice, struct.pack(">QQHQ", 1042, 1044, 2, 77), rid=0), M),
        ("read_mark_conv_kind_3", "READ_MARK with conversation kind 3",
         _frame(FrameType.READ_MARK, struct.pack(">BQQ", 3, 1002, 77)), I),
        ("read_mark_msg_id_0", "READ_MARK at msg_id 0",
         _frame(FrameType.READ_MARK, struct.pack(">BQQ", 1, 1002, 0)), I),
        ("read_mark_ok_conv_id_0", "READ_MARK_OK for conversation 0",
         _frame(FrameType.READ_MARK_OK, struct.pack(">BQQ", 1, 0, 77)), I),
        ("conv_hide_conv_kind_0", "CONV_HIDE with conversation kind 0",
         _frame(FrameType.CONV_HIDE, struct.pack(">BQ", 0, 1002)), I),
        ("conv_hide_padded", "CONV_HIDE with a byte after conv_id",
         _frame(FrameType.CONV_HIDE, struct.pack(">BQB", 1, 1002, 0)), M),
        ("conv_hide_ok_truncated", "CONV_HIDE_OK with a 7-byte conv_id",
         _frame(FrameType.CONV_HIDE_OK, b"\x01" + b"\x00" * 7), M),
        ("read_update_reader_0", "READ_UPDATE from reader 0",
         _frame(FrameType.READ_UPDATE, struct.pack(">QBQQ", 0, 1, 1002, 77), rid=0), I),
        ("read_update_truncated", "READ_UPDATE without the last byte of msg_id",
         _frame(FrameType.READ_UPDATE, read_update[:-1], rid=0), M),
        ("conv_hidden_2", "a CONV record with hidden = 2", _conv_page(_conv_row(hidden=2)), I),
        ("conv_row_kind_3", "a CONV record with conversation kind 3",
         _conv_page(_conv_row(kind=3)), I),
        ("conv_version_0", "a CONV record with version 0 (row versions start at 1)",
         _conv_page(_conv_row(version=0)), I),
        ("conv_group_peer_read", "a group's CONV record with a peer read position",
         _conv_page(_conv_row(kind=2, conv=5001, peer=5)), I),
        ("conv_last_2_messages", "a CONV record with 2 last messages",
         _conv_page(_conv_row(last=(_record(77), _record(78)))), I),
        ("conv_last_elsewhere", "a CONV record whose last message belongs to another conversation",
         _conv_page(_conv_row(conv=1003, last=(_record(77),))), I),
        ("conv_last_bad_utf8", "a CONV record whose last TEXT message is not UTF-8",
         _conv_page(_conv_row(last=(_record(77, body=b"\xff"),))), B),
        ("conv_page_101_convs", "CONV_PAGE declaring 101 rows (count checked at the prefix)",
         _conv_page(count=101), I),
        ("conv_page_rows_short", "CONV_CHANGES_PAGE says 2 rows but holds 1",
         _conv_page(_conv_row(), ftype=FrameType.CONV_CHANGES_PAGE, count=2), M),
        ("conv_page_has_more_2", "CONV_PAGE with has_more = 2",
         _frame(FrameType.CONV_PAGE, struct.pack(">QBIH", 9, 2, 0, 0)), I),
        ("conv_page_padded", "CONV_PAGE with a byte after its rows",
         _frame(FrameType.CONV_PAGE, struct.pack(">QBIHB", 9, 0, 0, 0, 0)), M),
        # section 19
        ("push_platform_empty", "PUSH_REGISTER with an empty platform",
         _frame(reg, _push_register(platform=b"")), I),
        ("push_platform_33", "a 33-byte platform (length checked at the prefix)",
         _frame(reg, _push_register(platform=b"p" * 33)), I),
        ("push_platform_upper", "platform APNS: capitals are not allowed",
         _frame(reg, _push_register(platform=b"APNS")), I),
        ("push_platform_space", "platform 'apns ' with a space",
         _frame(reg, _push_register(platform=b"apns ")), I),
        ("push_platform_non_ascii", "platform with a valid non-ASCII letter",
         _frame(reg, _push_register(platform="fcm\u00e9".encode())), I),
        ("push_platform_bad_utf8", "platform holds 0xff",
         _frame(reg, _push_register(platform=b"fcm\xff")), B),
        ("push_token_empty", "PUSH_REGISTER with an empty token",
         _frame(reg, _push_register(token=b"")), I),
        ("push_token_4097", "a 4097-byte token (length checked at the prefix)",
         _frame(reg, _push_register(token=b"t" * 4097)), I),
        ("push_token_bad_utf8", "token with a lone continuation byte",
         _frame(reg, _push_register(token=b"abc\x80")), B),
        ("push_options_2", "options bit 1 set (only bit 0, preview, is defined)",
         _frame(reg, _push_register(options=2)), I),
        ("push_options_0x81", "preview and bit 7 set", _frame(reg, _push_register(options=0x81)),
         I),
        ("push_register_truncated", "PUSH_REGISTER without its options byte",
         _frame(reg, _push_register()[:-1]), M),
        ("push_register_padded", "PUSH_REGISTER with a byte after options",
         _frame(reg, _push_register() + b"\x00"), M),
        ("push_register_ok_padded", "PUSH_REGISTER_OK with a body byte",
         _frame(FrameType.PUSH_REGISTER_OK, b"\x00"), M),
        ("push_unregister_padded", "PUSH_UNREGISTER with a body byte",
         _frame(FrameType.PUSH_UNREGISTER, b"\x00"), M),
        ("push_unregister_ok_padded", "PUSH_UNREGISTER_OK with two body bytes",
         _frame(FrameType.PUSH_UNREGISTER_OK, b"\x00\x00"), M),
        # section 20
        *_timeline_invalid_frames(),
    ]  # fmt: skip


def _head(group_id: int = 5003, done: int = 1042, read_seq: int = 1040, unread: int = 2,
          last: int = 77) -> bytes:  # fmt: skip
    return struct.pack(">QQQIQ", group_id, done, read_seq, unread, last)


def _heads_page(*heads: bytes, count: int | None = None) -> bytes:
    n = len(heads) if count is None else count
    return _frame(FrameType.TIMELINE_HEADS_PAGE, struct.pack(">H", n) + b"".join(heads))


def _timeline_page(
    *records: bytes, group_id: int = 5003, position: int = 1042, done: int = 1042,
    has_more: int = 0, count: int | None = None,
) -> bytes:  # fmt: skip
    n = len(records) if count is None else count
    fixed = struct.pack(">QQQBH", group_id, position, done, has_more, n)
    return _frame(FrameType.TIMELINE_PAGE, fixed + b"".join(records))


def _timeline_pull_body(*held: int, group_id: int = 5003, limit: int = 0,
                        count: int | None = None) -> bytes:  # fmt: skip
    n = len(held) if count is None else count
    return struct.pack(f">QQHH{len(held)}Q", group_id, 1040, limit, n, *held)


def _timeline_pull(*held: int, group_id: int = 5003, limit: int = 0,
                   count: int | None = None) -> bytes:  # fmt: skip
    """A TIMELINE_PULL after seq 1040 by hand, its held ids as given."""
    body = _timeline_pull_body(*held, group_id=group_id, limit=limit, count=count)
    return _frame(FrameType.TIMELINE_PULL, body)


def _timeline_invalid_frames() -> list[tuple[str, str, bytes, ErrorCode]]:
    M, I, B = ErrorCode.MALFORMED_FRAME, ErrorCode.INVALID_FIELD, ErrorCode.BAD_UTF8  # noqa: E741
    pull = FrameType.TIMELINE_PULL
    ours = _record(77, conv_kind=2, conv_id=5003)
    return [
        ("timeline_heads_padded", "TIMELINE_HEADS with a body byte",
         _frame(FrameType.TIMELINE_HEADS, b"\x00"), M),
        ("timeline_pull_limit_201", "timeline page size above 200",
         _frame(pull, struct.pack(">QQH", 5003, 1040, 201)), I),
        ("timeline_pull_limit_65535", "timeline page size 65535",
         _frame(pull, struct.pack(">QQH", 5003, 1040, 0xFFFF)), I),
        ("timeline_pull_group_0", "TIMELINE_PULL of group 0",
         _frame(pull, struct.pack(">QQH", 0, 1040, 0)), I),
        ("timeline_pull_truncated", "TIMELINE_PULL without the last byte of its limit",
         _frame(pull, struct.pack(">QQH", 5003, 1040, 0)[:-1]), M),
        ("timeline_pull_padded", "TIMELINE_PULL with a byte after its limit",
         _frame(pull, struct.pack(">QQHB", 5003, 1040, 0, 0)), M),
        ("timeline_pull_held_padded", "TIMELINE_PULL with a byte after its held ids",
         _frame(pull, _timeline_pull_body(77) + b"\x00"), M),
        ("timeline_pull_held_1001", "TIMELINE_PULL declaring 1001 held ids (count checked at "
         "the prefix)", _timeline_pull(count=TIMELINE_HELD_MAX + 1), I),
        ("timeline_pull_held_short", "TIMELINE_PULL says 2 held ids but holds 1",
         _timeline_pull(77, count=2), M),
        ("timeline_pull_held_id_truncated", "a held id without its last byte",
         _frame(pull, _timeline_pull_body(77, 78)[:-1]), M),
        ("timeline_pull_held_descending", "held ids not in ascending order",
         _timeline_pull(78, 77), I),
        ("timeline_pull_held_repeated", "the same held id twice", _timeline_pull(77, 77), I),
        ("timeline_pull_held_0", "a held id 0 (not an id)", _timeline_pull(0, 77), I),
        ("timeline_heads_501", "TIMELINE_HEADS_PAGE declaring 501 heads (count checked at the "
         "prefix)", _heads_page(count=MAX_TIMELINE_HEADS + 1), I),
        ("timeline_heads_short", "TIMELINE_HEADS_PAGE says 2 heads but holds 1",
         _heads_page(_head(), count=2), M),
        ("timeline_head_truncated", "a head without the last byte of last_msg_id",
         _heads_page(_head()[:-1], count=1), M),
        ("timeline_head_group_0", "a head of group 0", _heads_page(_head(group_id=0)), I),
        ("timeline_head_read_above_done", "a head whose read_seq is above its done",
         _heads_page(_head(done=1042, read_seq=1043, unread=0)), I),
        ("timeline_heads_descending", "heads not in ascending group_id",
         _heads_page(_head(5007), _head(5003)), I),
        ("timeline_heads_repeated", "the same group twice", _heads_page(_head(), _head()), I),
        ("timeline_page_201_messages", "TIMELINE_PAGE declaring 201 messages (count checked at "
         "the prefix)", _timeline_page(count=TIMELINE_PAGE_MAX + 1), I),
        ("timeline_page_short", "TIMELINE_PAGE says 2 messages but holds 1",
         _timeline_page(ours, count=2), M),
        ("timeline_page_group_0", "TIMELINE_PAGE of group 0",
         _timeline_page(group_id=0, position=0, done=0), I),
        ("timeline_page_has_more_2", "TIMELINE_PAGE with has_more = 2",
         _timeline_page(position=1000, has_more=2), I),
        ("timeline_page_position_above_done", "a page covering seqs above done",
         _timeline_page(position=1043), I),
        ("timeline_page_other_group", "a message of group 5004 in group 5003's timeline",
         _timeline_page(_record(77, conv_kind=2, conv_id=5004)), I),
        ("timeline_page_user_message", "a 1:1 message in a group's timeline",
         _timeline_page(_record(77, conv_kind=1, conv_id=5003)), I),
        ("timeline_page_bad_utf8", "a TEXT message whose body is not UTF-8",
         _timeline_page(_record(77, body=b"\xc3", conv_kind=2, conv_id=5003)), B),
        ("timeline_page_padded", "TIMELINE_PAGE with a byte after its messages",
         _frame(FrameType.TIMELINE_PAGE, struct.pack(">QQQBH", 5003, 1042, 1042, 0, 1) + ours
                + b"\x00"), M),
    ]  # fmt: skip


def _push_register(platform: bytes = b"apns", token: bytes = b"0a1b2c", options: int = 1) -> bytes:
    return str8(platform) + str16(token) + struct.pack(">B", options)


def _documents(
    valid_frames: list[tuple[str, str, Frame]],
    invalid_frames: list[tuple[str, str, bytes, ErrorCode]],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    valid = []
    for name, description, frame in valid_frames:
        entry = {"name": name, "description": description, "hex": encode(frame).hex()}
        entry.update(frame_to_json(frame))
        valid.append(entry)
    invalid = [
        {
            "name": name,
            "description": description,
            "hex": data.hex(),
            "error": code.name,
            "error_code": code.value,
        }
        for name, description, data, code in invalid_frames
    ]
    return valid, invalid


def build() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The version-1 vectors (valid.json, invalid.json)."""
    return _documents(valid_frames(), invalid_frames())


def build_ext() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The post-v1 vectors (ext-valid.json, ext-invalid.json)."""
    return _documents(ext_valid_frames(), ext_invalid_frames())


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    out = Path(args[0] if args else "spec/vectors")
    for prefix, (valid, invalid) in (("", build()), ("ext-", build_ext())):
        for fname, doc in ((f"{prefix}valid.json", valid), (f"{prefix}invalid.json", invalid)):
            (out / fname).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {len(valid)} valid and {len(invalid)} invalid {prefix}vectors to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
