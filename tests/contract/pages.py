"""The store pages of the contract suite as Message objects (the stores return records)."""

from __future__ import annotations

from improto.frames import Message
from improto.records import message_of
from improto_server.model import HistoryRecords, InboxRecords


def messages(page: InboxRecords | HistoryRecords) -> list[Message]:
    """The page's messages, in page order."""
    return [message_of(record) for record in page.records]


def ids(page: InboxRecords | HistoryRecords) -> list[int]:
    return [m.msg_id for m in messages(page)]
