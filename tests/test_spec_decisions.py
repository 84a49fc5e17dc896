"""The decisions of issue 12 point 7, written down in spec/PROTOCOL.md, against the server:
ChatService over the embedded backend (real SQLite, the persister, a fake clock for the
inbox retention), and the start-up validation of the settings (config.check, imserver).

Pages as full as 10.3 allows (the offline_page_max_frame vector from messages sent through
SEND), `gap` on a cursor-0 pull after expiry, the clamp of an inbox that never had an entry,
OFFLINE_ACK(0) and OFFLINE_ACK(2^64-1), group event bodies (group_id, ascending members with
the creator, client_msg_id) and a member's history starting at the event that added them.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.task import deferLater

from improto.codec import decode_payload, encode
from improto.enums import ContentType, ConvKind
from improto.frames import (
    GroupAdd,
    GroupCreate,
    GroupRemove,
    HistoryPage,
    HistoryPull,
    Message,
    OfflineAck,
    OfflinePage,
    OfflinePull,
    Send,
)
from improto.limits import CURSOR_RESUME, MAX_FRAME_LENGTH, U64_MAX
from improto.vectors import T0
from improto_server import cli
from improto_server.config import Config
from improto_server.embedded.backend import SQLiteBackend
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.persister import Persister
from improto_server.service import Caller, ChatService

REPO = Path(__file__).resolve().parents[1]
DAY_MS = 86_400_000
RETENTION_MS = 7 * DAY_MS


class Clock:
    """Milliseconds, moved by the test: the inbox retention's clock and the ids' clock."""

    def __init__(self, now: int) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@dataclasses.dataclass
class Chat:
    service: ChatService
    backend: SQLiteBackend
    clock: Clock
    ids_clock: Clock

    async def persisted(self, user: int, count: int) -> None:
        """Wait until `user`'s inbox holds `count` entries (persistence is asynchronous)."""
        for _ in range(500):
            page = await self.backend.inbox.page(user, 0, 200, 1 << 30)
            if len(page.records) >= count:
                return
            await deferLater(reactor, 0.01, lambda: None)
        raise AssertionError(f"user {user}'s inbox never reached {count} entries")

    async def pull(self, user: int, cursor: int, device: str = "d", rid: int = 1) -> bytes:
        return await self.service.offline_pull(
            Caller(user, device), OfflinePull(cursor, 0, request_id=rid)
        )

    async def page(self, user: int, cursor: int, device: str = "d") -> OfflinePage:
        frame = decode_payload((await self.pull(user, cursor, device))[4:])
        assert isinstance(frame, OfflinePage)
        return frame

    async def ack(self, user: int, cursor: int, device: str = "d") -> int:
        ok = await self.service.offline_ack(Caller(user, device), OfflineAck(cursor))
        return ok.cursor

    async def send(
        self,
        sender: int,
        to: int,
        body: bytes,
        cmid: bytes | None = None,
        device: str = "d",
        kind: int = ConvKind.USER,
        ctype: int = 2,
    ) -> int:
        req = Send(cmid or uuid.uuid4().bytes, kind, to, ctype, body)
        return (await self.service.send(Caller(sender, device), req)).msg_id


@pytest_twisted.async_yield_fixture()
async def chat(tmp_path: Path) -> AsyncIterator[Chat]:
    clock, ids_clock = Clock(T0), Clock(T0)
    backend = SQLiteBackend(tmp_path / "db.sqlite3", reactor=reactor, now_ms=clock,
                            inbox_retention_ms=RETENTION_MS)  # fmt: skip
    await backend.start()
    Persister(backend.queue, backend.inbox, backend.history).start()
    service = ChatService(IdGenerator(1, ids_clock), backend.queue, backend.inbox,
                          backend.history, backend.groups, Hub())  # fmt: skip
    try:
        yield Chat(service, backend, clock, ids_clock)
    finally:
        await backend.close()


def _vector(name: str) -> dict[str, Any]:
    vectors = json.loads((REPO / "spec" / "vectors" / "valid.json").read_text())
    return next(v for v in vectors if v["name"] == name)


# ------------------------------------------------------------------ pages (10.3)


@pytest_twisted.ensureDeferred
async def test_the_server_builds_the_max_frame_vector_from_sent_messages(chat: Chat) -> None:
    vector = _vector("offline_page_max_frame")
    want = decode_payload(bytes.fromhex(vector["hex"])[4:])
    assert isinstance(want, OfflinePage) and len(want.messages) == 2 and want.has_more
    sent = []
    for i, m in enumerate(want.messages):  # the vector's messages, as SENDs at its times
        chat.ids_clock.now = m.server_time
        cmid = m.client_msg_id if i == 0 else None  # the second: its own idempotency key
        sent.append(await chat.send(m.sender_id, m.conv_id, m.body, cmid, m.sender_device,
                                    ctype=m.content_type))  # fmt: skip
    await chat.send(1001, 1002, b"one more: has_more")
    me = want.messages[0].sender_id
    await chat.persisted(me, 3)
    frame = await chat.pull(me, 0, device="d", rid=want.request_id)
    assert struct.unpack(">I", frame[:4])[0] == MAX_FRAME_LENGTH
    got = decode_payload(frame[4:])
    assert isinstance(got, OfflinePage)
    assert [m.msg_id for m in got.messages] == sent  # both in one page
    assert (got.has_more, got.gap, got.unread) == (1, 0, ())
    assert encode(got) == frame
    # What a server cannot reproduce through SEND: its own msg_ids and inbox cursor, and the
    # vector's one client_msg_id for two messages (a resend would be a duplicate).
    same = dataclasses.replace(got, cursor=want.cursor, messages=tuple(
        dataclasses.replace(m, msg_id=w.msg_id, client_msg_id=w.client_msg_id)
        for m, w in zip(got.messages, want.messages, strict=True)
    ))  # fmt: skip
    assert encode(same).hex() == vector["hex"]


@pytest_twisted.ensureDeferred
async def test_a_page_from_another_sender_holds_65535_and_65395_bytes(chat: Chat) -> None:
    # The case: one UNREAD (11 bytes) is all the page needs, not room for 200.
    ids = [await chat.send(1002, 1001, bytes(65_535)), await chat.send(1002, 1001, bytes(65_395))]
    ids.append(await chat.send(1002, 1001, bytes(65_396 - 65_395)))
    await chat.persisted(1001, 3)
    frame = await chat.pull(1001, 0)
    page = decode_payload(frame[4:])
    assert isinstance(page, OfflinePage)
    assert len(frame) - 4 == MAX_FRAME_LENGTH
    assert [m.msg_id for m in page.messages] == ids[:2] and page.has_more == 1
    assert [(u.conv_kind, u.conv_id, u.count) for u in page.unread] == [(1, 1002, 2)]
    rest = await chat.page(1001, page.cursor)
    assert [m.msg_id for m in rest.messages] == ids[2:] and rest.has_more == 0


@pytest_twisted.ensureDeferred
async def test_a_history_page_fills_to_131072(chat: Chat) -> None:
    oldest = await chat.send(1001, 1002, b"oldest")
    # Records of 65,463 and 65,590 bytes: with the 19 fixed bytes, exactly 131072.
    ids = [
        await chat.send(1001, 1002, bytes(65_535 - 127)),
        await chat.send(1001, 1002, bytes(65_535)),
    ]
    for _ in range(500):
        frame = await chat.service.history_pull(Caller(1002, "x"), HistoryPull(1, 1001, 0, 0))
        page = decode_payload(frame[4:])
        assert isinstance(page, HistoryPage)
        if [m.msg_id for m in page.messages] == ids[::-1]:  # both persisted
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert isinstance(page, HistoryPage) and len(frame) - 4 == MAX_FRAME_LENGTH
    assert [m.msg_id for m in page.messages] == ids[::-1] and page.has_more == 1
    rest = await chat.service.history_pull(Caller(1002, "x"), HistoryPull(1, 1001, ids[0], 0))
    older = decode_payload(rest[4:])
    assert isinstance(older, HistoryPage) and [m.msg_id for m in older.messages] == [oldest]


# ------------------------------------------------- gap, clamp, OFFLINE_ACK (10.3, 10.4)


@pytest_twisted.ensureDeferred
async def test_a_cursor_0_pull_after_expiry_reports_the_gap_every_time(chat: Chat) -> None:
    await chat.send(1002, 1001, b"old 1")
    await chat.send(1002, 1001, b"old 2")
    await chat.persisted(1001, 2)
    chat.clock.now += RETENTION_MS + 1
    empty = await chat.page(1001, 0)
    assert (empty.messages, empty.gap, empty.cursor, empty.has_more) == ((), 1, 0, 0)
    new = await chat.send(1002, 1001, b"new")
    for _ in range(500):
        page = await chat.page(1001, 0)
        if page.messages:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert [m.msg_id for m in page.messages] == [new] and page.gap == 1
    again = await chat.page(1001, 0)  # the same S again: the same answer
    assert (again.gap, [m.msg_id for m in again.messages]) == (1, [new])
    resumed = await chat.page(1001, CURSOR_RESUME, device="fresh")  # no position: S = 0
    assert resumed.gap == 1
    after = await chat.page(1001, page.cursor)
    assert (after.gap, after.messages) == (0, ())


@pytest_twisted.ensureDeferred
async def test_an_inbox_that_never_had_an_entry_clamps_to_0(chat: Chat) -> None:
    for cursor in (1, 12_345, U64_MAX - 1):
        page = await chat.page(4242, cursor)
        assert (page.cursor, page.has_more, page.gap, page.messages) == (0, 0, 0, ())
    for cursor in (0, 12_345, U64_MAX):
        assert await chat.ack(4242, cursor) == 0


@pytest_twisted.ensureDeferred
async def test_offline_ack_0_reads_and_2_64_minus_1_takes_everything_so_far(chat: Chat) -> None:
    for i in range(3):
        await chat.send(1002, 1001, b"m%d" % i)
    await chat.persisted(1001, 3)
    head = (await chat.page(1001, 0)).cursor
    first = (await chat.page(1001, 0)).messages[0].msg_id
    assert await chat.ack(1001, 0) == 0  # a device without a position
    assert await chat.ack(1001, U64_MAX) == head
    assert await chat.ack(1001, 0) == head  # reads, moves nothing
    assert await chat.ack(1001, 1) == head  # never backwards
    assert (await chat.page(1001, CURSOR_RESUME)).messages == ()
    later = await chat.send(1002, 1001, b"later")
    await chat.persisted(1001, 4)
    resumed = await chat.page(1001, CURSOR_RESUME)
    assert [m.msg_id for m in resumed.messages] == [later] and first != later
    assert await chat.ack(1001, 0, device="other") == 0  # per device


# ---------------------------------------------------------------- group events (12.3)


def _events(page: OfflinePage, gid: int) -> list[tuple[Message, dict[str, Any]]]:
    return [(m, json.loads(m.body)) for m in page.messages
            if m.content_type == ContentType.GROUP_EVENT and m.conv_id == gid]  # fmt: skip


@pytest_twisted.ensureDeferred
async def test_group_event_bodies_list_members_ascending_with_the_creator(chat: Chat) -> None:
    actor = Caller(9000, "tab")
    gid = (await chat.service.group_create(actor, GroupCreate("Ünï", (7, 5, 9000, 7)))).group_id
    huge, big = U64_MAX, 2**63 + 1  # above the signed range: ordered as unsigned values
    await chat.service.group_add(actor, GroupAdd(gid, (huge, 30, big, 30)))
    await chat.service.group_remove(actor, GroupRemove(gid, (huge, 5, big)))
    await chat.persisted(9000, 3)
    events = _events(await chat.page(9000, 0, device="tab"), gid)
    g = str(gid)
    assert [e for _, e in events] == [
        {"event": "created", "group_id": g, "name": "Ünï", "members": ["5", "7", "9000"]},
        {"event": "added", "group_id": g, "members": ["30", str(big), str(huge)]},
        {"event": "removed", "group_id": g, "members": ["5", str(big), str(huge)]},
    ]
    created = events[0][0].body.decode()
    assert created.startswith(f'{{"event":"created","group_id":"{gid}","name":')
    assert " " not in created
    cmids = [m.client_msg_id for m, _ in events]
    assert len(set(cmids)) == 3
    assert all(uuid.UUID(bytes=c).version == 4 for c in cmids)
    assert all((m.sender_id, m.sender_device) == (9000, "tab") for m, _ in events)


@pytest_twisted.ensureDeferred
async def test_a_members_history_starts_with_the_event_that_added_them(chat: Chat) -> None:
    owner = Caller(1, "d")
    gid = (await chat.service.group_create(owner, GroupCreate("g", ()))).group_id
    before = await chat.send(1, gid, b"before", kind=ConvKind.GROUP, ctype=1)
    await chat.service.group_add(owner, GroupAdd(gid, (2,)))
    after = await chat.send(1, gid, b"after", kind=ConvKind.GROUP, ctype=1)
    await chat.persisted(2, 2)
    for _ in range(500):
        frame = await chat.service.history_pull(Caller(2, "d"), HistoryPull(2, gid, 0, 0))
        page = decode_payload(frame[4:])
        assert isinstance(page, HistoryPage)
        if len(page.messages) == 2 and page.messages[0].msg_id == after:
            break
        await deferLater(reactor, 0.01, lambda: None)
    assert (
        isinstance(page, HistoryPage)
        and page.messages[0].msg_id == after
        and before not in [m.msg_id for m in page.messages]
    )
    event = page.messages[1]
    assert event.content_type == ContentType.GROUP_EVENT
    assert json.loads(event.body) == {"event": "added", "group_id": str(gid), "members": ["2"]}


# ------------------------------------------------------------- settings (10.1, 11, 16)

_LIMITS = (
    "login_timeout_s", "output_high_water_bytes", "output_hard_limit_bytes",
    "slow_reader_timeout_s", "max_requests_in_flight", "max_connections_per_address",
    "max_prelogin_per_address", "listen_backlog", "send_rate", "send_burst", "send_bytes_rate",
    "send_bytes_burst", "group_op_rate", "group_op_burst", "added_by_others_per_day",
    "inbox_max_entries", "inbox_max_bytes", "max_devices_per_user",
)  # fmt: skip
_CHECKED = ("inbox_retention_days", "history_retention_days", *_LIMITS)


def test_the_defaults_pass_and_retention_takes_fractions_of_days() -> None:
    Config().check()
    Config(inbox_retention_days=0.5, history_retention_days=36_500).check()
    Config(inbox_retention_days=1 / 86_400).check()  # one second


@pytest.mark.parametrize("name", _CHECKED)
@pytest.mark.parametrize(
    "bad", [0, -1, math.nan, math.inf, -math.inf, 10**15, True, "7", None], ids=repr
)
def test_check_refuses_zero_negative_nan_and_absurd_settings(name: str, bad: Any) -> None:
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(Config(), **{name: bad}).check()


_INTEGERS = [f.name for f in dataclasses.fields(Config) if f.name in _LIMITS and f.type == "int"]


@pytest.mark.parametrize("name", _INTEGERS)
def test_integer_settings_refuse_fractions(name: str) -> None:
    with pytest.raises(ValueError, match=name):
        dataclasses.replace(Config(), **{name: getattr(Config(), name) + 0.5}).check()


@pytest.mark.parametrize("bad", [0, 1, "no", "false", None], ids=repr)
def test_read_receipts_must_be_a_boolean(bad: Any) -> None:
    Config(read_receipts=False).check()
    with pytest.raises(ValueError, match="read_receipts"):
        Config(read_receipts=bad).check()


def test_check_refuses_settings_that_contradict_each_other() -> None:
    with pytest.raises(ValueError, match="idle_timeout"):
        Config(heartbeat=90, idle_timeout=90).check()
    with pytest.raises(ValueError, match="output_hard_limit_bytes"):
        Config(output_high_water_bytes=1 << 20, output_hard_limit_bytes=1 << 19).check()
    with pytest.raises(ValueError, match="output_hard_limit_bytes"):
        Config(output_high_water_bytes=1000, output_hard_limit_bytes=4 + MAX_FRAME_LENGTH - 1
               ).check()  # fmt: skip
    with pytest.raises(ValueError, match="inbox_retention_days"):
        Config(inbox_retention_days=1 / 86_400 / 2).check()  # below one second


@pytest.mark.parametrize(
    "flags", [["--inbox-retention-days", "0"], ["--history-retention-days", "-3"],
              ["--inbox-retention-days", "nan"], ["--history-retention-days", "1e9"]],
)  # fmt: skip
def test_imserver_refuses_to_start(flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(flags)
    assert exc.value.code == 2  # argparse's usage error, before anything started
    assert "retention_days must be a number" in capsys.readouterr().err


def test_a_toml_file_with_a_bad_limit_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "imserver.toml"
    path.write_text("send_rate = 0\n")
    check: Callable[[], None] = Config.from_file(path).check
    with pytest.raises(ValueError, match="send_rate"):
        check()
