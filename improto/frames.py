"""Typed frame objects: one frozen dataclass per frame type, plus the records they carry.

Field names and order match the wire layout in `improto.schema` (a test checks this).
Each class validates the ranges the spec sets that the wire widths alone do not enforce;
the codec calls `validate()` after every decode and before every encode.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import ClassVar

from improto.enums import ClientKind, ContentType, ConvKind, FrameType
from improto.errors import BadUtf8, InvalidField, UnsupportedVersion
from improto.limits import (
    CONV_PAGE_MAX,
    HISTORY_PAGE_MAX,
    MAX_FEATURES,
    MAX_GROUP_MEMBERS,
    MAX_GROUPS_PER_USER,
    MAX_IDS_PER_REQUEST,
    MAX_TIMELINE_HEADS,
    NOTICE_MAX_IDS,
    OFFLINE_PAGE_MAX,
    PROTOCOL_VERSION,
    TIMELINE_HELD_MAX,
    TIMELINE_PAGE_MAX,
    U64_MAX,
)

_CONV_KINDS = frozenset(k.value for k in ConvKind)
_CLIENT_KINDS = frozenset(k.value for k in ClientKind)


def _bad(msg: str) -> InvalidField:
    return InvalidField(msg)


def _check_id(value: int, name: str) -> None:
    """Ids of users, groups, conversations and messages are 1..2^64-1; 0 means "none"."""
    if not 1 <= value <= U64_MAX:
        raise _bad(f"{name}: {value} is not an id (1..2^64-1)")


def _check_bool(value: int, name: str) -> None:
    if value != 0 and value != 1:
        raise _bad(f"{name}: {value} is not 0 or 1")


def _check_conv(kind: int, conv_id: int) -> None:
    if kind not in _CONV_KINDS:
        raise _bad(f"conv_kind: {kind} is not 1 (user) or 2 (group)")
    _check_id(conv_id, "conv_id")


def _check_count(items: tuple[object, ...], lo: int, hi: int, name: str) -> None:
    if not lo <= len(items) <= hi:
        raise _bad(f"{name}: {len(items)} entries, allowed {lo}..{hi}")


def _check_ids(ids: tuple[int, ...], lo: int, hi: int, name: str) -> None:
    _check_count(ids, lo, hi, name)
    for uid in ids:
        _check_id(uid, name)


def _check_ascending_ids(ids: tuple[int, ...], lo: int, hi: int, name: str) -> None:
    """An id list that is a set: lo..hi ids, strictly ascending (no repeats)."""
    _check_ids(ids, lo, hi, name)
    previous = 0
    for i in ids:
        if i <= previous:
            raise _bad(f"{name}: ids not strictly ascending")
        previous = i


def _check_text_body(content_type: int, body: bytes) -> None:
    if content_type <= ContentType.TEXT:  # TEXT and GROUP_EVENT bodies are UTF-8
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadUtf8(f"body: invalid UTF-8 at byte {e.start}") from None


# ---------------------------------------------------------------------------- records


@dataclass(frozen=True, slots=True)
class Message:
    """The message record carried by PUSH, OFFLINE_PAGE and HISTORY_PAGE."""

    msg_id: int
    server_time: int
    sender_id: int
    sender_device: str
    conv_kind: int
    conv_id: int
    content_type: int
    client_msg_id: bytes
    body: bytes

    def validate(self) -> None:
        _check_id(self.msg_id, "msg_id")
        _check_id(self.sender_id, "sender_id")
        _check_conv(self.conv_kind, self.conv_id)
        _check_text_body(self.content_type, self.body)


@dataclass(frozen=True, slots=True)
class UnreadCount:
    """Per-conversation count of other users' messages in one OFFLINE_PAGE."""

    conv_kind: int
    conv_id: int
    count: int

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)
        if self.count < 1:
            raise _bad("unread.count: must be at least 1")


@dataclass(frozen=True, slots=True)
class GroupSummary:
    group_id: int
    name: str

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")


@dataclass(frozen=True, slots=True)
class ConvEntry:
    """The CONV record of CONV_PAGE and CONV_CHANGES_PAGE (spec 18.3): one conversation as the
    receiving user sees it (1:1: conv_id is the peer), with its newest message, if any."""

    conv_kind: int
    conv_id: int
    version: int
    hidden: int
    read_id: int
    peer_read_id: int
    unread: int
    last: tuple[Message, ...]

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)
        _check_id(self.version, "version")
        _check_bool(self.hidden, "hidden")
        if self.conv_kind == ConvKind.GROUP and self.peer_read_id:
            raise _bad("peer_read_id: must be 0 for a group")
        _check_count(self.last, 0, 1, "last")
        for m in self.last:
            m.validate()
            # 1:1: the user's own message names the peer, the peer's names the user.
            mine = m.conv_id == self.conv_id or (
                self.conv_kind == ConvKind.USER and m.sender_id == self.conv_id
            )
            if m.conv_kind != self.conv_kind or not mine:
                raise _bad("last: message of another conversation")


# ----------------------------------------------------------------------------- frames


@dataclass(frozen=True, slots=True)
class Frame:
    """Header fields shared by every frame; `request_id` is echoed by replies."""

    TYPE: ClassVar[FrameType]
    request_id: int = field(default=0, kw_only=True)
    flags: int = field(default=0, kw_only=True)

    def validate(self) -> None:
        """Check the spec's ranges; the base class has nothing beyond the wire widths."""


@dataclass(frozen=True, slots=True)
class Hello(Frame):
    TYPE = FrameType.HELLO
    protocol_version: int
    client_kind: int
    device_id: str
    token: str

    def validate(self) -> None:
        if self.protocol_version != PROTOCOL_VERSION:
            raise UnsupportedVersion(
                f"protocol_version: {self.protocol_version} is not {PROTOCOL_VERSION}"
            )
        if self.client_kind not in _CLIENT_KINDS:
            raise _bad(f"client_kind: {self.client_kind} is not defined")


@dataclass(frozen=True, slots=True)
class HelloOk(Frame):
    TYPE = FrameType.HELLO_OK
    user_id: int
    server_time: int
    heartbeat_s: int
    idle_timeout_s: int
    max_frame: int

    def validate(self) -> None:
        _check_id(self.user_id, "user_id")


@dataclass(frozen=True, slots=True)
class Ping(Frame):
    TYPE = FrameType.PING


@dataclass(frozen=True, slots=True)
class Pong(Frame):
    TYPE = FrameType.PONG
    server_time: int


@dataclass(frozen=True, slots=True)
class Send(Frame):
    TYPE = FrameType.SEND
    client_msg_id: bytes
    conv_kind: int
    conv_id: int
    content_type: int
    body: bytes

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)
        if self.content_type == ContentType.GROUP_EVENT:
            raise _bad("content_type: 0 is reserved for server-generated group events")
        _check_text_body(self.content_type, self.body)


@dataclass(frozen=True, slots=True)
class SendAck(Frame):
    TYPE = FrameType.SEND_ACK
    client_msg_id: bytes
    msg_id: int
    server_time: int
    duplicate: int

    def validate(self) -> None:
        _check_id(self.msg_id, "msg_id")
        _check_bool(self.duplicate, "duplicate")


@dataclass(frozen=True, slots=True)
class Push(Frame):
    TYPE = FrameType.PUSH
    message: Message

    def validate(self) -> None:
        self.message.validate()


@dataclass(frozen=True, slots=True)
class PushAck(Frame):
    TYPE = FrameType.PUSH_ACK
    msg_id: int

    def validate(self) -> None:
        _check_id(self.msg_id, "msg_id")


@dataclass(frozen=True, slots=True)
class OfflinePull(Frame):
    TYPE = FrameType.OFFLINE_PULL
    cursor: int
    limit: int = 0

    def validate(self) -> None:
        if self.limit > OFFLINE_PAGE_MAX:
            raise _bad(f"limit: {self.limit} exceeds {OFFLINE_PAGE_MAX}")


@dataclass(frozen=True, slots=True)
class OfflinePage(Frame):
    TYPE = FrameType.OFFLINE_PAGE
    cursor: int
    has_more: int
    gap: int
    messages: tuple[Message, ...]
    unread: tuple[UnreadCount, ...]

    def validate(self) -> None:
        _check_bool(self.has_more, "has_more")
        _check_bool(self.gap, "gap")
        _check_count(self.messages, 0, OFFLINE_PAGE_MAX, "messages")
        _check_count(self.unread, 0, OFFLINE_PAGE_MAX, "unread")
        for m in self.messages:
            m.validate()
        for u in self.unread:
            u.validate()


@dataclass(frozen=True, slots=True)
class OfflineAck(Frame):
    TYPE = FrameType.OFFLINE_ACK
    cursor: int


@dataclass(frozen=True, slots=True)
class OfflineAckOk(Frame):
    TYPE = FrameType.OFFLINE_ACK_OK
    cursor: int


@dataclass(frozen=True, slots=True)
class HistoryPull(Frame):
    TYPE = FrameType.HISTORY_PULL
    conv_kind: int
    conv_id: int
    before_id: int = 0
    limit: int = 0

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)
        if self.limit > HISTORY_PAGE_MAX:
            raise _bad(f"limit: {self.limit} exceeds {HISTORY_PAGE_MAX}")


@dataclass(frozen=True, slots=True)
class HistoryPage(Frame):
    TYPE = FrameType.HISTORY_PAGE
    conv_kind: int
    conv_id: int
    has_more: int
    messages: tuple[Message, ...]

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)
        _check_bool(self.has_more, "has_more")
        _check_count(self.messages, 0, HISTORY_PAGE_MAX, "messages")
        for m in self.messages:
            m.validate()


@dataclass(frozen=True, slots=True)
class GroupCreate(Frame):
    TYPE = FrameType.GROUP_CREATE
    name: str
    members: tuple[int, ...] = ()

    def validate(self) -> None:
        _check_ids(self.members, 0, MAX_IDS_PER_REQUEST, "members")


@dataclass(frozen=True, slots=True)
class _GroupFrame(Frame):
    """Frames whose body starts with group_id: GROUP_CREATED, GROUP_MEMBERS, the bases below."""

    group_id: int

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")


@dataclass(frozen=True, slots=True)
class _GroupChange(_GroupFrame):
    """GROUP_ADD and GROUP_REMOVE: a group and the 1..1000 users to add or remove."""

    members: tuple[int, ...]

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        _check_ids(self.members, 1, MAX_IDS_PER_REQUEST, "members")


@dataclass(frozen=True, slots=True)
class _GroupChangeOk(_GroupFrame):
    """GROUP_ADD_OK and GROUP_REMOVE_OK: how many users were added or removed."""

    count: int


@dataclass(frozen=True, slots=True)
class GroupCreated(_GroupFrame):
    TYPE = FrameType.GROUP_CREATED


@dataclass(frozen=True, slots=True)
class GroupAdd(_GroupChange):
    TYPE = FrameType.GROUP_ADD


@dataclass(frozen=True, slots=True)
class GroupAddOk(_GroupChangeOk):
    TYPE = FrameType.GROUP_ADD_OK


@dataclass(frozen=True, slots=True)
class GroupRemove(_GroupChange):
    TYPE = FrameType.GROUP_REMOVE


@dataclass(frozen=True, slots=True)
class GroupRemoveOk(_GroupChangeOk):
    TYPE = FrameType.GROUP_REMOVE_OK


@dataclass(frozen=True, slots=True)
class GroupMembers(_GroupFrame):
    TYPE = FrameType.GROUP_MEMBERS


@dataclass(frozen=True, slots=True)
class GroupMemberList(Frame):
    TYPE = FrameType.GROUP_MEMBER_LIST
    group_id: int
    owner_id: int
    name: str
    members: tuple[int, ...]

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        _check_id(self.owner_id, "owner_id")
        _check_ids(self.members, 0, MAX_GROUP_MEMBERS, "members")


@dataclass(frozen=True, slots=True)
class MyGroups(Frame):
    TYPE = FrameType.MY_GROUPS


@dataclass(frozen=True, slots=True)
class GroupList(Frame):
    TYPE = FrameType.GROUP_LIST
    groups: tuple[GroupSummary, ...]

    def validate(self) -> None:
        _check_count(self.groups, 0, MAX_GROUPS_PER_USER, "groups")
        for g in self.groups:
            g.validate()


@dataclass(frozen=True, slots=True)
class Close(Frame):
    TYPE = FrameType.CLOSE
    reason: int
    text: str = ""


@dataclass(frozen=True, slots=True)
class SyncHint(Frame):
    TYPE = FrameType.SYNC_HINT


@dataclass(frozen=True, slots=True)
class Error(Frame):
    TYPE = FrameType.ERROR
    code: int
    text: str = ""


# ------------------------------------------------------------- post-v1 (spec section 18)


def _check_features(features: tuple[int, ...]) -> None:
    # Unknown numbers are allowed: each side ignores what it does not know.
    _check_count(features, 0, MAX_FEATURES, "features")


def _check_limit(limit: int) -> None:
    if limit > CONV_PAGE_MAX:
        raise _bad(f"limit: {limit} exceeds {CONV_PAGE_MAX}")


@dataclass(frozen=True, slots=True)
class Features(Frame):
    TYPE = FrameType.FEATURES
    features: tuple[int, ...]

    def validate(self) -> None:
        _check_features(self.features)


@dataclass(frozen=True, slots=True)
class FeaturesOk(Frame):
    TYPE = FrameType.FEATURES_OK
    features: tuple[int, ...]

    def validate(self) -> None:
        _check_features(self.features)


@dataclass(frozen=True, slots=True)
class ConvList(Frame):
    TYPE = FrameType.CONV_LIST
    before_id: int = 0
    limit: int = 0

    def validate(self) -> None:
        _check_limit(self.limit)


@dataclass(frozen=True, slots=True)
class ConvChanges(Frame):
    TYPE = FrameType.CONV_CHANGES
    since_version: int = 0
    limit: int = 0

    def validate(self) -> None:
        _check_limit(self.limit)


@dataclass(frozen=True, slots=True)
class _ConvPageBase(Frame):
    """CONV_PAGE and CONV_CHANGES_PAGE share one layout. The list version is `list_version`
    (the header's protocol version is the flat wire layout's `version`)."""

    list_version: int
    has_more: int
    total_unread: int
    convs: tuple[ConvEntry, ...]

    def validate(self) -> None:
        _check_bool(self.has_more, "has_more")
        _check_count(self.convs, 0, CONV_PAGE_MAX, "convs")
        for c in self.convs:
            c.validate()


@dataclass(frozen=True, slots=True)
class ConvPage(_ConvPageBase):
    TYPE = FrameType.CONV_PAGE


@dataclass(frozen=True, slots=True)
class ConvChangesPage(_ConvPageBase):
    TYPE = FrameType.CONV_CHANGES_PAGE


@dataclass(frozen=True, slots=True)
class _ReadPosition(Frame):
    """READ_MARK and READ_MARK_OK: a conversation and a read position in it."""

    conv_kind: int
    conv_id: int
    msg_id: int

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)
        _check_id(self.msg_id, "msg_id")


@dataclass(frozen=True, slots=True)
class ReadMark(_ReadPosition):
    TYPE = FrameType.READ_MARK


@dataclass(frozen=True, slots=True)
class ReadMarkOk(_ReadPosition):
    TYPE = FrameType.READ_MARK_OK


@dataclass(frozen=True, slots=True)
class _ConvRef(Frame):
    """CONV_HIDE and CONV_HIDE_OK: one conversation."""

    conv_kind: int
    conv_id: int

    def validate(self) -> None:
        _check_conv(self.conv_kind, self.conv_id)


@dataclass(frozen=True, slots=True)
class ConvHide(_ConvRef):
    TYPE = FrameType.CONV_HIDE


@dataclass(frozen=True, slots=True)
class ConvHideOk(_ConvRef):
    TYPE = FrameType.CONV_HIDE_OK


@dataclass(frozen=True, slots=True)
class InboxNotice(Frame):
    """The inbox entries in (from_cursor, to_cursor] are these messages, in cursor order."""

    TYPE = FrameType.INBOX_NOTICE
    from_cursor: int
    to_cursor: int
    msg_ids: tuple[int, ...]

    def validate(self) -> None:
        if self.to_cursor <= self.from_cursor:
            raise _bad(f"to_cursor: {self.to_cursor} is not above from_cursor {self.from_cursor}")
        _check_ids(self.msg_ids, 1, NOTICE_MAX_IDS, "msg_ids")


@dataclass(frozen=True, slots=True)
class ReadUpdate(Frame):
    TYPE = FrameType.READ_UPDATE
    reader_id: int
    conv_kind: int
    conv_id: int
    msg_id: int

    def validate(self) -> None:
        _check_id(self.reader_id, "reader_id")
        _check_conv(self.conv_kind, self.conv_id)
        _check_id(self.msg_id, "msg_id")


# ------------------------------------------------------------- post-v1 (spec section 19)

_PLATFORM = re.compile(r"[a-z0-9._-]+")  # ASCII only: re's [a-z] is not Unicode-aware


@dataclass(frozen=True, slots=True)
class PushRegister(Frame):
    """Notify this device through `platform` (apns, fcm or a kind the server allows) at
    push token `token`. `options` bit 0 (PREVIEW): a notification may carry the message text.
    The body field is not called "flags": the header has that name."""

    TYPE = FrameType.PUSH_REGISTER
    PREVIEW: ClassVar[int] = 0x01
    platform: str
    token: str
    options: int = 0

    @property
    def preview(self) -> bool:
        return bool(self.options & self.PREVIEW)

    def validate(self) -> None:
        if not _PLATFORM.fullmatch(self.platform):
            raise _bad(f"platform: {self.platform!r} is not [a-z0-9._-]")
        if self.options & ~self.PREVIEW:
            raise _bad(f"options: 0x{self.options:02x} sets bits other than 0 (preview)")


@dataclass(frozen=True, slots=True)
class PushRegisterOk(Frame):
    TYPE = FrameType.PUSH_REGISTER_OK


@dataclass(frozen=True, slots=True)
class PushUnregister(Frame):
    TYPE = FrameType.PUSH_UNREGISTER


@dataclass(frozen=True, slots=True)
class PushUnregisterOk(Frame):
    TYPE = FrameType.PUSH_UNREGISTER_OK


# ------------------------------------------------------------- post-v1 (spec section 20)


@dataclass(frozen=True, slots=True)
class TimelineHead:
    """One large group's timeline as TIMELINE_HEADS_PAGE lists it (spec 20.3): its `done` (the
    highest seq readable, 0: none yet), the user's read position as a seq (at most done) and
    unread = done - read_seq (saturating at 2^32-1), the msg_id of seq done's message (0:
    none)."""

    group_id: int
    done: int
    read_seq: int
    unread: int
    last_msg_id: int

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        if self.read_seq > self.done:
            raise _bad(f"read_seq: {self.read_seq} is above done {self.done}")


@dataclass(frozen=True, slots=True)
class TimelineHeads(Frame):
    TYPE = FrameType.TIMELINE_HEADS


@dataclass(frozen=True, slots=True)
class TimelineHeadsPage(Frame):
    """The user's groups that have a timeline, ascending group_id, one head each."""

    TYPE = FrameType.TIMELINE_HEADS_PAGE
    heads: tuple[TimelineHead, ...]

    def validate(self) -> None:
        _check_count(self.heads, 0, MAX_TIMELINE_HEADS, "heads")
        previous = 0
        for h in self.heads:
            h.validate()
            if h.group_id <= previous:
                raise _bad("heads: group ids not strictly ascending")
            previous = h.group_id


@dataclass(frozen=True, slots=True)
class TimelinePull(Frame):
    """The group's timeline messages of seqs above `after_seq`, oldest first. `held`: msg_ids
    of the group the client already holds (strictly ascending, at most 1000): the page omits
    them, its position covers them as if they had been sent (spec 20.4)."""

    TYPE = FrameType.TIMELINE_PULL
    group_id: int
    after_seq: int = 0
    limit: int = 0
    held: tuple[int, ...] = ()

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        if self.limit > TIMELINE_PAGE_MAX:
            raise _bad(f"limit: {self.limit} exceeds {TIMELINE_PAGE_MAX}")
        _check_ascending_ids(self.held, 0, TIMELINE_HELD_MAX, "held")


@dataclass(frozen=True, slots=True)
class TimelinePage(Frame):
    """A page of a group's timeline: `position` is the highest seq it covers (the next
    after_seq), at most `done`; `has_more`: seqs above position up to done exist."""

    TYPE = FrameType.TIMELINE_PAGE
    group_id: int
    position: int
    done: int
    has_more: int
    messages: tuple[Message, ...]

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        if self.position > self.done:
            raise _bad(f"position: {self.position} is above done {self.done}")
        _check_bool(self.has_more, "has_more")
        _check_count(self.messages, 0, TIMELINE_PAGE_MAX, "messages")
        for m in self.messages:
            m.validate()
            if m.conv_kind != ConvKind.GROUP or m.conv_id != self.group_id:
                raise _bad("messages: message of another conversation")


FRAME_CLASSES: dict[int, type[Frame]] = {
    cls.TYPE.value: cls
    for cls in (
        Hello, HelloOk, Ping, Pong, Send, SendAck, Push, PushAck, OfflinePull, OfflinePage,
        OfflineAck, OfflineAckOk, HistoryPull, HistoryPage, GroupCreate, GroupCreated,
        GroupAdd, GroupAddOk, GroupRemove, GroupRemoveOk, GroupMembers, GroupMemberList,
        MyGroups, GroupList, Close, SyncHint, Error,
        Features, FeaturesOk, ConvList, ConvChanges, ConvPage, ConvChangesPage, ReadMark,
        ReadMarkOk, ConvHide, ConvHideOk, InboxNotice, ReadUpdate,
        PushRegister, PushRegisterOk, PushUnregister, PushUnregisterOk,
        TimelineHeads, TimelineHeadsPage, TimelinePull, TimelinePage,
    )
}  # fmt: skip
