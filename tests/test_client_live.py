"""The client library's post-v1 features against a real server process (PROTOCOL.md 18), on
both backends: an always-online device gets each message once (its cursor follows by
INBOX_NOTICE, a reconnect downloads nothing), read markers reach the user's other device and
the peer, the conversation list agrees, and a version-1 client is untouched."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.task import deferLater

from improto.enums import ConvKind, Feature, FrameType
from improto.frames import Message, ReadUpdate
from improto.tokens import mint
from improto_clients.client import ClientState, FeatureUnavailable, IMClient, Notice
from tests.support.server import ServerHandle, storage_server

SECRET = "client-live-secret-0123456789abcdef0123456789"
USER = ConvKind.USER
_users = itertools.count(100, 10)  # each test its own users on the shared server


@pytest.fixture(
    scope="module", params=["embedded", pytest.param("production", marks=pytest.mark.services)]
)
def server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServerHandle]:
    with storage_server(
        request.param, Path(tmp_path_factory.mktemp("imserver")), SECRET, "clientlive"
    ) as proc:
        yield proc


class Devices:
    def __init__(self, server: ServerHandle) -> None:
        self.server = server
        self.clients: list[IMClient] = []
        self.errors: list[BaseException] = []

    async def login(self, user: int, device: str, state: ClientState | None = None,
                    **kw: Any) -> IMClient:  # fmt: skip
        c = IMClient(self.server.endpoint, mint(SECRET, user, device), device, state=state,
                     reactor=reactor, **kw)  # fmt: skip
        c.received = []  # type: ignore[attr-defined]
        c.reads = []  # type: ignore[attr-defined]
        c.on_message = lambda conv, m: c.received.append(m)  # type: ignore[attr-defined]
        c.on_read_update = lambda conv, u: c.reads.append(u)  # type: ignore[attr-defined]
        c.on_error = self.errors.append
        self.clients.append(c)
        await c.connect()
        await c.drain()  # the login sync
        return c

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


@pytest_twisted.async_yield_fixture()
async def devices(server: ServerHandle) -> AsyncIterator[Devices]:
    d = Devices(server)
    yield d
    await d.close()
    assert d.errors == []


async def eventually(check: Callable[[], Any], timeout: float = 10.0) -> None:
    """Poll `check` (persistence, notices and receipts are asynchronous)."""
    waited = 0.0
    while True:
        try:
            result = check()
            if hasattr(result, "__await__"):
                await result
            return
        except AssertionError:
            if waited >= timeout:
                raise
        await deferLater(reactor, 0.05, lambda: None)
        waited += 0.05


def ids(messages: list[Message]) -> list[int]:
    return [m.msg_id for m in messages]


@pytest_twisted.ensureDeferred
async def test_an_online_device_gets_each_message_once(devices: Devices) -> None:
    alice_id, bob_id = next(_users), next(_users)
    alice = await devices.login(alice_id, "laptop")
    state = ClientState()
    bob = await devices.login(bob_id, "phone", state, track_ids=True, notice_ack_delay=0.2)
    assert bob.features == {
        Feature.WIRE_ONCE, Feature.CONVERSATIONS, Feature.READ_RECEIPTS, Feature.LARGE_GROUPS
    }  # fmt: skip
    start = bob.state.cursor
    acks = [await alice.send_text(USER, bob_id, f"m{i}") for i in range(20)]

    def followed() -> None:
        assert ids(bob.received) == [a.msg_id for a in acks]  # type: ignore[attr-defined]
        assert bob.state.cursor == start + 20  # one inbox entry each, consecutive cursors

    await eventually(followed)
    assert bob.notices[Notice.ADVANCED] >= 1 and bob.notices[Notice.MISSING] == 0
    frames = bob.wire.named(bob.wire.frames_in)
    assert bob.wire.repeated() == {}, f"a message came twice; frames in: {frames}"
    assert bob.wire.messages_in == 20 and bob.wire.frames_in[FrameType.PUSH] == 20
    assert bob.wire.frames_in[FrameType.OFFLINE_PAGE] == 1  # the login page only

    async def acked() -> None:
        assert await bob.ack_cursor() == start + 20  # the timed OFFLINE_ACK after notices

    await eventually(acked)
    await bob.close()
    again = await devices.login(bob_id, "phone", state, track_ids=True)
    assert again.protocol is not None and again.protocol.stats.messages_in == 0
    assert again.state.cursor == start + 20


@pytest_twisted.ensureDeferred
async def test_read_marks_reach_my_other_device_the_peer_and_the_list(devices: Devices) -> None:
    alice_id, bob_id = next(_users), next(_users)
    alice = await devices.login(alice_id, "laptop")
    bob_phone = await devices.login(bob_id, "phone")
    bob_laptop = await devices.login(bob_id, "laptop")
    acks = [await alice.send_text(USER, bob_id, f"hi {i}") for i in range(3)]
    newest = acks[-1].msg_id

    async def listed() -> None:
        await bob_phone.conversations()
        row = bob_phone.state.convs.get(f"user:{alice_id}")
        assert row is not None and row.last and row.last[0].msg_id == newest
        assert (row.unread, bob_phone.total_unread) == (3, 3)

    await eventually(listed)
    assert await bob_phone.mark_read(USER, alice_id, newest) == newest
    assert bob_phone.total_unread == 0

    def told() -> None:
        own = [u for u in bob_laptop.reads if u.reader_id == bob_id]  # type: ignore[attr-defined]
        assert own == [ReadUpdate(bob_id, USER, alice_id, newest)]
        receipt = alice.reads  # type: ignore[attr-defined]
        assert receipt == [ReadUpdate(bob_id, USER, bob_id, newest)]
        assert all(alice.state.convs.read_by_peer(f"user:{bob_id}", a.msg_id) for a in acks)

    await eventually(told)
    laptop_row = bob_laptop.state.convs.get(f"user:{alice_id}")
    assert laptop_row is not None and laptop_row.read_id == newest and laptop_row.unread == 0

    async def everyone_agrees() -> None:
        await alice.conversation_changes()
        await bob_laptop.conversation_changes()
        row = alice.state.convs.get(f"user:{bob_id}")
        assert row is not None and row.peer_read_id == newest and row.unread == 0
        laptop = bob_laptop.state.convs.get(f"user:{alice_id}")
        assert laptop is not None and (laptop.read_id, laptop.unread) == (newest, 0)

    await eventually(everyone_agrees)

    await bob_phone.hide(USER, alice_id)

    async def hidden_everywhere() -> None:
        await bob_laptop.conversation_changes()
        assert f"user:{alice_id}" not in dict(bob_laptop.state.convs.newest_first())

    await eventually(hidden_everywhere)


@pytest_twisted.ensureDeferred
async def test_a_version_1_client_sees_version_1(devices: Devices) -> None:
    alice_id, bob_id = next(_users), next(_users)
    alice = await devices.login(alice_id, "laptop")
    bob = await devices.login(bob_id, "old-phone", features=(), push_sync_delay=None)
    assert bob.features == frozenset()
    ack = await alice.send_text(USER, bob_id, "plain")

    def pushed() -> None:
        assert ids(bob.received) == [ack.msg_id]  # type: ignore[attr-defined]

    await eventually(pushed)

    async def pulled_again() -> None:  # v1: pushed, and the next sync pages it again
        await bob.sync()
        assert bob.wire.messages_in == 2

    await eventually(pulled_again)
    assert bob.wire.frames_in[FrameType.INBOX_NOTICE] == 0
    assert bob.wire.frames_in[FrameType.FEATURES_OK] == 0
    with pytest.raises(FeatureUnavailable):
        await bob.conversations()
