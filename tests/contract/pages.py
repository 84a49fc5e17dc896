"""The store pages of the contract suite as Message objects (the stores return records)."""

from __future__ import annotations

from improto.codec import encode_payload
from improto.frames import Message, Push
from improto.records import message_of
from improto_server.model import HistoryRecords, InboxRecords, PersistJob

# A page byte budget (max_bytes) that no test's page reaches: the test is about something else.
ANY_SIZE = 1 << 40


def messages(page: InboxRecords | HistoryRecords) -> list[Message]:
    """The page's messages, in page order."""
    return [message_of(record) for record in page.records]


def ids(page: InboxRecords | HistoryRecords) -> list[int]:
    return [m.msg_id for m in messages(page)]


class FormatOneJob(PersistJob):
    """A job whose stored record is in storage format 1 (a version-1 PUSH payload), as servers
    wrote before formats were numbered: appending it stores what such a server stored."""

    __slots__ = ()

    @property
    def stored_record(self) -> bytes:
        return encode_payload(Push(self.message))


def format_one(job: PersistJob) -> PersistJob:
    return FormatOneJob(job.message, job.inbox_users)
