"""The ack trigger of sessions (issue 15, spec 19.4): a connected device that leaves a PUSH
unacknowledged for push_ack_wait_s is handed to the service's ack_overdue hook once per stall,
with the newest pushed message. Sessions on StringTransports, the timers on a fake clock, and
a service that records the hook's calls (the hook's queue and the notifier are tested in
test_notifier.py and test_push_e2e.py)."""

from __future__ import annotations

import gc
import weakref
from dataclasses import dataclass, field

import pytest

from twisted.internet.task import Clock

from improto import records
from improto.enums import CloseReason, ContentType, ConvKind
from improto.frames import Message, PushAck
from improto_server.config import Config
from improto_server.session import SessionFactory
from tests.support.sessions import Peer, fake_clock, logged_in, session_factory

SECRET = "ack-overdue-test-secret-0123456789abcdef"
WAIT = 5.0
USER = 7


@dataclass
class HookService:
    """What a session uses of a ChatService that sends notifications: the notify queue's
    presence (the trigger's switch) and the hook, recorded."""

    notify_queue: object | None = True
    calls: list[tuple[int, str, bytes]] = field(default_factory=list)

    def ack_overdue(self, user_id: int, device_id: str, record: bytes) -> None:
        self.calls.append((user_id, device_id, record))


def _record(msg_id: int, sender: int = 8, ctype: int = 1) -> bytes:
    m = Message(msg_id, 1, sender, "d", ConvKind.USER, USER, ctype, b"c" * 16, b"m%d" % msg_id)
    return records.record_of(m)


def _push(peer: Peer, msg_id: int, sender: int = 8, ctype: int = 1) -> bytes:
    """PUSH msg_id to the peer as the hub does (the frame every receiver shares)."""
    data = records.push_frame(_record(msg_id, sender, ctype))
    peer.session.push(msg_id, data)
    return data


@pytest.fixture
def clock() -> Clock:
    return fake_clock()


@pytest.fixture
def service() -> HookService:
    return HookService()


def _factory(clock: Clock, service: HookService, wait: float = WAIT) -> SessionFactory:
    config = Config(idle_timeout=600, heartbeat=20, push_ack_wait_s=wait)
    return session_factory(config, clock, SECRET, service)


@pytest.fixture
def factory(clock: Clock, service: HookService) -> SessionFactory:
    return _factory(clock, service)


def test_the_newest_push_is_handed_over_once_the_oldest_waited_long_enough(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    first = _push(peer, 1)
    clock.advance(1)
    newest = _push(peer, 2)
    assert peer.session._last_push is newest  # the shared frame, not a copy
    clock.advance(WAIT - 1 - 0.01)
    assert service.calls == []
    clock.advance(0.01)  # the first push has waited WAIT
    assert service.calls == [(USER, "phone", _record(2))]
    assert newest.endswith(service.calls[0][2]) and first != newest
    clock.advance(60)  # still unacknowledged, but notified already: nothing more
    assert len(service.calls) == 1
    assert peer.session._last_push is None and peer.session._ack_watch is None
    assert not peer.closed and list(peer.session.unacked or ()) == [1, 2]


def test_the_notice_carries_the_newest_message_that_notifies_the_user(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    """The user's own message from another device and a group event notify nobody: the
    newest message from someone else before them is the notice's; with only such pushes
    overdue, nothing is handed over."""
    peer = logged_in(factory, USER, "phone")
    _push(peer, 1)
    _push(peer, 2, sender=USER)
    _push(peer, 3, ctype=ContentType.GROUP_EVENT)
    clock.advance(WAIT)
    assert service.calls == [(USER, "phone", _record(1))]
    _push(peer, 4, sender=USER)
    clock.advance(WAIT)
    assert len(service.calls) == 1 and peer.session._last_push is None


def test_a_push_acknowledged_in_time_is_not_handed_over(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    _push(peer, 1)
    clock.advance(WAIT - 0.5)
    peer.send(PushAck(1))
    clock.advance(WAIT * 3)
    assert service.calls == []
    # the watch is over: nothing held, and the deadline is the idle timeout again
    session = peer.session
    assert session._last_push is None and session._ack_watch is None
    assert session.deadline == session._last_rx + factory.config.idle_timeout


def test_later_pushes_left_unacknowledged_give_another_notice_after_another_wait(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    _push(peer, 1)
    clock.advance(WAIT)
    assert [c[2] for c in service.calls] == [_record(1)]
    clock.advance(1)
    _push(peer, 2)  # the second stall: watched from its own send time
    clock.advance(0.5)
    _push(peer, 3)
    clock.advance(WAIT - 0.5 - 0.01)
    assert len(service.calls) == 1
    clock.advance(0.01)
    assert [c[2] for c in service.calls] == [_record(1), _record(3)]
    # a push acknowledged by a device that woke up: the next stall starts afresh
    peer.send(PushAck(1), PushAck(2), PushAck(3))
    _push(peer, 4)
    peer.send(PushAck(4))
    clock.advance(WAIT * 2)
    assert len(service.calls) == 2
    _push(peer, 5)
    clock.advance(WAIT)
    assert [c[2] for c in service.calls] == [_record(1), _record(3), _record(5)]


def test_a_push_from_the_inbox_is_watched_too(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    assert peer.session.push_missing(9, records.push_frame(_record(9)))
    clock.advance(WAIT)
    assert service.calls == [(USER, "phone", _record(9))]


def test_the_idle_timeout_still_closes_a_watched_connection(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    clock.advance(600 - 1)
    _push(peer, 1)
    clock.advance(1)
    assert peer.closed and service.calls == []  # the idle timeout came first


@pytest.mark.parametrize("wait", [0.0, WAIT])
def test_off_without_a_wait_or_without_notifications(clock: Clock, wait: float) -> None:
    """push_ack_wait_s = 0, or a service that sends no notifications (no notify queue)."""
    service = HookService(notify_queue=None if wait else True)
    factory = _factory(clock, service, wait)
    assert factory.ack_wait_s == 0.0
    peer = logged_in(factory, USER, "phone")
    deadline = peer.session.deadline
    _push(peer, 1)
    assert peer.session.deadline == deadline  # no timer of its own
    clock.advance(WAIT * 3)
    assert service.calls == [] and peer.session._last_push is None
    assert peer.session.unacked == {1: 0.0}  # no clock read per push


def test_a_gone_connection_hands_nothing_over_and_keeps_nothing(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    data = _push(peer, 1)
    session = peer.session
    session.connectionLost()
    assert session._last_push is None and session._ack_watch is None
    assert session.deadline is None and session.unacked is None
    clock.advance(WAIT * 2)
    assert service.calls == []
    ref = weakref.ref(session)
    del session, peer
    gc.collect()
    assert ref() is None  # nothing (a timer entry, the frame) kept it
    assert data  # the frame itself is the test's


def test_a_closed_connection_hands_nothing_over(
    factory: SessionFactory, clock: Clock, service: HookService
) -> None:
    peer = logged_in(factory, USER, "phone")
    _push(peer, 1)
    peer.session.close(CloseReason.SHUTDOWN, "bye")
    assert peer.session._last_push is None and peer.session._ack_watch is None
    clock.advance(WAIT * 2)
    assert service.calls == []


@pytest.mark.parametrize("bad", [-0.5, 3601.0, float("nan"), "5", True])
def test_push_ack_wait_s_is_range_checked(bad: object) -> None:
    Config(push_ack_wait_s=0).check()  # 0 switches the trigger off
    Config(push_ack_wait_s=0.25).check()
    with pytest.raises(ValueError, match="push_ack_wait_s"):
        Config(push_ack_wait_s=bad).check()  # type: ignore[arg-type]
