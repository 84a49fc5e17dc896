"""The local device state: offline cursor, messages per conversation, outbox of SENDs, the
conversation list (rows, list version, badge: `conv_list`), and the device's positions in
large groups' timelines with the msg_ids it holds above them (`held`).

Kept between sessions, optionally persisted as one JSON file (`ClientState.load`/`save`).
"""

from __future__ import annotations

import bisect
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from improto.frames import Message, Send
from improto.jsonform import frame_from_json, frame_to_json, record_from_json, record_to_json
from improto_clients.conv_keys import message_conv
from improto_clients.conv_list import ConversationList
from improto_clients.errors import StateMismatch
from improto_clients.held import HeldIds

# 2 added the conversation list; a format 1 file loads with an empty one. The "timelines" key
# (positions and held ids, section 20) is optional within format 2: a file without it loads
# with none, and a reader that predates it ignores it.
STATE_FORMAT = 2


@dataclass
class ClientState:
    """One device's local store. `path` set: `save()` rewrites that JSON file atomically.

    The offline `cursor` is opaque: it only ever takes values from OFFLINE_PAGE.cursor, or the
    `to` of an INBOX_NOTICE that starts at it (or 0 on a fresh install, or 2^64-1 "resume"
    for a client that keeps nothing between launches).
    """

    path: str | None = None
    user_id: int | None = None
    cursor: int = 0
    conversations: dict[str, list[Message]] = field(default_factory=dict)
    outbox: dict[bytes, Send] = field(default_factory=dict)  # client_msg_id -> unacked SEND
    convs: ConversationList = field(default_factory=ConversationList)
    # Large groups (section 20.6): group id -> this device's timeline position (only ever a
    # TIMELINE_PAGE.position, or the head's read_seq), and the msg_ids held above them.
    timeline_positions: dict[int, int] = field(default_factory=dict)
    timeline_held: HeldIds = field(default_factory=HeldIds)
    _ids: set[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ids = {m.msg_id for msgs in self.conversations.values() for m in msgs}

    def bind(self, user_id: int) -> None:
        """Attach the state to the logged-in user; a state file is never shared by users."""
        if self.user_id is not None and self.user_id != user_id:
            raise StateMismatch(f"state belongs to user {self.user_id}, not {user_id}")
        self.user_id = user_id

    def has(self, msg_id: int) -> bool:
        """A message with this msg_id is held (stored, or sent by this device and acked)."""
        return msg_id in self._ids

    def add(self, m: Message) -> bool:
        """Store a message unless its msg_id is already held; True if it was new."""
        if m.msg_id in self._ids:
            return False
        if self.user_id is None:
            raise RuntimeError("the state has no user yet (store messages after HELLO_OK)")
        msgs = self.conversations.setdefault(message_conv(self.user_id, m), [])
        bisect.insort(msgs, m, key=lambda x: x.msg_id)  # a conversation shows in msg_id order
        self._ids.add(m.msg_id)
        return True

    def store_page(self, messages: Iterable[Message], cursor: int) -> list[Message]:
        """Store a page's messages, then move the cursor and persist (section 10.2).

        If saving fails the in-memory cursor goes back, so the next pull asks for the same page
        again: the cursor must never claim messages that were not stored.
        """
        new = [m for m in messages if self.add(m)]
        self.move_cursor(cursor)
        return new

    def move_cursor(self, cursor: int) -> None:
        """Set the cursor and persist it; if saving fails it goes back (never ahead of what
        is stored on disk)."""
        previous, self.cursor = self.cursor, cursor
        try:
            self.save()
        except BaseException:
            self.cursor = previous
            raise

    def move_timeline(self, group_id: int, position: int) -> None:
        """Set a group's timeline position and persist it (after the page's messages, which
        are stored first); if saving fails it goes back, as the cursor does."""
        had = group_id in self.timeline_positions
        previous = self.timeline_positions.get(group_id, 0)
        self.timeline_positions[group_id] = position
        try:
            self.save()
        except BaseException:
            if had:
                self.timeline_positions[group_id] = previous
            else:
                del self.timeline_positions[group_id]
            raise

    def messages(self, key: str) -> list[Message]:
        return list(self.conversations.get(key, ()))

    # --- persistence

    def to_json(self) -> dict[str, Any]:
        # Messages are written before the cursor; the file is replaced whole (see save()).
        return {
            "format": STATE_FORMAT,
            "user_id": None if self.user_id is None else str(self.user_id),
            "conversations": {
                k: [record_to_json(m) for m in msgs] for k, msgs in self.conversations.items()
            },
            "outbox": [frame_to_json(f) for f in self.outbox.values()],
            "convs": self.convs.to_json(),
            "timelines": self._timelines_json(),
            "cursor": str(self.cursor),
        }

    def _timelines_json(self) -> dict[str, Any]:
        """{"<group id>": {"position": "<seq>", "covered_id": "<msg_id>", "held": [...]}},
        each key present only when set."""
        out: dict[str, Any] = {}
        groups = set(self.timeline_positions) | self.timeline_held.groups()
        for g in sorted(groups):
            entry = self.timeline_held.group_json(g)
            if g in self.timeline_positions:
                entry["position"] = str(self.timeline_positions[g])
            out[str(g)] = entry
        return out

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: str | None = None) -> ClientState:
        if obj.get("format") not in (1, STATE_FORMAT):
            raise ValueError(f"unsupported state format {obj.get('format')!r}")
        outbox: dict[bytes, Send] = {}
        for f in obj["outbox"]:
            frame = frame_from_json(f)
            assert isinstance(frame, Send)
            outbox[frame.client_msg_id] = frame
        positions: dict[int, int] = {}
        held = HeldIds()
        for g, entry in obj.get("timelines", {}).items():
            if "position" in entry:
                positions[int(g)] = int(entry["position"])
            held.load_group(int(g), entry)
        return cls(
            path=path,
            user_id=None if obj["user_id"] is None else int(obj["user_id"]),
            cursor=int(obj["cursor"]),
            conversations={
                k: [record_from_json(Message, m) for m in msgs]
                for k, msgs in obj["conversations"].items()
            },
            outbox=outbox,
            convs=ConversationList.from_json(obj["convs"])
            if "convs" in obj
            else ConversationList(),
            timeline_positions=positions,
            timeline_held=held,
        )

    def save(self) -> None:
        """Write the whole state to `path` (no-op without one).

        Write-to-temp + rename: the file always holds a cursor together with every message
        stored before it, never a cursor ahead of its messages. The write is synchronous; the
        file is small for a console client.
        """
        if self.path is None:
            return
        tmp = f"{self.path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(self.to_json(), f, separators=(",", ":"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    @classmethod
    def load(cls, path: str) -> ClientState:
        """The state saved at `path`, or a fresh one (cursor 0) that will be saved there."""
        try:
            with open(path, encoding="utf-8") as f:
                return cls.from_json(json.load(f), path)
        except FileNotFoundError:
            return cls(path=path)
