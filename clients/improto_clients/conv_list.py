"""The device's copy of the user's conversation list (PROTOCOL.md section 18): one CONV row
per conversation key, the list version it is complete up to, and the total unread badge.

The server's rows are the truth; between fetches the client applies what it sees live
(pushes, its own sends, read updates) with the server's own rules, so that badges move at
once. Read positions only move forward, here as on the server.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from improto.enums import ConvKind
from improto.frames import ConvEntry, Message
from improto.jsonform import record_from_json, record_to_json
from improto_clients.conv_keys import conv_key, message_conv, parse_conv_key


def last_id(row: ConvEntry) -> int:
    """The msg_id of the row's newest message (0: none)."""
    return row.last[0].msg_id if row.last else 0


def row_key(row: ConvEntry) -> str:
    """A row's conversation key: its conv_kind/conv_id are already as the user sees them."""
    return conv_key(row.conv_kind, row.conv_id)


def _shown_unread(row: ConvEntry | None) -> int:
    """What the row adds to the total badge: hidden rows count 0 (as on the server)."""
    return 0 if row is None or row.hidden else row.unread


def _empty_row(key: str) -> ConvEntry:
    """A row the client has not fetched yet (version 0: any server row replaces it)."""
    kind, cid = parse_conv_key(key)
    return ConvEntry(kind, cid, 0, 0, 0, 0, 0, ())


@dataclass
class ConversationList:
    """`total_unread` is the badge. Once every row was fetched (`complete`) it is the sum over
    our rows, so that live changes move it; before that (a list paged only partly) it is the
    server's total of the last page, with our rows counted instead of its copies of them."""

    rows: dict[str, ConvEntry] = field(default_factory=dict)  # conversation key -> row
    version: int = 0  # CONV_CHANGES starts here (0: never fetched)
    total_unread: int = 0
    complete: bool = False  # holds every row of the user (the whole list was read once)
    # Hidden here but maybe not yet on the server (rows are written by its persister): key ->
    # the row's last msg_id when hidden. A server row not hidden and no newer stays hidden.
    pending_hides: dict[str, int] = field(default_factory=dict)

    def get(self, key: str) -> ConvEntry | None:
        return self.rows.get(key)

    def newest_first(self) -> list[tuple[str, ConvEntry]]:
        """The rows not hidden, newest activity first, rows without a message last."""
        shown = [(k, r) for k, r in self.rows.items() if not r.hidden]
        return sorted(shown, key=lambda kr: last_id(kr[1]), reverse=True)

    def read_by_peer(self, key: str, msg_id: int) -> bool:
        """A 1:1 message is read by the peer (the peer's read position covers it)."""
        row = self.rows.get(key)
        return row is not None and row.conv_kind == ConvKind.USER and msg_id <= row.peer_read_id

    def _put(self, key: str, row: ConvEntry) -> None:
        old = self.rows.get(key)
        self.total_unread = max(0, self.total_unread + _shown_unread(row) - _shown_unread(old))
        self.rows[key] = row

    # --- the server's rows

    def apply_page(self, total_unread: int, convs: tuple[ConvEntry, ...]) -> list[str]:
        """A CONV_PAGE or CONV_CHANGES_PAGE: a row replaces ours if its version is newer (ours
        as new may hold live changes since), or if at our version it has a newer message (a
        large group: its timeline messages move no version, PROTOCOL.md 20.1). Returns the
        keys whose row changed."""
        changed: list[str] = []
        for e in convs:
            key = row_key(e)
            cur = self.rows.get(key)
            if (
                cur is None
                or cur.version < e.version
                or (cur.version == e.version and last_id(e) > last_id(cur))
            ):
                self._put(key, self._merge(key, e, cur))
                changed.append(key)
        if not self.complete:
            ours = sum(_shown_unread(self.rows[row_key(e)]) - _shown_unread(e) for e in convs)
            self.total_unread = max(0, total_unread + ours)
        return changed

    def mark_complete(self) -> None:
        """Every row of the user has been read: from now on the badge is our rows' sum."""
        self.complete = True
        self.total_unread = sum(_shown_unread(r) for r in self.rows.values())

    # --- what the client sees live

    def message(self, me: int, m: Message, live: bool) -> ConvEntry | None:
        """A message stored for the first time: it becomes the row's last one if newer. From
        me: my read position moves to it (sending reads what came before). From others: one
        more unread if it is newer than what the row knew (a row fetched after the message
        was recorded has counted it already). `live` (a push or my send): it also unhides the
        row, being newer than any hide; a synced message may be older than the hide.
        Returns the new row, or None if nothing changed."""
        key = message_conv(me, m)
        cur = self.rows.get(key) or _empty_row(key)
        row = cur
        if m.sender_id == me:
            row = replace(row, read_id=max(row.read_id, m.msg_id))
        if m.msg_id > last_id(cur):
            if live:
                self.pending_hides.pop(key, None)
            if m.sender_id == me:
                unread = 0
            else:
                unread = row.unread + (m.msg_id > row.read_id)
            row = replace(row, last=(m,), unread=unread, hidden=0 if live else row.hidden)
        if row == cur and key in self.rows:
            return None
        self._put(key, row)
        return row

    def read(self, key: str, msg_id: int) -> ConvEntry | None:
        """My read position (READ_MARK_OK, or READ_UPDATE from my other device): up to the last
        message clears the badge; short of it the count waits for the server's row."""
        cur = self.rows.get(key) or _empty_row(key)
        if msg_id <= cur.read_id and key in self.rows:
            return None
        read_id = max(cur.read_id, msg_id)
        unread = 0 if read_id >= last_id(cur) else cur.unread
        row = replace(cur, read_id=read_id, unread=unread)
        self._put(key, row)
        return row

    def peer_read(self, key: str, msg_id: int) -> ConvEntry | None:
        """The 1:1 peer's read position (a READ_UPDATE receipt)."""
        cur = self.rows.get(key) or _empty_row(key)
        if msg_id <= cur.peer_read_id and key in self.rows:
            return None
        row = replace(cur, peer_read_id=max(cur.peer_read_id, msg_id))
        self._put(key, row)
        return row

    def hide(self, key: str) -> ConvEntry:
        """CONV_HIDE_OK: off the list (and the badge) until a newer message arrives."""
        row = replace(self.rows.get(key) or _empty_row(key), hidden=1)
        self.pending_hides[key] = last_id(row)
        self._put(key, row)
        return row

    def _merge(self, key: str, server: ConvEntry, ours: ConvEntry | None) -> ConvEntry:
        row = _merge(server, ours)
        hidden_at = self.pending_hides.get(key)
        if hidden_at is not None:
            if server.hidden or last_id(server) > hidden_at:
                del self.pending_hides[key]  # the server has the hide, or a newer message
            else:
                row = replace(row, hidden=1)
        return row

    # --- persistence (inside ClientState's file)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": str(self.version),
            "total_unread": self.total_unread,
            "complete": self.complete,
            "pending_hides": {k: str(v) for k, v in self.pending_hides.items()},
            "rows": [record_to_json(r) for r in self.rows.values()],
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> ConversationList:
        rows = [record_from_json(ConvEntry, r) for r in obj["rows"]]
        return cls(
            rows={row_key(r): r for r in rows},
            version=int(obj["version"]),
            total_unread=int(obj["total_unread"]),
            complete=bool(obj["complete"]),
            pending_hides={k: int(v) for k, v in obj["pending_hides"].items()},
        )


def _merge(server: ConvEntry, ours: ConvEntry | None) -> ConvEntry:
    """A newer server row, keeping what we saw live that it may not have recorded yet: the
    read positions (they only move forward) and a newer last message."""
    if ours is None:
        return server
    read_id = max(server.read_id, ours.read_id)
    ahead = last_id(ours) > last_id(server)  # messages seen live that it has not recorded
    last = ours.last if ahead else server.last
    unread = max(server.unread, ours.unread) if ahead else server.unread
    if read_id > server.read_id and read_id >= (last[0].msg_id if last else 0):
        unread = 0
    return replace(server, read_id=read_id, peer_read_id=max(server.peer_read_id,
                   ours.peer_read_id), last=last, unread=unread)  # fmt: skip
