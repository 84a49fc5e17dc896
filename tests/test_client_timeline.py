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
from improto.limits import TIMELINE_HELD_MAX, TIMELINE_PAGE_MAX
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
from improto_clients.held import HELD_FOLLOW, HELD_KEEP, HeldIds
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
        has_more: int | None = None, limit: int = TIMELINE_PAGE_MAX, held: tuple[int, ...] = (),
    ) -> None:  # fmt: skip
        (pull,) = self.sent()
        assert pull == TimelinePull(group, after, limit, held, request_id=pull.request_id)
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
    assert h.client.timeline_held.held(GID) == (13,)
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 2, 0, 13))
    # the position does not follow pushes, but the pull lists 13: the page leaves it out
    h.answer_pull(GID, 0, 2, 2, gmsg(12), held=(13,))
    assert [m.msg_id for m in result(d).messages] == [12]
    assert h.held() == [12, 13]
    assert h.client.timeline_held.held(GID) == ()  # covered (the head's last): forgotten
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


def _push(h: Large, *msg_ids: int, group: int = GID) -> None:
    for i in msg_ids:
        h.feed(Push(gmsg(i, group)))
        assert h.sent() == [PushAck(i)]


def test_held_ids_are_forgotten_once_a_message_at_or_above_them_is_covered() -> None:
    """20.6 "Held ids": covered_id is the newest msg_id known at or below the position."""
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 0, 0))  # a large group, nothing in it yet: position 0
    _push(h, 13, 14, 20)
    held = h.client.timeline_held
    assert held.held(GID) == (13, 14, 20)
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 5, 0, 20))
    # seqs 1..3 are 12, 13, 14: 13 and 14 left out; covered_id 12 forgets nothing yet
    h.answer_pull(GID, 0, 3, 5, gmsg(12), held=(13, 14, 20))
    assert held.held(GID) == (13, 14, 20) and held.covered[GID] == 12
    h.answer_pull(GID, 3, 5, 5, gmsg(15), held=(13, 14, 20))  # seqs 4, 5: 15, 20 (held)
    sync = result(d)
    assert [m.msg_id for m in sync.messages] == [12, 15] and sync.positions == {GID: 5}
    assert held.held(GID) == () and held.covered[GID] == 20  # the head's last: covered


def test_a_push_not_in_the_timeline_yet_stays_held_past_a_final_page() -> None:
    """The race a plain "forget at has_more 0" would lose: 21 is pushed (accepted) but not
    stored in the timeline when the page is built, so the page's done is below it."""
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 5, 5, 20))  # caught up at 5 (covered_id 20)
    _push(h, 21)
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 5, 5, 20))  # 21 has no seq yet: nothing to pull
    result(d)
    assert h.client.timeline_held.held(GID) == (21,)
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 6, 5, 21))  # stored since: seq 6
    h.answer_pull(GID, 5, 6, 6, held=(21,))  # left out, covered
    assert result(d).messages == []
    assert h.client.timeline_held.held(GID) == () and h.client.timeline_positions == {GID: 6}


def test_a_heads_page_drops_the_held_ids_of_groups_without_a_timeline() -> None:
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 0, 0))
    _push(h, 31, group=OTHER)  # a group not (yet) known to have a timeline: held too
    _push(h, 32)
    assert h.client.timeline_held.held(OTHER) == (31,)
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 0, 0))  # OTHER is not large: its held ids go
    result(d)
    assert h.client.timeline_held.held(OTHER) == () and h.client.timeline_held.held(GID) == (32,)


def test_a_position_that_goes_back_resets_covered_id() -> None:
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 9, 9, 90))  # covered_id 90
    assert h.client.timeline_held.covered == {GID: 90}
    d = h.client.sync_timelines()
    h.answer_heads(head(GID, 4, 4, 40))  # lost server data: done below the position
    h.answer_pull(GID, 9, 4, 4)
    result(d)
    assert h.client.timeline_positions == {GID: 4}
    assert h.client.timeline_held.covered == {GID: 40}  # reset, then the head's last


def test_every_200_held_ids_the_client_runs_the_timeline_loop() -> None:
    h = Large()
    h.login_large()
    h.answer_heads(head(GID, 0, 0))
    _push(h, *range(1001, 1000 + HELD_FOLLOW))  # 199 held: nothing happens
    h.feed(Push(gmsg(1000 + HELD_FOLLOW)))  # the 200th held id
    ack, heads_req = h.sent()
    assert ack == PushAck(1000 + HELD_FOLLOW) and isinstance(heads_req, TimelineHeads)
    held = tuple(range(1001, 1001 + HELD_FOLLOW))
    h.feed(TimelineHeadsPage((head(GID, HELD_FOLLOW, 0, held[-1]),),
                             request_id=heads_req.request_id))  # fmt: skip
    h.answer_pull(GID, 0, HELD_FOLLOW, HELD_FOLLOW, held=held)  # all held: an empty page
    assert h.client.timeline_positions == {GID: HELD_FOLLOW}
    assert h.client.timeline_held.held(GID) == () and h.client.wire.timeline_messages_in == 0
    assert h.errors == []


def test_held_ids_sent_are_the_lowest_1000_and_at_most_4000_are_kept() -> None:
    held = HeldIds()
    for i in range(HELD_KEEP + 10, 0, -1):  # any order in
        held.hold(GID, i)
    assert held.count(GID) == HELD_KEEP == 4 * TIMELINE_HELD_MAX
    assert held.held(GID)[0] == 11  # the lowest ten were dropped
    assert held.to_send(GID) == tuple(range(11, 11 + TIMELINE_HELD_MAX))
    assert not held.hold(GID, 5)  # below the kept ones: dropped at once
    held.cover(GID, 2000)
    assert held.to_send(GID)[0] == 2001 and not held.hold(GID, 1999)
    held.reset(GID)
    assert held.hold(GID, 1999)


def test_the_state_file_keeps_positions_and_held_ids(tmp_path: Path) -> None:
    path = str(tmp_path / "phone.json")
    h = Large(state=ClientState.load(path))
    h.login_large()
    h.answer_heads(head(GID, 4, 1, 14))
    h.answer_pull(GID, 1, 4, 4, gmsg(12), gmsg(13), gmsg(14))
    _push(h, 15, 16)
    again = ClientState.load(path)
    assert again.timeline_positions == {GID: 4}
    assert again.timeline_held == h.client.timeline_held
    assert again.timeline_held.held(GID) == (15, 16) and again.timeline_held.covered[GID] == 14
    # a restarted client starts at its position, not at read_seq, and lists what it holds
    h2 = Large(state=again)
    h2.login_large()
    h2.answer_heads(head(GID, 7, 1, 17))
    h2.answer_pull(GID, 4, 7, 7, gmsg(17), held=(15, 16))
    assert h2.client.timeline_held.held(GID) == ()


def test_an_older_state_file_loads_without_timelines(tmp_path: Path) -> None:
    state = ClientState(user_id=ME, cursor=9)
    state.add(gmsg(12))
    obj = state.to_json()
    assert obj["timelines"] == {}
    del obj["timelines"]  # what a client before section 20's positions wrote
    old = ClientState.from_json(obj)
    assert old.timeline_positions == {} and old.timeline_held == HeldIds()
    assert old.cursor == 9 and old.has(12)
    obj["format"] = 1
    del obj["convs"]
    assert ClientState.from_json(obj).timeline_positions == {}


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

    async def login(self, user: int, device: str, state: ClientState | None = None,
                    **kw: Any) -> IMClient:  # fmt: skip
        state = ClientState() if state is None else state
        c = IMClient(self.server.endpoint, mint(TEST_SECRET, user, device), device,
                     state=state, reactor=reactor, **kw)  # fmt: skip
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


@pytest_twisted.ensureDeferred
async def test_server_pushed_and_own_messages_are_not_downloaded_again(devices: Devices) -> None:
    """Each message downloaded once: the reader gets N pushes, loses its connection, misses
    one message, reconnects; its catch-up pages carry that one record only (held ids), and
    its position reaches done. The sender's own messages are held too."""
    n = 6
    owner = await devices.login(OWNER, "desk")
    reader = await devices.login(READER, "phone")
    gid, _ = await _large_group(owner, [])
    first = (await reader.send_text(ConvKind.GROUP, gid, "first")).msg_id
    await _timeline_done(owner, gid, 1)
    for c in (owner, reader):  # both now have a position in the group: 1
        await c.sync_timelines()
        assert c.timeline_positions[gid] == 1
    assert owner.state.has(first) and owner.wire.timeline_messages_in == 0  # pushed: held
    sent = [(await owner.send_text(ConvKind.GROUP, gid, f"live {i}")).msg_id for i in range(n)]
    await _until(lambda: {m.msg_id for m in reader.received} >= set(sent))  # pushed
    assert set(reader.timeline_held.held(gid)) == set(sent)
    await _timeline_done(owner, gid, n)
    before = reader.wire.timeline_messages_in

    await reader.close()  # the connection is down while one more is sent
    missed = (await owner.send_text(ConvKind.GROUP, gid, "while away")).msg_id
    # seqs: "first" 1, the live ones 2..n+1, this one n+2 (waiting for n+1 raced its write)
    await _timeline_done(owner, gid, n + 2)
    await reader.connect()
    await reader.drain()  # the login's sync, timelines included
    assert reader.wire.timeline_messages_in - before == 1  # the missed one, nothing pushed
    assert reader.state.has(missed)
    assert missed in {m.msg_id for m in reader.state.messages(f"group:{gid}")}
    (h,) = [x for x in (await reader.timeline_heads()).heads if x.group_id == gid]
    assert reader.timeline_positions[gid] == h.done >= n + 2
    assert reader.timeline_held.held(gid) == ()  # all covered: forgotten
    assert reader.wire.repeated() == {}  # no msg_id came twice (pushes and pages)

    # The sender: its own messages were held from their SEND_ACKs.
    await owner.sync()
    assert owner.wire.timeline_messages_in == 0  # its own: held since their SEND_ACKs
    assert owner.timeline_positions[gid] == h.done and owner.timeline_held.held(gid) == ()
    # What held ids saved: the same page without them carries every record again.
    page = await reader.timeline_pull(gid, 1)
    assert [m.msg_id for m in page.messages] == [*sent, missed]


@pytest_twisted.ensureDeferred
async def test_server_a_restarted_client_continues_at_its_stored_position(
    devices: Devices, tmp_path: Path
) -> None:
    """Positions are persisted in the state file: a restart does not start at read_seq
    again (the reader has read nothing: that would download everything once more)."""
    path = str(tmp_path / "phone.json")
    owner = await devices.login(OWNER, "desk")
    gid, sent = await _large_group(owner, ["one", "two", "three"])
    await _timeline_done(owner, gid, len(sent))
    reader = await devices.login(READER, "phone", ClientState.load(path))
    assert reader.wire.timeline_messages_in == len(sent)
    position = reader.timeline_positions[gid]
    await reader.close()
    later = (await owner.send_text(ConvKind.GROUP, gid, "later")).msg_id
    await _timeline_done(owner, gid, len(sent) + 1)
    assert ClientState.load(path).timeline_positions == {gid: position}
    again = await devices.login(READER, "phone", ClientState.load(path))
    assert again.wire.timeline_messages_in == 1 and again.state.has(later)
    (h,) = [x for x in (await again.timeline_heads()).heads if x.group_id == gid]
    assert h.read_seq < position  # nothing read: read_seq would have pulled it all again
    assert again.timeline_positions[gid] == h.done
