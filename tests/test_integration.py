"""End to end over TCP on 127.0.0.1: the embedded server and the client library in one reactor."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import gatherResults
from twisted.internet.task import deferLater

from improto.enums import ConvKind
from improto.errors import ErrorCode
from improto.frames import Message
from improto.tokens import mint
from improto_clients.client import ClientState, IMClient, ServerError
from improto_server.app import Server
from improto_server.config import Config

SECRET = "integration-secret-integration-secret"
USER, GROUP = ConvKind.USER, ConvKind.GROUP


class Harness:
    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.server: Server | None = None
        self.clients: list[IMClient] = []

    async def start(self) -> None:
        config = Config(listen=["tcp:0:interface=127.0.0.1"], data_dir=str(self.data_dir),
                        jwt_secret=SECRET)  # fmt: skip
        self.server = Server(config, reactor)
        await self.server.start()

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        self.clients.clear()
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def client(self, user: int, device: str, state: ClientState | None = None) -> IMClient:
        assert self.server is not None
        port = self.server.bound_ports()[0]
        c = IMClient(f"tcp:host=127.0.0.1:port={port}", mint(SECRET, user, device), device,
                     state=state, reactor=reactor)  # fmt: skip
        c.received = []  # type: ignore[attr-defined]
        c.on_message = lambda conv, m: c.received.append(m)  # type: ignore[attr-defined]
        self.clients.append(c)
        await c.connect()
        await c.drain()  # the login sync
        return c


@pytest_twisted.async_yield_fixture()
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = Harness(tmp_path)
    await harness.start()
    yield harness
    await harness.stop()


async def eventually(check, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    """Poll `check` (persistence is asynchronous: spec section 11)."""
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


def bodies(messages: list[Message]) -> list[bytes]:
    return [m.body for m in messages]


@pytest_twisted.ensureDeferred
async def test_live_chat_reaches_every_device(h: Harness) -> None:
    alice_phone = await h.client(1, "phone")
    alice_laptop = await h.client(1, "laptop")
    bob = await h.client(2, "phone")
    ack = await alice_phone.send_text(USER, 2, "hi bob")
    assert ack.duplicate == 0

    def delivered() -> None:
        assert [m.msg_id for m in bob.received] == [ack.msg_id]
        assert [m.msg_id for m in alice_laptop.received] == [ack.msg_id]

    await eventually(delivered)
    assert alice_phone.received == []  # the sender's own connection gets the ack only
    m = bob.received[0]
    assert (m.sender_id, m.sender_device, m.conv_id, m.body) == (1, "phone", 2, b"hi bob")


@pytest_twisted.ensureDeferred
async def test_resend_is_deduplicated(h: Harness) -> None:
    alice = await h.client(1, "phone")
    bob = await h.client(2, "phone")
    first = await alice.send(USER, 2, b"once", client_msg_id=b"K" * 16)
    again = await alice.send(USER, 2, b"once", client_msg_id=b"K" * 16)
    assert (again.msg_id, again.server_time, again.duplicate) == (
        first.msg_id, first.server_time, 1,
    )  # fmt: skip
    await deferLater(reactor, 0.2, lambda: None)
    assert [m.msg_id for m in bob.received] == [first.msg_id]

    async def in_history_once() -> None:
        page = await bob.history(USER, 1)
        assert [m.msg_id for m in page.messages] == [first.msg_id]

    await eventually(in_history_once)


@pytest_twisted.ensureDeferred
async def test_offline_sync_of_a_burst_larger_than_a_page(h: Harness) -> None:
    alice = await h.client(1, "phone")
    # Pipelined, so that many share a millisecond.
    acks = await gatherResults([alice.send_text(USER, 2, f"m{i}") for i in range(450)])
    assert [a.msg_id for a in acks] == sorted(a.msg_id for a in acks)
    bob = await h.client(2, "phone")  # logs in: the sync loop runs

    async def synced() -> None:
        await bob.sync()
        got = [m.msg_id for m in bob.state.messages("user:1")]
        assert got == [a.msg_id for a in acks]

    await eventually(synced)
    assert (await bob.sync()).messages == []  # nothing new, nothing repeated
    times = [a.server_time for a in acks]
    assert len(set(times)) < len(times)  # several shared a millisecond


@pytest_twisted.ensureDeferred
async def test_groups_history_and_late_joiner(h: Harness) -> None:
    a = await h.client(1, "phone")
    b = await h.client(2, "phone")
    gid = await a.create_group("team", [2])
    before = await b.send_text(GROUP, gid, "before carol")
    assert await a.add_members(gid, [3]) == 1
    carol = await h.client(3, "phone")
    after = await a.send_text(GROUP, gid, "after carol joined")

    async def carol_history() -> None:
        msgs = await carol.history_all(GROUP, gid)
        ids = [m.msg_id for m in msgs]
        assert after.msg_id in ids and before.msg_id not in ids
        assert msgs[-1].content_type == 0  # oldest visible: the event that added carol

    await eventually(carol_history)
    members = await carol.group_members(gid)
    assert (members.owner_id, members.members) == (1, (1, 2, 3))
    assert await b.remove_members(gid, [2]) == 1
    with pytest.raises(ServerError) as err:
        await b.history(GROUP, gid)
    assert err.value.code == ErrorCode.FORBIDDEN
    with pytest.raises(ServerError) as err:
        await b.send_text(GROUP, gid, "not a member any more")
    assert err.value.code == ErrorCode.FORBIDDEN


@pytest_twisted.ensureDeferred
async def test_data_survives_a_restart(h: Harness) -> None:
    alice = await h.client(1, "phone")
    acks = [await alice.send_text(USER, 2, f"durable {i}") for i in range(5)]
    await h.stop()  # immediately: some jobs may still be queued, they must survive
    await h.start()
    bob = await h.client(2, "phone")

    async def all_there() -> None:
        await bob.sync()
        assert [m.msg_id for m in bob.state.messages("user:1")] == [a.msg_id for a in acks]
        page = await bob.history(USER, 1)
        assert [m.msg_id for m in page.messages] == [a.msg_id for a in reversed(acks)]

    await eventually(all_there)
