"""The client's large groups (PROTOCOL.md section 20): TIMELINE_HEADS, TIMELINE_PULL and the
timeline part of the sync loop (20.6), in the library and in imclient.

The first part runs against scripted server frames (the harness of test_client_unit, as
test_client_features does); the second against a real imserver process whose
large_group_threshold is 3, so that a group of five is large."""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor

from improto.enums import ConvKind, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    Error,
    Message,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Push,
    PushAck,
    SyncHint,
    TimelineHead,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto.limits import TIMELINE_PAGE_MAX
from improto.tokens import mint
from improto_clients.client import (
    DEFAULT_FEATURES,
    ClientState,
    FeatureUnavailable,
    IMClient,
    ServerError,
    SyncResult,
    TimelineSync,
)
from improto_clients.console import Console, render
from tests.support.server import TEST_SECRET, ServerHandle
from tests.support.waiting import sleep
from tests.test_client_features import ALL, Ext
from tests.test_client_unit import BOB, ME, failure, msg, pending, result
from tests.test_console import run_script

LG = Feature.LARGE_GROUPS
GID, OTHER = 5003, 5007
CAROL = 1003


def gmsg(msg_id: int, group: int = GID, sender: int = BOB, text: str = "hi") -> Message:
    return msg(msg_id, sender=sender, conv_id=group, kind=ConvKind.GROUP, text=text)


def head(group: int, done: int, read_seq: int, last: int = 0) -> TimelineHead:
    return TimelineHead(group, done, read_seq, done - read_seq, last)


class Large(Ext):
    """A client with LARGE_GROUPS enabled; `answer_*` play the server's side of 20.6."""

    def __init__(self, **kw: Any) -> None:
        super().__init__(**kw)
        self.syncs: list[SyncResult] = []
        self.client.on_sync = self.syncs.append

    def login_large(self, enabled: tuple[int, ...] = (*ALL, LG)) -> None:
        """Log in; the offline loop is answered, the timeline part is left to the test."""
        self.login_ext(enabled=enabled)

    def answer_heads(self, *heads: TimelineHead) -> None:
        (req,) = self.sent()
        assert isinstance(req, TimelineHeads)
        self.feed(TimelineHeadsPage(heads, request_id=req.request_id))

    def answer_pull(
        self, group: int, after: int, position: int, done: int, *messages: Message,
        has_more: int | None = None, limit: int = TIMELINE_PAGE_MAX,
    ) -> None:  # fmt: skip
        (pull,) = self.sent()
        assert pull == TimelinePull(group, after, limit, request_id=pull.request_id)
        more = int(position < done) if has_more is None else has_more
        self.feed(TimelinePage(group, position, done, more, messages, request_id=pull.request_id))

    def held(self, group: int = GID) -> list[int]:
        return [m.msg_id for m in self.client.state.messages(f"group:{group}")]


# ------------------------------------------------------------------ scripted frames


def test_clients_ask_for_large_groups_by_default() -> None:
    assert LG in DEFAULT_FEATURES
    h = Large()
    h.login_large(enabled=(LG,))
    assert h.client.has_feature(LG)


def test_the_login_sync_pulls_each_timeline_from_read_seq_until_caught_up() -> None:
    h = Large()
    h.login_large()
    assert h.syncs == []  # the sync is not over: the timelines come after the offline pages
    h.answer_heads(head(GID, 4, 1, 14), head(OTHER, 310, 310, 9))
    h.answer_pull(GID, 1, 3, 4, gmsg(12), gmsg(13))  # no position: from read_seq
    h.answer_pull(GID, 3, 4, 4, gmsg(14))
    assert h.sent() == []  # OTHER: done = read_seq, nothing to pull
    assert h.client.timeline_positions == {GID: 4, OTHER: 310}
    assert h.held() == [12, 13, 14]
    (sync,) = h.syncs
    assert [m.msg_id for m in sync.messages] == [12, 13, 14]
    row = h.client.state.convs.get(f"group:{GID}")  # CONVERSATIONS: the row follows
    assert row is not None and row.last[0].msg_id == 14
    assert h.errors == []


def test_the_next_sync_starts_at_the_stored_position() -> None:
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 4, 1))
    h.answer_pull(GID, 1, 4, 4, gmsg(12), gmsg(13), gmsg(14))
    d = h.client.sync()
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull)
    h.feed(OfflinePage(10, 0, 0, (), (), request_id=pull.request_id))
    (ack,) = h.sent()
    assert isinstance(ack, OfflineAck)
    h.feed(OfflineAckOk(10, request_id=ack.request_id))
    h.answer_heads(head(GID, 5, 2))  # read elsewhere up to 2: the position (4) decides
    h.answer_pull(GID, 4, 5, 5, gmsg(15))
    assert [m.msg_id for m in result(d).messages] == [15]
    assert h.client.timeline_positions == {GID: 5}


def test_sync_timelines_with_positions_of_the_callers_own() -> None:
    h = Large()
    h.login_large()
    h.answer_heads()  # the login's: no large group yet
    positions = {GID: 2, OTHER: 400}  # OTHER: above done (lost server data)
    d = h.client.sync_timelines(positions)
    h.answer_heads(head(GID, 3, 1), head(OTHER, 310, 300), head(5009, 0, 0))
    h.answer_pull(GID, 2, 3, 3, gmsg(13))
    h.answer_pull(OTHER, 400, 310, 310)  # the empty page brings the position back to done
    sync = result(d)
    assert isinstance(sync, TimelineSync)
    assert [m.msg_id for m in sync.messages] == [13] and sync.pages == 2
    assert positions == sync.positions == {GID: 3, OTHER: 310, 5009: 0}
    assert [x.group_id for x in sync.heads] == [GID, OTHER, 5009]
    assert h.client.timeline_positions == {}  # the caller's dict, not the client's


def test_pushes_and_pages_carry_a_message_once_into_the_state() -> None:
    h = Large()
    h.login_large()
    h.answer_heads()
    h.feed(Push(gmsg(13)))
    assert h.sent() == [PushAck(13)]
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 2, 0))
    h.answer_pull(GID, 0, 2, 2, gmsg(12), gmsg(13))  # the position does not follow pushes
    assert [m.msg_id for m in result(d).messages] == [12]  # 13 was held: not repeated
    assert h.held() == [12, 13]
    assert [m.msg_id for _, m in h.messages] == [13]  # on_message: the push only


def test_skipped_seqs_move_the_position_without_messages() -> None:
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 1500, 0))
    h.answer_pull(GID, 0, 200, 1500)  # before the member's join: covered, nothing sent
    h.answer_pull(GID, 200, 1500, 1500, gmsg(1234))
    assert h.client.timeline_positions == {GID: 1500}
    assert h.held() == [1234]


def test_a_page_that_does_not_move_ends_the_loop() -> None:
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 10, 2))
    h.answer_pull(GID, 2, 2, 10, has_more=1)  # a server that makes no progress
    assert h.sent() == []
    assert h.client.timeline_positions == {GID: 2}
    assert len(h.syncs) == 1


def test_a_refused_heads_request_leaves_the_offline_sync_standing() -> None:
    h = Large()
    h.login_large()
    (req,) = h.sent()
    assert isinstance(req, TimelineHeads)
    h.feed(Error(ErrorCode.UNAVAILABLE, "storage", request_id=req.request_id))
    (sync,) = h.syncs  # the offline part of the loop is reported as usual
    assert sync.cursor == 10
    (err,) = h.errors
    assert isinstance(err, ServerError) and err.code == ErrorCode.UNAVAILABLE
    d = h.client.timeline_pull(GID, 7, 50)
    h.answer_pull(GID, 7, 8, 8, gmsg(21), limit=50)
    page = result(d)
    assert page == TimelinePage(GID, 8, 8, 0, (gmsg(21),), request_id=page.request_id)
    assert h.held() == [21]  # stored, deduplicated
    assert h.client.timeline_positions == {}  # a raw pull moves no position


def test_a_sync_hint_runs_the_timelines_too() -> None:
    h = Large()
    h.login_large()
    h.answer_heads()
    h.feed(SyncHint())
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull)
    h.feed(OfflinePage(11, 0, 0, (), (), request_id=pull.request_id))
    (ack,) = h.sent()
    h.feed(OfflineAckOk(11, request_id=ack.request_id))
    h.answer_heads(head(GID, 1, 0))
    h.answer_pull(GID, 0, 1, 1, gmsg(30))
    assert [m.msg_id for m in h.syncs[-1].messages] == [30]


def test_heads_and_pulls_need_the_feature() -> None:
    h = Large()
    h.login_large(enabled=ALL)  # the server did not enable LARGE_GROUPS
    assert h.sent() == []  # and the sync asked for no heads
    for d in (h.client.timeline_heads(), h.client.timeline_pull(GID, 0),
              h.client.sync_timelines()):  # fmt: skip
        assert isinstance(failure(d), FeatureUnavailable)
    assert h.sent() == []


def test_timeline_heads_returns_the_page() -> None:
    h = Large()
    h.login_large()
    h.answer_heads()
    d = h.client.timeline_heads()
    assert pending(d)
    h.answer_heads(head(GID, 9, 4, 99))
    assert result(d).heads == (head(GID, 9, 4, 99),)


# ------------------------------------------------------------------------- imclient


def _console() -> tuple[Large, Console, list[dict[str, Any]]]:
    h = Large()
    h.login_large()
    h.answer_heads()
    events: list[dict[str, Any]] = []
    console = Console(h.client, lambda line: events.append(json.loads(line)), script=True)
    return h, console, events


def test_heads_command_shows_each_group_and_this_devices_position() -> None:
    h, console, events = _console()
    h.client.timeline_positions[GID] = 3
    d = console._run("/heads")
    h.answer_heads(head(GID, 4, 1, 14), head(OTHER, 310, 310, 9))
    result(d)
    assert events == [{"event": "heads", "heads": [
        {"conv": "group:5003", "done": "4", "read_seq": "1", "unread": 3, "last_msg_id": "14",
         "position": "3"},
        {"conv": "group:5007", "done": "310", "read_seq": "310", "unread": 0,
         "last_msg_id": "9", "position": None},
    ]}]  # fmt: skip
    assert render(events[0], None) == (
        "-- large groups: group:5003 3 unread (at 3 of 4), group:5007 0 unread (at - of 310)"
    )


def test_timeline_command_pulls_from_the_read_position_until_caught_up() -> None:
    h, console, events = _console()
    result(console._run(f"/to group {GID}"))
    d = console._run("/timeline")
    h.answer_heads(head(GID, 3, 1))  # no position on this device: from read_seq
    h.answer_pull(GID, 1, 2, 3, gmsg(12, text="one"), limit=0)
    h.answer_pull(GID, 2, 3, 3, gmsg(13, text="two"), limit=0)
    (mark,) = h.sent()  # viewed: read up to the newest
    assert mark.TYPE == FrameType.READ_MARK and mark.msg_id == 13  # type: ignore[attr-defined]
    timeline = [e for e in events if e["event"] == "timeline"]
    assert [[m["text"] for m in e["messages"]] for e in timeline] == [["one"], ["two"]]
    assert [(e["position"], e["done"], e["has_more"]) for e in timeline] == [
        ("2", "3", True), ("3", "3", False)]  # fmt: skip
    assert h.client.timeline_positions == {GID: 3}
    assert pending(d)
    assert render(timeline[-1], str(ME)).endswith("-- (timeline of group:5003 at 3 of 3)")


def test_timeline_command_of_another_group_and_usage() -> None:
    h, console, events = _console()
    h.client.timeline_positions[OTHER] = 5
    d = console._run(f"/timeline {OTHER}")
    h.answer_pull(OTHER, 5, 5, 5, limit=0)
    result(d)
    assert events[-1] == {"event": "timeline", "conv": "group:5007", "messages": [],
                          "position": "5", "done": "5", "has_more": False}  # fmt: skip
    for line in ("/timeline", "/timeline 1 2", "/timeline x", "/heads now"):
        result(console._run(line))
    result(console._run(f"/to user {BOB}"))
    result(console._run("/timeline"))
    assert [e["name"] for e in events if e["event"] == "error"] == ["USAGE"] * 5
    assert h.sent() == []


def test_the_commands_need_the_feature() -> None:
    h = Large()
    h.login_large(enabled=ALL)
    events: list[dict[str, Any]] = []
    console = Console(h.client, lambda line: events.append(json.loads(line)), script=True)
    for line in ("/heads", f"/timeline {GID}"):
        result(console._run(line))
    assert [e["name"] for e in events] == ["UNSUPPORTED"] * 2


# ---------------------------------------------------- a real server (section 20 served)

THRESHOLD = 3  # a group of more than 3 members is large
OWNER, READER, V1, LATE = 11, 12, 13, 14


@pytest.fixture
def large_server(server_process: Callable[..., ServerHandle], tmp_path: Path) -> ServerHandle:
    config = tmp_path / "imserver.toml"
    config.write_text(f"large_group_threshold = {THRESHOLD}\n")
    return server_process(TEST_SECRET, "--config", str(config))


class Devices:
    def __init__(self, server: ServerHandle) -> None:
        self.server = server
        self.clients: list[IMClient] = []
        self.errors: list[BaseException] = []

    async def login(self, user: int, device: str, **kw: Any) -> IMClient:
        c = IMClient(self.server.endpoint, mint(TEST_SECRET, user, device), device,
                     state=ClientState(), reactor=reactor, **kw)  # fmt: skip
        c.received = []  # type: ignore[attr-defined]
        c.on_message = lambda conv, m: c.received.append(m)  # type: ignore[attr-defined]
        c.on_error = self.errors.append
        self.clients.append(c)
        await c.connect()
        await c.drain()  # the login sync
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


@pytest_twisted.async_yield_fixture()
async def devices(large_server: ServerHandle) -> AsyncIterator[Devices]:
    d = Devices(large_server)
    yield d
    await d.close()
    assert d.errors == []


async def _until(check: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll `check()` (a value, or something to await) until it is true; its last value."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if inspect.isawaitable(got):
            got = await got
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await sleep(0.05)


async def _large_group(owner: IMClient, texts: list[str]) -> tuple[int, list[int]]:
    """A group of five (large: above the threshold) and `texts` sent to it by the owner."""
    gid = await owner.create_group("all hands", [READER, V1, LATE + 100, LATE + 101])
    sent = [(await owner.send_text(ConvKind.GROUP, gid, t)).msg_id for t in texts]
    return gid, sent


async def _timeline_done(c: IMClient, gid: int, done: int) -> None:
    """Wait until the group's timeline holds `done` messages (persistence is asynchronous)."""

    async def check() -> bool:
        return any(h.group_id == gid and h.done >= done for h in (await c.timeline_heads()).heads)

    await _until(check)


@pytest_twisted.ensureDeferred
async def test_server_a_reader_catches_up_from_the_timeline(devices: Devices) -> None:
    """Needs the server's TIMELINE_* handlers (issue 14)."""
    owner = await devices.login(OWNER, "desk")
    gid, sent = await _large_group(owner, ["one", "two", "three"])
    await _timeline_done(owner, gid, len(sent))
    reader = await devices.login(READER, "phone")  # was offline: the login sync pulls them
    held = [m.msg_id for m in reader.state.messages(f"group:{gid}")]
    assert set(sent) <= set(held)
    assert reader.wire.frames_in[FrameType.TIMELINE_PAGE] >= 1
    (h,) = [x for x in (await reader.timeline_heads()).heads if x.group_id == gid]
    assert reader.timeline_positions[gid] == h.done >= len(sent)
    assert h.unread == h.done - h.read_seq
    again = await reader.sync_timelines()  # caught up: no page, nothing new
    assert again.messages == [] and again.pages == 0


@pytest_twisted.ensureDeferred
async def test_server_pushes_and_pages_deliver_each_message_once_to_the_state(
    devices: Devices,
) -> None:
    """Needs the server's TIMELINE_* handlers (issue 14)."""
    owner = await devices.login(OWNER, "desk")
    reader = await devices.login(READER, "phone")
    gid, sent = await _large_group(owner, ["live one", "live two"])
    await _until(lambda: {m.msg_id for m in reader.received} >= set(sent))  # pushed
    await _timeline_done(owner, gid, len(sent))
    synced = await reader.sync()  # the timeline pages bring the pushed messages again
    assert not set(sent) & {m.msg_id for m in synced.messages}  # held: not new
    held = [m.msg_id for m in reader.state.messages(f"group:{gid}")]
    assert len(held) == len(set(held)) and set(sent) <= set(held)


@pytest_twisted.ensureDeferred
async def test_server_a_version_1_device_reads_a_large_group_from_history_only(
    devices: Devices,
) -> None:
    """Needs the server's large-group send path (issue 14)."""
    owner = await devices.login(OWNER, "desk")
    gid, sent = await _large_group(owner, ["for everyone"])
    v1 = await devices.login(V1, "old", features=())
    assert not v1.has_feature(LG)
    assert not set(sent) & {m.msg_id for m in v1.state.messages(f"group:{gid}")}  # no inbox
    assert isinstance(await _failed(v1.timeline_heads()), FeatureUnavailable)

    async def in_history() -> bool:
        return set(sent) <= {m.msg_id for m in await v1.history_all(ConvKind.GROUP, gid)}

    await _until(in_history)


async def _failed(d: Any) -> BaseException:
    try:
        await d
    except BaseException as e:
        return e
    raise AssertionError("it did not fail")


@pytest_twisted.ensureDeferred
async def test_server_a_non_member_is_refused_and_an_unknown_group_not_found(
    devices: Devices,
) -> None:
    """Needs the server's TIMELINE_PULL handler (issue 14)."""
    owner = await devices.login(OWNER, "desk")
    gid, _ = await _large_group(owner, ["x"])
    outsider = await devices.login(LATE, "tablet")
    err = await _failed(outsider.timeline_pull(gid, 0))
    assert isinstance(err, ServerError) and err.code == ErrorCode.FORBIDDEN
    err = await _failed(outsider.timeline_pull(gid ^ 1, 0))
    assert isinstance(err, ServerError) and err.code == ErrorCode.NOT_FOUND
    assert not [x for x in (await outsider.timeline_heads()).heads if x.group_id == gid]


def test_server_imclient_heads_and_timeline(large_server: ServerHandle) -> None:
    """imclient --script: /sync pulls the timeline, /heads and /timeline show it. Needs the
    server's TIMELINE_* handlers (issue 14)."""
    events = run_script(large_server, OWNER, "desk",
                        [f"/group create big {READER} {V1} {LATE} {LATE + 1}"])  # fmt: skip
    gid = next(e["group_id"] for e in events if e["event"] == "group")
    run_script(large_server, OWNER, "desk", [f"/to group {gid}", "hello big group"])
    conv = f"group:{gid}"
    deadline = time.monotonic() + 15
    while True:  # the syncs pull the timeline (persisted a little after the ack)
        # /sync waits for the login's sync (commands do not): then the position is stored
        got = run_script(large_server, READER, "phone", ["/sync", "/heads", f"/timeline {gid}"])
        texts = [e["text"] for e in got if e["event"] == "message" and e["conv"] == conv]
        if "hello big group" in texts:
            break
        assert time.monotonic() < deadline, "the message never came from the timeline"
    (heads,) = [e for e in got if e["event"] == "heads"]
    (mine,) = [h for h in heads["heads"] if h["conv"] == conv]
    assert mine["position"] == mine["done"]  # the syncs caught up
    (timeline,) = [e for e in got if e["event"] == "timeline"]
    assert (timeline["position"], timeline["has_more"]) == (mine["done"], False)
