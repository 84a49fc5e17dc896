"""Conversation keys: the local names of conversations ("user:1002", "group:7")."""

from __future__ import annotations

from improto.enums import ConvKind
from improto.frames import Message


def conv_key(conv_kind: int, conv_id: int) -> str:
    """The local name of a conversation: "user:1002" or "group:7" (also the console's)."""
    return f"{'group' if conv_kind == ConvKind.GROUP else 'user'}:{conv_id}"


def parse_conv_key(key: str) -> tuple[int, int]:
    kind, _, cid = key.partition(":")
    kinds = {"user": ConvKind.USER, "group": ConvKind.GROUP}
    if kind not in kinds or not cid.isdigit():
        raise ValueError(f"not a conversation key: {key!r}")
    return kinds[kind], int(cid)


def message_conv(me: int, m: Message) -> str:
    """Section 6: a 1:1 message belongs to the peer, which is conv_id only if I sent it."""
    if m.conv_kind == ConvKind.GROUP:
        return conv_key(ConvKind.GROUP, m.conv_id)
    return conv_key(ConvKind.USER, m.conv_id if m.sender_id == me else m.sender_id)
