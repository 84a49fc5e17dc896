"""The wire layout of protocol v1, defined once with `construct`.

`HEADER` and `BODIES` are the single source of truth. From them the codec builds
  * `FRAME`: the interpreted reference parser of a whole payload (header + body), and
  * `frame_struct(t)`: a flat header+body Struct per type, compiled for the hot path.
Integers are unsigned big-endian. Strings and blobs carry a byte-length prefix.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias

from construct import (
    Construct,
    Error,
    FormatField,
    Int8ub,
    Int16ub,
    Int32ub,
    Int64ub,
    Struct,
    Switch,
    this,
)

from improto.enums import FrameType as T
from improto.fields import Blob, End, FixedBytes, List16, PackedRun, TailList16, Utf8
from improto.limits import (
    CONV_PAGE_MAX,
    HISTORY_PAGE_MAX,
    MAX_BODY,
    MAX_DEVICE_ID,
    MAX_FEATURES,
    MAX_GROUP_MEMBERS,
    MAX_GROUP_NAME,
    MAX_GROUPS_PER_USER,
    MAX_IDS_PER_REQUEST,
    MAX_PLATFORM,
    MAX_PUSH_TOKEN,
    MAX_TEXT,
    MAX_TIMELINE_HEADS,
    MAX_TOKEN,
    NOTICE_MAX_IDS,
    OFFLINE_PAGE_MAX,
    TIMELINE_HELD_MAX,
    TIMELINE_PAGE_MAX,
)

# One field of a layout: each parses into and builds from its own type (int, str, a list...).
Field: TypeAlias = "Construct[Any, Any]"

HEADER: list[Field] = [
    "version" / Int8ub,
    "type" / Int8ub,
    "flags" / Int8ub,
    "request_id" / Int32ub,
]

# The message record. PUSH carries its fields inline (same bytes as a nested Struct, one
# Container fewer per parse); pages carry arrays of it.
MESSAGE_FIELDS: list[Field] = [
    "msg_id" / Int64ub,
    "server_time" / Int64ub,
    "sender_id" / Int64ub,
    "sender_device" / Utf8("sender_device", 1, 1, MAX_DEVICE_ID),
    "conv_kind" / Int8ub,
    "conv_id" / Int64ub,
    "content_type" / Int16ub,
    "client_msg_id" / FixedBytes("client_msg_id", 16),
    "body" / Blob("body", 2, 0, MAX_BODY),
]
UNREAD_FIELDS: list[Field] = ["conv_kind" / Int8ub, "conv_id" / Int64ub, "count" / Int16ub]
GROUP_SUMMARY_FIELDS: list[Field] = [
    "group_id" / Int64ub,
    "name" / Utf8("name", 1, 1, MAX_GROUP_NAME),
]

# The TIMELINE_HEAD record of TIMELINE_HEADS_PAGE (spec 20.3).
TIMELINE_HEAD_FIELDS: list[Field] = [
    "group_id" / Int64ub,
    "done" / Int64ub,
    "read_seq" / Int64ub,
    "unread" / Int32ub,
    "last_msg_id" / Int64ub,
]


def conv_fields(message: Struct) -> list[Field]:
    """The CONV record (spec 18.3); `message` is the MESSAGE record's Struct."""
    return [
        "conv_kind" / Int8ub,
        "conv_id" / Int64ub,
        "version" / Int64ub,
        "hidden" / Int8ub,
        "read_id" / Int64ub,
        "peer_read_id" / Int64ub,
        "unread" / Int32ub,
        "last" / List16("last", message, 0, 1),
    ]


def _ids(lo: int, hi: int) -> List16[int, int]:
    return List16("members", Int64ub, lo, hi)


def _text() -> Utf8:
    return Utf8("text", 2, 0, MAX_TEXT)


def _bodies(record: Callable[[list[Field]], Struct]) -> dict[T, list[Field]]:
    """The body layout of every frame type; `record` turns a record's fields into a Struct."""
    message, unread, group = (
        record(MESSAGE_FIELDS),
        record(UNREAD_FIELDS),
        record(GROUP_SUMMARY_FIELDS),
    )
    conv = record(conv_fields(message))
    head = record(TIMELINE_HEAD_FIELDS)
    features: list[Field] = ["features" / List16("features", Int16ub, 0, MAX_FEATURES)]
    conv_page: list[Field] = [
        "list_version" / Int64ub,  # not "version": the header already has that name
        "has_more" / Int8ub,
        "total_unread" / Int32ub,
        "convs" / List16("convs", conv, 0, CONV_PAGE_MAX),
    ]
    position: list[Field] = ["conv_kind" / Int8ub, "conv_id" / Int64ub, "msg_id" / Int64ub]
    conv_ref: list[Field] = ["conv_kind" / Int8ub, "conv_id" / Int64ub]
    return {
        T.HELLO: [
            "protocol_version" / Int8ub,
            "client_kind" / Int8ub,
            "device_id" / Utf8("device_id", 1, 1, MAX_DEVICE_ID),
            "token" / Utf8("token", 2, 1, MAX_TOKEN),
        ],
        T.HELLO_OK: [
            "user_id" / Int64ub,
            "server_time" / Int64ub,
            "heartbeat_s" / Int16ub,
            "idle_timeout_s" / Int16ub,
            "max_frame" / Int32ub,
        ],
        T.PING: [],
        T.PONG: ["server_time" / Int64ub],
        T.SEND: [
            "client_msg_id" / FixedBytes("client_msg_id", 16),
            "conv_kind" / Int8ub,
            "conv_id" / Int64ub,
            "content_type" / Int16ub,
            "body" / Blob("body", 2, 0, MAX_BODY),
        ],
        T.SEND_ACK: [
            "client_msg_id" / FixedBytes("client_msg_id", 16),
            "msg_id" / Int64ub,
            "server_time" / Int64ub,
            "duplicate" / Int8ub,
        ],
        T.PUSH: MESSAGE_FIELDS,
        T.PUSH_ACK: ["msg_id" / Int64ub],
        T.OFFLINE_PULL: ["cursor" / Int64ub, "limit" / Int16ub],
        T.OFFLINE_PAGE: [
            "cursor" / Int64ub,
            "has_more" / Int8ub,
            "gap" / Int8ub,
            "messages" / List16("messages", message, 0, OFFLINE_PAGE_MAX),
            "unread" / List16("unread", unread, 0, OFFLINE_PAGE_MAX),
        ],
        T.OFFLINE_ACK: ["cursor" / Int64ub],
        T.OFFLINE_ACK_OK: ["cursor" / Int64ub],
        T.HISTORY_PULL: [
            "conv_kind" / Int8ub,
            "conv_id" / Int64ub,
            "before_id" / Int64ub,
            "limit" / Int8ub,
        ],
        T.HISTORY_PAGE: [
            "conv_kind" / Int8ub,
            "conv_id" / Int64ub,
            "has_more" / Int8ub,
            "messages" / List16("messages", message, 0, HISTORY_PAGE_MAX),
        ],
        T.GROUP_CREATE: [
            "name" / Utf8("name", 1, 1, MAX_GROUP_NAME),
            "members" / _ids(0, MAX_IDS_PER_REQUEST),
        ],
        T.GROUP_CREATED: ["group_id" / Int64ub],
        T.GROUP_ADD: ["group_id" / Int64ub, "members" / _ids(1, MAX_IDS_PER_REQUEST)],
        T.GROUP_ADD_OK: ["group_id" / Int64ub, "count" / Int16ub],
        T.GROUP_REMOVE: ["group_id" / Int64ub, "members" / _ids(1, MAX_IDS_PER_REQUEST)],
        T.GROUP_REMOVE_OK: ["group_id" / Int64ub, "count" / Int16ub],
        T.GROUP_MEMBERS: ["group_id" / Int64ub],
        T.GROUP_MEMBER_LIST: [
            "group_id" / Int64ub,
            "owner_id" / Int64ub,
            "name" / Utf8("name", 1, 1, MAX_GROUP_NAME),
            "members" / _ids(0, MAX_GROUP_MEMBERS),
        ],
        T.MY_GROUPS: [],
        T.GROUP_LIST: ["groups" / List16("groups", group, 0, MAX_GROUPS_PER_USER)],
        T.CLOSE: ["reason" / Int8ub, "text" / _text()],
        T.SYNC_HINT: [],
        T.ERROR: ["code" / Int16ub, "text" / _text()],
        # post-v1 (spec section 18)
        T.FEATURES: features,
        T.FEATURES_OK: features,
        T.CONV_LIST: ["before_id" / Int64ub, "limit" / Int8ub],
        T.CONV_CHANGES: ["since_version" / Int64ub, "limit" / Int8ub],
        T.CONV_PAGE: conv_page,
        T.CONV_CHANGES_PAGE: conv_page,
        T.READ_MARK: position,
        T.READ_MARK_OK: position,
        T.CONV_HIDE: conv_ref,
        T.CONV_HIDE_OK: conv_ref,
        T.INBOX_NOTICE: [
            "from_cursor" / Int64ub,
            "to_cursor" / Int64ub,
            "msg_ids" / List16("msg_ids", Int64ub, 1, NOTICE_MAX_IDS),
        ],
        T.READ_UPDATE: [
            "reader_id" / Int64ub,
            "conv_kind" / Int8ub,
            "conv_id" / Int64ub,
            "msg_id" / Int64ub,
        ],
        # post-v1 (spec section 19); "options", not "flags": the header has that name
        T.PUSH_REGISTER: [
            "platform" / Utf8("platform", 1, 1, MAX_PLATFORM),
            "token" / Utf8("token", 2, 1, MAX_PUSH_TOKEN),
            "options" / Int8ub,
        ],
        T.PUSH_REGISTER_OK: [],
        T.PUSH_UNREGISTER: [],
        T.PUSH_UNREGISTER_OK: [],
        # post-v1 (spec section 20)
        T.TIMELINE_HEADS: [],
        T.TIMELINE_HEADS_PAGE: ["heads" / List16("heads", head, 0, MAX_TIMELINE_HEADS)],
        T.TIMELINE_PULL: [
            "group_id" / Int64ub,
            "after_seq" / Int64ub,
            "limit" / Int16ub,
            "held" / TailList16("held", Int64ub, 0, TIMELINE_HELD_MAX),
        ],
        T.TIMELINE_PAGE: [
            "group_id" / Int64ub,
            "position" / Int64ub,
            "done" / Int64ub,
            "has_more" / Int8ub,
            "messages" / List16("messages", message, 0, TIMELINE_PAGE_MAX),
        ],
    }


def _plain(fields: list[Field]) -> Struct:
    return Struct(*fields)


def merge_runs(fields: list[Field]) -> list[Field]:
    """Replace each run of 2+ adjacent named integer fields by one PackedRun (same bytes)."""
    out: list[Field] = []
    run: list[tuple[Field, str, FormatField[int, int]]] = []  # field, its name, its int

    def flush() -> None:
        if len(run) > 1:
            fmts = "".join(sub.fmtstr[1:] for _, _, sub in run)
            out.append(PackedRun([name for _, name, _ in run], fmts))
        else:
            out.extend(f for f, _, _ in run)
        run.clear()

    for f in fields:
        sub: object = getattr(f, "subcon", None)
        if f.name and isinstance(sub, FormatField):
            run.append((f, f.name, sub))
        else:
            flush()
            out.append(f)
    flush()
    return out


def _merged(fields: list[Field]) -> Struct:
    return Struct(*merge_runs(fields))


# The reference layout: every field separate, exactly as spec/PROTOCOL.md lists them.
BODIES = _bodies(_plain)

# Interpreted reference parser of a whole payload (the bytes after the length prefix).
FRAME = Struct(
    *HEADER,
    "body" / Switch(this.type, {int(t): Struct(*f) for t, f in BODIES.items()}, default=Error),
    End(),
)

_MERGED_BODIES = _bodies(_merged)


def frame_struct(frame_type: T) -> Struct:
    """Flat header+body Struct of one type in the reference layout (interpreted)."""
    return Struct(*HEADER, *BODIES[frame_type], End())


def compiled_frame_struct(frame_type: T) -> Struct:
    """The same layout with integer runs merged, ready for `.compile()`."""
    return Struct(*merge_runs([*HEADER, *_MERGED_BODIES[frame_type]]), End())
