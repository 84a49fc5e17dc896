"""The client's post-v1 features (PROTOCOL.md sections 18, 19) against scripted server frames:
FEATURES negotiation and the version-1 fallback, INBOX_NOTICE rules, the conversation list,
read markers and receipts, push registrations, and the wire counters. Harness as in
test_client_unit."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from improto.codec import encode
from improto.enums import ConvKind, Feature, FrameType
from improto.errors import EncodeError, ErrorCode, InvalidField
from improto.frames import (
    ConvChanges,
    ConvChangesPage,
    ConvEntry,
    ConvHide,
    ConvHideOk,
    ConvList,
    ConvPage,
    Error,
    Features,
    FeaturesOk,
    Frame,
    HelloOk,
    InboxNotice,
    Message,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Push,
    PushAck,
    PushRegister,
    PushRegisterOk,
    PushUnregister,
    PushUnregisterOk,
    ReadMark,
    ReadMarkOk,
    ReadUpdate,
    Send,
    SendAck,
)
from improto_clients.client import (
    DEFAULT_FEATURES,
    ClientState,
    ConvResult,
    FeatureUnavailable,
    Notice,
    ServerError,
)
from improto_clients.conv_list import ConversationList, last_id, row_key
from tests.test_client_unit import BOB, ME, Harness, failure, msg, pending, result

ALL = (Feature.WIRE_ONCE, Feature.CONVERSATIONS, Feature.READ_RECEIPTS)
CAROL = 1003


class Ext(Harness):
    """A client that asks for every feature; `login` answers FEATURES and the first sync."""

    def __init__(self, state: ClientState | None = None, **kw: Any) -> None:
        kw.setdefault("features", DEFAULT_FEATURES)
        super().__init__(state, **kw)

    def login_ext(self, enabled: tuple[int, ...] = ALL, cursor: int = 10) -> None:
        d = self.open()
        (hello,) = self.sent()
        self.feed(HelloOk(ME, 1, 0, 90, 131072, request_id=hello.request_id))
        (feat,) = self.sent()  # nothing else before FEATURES_OK: the pull comes after it
        assert isinstance(feat, Features) and feat.features == DEFAULT_FEATURES
        assert pending(d)
        self.feed(FeaturesOk(enabled, request_id=feat.request_id))
        assert result(d).user_id == ME
        self.answer_sync(cursor)

    def answer_sync(self, cursor: int, messages: tuple[Message, ...] = ()) -> None:
        (pull,) = self.sent()
        assert isinstance(pull, OfflinePull)
        self.feed(OfflinePage(cursor, 0, 0, messages, (), request_id=pull.request_id))
        (ack,) = self.sent()
        assert isinstance(ack, OfflineAck)
        self.feed(OfflineAckOk(ack.cursor, request_id=ack.request_id))

    def reply(self, frame: Frame, make: Any) -> None:
        """Answer `frame` (already taken from sent()) with make(request_id=...)."""
        self.feed(make(request_id=frame.request_id))


def row(conv_id: int, version: int, last: Message | None = None, *, kind: int = ConvKind.USER,
        unread: int = 0, read_id: int = 0, peer_read_id: int = 0,
        hidden: int = 0) -> ConvEntry:  # fmt: skip
    return ConvEntry(kind, conv_id, version, hidden, read_id, peer_read_id, unread,
                     (last,) if last else ())  # fmt: skip


def mine(msg_id: int, to: int = BOB) -> Message:
    return msg(msg_id, sender=ME, conv_id=to)


# ----------------------------------------------------------------------------- FEATURES


def test_features_are_negotiated_after_hello_ok_and_before_the_first_pull() -> None:
    h = Ext()
    h.login_ext(enabled=(Feature.WIRE_ONCE, Feature.CONVERSATIONS))
    assert h.client.features == {Feature.WIRE_ONCE, Feature.CONVERSATIONS}
    assert h.client.has_feature(Feature.CONVERSATIONS)
    assert not h.client.has_feature(Feature.READ_RECEIPTS)
    assert h.errors == []


def test_a_version_1_server_makes_it_a_version_1_client() -> None:
    h = Ext(push_sync_delay=5.0)
    d = h.open()
    (hello,) = h.sent()
    h.feed(HelloOk(ME, 1, 0, 90, 131072, request_id=hello.request_id))
    (feat,) = h.sent()
    h.feed(Error(ErrorCode.UNKNOWN_FRAME_TYPE, "unknown type 0x30", request_id=feat.request_id))
    assert result(d).user_id == ME
    assert h.client.features == frozenset()
    assert h.errors == []  # the expected answer of a v1 server is no error
    h.answer_sync(7)
    # v1 behaviour: a burst of pushes is followed by a sync so that the cursor follows
    h.feed(Push(msg(1)))
    assert h.sent() == [PushAck(1)]
    h.reactor.advance(5)
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull) and pull.cursor == 7
    assert isinstance(failure(h.client.conversations()), FeatureUnavailable)
    assert isinstance(failure(h.client.mark_read(ConvKind.USER, BOB, 1)), FeatureUnavailable)


def test_no_features_wanted_sends_no_features_frame() -> None:
    h = Harness(features=())
    h.open()
    (hello,) = h.sent()
    h.feed(HelloOk(ME, 1, 0, 90, 131072, request_id=hello.request_id))
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull)


# ------------------------------------------------------------------------- INBOX_NOTICE


def test_notice_at_the_cursor_for_held_messages_advances_and_acks_once_later(
    tmp_path: Path,
) -> None:
    path = str(tmp_path / "s.json")
    h = Ext(state=ClientState(path=path))
    h.login_ext(cursor=10)
    h.feed(Push(msg(500)), Push(msg(501)))
    assert h.sent() == [PushAck(500), PushAck(501)]
    h.feed(InboxNotice(10, 11, (500,)))
    assert h.client.state.cursor == 11
    assert ClientState.load(path).cursor == 11  # persisted, as a page's cursor is
    h.feed(InboxNotice(11, 12, (501,)))
    assert h.client.state.cursor == 12
    assert h.sent() == []  # nothing downloaded, no pull
    h.reactor.advance(2.9)
    assert h.sent() == []
    h.reactor.advance(0.1)  # 3 s after the first notice of the run: one OFFLINE_ACK
    (ack,) = h.sent()
    assert isinstance(ack, OfflineAck) and ack.cursor == 12
    h.feed(OfflineAckOk(12, request_id=ack.request_id))
    h.reactor.advance(10)
    assert h.sent() == []
    assert h.client.notices == {Notice.ADVANCED: 2}


def test_notice_not_at_the_cursor_is_ignored() -> None:
    h = Ext()
    h.login_ext(cursor=10)
    h.feed(Push(msg(500)))
    h.sent()
    h.feed(InboxNotice(9, 11, (499, 500)))
    assert h.client.state.cursor == 10
    h.reactor.advance(10)
    assert h.sent() == []
    assert h.client.notices == {Notice.IGNORED: 1}


def test_notice_listing_a_message_not_held_runs_the_sync_loop() -> None:
    h = Ext()
    h.login_ext(cursor=10)
    h.feed(Push(msg(500)))
    h.sent()
    h.feed(InboxNotice(10, 12, (500, 777)))
    assert h.client.state.cursor == 10
    (pull,) = h.sent()
    assert isinstance(pull, OfflinePull) and pull.cursor == 10
    h.feed(OfflinePage(12, 0, 0, (msg(500), msg(777)), (), request_id=pull.request_id))
    (ack,) = h.sent()
    h.feed(OfflineAckOk(12, request_id=ack.request_id))
    assert h.client.state.cursor == 12 and h.client.state.has(777)


def test_notice_of_my_own_sent_message_advances() -> None:
    h = Ext()
    h.login_ext(cursor=10)
    d = h.client.send_text(ConvKind.USER, BOB, "hi")
    (s,) = h.sent()
    assert isinstance(s, Send)
    h.feed(SendAck(s.client_msg_id, 900, 1, 0, request_id=s.request_id))
    result(d)
    h.feed(InboxNotice(10, 11, (900,)))
    assert h.client.state.cursor == 11


def test_wire_once_needs_no_sync_after_pushes_and_close_acks_the_cursor() -> None:
    h = Ext(push_sync_delay=5.0, notice_ack_delay=None)
    h.login_ext(cursor=10)
    h.feed(Push(msg(500)))
    h.sent()
    h.feed(InboxNotice(10, 11, (500,)))
    h.reactor.advance(60)
    assert h.sent() == []  # neither a pull after the push nor a timed ack
    h.client.close()
    (ack,) = h.sent()
    assert isinstance(ack, OfflineAck) and ack.cursor == 11  # before the connection closes
    assert h.transport.disconnecting


def test_wire_counters_count_every_byte_and_frame_both_ways() -> None:
    h = Ext(track_ids=True)
    h.login_ext(cursor=10)
    out_before = h.client.wire.bytes_out
    push = encode(Push(msg(500)))
    h.feed(Push(msg(500)), Push(msg(500)))  # the second is a duplicate: delivered twice
    h.sent()
    w = h.client.wire
    assert w.frames_in[FrameType.PUSH] == 2
    assert w.frame_bytes_in[FrameType.PUSH] == 2 * len(push)
    assert w.frames_out[FrameType.PUSH_ACK] == 2
    assert w.bytes_out - out_before == 2 * len(encode(PushAck(500)))
    assert w.messages_in == 2 and w.repeated() == {500: 2}
    proto = h.client.protocol
    assert proto is not None
    assert proto.stats.bytes_in == w.bytes_in  # one connection so far: the same totals
    assert w.frames_in[FrameType.FEATURES_OK] == 1 and w.frames_out[FrameType.FEATURES] == 1
    assert w.named(w.frames_in)["PUSH"] == 2


# -------------------------------------------------------------------- conversation list


def test_conversations_pages_the_list_then_fetches_changes_from_the_first_version() -> None:
    h = Ext()
    h.login_ext()
    seen: list[str] = []
    h.client.on_conversation = lambda key, r: seen.append(key)
    d = h.client.conversations(limit=2)
    (p1,) = h.sent()
    assert isinstance(p1, ConvList) and (p1.before_id, p1.limit) == (0, 2)
    bob = row(BOB, 9, msg(50), unread=2)
    group = row(7, 8, msg(40, conv_id=7, kind=ConvKind.GROUP), kind=ConvKind.GROUP, unread=1)
    h.reply(p1, lambda **k: ConvPage(10, 1, 4, (bob, group), **k))
    (p2,) = h.sent()
    assert isinstance(p2, ConvList) and p2.before_id == 40  # the last row's last msg_id
    carol = row(CAROL, 3, msg(30, sender=CAROL), unread=1)
    h.reply(p2, lambda **k: ConvPage(11, 0, 4, (carol,), **k))
    (ch,) = h.sent()
    assert isinstance(ch, ConvChanges) and ch.since_version == 10  # the FIRST page's version
    bob_read = row(BOB, 12, msg(50), read_id=50)  # read elsewhere while we paged
    h.reply(ch, lambda **k: ConvChangesPage(12, 0, 2, (bob_read,), **k))
    res = result(d)
    assert isinstance(res, ConvResult)
    assert (res.pages, res.version, res.total_unread) == (3, 12, 2)
    convs = h.client.state.convs
    assert convs.version == 12 and h.client.total_unread == 2
    assert [k for k, _ in convs.newest_first()] == ["user:1002", "group:7", "user:1003"]
    assert convs.get("user:1002") == bob_read
    assert seen == ["user:1002", "group:7", "user:1003"]


def test_a_partly_paged_list_shows_the_servers_total() -> None:
    h = Ext()
    h.login_ext()
    d = h.client.conversations(max_pages=1)
    (p,) = h.sent()
    h.reply(p, lambda **k: ConvPage(5, 1, 9, (row(BOB, 5, msg(50), unread=2),), **k))
    (ch,) = h.sent()  # no second CONV_LIST page: max_pages
    assert isinstance(ch, ConvChanges) and ch.since_version == 5
    h.reply(ch, lambda **k: ConvChangesPage(5, 0, 9, (), **k))
    result(d)
    convs = h.client.state.convs
    assert not convs.complete and h.client.total_unread == 9  # 7 in rows not fetched
    h.feed(Push(msg(60)))
    h.sent()
    assert h.client.total_unread == 10


def test_conversation_changes_starts_at_the_stored_version_and_stores_what_it_gets() -> None:
    h = Ext()
    h.login_ext()
    h.client.state.convs.version = 40
    d = h.client.conversation_changes()
    (c1,) = h.sent()
    assert c1.since_version == 40  # type: ignore[attr-defined]
    h.reply(c1, lambda **k: ConvChangesPage(42, 1, 1, (row(BOB, 41, msg(5), unread=1),
                                                       row(CAROL, 42, hidden=1)), **k))  # fmt: skip
    (c2,) = h.sent()
    assert c2.since_version == 42  # type: ignore[attr-defined]
    assert h.client.state.convs.version == 42  # stored page by page, after its rows
    h.reply(c2, lambda **k: ConvChangesPage(30, 0, 1, (), **k))  # lost server data: lower
    assert result(d).version == 30 and h.client.state.convs.version == 30
    assert [k for k, _ in h.client.state.convs.newest_first()] == ["user:1002"]  # hidden: off


def test_a_login_with_a_fetched_list_asks_for_changes_beside_the_sync() -> None:
    st = ClientState()
    st.convs.version = 5
    h = Ext(state=st)
    h.open()
    (hello,) = h.sent()
    h.feed(HelloOk(ME, 1, 0, 90, 131072, request_id=hello.request_id))
    (feat,) = h.sent()
    h.reply(feat, lambda **k: FeaturesOk(ALL, **k))
    pull, ch = h.sent()  # reads done elsewhere meanwhile, without waiting for the sync
    assert isinstance(pull, OfflinePull)
    assert isinstance(ch, ConvChanges) and ch.since_version == 5
    h.reply(ch, lambda **k: ConvChangesPage(6, 0, 0, (row(BOB, 6, read_id=3),), **k))
    assert h.client.state.convs.version == 6
    assert h.errors == []


def test_live_messages_move_the_badge_and_sending_reads_the_conversation() -> None:
    h = Ext()
    h.login_ext()
    d = h.client.conversations()
    (p,) = h.sent()
    h.reply(p, lambda **k: ConvPage(3, 0, 1, (row(BOB, 3, msg(50), unread=1),), **k))
    (ch,) = h.sent()
    h.reply(ch, lambda **k: ConvChangesPage(3, 0, 1, (), **k))
    result(d)
    h.feed(Push(msg(60)), Push(msg(70, sender=CAROL)))
    h.sent()
    convs = h.client.state.convs
    assert (convs.get("user:1002").unread, convs.get("user:1003").unread) == (2, 1)  # type: ignore[union-attr]
    assert h.client.total_unread == 3
    send = h.client.send_text(ConvKind.USER, BOB, "answer")
    (s,) = h.sent()
    h.feed(SendAck(s.client_msg_id, 80, 1, 0, request_id=s.request_id))  # type: ignore[attr-defined]
    result(send)
    bob = convs.get("user:1002")
    assert bob is not None and (bob.read_id, bob.unread, bob.last[0].msg_id) == (80, 0, 80)
    assert h.client.total_unread == 1
    # A newer server row (version 4) is the truth; the read position never goes back.
    d = h.client.conversation_changes()
    (ch,) = h.sent()
    h.reply(ch, lambda **k: ConvChangesPage(4, 0, 2, (row(BOB, 4, msg(60), unread=1),), **k))
    result(d)
    bob = convs.get("user:1002")
    assert bob is not None and (bob.read_id, bob.unread, bob.last[0].msg_id) == (80, 0, 80)


# ----------------------------------------------------------------- read markers and hide


def loaded(h: Ext, *rows: ConvEntry, total: int) -> None:
    d = h.client.conversations()
    (p,) = h.sent()
    h.reply(p, lambda **k: ConvPage(9, 0, total, rows, **k))
    (ch,) = h.sent()
    h.reply(ch, lambda **k: ConvChangesPage(9, 0, total, (), **k))
    result(d)


def test_mark_read_sends_read_mark_and_keeps_the_clamped_position() -> None:
    h = Ext()
    h.login_ext()
    loaded(h, row(BOB, 9, msg(50), unread=3), total=3)
    d = h.client.mark_read(ConvKind.USER, BOB, 2**64 - 1)
    (m,) = h.sent()
    assert isinstance(m, ReadMark) and (m.conv_kind, m.conv_id, m.msg_id) == (1, BOB, 2**64 - 1)
    h.reply(m, lambda **k: ReadMarkOk(ConvKind.USER, BOB, 50, **k))  # clamped by the server
    assert result(d) == 50
    bob = h.client.state.convs.get("user:1002")
    assert bob is not None and (bob.read_id, bob.unread) == (50, 0)
    assert h.client.total_unread == 0


def test_read_update_from_my_other_device_clears_the_badge_up_to_the_last() -> None:
    h = Ext()
    h.login_ext()
    loaded(h, row(BOB, 9, msg(50), unread=3), row(7, 8, msg(40, conv_id=7, kind=2), kind=2,
                                                   unread=2), total=5)  # fmt: skip
    updates: list[tuple[str, ReadUpdate]] = []
    h.client.on_read_update = lambda key, u: updates.append((key, u))
    h.feed(ReadUpdate(ME, ConvKind.GROUP, 7, 30))  # short of the last: the count waits
    g = h.client.state.convs.get("group:7")
    assert g is not None and (g.read_id, g.unread) == (30, 2)
    h.feed(ReadUpdate(ME, ConvKind.USER, BOB, 50))
    bob = h.client.state.convs.get("user:1002")
    assert bob is not None and (bob.read_id, bob.unread) == (50, 0)
    assert h.client.total_unread == 2
    h.feed(ReadUpdate(ME, ConvKind.USER, BOB, 20))  # never back
    assert h.client.state.convs.get("user:1002").read_id == 50  # type: ignore[union-attr]
    assert [k for k, _ in updates] == ["group:7", "user:1002", "user:1002"]


def test_peer_receipt_marks_my_messages_read() -> None:
    h = Ext()
    h.login_ext()
    for i in (60, 70):
        d = h.client.send(ConvKind.USER, BOB, b"x", client_msg_id=bytes([i]) * 16)
        (s,) = h.sent()
        h.feed(SendAck(bytes([i]) * 16, i, 1, 0, request_id=s.request_id))
        result(d)
    h.feed(ReadUpdate(BOB, ConvKind.USER, BOB, 60))
    convs = h.client.state.convs
    assert convs.read_by_peer("user:1002", 60) and not convs.read_by_peer("user:1002", 70)
    h.feed(ReadUpdate(BOB, ConvKind.USER, BOB, 70))
    assert convs.read_by_peer("user:1002", 70)
    bob = convs.get("user:1002")
    assert bob is not None and bob.read_id == 70  # my own read position is not the peer's


def test_hide_takes_the_row_off_until_a_newer_message_arrives() -> None:
    h = Ext()
    h.login_ext()
    loaded(h, row(BOB, 9, msg(50), unread=2), row(CAROL, 8, msg(40, sender=CAROL)), total=2)
    d = h.client.hide(ConvKind.USER, BOB)
    (hide,) = h.sent()
    assert isinstance(hide, ConvHide) and hide.conv_id == BOB
    h.reply(hide, lambda **k: ConvHideOk(ConvKind.USER, BOB, **k))
    result(d)
    assert [k for k, _ in h.client.state.convs.newest_first()] == ["user:1003"]
    assert h.client.total_unread == 0
    h.feed(Push(msg(90)))
    h.sent()
    assert [k for k, _ in h.client.state.convs.newest_first()] == ["user:1002", "user:1003"]
    assert h.client.total_unread == 3


def test_the_conversation_list_is_saved_with_the_state(tmp_path: Path) -> None:
    path = str(tmp_path / "s.json")
    h = Ext(state=ClientState(path=path))
    h.login_ext()
    loaded(h, row(BOB, 9, msg(50), unread=2, peer_read_id=44), total=2)
    back = ClientState.load(path)
    assert back.convs.version == 9 and back.convs.total_unread == 2
    assert back.convs.get("user:1002") == row(BOB, 9, msg(50), unread=2, peer_read_id=44)
    doc = json.loads(Path(path).read_text())
    doc["format"] = 1  # a file from before the conversation list still loads
    del doc["convs"]
    Path(path).write_text(json.dumps(doc))
    old = ClientState.load(path)
    assert old.convs.version == 0 and old.convs.rows == {} and old.cursor == 10


def test_a_hide_holds_until_the_server_row_has_it() -> None:
    h = Ext()
    h.login_ext()
    loaded(h, row(BOB, 9, msg(50), unread=1), total=1)
    d = h.client.hide(ConvKind.USER, BOB)
    (hide,) = h.sent()
    h.reply(hide, lambda **k: ConvHideOk(ConvKind.USER, BOB, **k))
    result(d)
    convs = h.client.state.convs
    # The persister applied an earlier mark but not yet the hide: the row stays hidden.
    convs.apply_page(0, (row(BOB, 10, msg(50), read_id=50),))
    assert convs.newest_first() == [] and convs.get("user:1002").read_id == 50  # type: ignore[union-attr]
    convs.apply_page(0, (row(BOB, 11, msg(50), read_id=50, hidden=1),))
    assert convs.pending_hides == {}
    convs.apply_page(0, (row(BOB, 12, msg(60), unread=1, read_id=50),))  # a newer message
    assert [k for k, _ in convs.newest_first()] == ["user:1002"] and h.client.total_unread == 1


def test_a_notice_during_the_loops_final_ack_is_applied() -> None:
    h = Ext()
    h.login_ext(cursor=10)
    h.feed(Push(msg(500)))
    h.sent()
    d = h.client.sync()
    (pull,) = h.sent()
    h.feed(OfflinePage(10, 0, 0, (), (), request_id=pull.request_id))
    (ack,) = h.sent()
    h.feed(InboxNotice(10, 11, (500,)))  # the server's loop ended with the final page
    assert h.client.state.cursor == 11
    h.feed(OfflineAckOk(10, request_id=ack.request_id))
    assert result(d).cursor == 10  # what the loop acknowledged
    h.feed(Push(msg(501)), InboxNotice(11, 12, (501,)))
    assert h.client.state.cursor == 12  # and the chain of notices goes on


def test_a_server_row_behind_the_live_messages_keeps_their_unread() -> None:
    """The list can lag the pushes (the persister records rows shortly after the ack): a
    fetched row older than what was seen live keeps the live last message and unread count."""
    convs = ConversationList()
    for m in (msg(10), msg(11)):  # two pushes from bob
        convs.message(ME, m, live=True)
    server = row(BOB, 5, msg(10), unread=1)  # the server has recorded only the first
    convs.apply_page(1, (server,))
    got = convs.get(row_key(server))
    assert got is not None and (got.unread, last_id(got)) == (2, 11)
    assert convs.total_unread == 2


def test_a_large_groups_row_at_our_version_with_a_newer_message_is_taken() -> None:
    """A large group's merged CONV_LIST row keeps its version while its timeline moves
    (PROTOCOL.md 20.1): the newer message and the server's unread count are taken; a row of
    our version with nothing newer changes nothing."""
    convs = ConversationList()
    convs.apply_page(0, (row(BOB, 7, msg(10), unread=1),))
    same = row(BOB, 7, msg(10), unread=5)  # same version, same last: not newer
    assert convs.apply_page(0, (same,)) == []
    assert convs.get(row_key(same)).unread == 1  # type: ignore[union-attr]
    merged = row(BOB, 7, msg(40), unread=4)
    assert convs.apply_page(0, (merged,)) == [row_key(merged)]
    got = convs.get(row_key(merged))
    assert got is not None and (got.unread, last_id(got)) == (4, 40)


# ---------------------------------------------------------------- push registrations


def test_register_and_unregister_push() -> None:
    h = Ext()
    h.login_ext(enabled=(*ALL, Feature.PUSH))
    d = h.client.register_push("apns", "tok-1", preview=True)
    (reg,) = h.sent()
    assert reg == PushRegister("apns", "tok-1", PushRegister.PREVIEW, request_id=reg.request_id)
    assert pending(d)
    h.reply(reg, PushRegisterOk)
    assert result(d) is None
    d = h.client.register_push("fcm", "tok-2")
    (reg,) = h.sent()
    assert (reg.platform, reg.options) == ("fcm", 0)
    h.feed(Error(ErrorCode.INVALID_FIELD, "unknown platform fcm", request_id=reg.request_id))
    err = failure(d)
    assert isinstance(err, ServerError) and err.code == ErrorCode.INVALID_FIELD
    d = h.client.unregister_push()
    (unreg,) = h.sent()
    assert isinstance(unreg, PushUnregister)
    h.reply(unreg, PushUnregisterOk)
    assert result(d) is None
    assert h.errors == []


def test_push_needs_the_feature_and_a_valid_frame() -> None:
    h = Ext()
    h.login_ext()  # the server did not enable PUSH
    assert isinstance(failure(h.client.register_push("apns", "t")), FeatureUnavailable)
    assert isinstance(failure(h.client.unregister_push()), FeatureUnavailable)
    assert h.sent() == []
    p = Ext()
    p.login_ext(enabled=(Feature.PUSH,))
    assert isinstance(failure(p.client.register_push("APNs", "t")), InvalidField)  # not sent
    assert isinstance(failure(p.client.register_push("apns", "")), EncodeError)
    assert p.sent() == []
