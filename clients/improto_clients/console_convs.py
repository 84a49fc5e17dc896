"""imclient's conversation-list events (PROTOCOL.md section 18): the list with its unread
badges, read markers, and read receipts on one's own 1:1 messages, as JSON events and as lines
for a human."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from improto.frames import Message
from improto_clients.conv_list import ConversationList

Event = dict[str, Any]
READ_MARK = "\u2713\u2713"  # shown after one's own 1:1 message once the peer has read it


def convs_event(convs: ConversationList, me: int,
                message_event: Callable[[str, Message, str], Event]) -> Event:  # fmt: skip
    rows = []
    for key, row in convs.newest_first():
        last = None
        if row.last:
            last = message_event(key, row.last[0], "list")
            if row.last[0].sender_id == me:
                last["read"] = convs.read_by_peer(key, row.last[0].msg_id)
        rows.append(
            {
                "conv": key,
                "unread": row.unread,
                "read_id": str(row.read_id),
                "peer_read_id": str(row.peer_read_id),
                "last": last,
            }
        )
    return {
        "event": "convs",
        "total_unread": convs.total_unread,
        "version": str(convs.version),
        "convs": rows,
    }


def render_convs(ev: Event, me: str | None, local_time: Callable[[int], str]) -> str:
    lines = [f"-- conversations ({ev['total_unread']} unread):"]
    for c in ev["convs"]:
        n = c["unread"]
        badge = f"[{'999+' if n > 999 else n}]" if n else ""  # exact up to 1000 (spec 18.4)
        m = c["last"]
        if m is None:
            last = "(no message)"
        else:
            who = "me" if m["sender"] == me else m["sender"]
            read = f" {READ_MARK}" if m.get("read") else ""
            last = f"{local_time(m['time'])} <{who}> {m['text']}{read}"
        lines.append(f"  {c['conv']:<14} {badge:>6}  {last}")
    if not ev["convs"]:
        lines.append("  (none)")
    return "\n".join(lines)


def render_read(ev: Event) -> str:
    if ev["event"] == "marked":
        return f"-- {ev['conv']} read up to msg {ev['msg_id']} ({ev['total_unread']} unread)"
    if ev["receipt"]:
        who, conv, upto = ev["reader"], ev["conv"], ev["msg_id"]
        return f"  {READ_MARK} {who} read your messages in {conv} up to msg {upto}"
    return f"-- {ev['conv']} read on another device ({ev['total_unread']} unread)"
