"""The language-neutral JSON form of frames used by spec/vectors (see its README).

u64 values are decimal strings (JSON numbers lose precision past 2^53 in many languages),
other integers are numbers, opaque bytes are lowercase hex, text is a JSON string.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, TypeVar

from improto.enums import FrameType
from improto.frames import (
    FRAME_CLASSES,
    ConvEntry,
    Frame,
    GroupSummary,
    Message,
    Push,
    TimelineHead,
    UnreadCount,
)

U64_FIELDS = frozenset(
    {
        "msg_id", "server_time", "sender_id", "conv_id", "user_id", "cursor", "before_id",
        "group_id", "owner_id", "members",
        # post-v1 (spec section 18)
        "since_version", "list_version", "version", "read_id", "peer_read_id", "from_cursor",
        "to_cursor", "msg_ids", "reader_id",
        # post-v1 (spec section 20)
        "done", "read_seq", "last_msg_id", "after_seq", "position", "held",
    }
)  # fmt: skip
_RECORD_OF = {
    "messages": Message,
    "unread": UnreadCount,
    "groups": GroupSummary,
    "convs": ConvEntry,
    "last": Message,
    "heads": TimelineHead,
}
_Record = TypeVar("_Record", Message, UnreadCount, GroupSummary, ConvEntry, TimelineHead)
_Records = Message | UnreadCount | GroupSummary | ConvEntry | TimelineHead

# JSON values are typed Any: a JSON document is only known by what a reader expects of it.


def _value_to_json(name: str, v: object) -> Any:
    if isinstance(v, bytes):
        return v.hex()
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v) if name in U64_FIELDS else int(v)
    if isinstance(v, tuple):
        return [_value_to_json(name, x) for x in v]
    assert isinstance(v, _Records)
    return record_to_json(v)


def record_to_json(rec: _Records) -> dict[str, Any]:
    return {f.name: _value_to_json(f.name, getattr(rec, f.name)) for f in fields(rec)}


def _value_from_json(name: str, annotation: str, v: Any) -> Any:
    if annotation == "bytes":
        return bytes.fromhex(v)
    if annotation == "str":
        return v
    if annotation == "int":
        return int(v)
    if annotation == "tuple[int, ...]":
        return tuple(int(x) for x in v)
    if name == "message":
        return record_from_json(Message, v)
    return tuple(record_from_json(_RECORD_OF[name], x) for x in v)


def record_from_json(cls: type[_Record], obj: dict[str, Any]) -> _Record:
    kw = {f.name: _value_from_json(f.name, str(f.type), obj[f.name]) for f in fields(cls)}
    return cls(**kw)


def frame_to_json(frame: Frame) -> dict[str, Any]:
    body = {
        f.name: _value_to_json(f.name, getattr(frame, f.name))
        for f in fields(frame)
        if f.name not in ("request_id", "flags")
    }
    if isinstance(frame, Push):  # PUSH's body is the record itself
        body = body["message"]
    return {
        "type": frame.TYPE.name,
        "type_code": frame.TYPE.value,
        "request_id": frame.request_id,
        "flags": frame.flags,
        "fields": body,
    }


def frame_from_json(obj: dict[str, Any]) -> Frame:
    cls = FRAME_CLASSES[FrameType[obj["type"]].value]
    body = obj["fields"]
    if cls is Push:
        return Push(
            record_from_json(Message, body), request_id=obj["request_id"], flags=obj["flags"]
        )
    kw = {
        f.name: _value_from_json(f.name, str(f.type), body[f.name])
        for f in fields(cls)
        if f.name not in ("request_id", "flags")
    }
    return cls(**kw, request_id=obj["request_id"], flags=obj["flags"])
