"""The offline sync loop (PROTOCOL.md section 10) and what one run of it found, and the
client's rule for INBOX_NOTICE (section 18, wire-once), which moves the same cursor."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from improto.frames import (
    InboxNotice,
    Message,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
)
from improto_clients.conv_keys import conv_key
from improto_clients.protocol import IMClientProtocol
from improto_clients.state import ClientState


@dataclass
class SyncResult:
    """One run of the sync loop: new messages (duplicates skipped), unread summed over pages."""

    messages: list[Message] = field(default_factory=list)
    unread: dict[str, int] = field(default_factory=dict)  # conversation key -> count
    pages: int = 0
    gap: bool = False  # messages expired while away: refill recent conversations from history
    cursor: int = 0  # where the loop ended (what OFFLINE_ACK reported)


async def sync_offline(
    proto: IMClientProtocol, state: ClientState, limit: int, timeout: float
) -> SyncResult:
    """Pull pages from the stored cursor until has_more=0, storing each page before the cursor
    moves, then OFFLINE_ACK the cursor where the loop ended."""
    result = SyncResult()
    while True:
        page = await proto.call(OfflinePull(state.cursor, limit), OfflinePage, timeout)
        # The next cursor is page.cursor, never a msg_id or a push (section 10.3).
        result.messages += state.store_page(page.messages, page.cursor)
        result.pages += 1
        result.gap = result.gap or bool(page.gap)
        for u in page.unread:
            key = conv_key(u.conv_kind, u.conv_id)
            result.unread[key] = result.unread.get(key, 0) + u.count
        if not page.has_more:  # never on the count: a short page can have more
            break
    cursor = state.cursor  # an INBOX_NOTICE may move it during the round trip
    await proto.call(OfflineAck(cursor), OfflineAckOk, timeout)
    result.cursor = cursor
    return result


class Notice(Enum):
    """What an INBOX_NOTICE did."""

    ADVANCED = "advanced"  # cursor := to (persisted): as if the page had been pulled
    MISSING = "missing"  # starts at our cursor but lists a message we lack: run the loop
    IGNORED = "ignored"  # starts elsewhere (a sync moved the cursor meanwhile)


def apply_notice(state: ClientState, notice: InboxNotice) -> Notice:
    """The entries in (from, to] are exactly notice.msg_ids: holding them all at cursor ==
    from, the device is where pulling that range would have left it."""
    if notice.from_cursor != state.cursor:
        return Notice.IGNORED
    if not all(state.has(i) for i in notice.msg_ids):
        return Notice.MISSING
    state.move_cursor(notice.to_cursor)
    return Notice.ADVANCED
