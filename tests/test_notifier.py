"""The notifier (server/improto_server/notifier.py) and its push gateway client, on the real
embedded backend and a real HTTP push gateway stand-in (tests/support/push_gateway.py): who
gets notified, the request bodies, coalescing, retries, dead tokens, and the bounds."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest_twisted

from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server import metrics
from improto_server.embedded.backend import SQLiteBackend
from improto_server.embedded.notify_queue import SQLiteNotifyQueue
from improto_server.hub import Hub
from improto_server.model import DeviceNotifyJob, PersistJob, PushTarget
from improto_server.notifier import Notifier
from improto_server.push_gateway import PushGatewayClient
from tests.support.push_gateway import PushGatewayStandIn
from tests.support.waiting import eventually, sleep

ALICE, BOB, CAROL = 21, 22, 23


@dataclass(eq=False)
class Conn:
    """An online device (what the hub holds); nothing is written to it here."""

    user_id: int
    device_id: str

    def push(self, msg_id: int, data: bytes) -> None:
        pass

    def notify(self, data: bytes, feature: int) -> bool:
        return False


class HubRouter:
    """The one PushRouter method the notifier uses, answered from a local Hub."""

    def __init__(self, hub: Hub) -> None:
        self.hub = hub

    def online_devices(self, user_ids: Sequence[int]) -> Deferred[dict[int, set[str]]]:
        found = {u: {c.device_id for c in self.hub.devices(u)} for u in user_ids}
        return succeed({u: devices for u, devices in found.items() if devices})


@dataclass
class Harness:
    backend: SQLiteBackend
    queue: SQLiteNotifyQueue
    hub: Hub
    gateway: PushGatewayStandIn
    notifier: Notifier
    ids: Any

    def online(self, user: int, device: str) -> None:
        self.hub.register(Conn(user, device))

    async def register(self, user: int, device: str, token: str, preview: bool = True) -> None:
        await self.backend.devices.set_target(user, device, PushTarget("apns", token, preview))

    async def send(
        self,
        sender: int,
        to: int,
        *users: int,
        kind: int = ConvKind.USER,
        body: bytes = b"hello",
        content_type: int = ContentType.TEXT,
    ) -> PersistJob:
        """What the persister does for a message: its inbox entries, then the notify job."""
        mid = next(self.ids)
        message = Message(
            mid, int(time.time() * 1000), sender, "phone", kind, to, content_type,
            mid.to_bytes(16, "big"), body,
        )  # fmt: skip
        job = PersistJob(message, users or (sender, to))
        await self.backend.inbox.append_many([job])
        await self.queue.put([job])
        return job

    def to(self, user: int) -> list[dict[str, Any]]:
        """The notifications the gateway took for `user`."""
        return [n for n in self.gateway.notifications if n["user_id"] == str(user)]

    async def settled(self) -> None:
        """Every message queued so far has been handled and its requests have finished
        (none is waiting for a window's end)."""

        def queued(db: Any) -> int:
            return db.execute("SELECT count(*) FROM notify_jobs").fetchone()[0]

        for _ in range(1000):
            if not await self.backend.db.call(queued):
                n = self.notifier
                if n.in_flight == 0 and n.pending == 0:
                    return
            await sleep(0.005)
        raise AssertionError("the notifier did not settle")

    async def tokens(self, user: int) -> dict[str, str]:
        targets = await self.backend.devices.targets([user])
        return {d: t.token for d, t in targets.get(user, {}).items()}


@pytest_twisted.async_yield_fixture()
async def make(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    made: list[Harness] = []

    async def build(
        *, interval_s: float = 0.3, timeout_s: float = 0.3, retries: int = 2,
        max_in_flight: int = 8, max_pending: int = 1000,
    ) -> Harness:  # fmt: skip
        backend = SQLiteBackend(tmp_path / f"db{len(made)}.sqlite3", reactor=reactor)
        await backend.start()
        queue = SQLiteNotifyQueue(backend.db, reactor)
        gateway = await PushGatewayStandIn.start()
        client = PushGatewayClient(
            gateway.url, reactor, timeout_s=timeout_s, retries=retries, backoff_s=0.02
        )
        hub = Hub()
        notifier = Notifier(
            queue, backend.devices, HubRouter(hub), backend.conversations, client, reactor,
            interval_s=interval_s, max_in_flight=max_in_flight, max_pending=max_pending,
        )  # fmt: skip
        notifier.start()
        h = Harness(backend, queue, hub, gateway, notifier, itertools.count(10_000))
        made.append(h)
        return h

    yield build
    for h in made:
        await h.queue.close()
        await h.notifier.stop()
        await h.backend.close()
        await h.gateway.stop()


# ------------------------------------------------------------------------ who


@pytest_twisted.ensureDeferred
async def test_an_offline_registered_device_is_notified_with_the_documented_body(make) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-bob")
    await h.register(ALICE, "phone", "tok-alice")  # the sender: never notified
    job = await h.send(ALICE, BOB, body=b"hi Bob")
    await h.gateway.wait_for(1)
    assert h.gateway.bodies == [
        {
            "notification": {
                "user_id": str(BOB),
                "msg_id": str(job.message.msg_id),
                "server_time": job.message.server_time,
                "sender_id": str(ALICE),
                "conv_kind": "user",
                "conv_id": str(ALICE),  # the conversation as Bob's list names it
                "content_type": 1,
                "content": "hi Bob",
                "counts": {"unread": 1},
                "devices": [
                    {
                        "device_id": "phone",
                        "platform": "apns",
                        "pushkey": "tok-bob",
                        "preview": True,
                    },
                ],
            }
        }
    ]
    await h.settled()
    assert h.to(ALICE) == [] and len(h.to(BOB)) == 1
    assert (h.notifier.sent, h.notifier.dropped, h.notifier.retried) == (1, 0, 0)


@pytest_twisted.ensureDeferred
async def test_online_devices_senders_and_group_events_get_no_notification(make) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-bob-phone")
    await h.register(BOB, "tablet", "tok-bob-tablet")
    await h.register(CAROL, "phone", "tok-carol")
    await h.register(ALICE, "phone", "tok-alice")
    h.online(BOB, "phone")  # Bob's phone gets the live push: only his tablet is notified
    h.online(CAROL, "phone")  # all of Carol's registered devices are online
    gid = 77
    job = await h.send(ALICE, gid, ALICE, BOB, CAROL, kind=ConvKind.GROUP)
    await h.send(ALICE, gid, ALICE, BOB, kind=ConvKind.GROUP, content_type=0, body=b"{}")
    await h.settled()
    (n,) = h.to(BOB)
    assert [d["device_id"] for d in n["devices"]] == ["tablet"]
    assert (n["conv_kind"], n["conv_id"], n["msg_id"]) == (
        "group",
        str(gid),
        str(job.message.msg_id),
    )
    assert h.to(CAROL) == [] and h.to(ALICE) == []


# ------------------------------------------------ unacknowledged pushes (DeviceNotifyJob)


@pytest_twisted.ensureDeferred
async def test_a_device_job_notifies_that_device_online_or_not(make) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-phone")
    await h.register(BOB, "tablet", "tok-tablet")
    h.online(BOB, "phone")  # connected, its app suspended: the PUSH went unacknowledged
    h.online(BOB, "tablet")  # connected and reading
    job = await h.send(ALICE, BOB, body=b"are you there?")
    await h.settled()
    assert h.to(BOB) == []  # both online: nothing for the message itself
    await h.queue.put([DeviceNotifyJob.of(BOB, "phone", job.record)])
    await h.gateway.wait_for(1)
    await h.settled()
    (n,) = h.to(BOB)
    assert (n["msg_id"], n["content"], n["counts"]) == (
        str(job.message.msg_id), "are you there?", {"unread": 1},
    )  # fmt: skip
    assert [d["pushkey"] for d in n["devices"]] == ["tok-phone"]  # not the tablet


@pytest_twisted.ensureDeferred
async def test_a_device_job_for_no_registration_own_messages_or_group_events_is_not_sent(
    make,
) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-bob")
    await h.register(ALICE, "phone", "tok-alice")
    h.online(BOB, "phone")
    h.online(ALICE, "phone")
    job = await h.send(ALICE, BOB)
    event = await h.send(ALICE, 77, ALICE, BOB, kind=ConvKind.GROUP, content_type=0, body=b"{}")
    await h.queue.put([
        DeviceNotifyJob.of(BOB, "watch", job.record),  # Bob's watch registered nothing
        DeviceNotifyJob.of(ALICE, "phone", job.record),  # her own message, on her phone
        DeviceNotifyJob.of(BOB, "phone", event.record),  # a group event
    ])  # fmt: skip
    await h.settled()
    assert h.notifier.handled == 5 and h.gateway.requests == []


@pytest_twisted.ensureDeferred
async def test_a_forced_device_survives_coalescing_and_the_lookup_at_the_window_end(
    make,
) -> None:
    h = await make(interval_s=0.4)
    await h.register(BOB, "phone", "tok-phone")
    await h.register(BOB, "tablet", "tok-tablet")
    h.online(BOB, "phone")
    first = await h.send(ALICE, BOB, body=b"m0")  # the tablet is offline: at once
    await h.gateway.wait_for(1)
    second = await h.send(ALICE, BOB, body=b"m1")  # in the window: waits for its end
    await h.queue.put([DeviceNotifyJob.of(BOB, "phone", first.record)])  # m0 unacknowledged
    await h.gateway.wait_for(2)
    await h.settled()
    a, b = h.to(BOB)
    assert [d["device_id"] for d in a["devices"]] == ["tablet"]
    # the newest message, to the offline tablet and the online phone that did not ack
    assert (b["msg_id"], b["content"]) == (str(second.message.msg_id), "m1")
    assert [d["device_id"] for d in b["devices"]] == ["phone", "tablet"]
    await sleep(0.5)  # the window is over; the phone is not forced any more
    await h.send(ALICE, BOB, body=b"m2")
    await h.gateway.wait_for(3)
    await h.settled()
    assert [d["device_id"] for d in h.to(BOB)[2]["devices"]] == ["tablet"]


@pytest_twisted.ensureDeferred
async def test_a_device_job_joins_a_notification_waiting_for_a_request_slot(make) -> None:
    h = await make(max_in_flight=1, timeout_s=0.3, retries=0)
    await h.register(CAROL, "phone", "tok-carol")
    await h.register(BOB, "phone", "tok-phone")
    await h.register(BOB, "tablet", "tok-tablet")
    h.online(BOB, "phone")
    h.gateway.hang(1)  # Carol's request takes the one slot until it times out
    await h.send(ALICE, CAROL)
    await h.gateway.wait_for(1)
    job = await h.send(ALICE, BOB)  # waits for the slot, for the offline tablet
    await h.queue.put([DeviceNotifyJob.of(BOB, "phone", job.record)])
    await h.gateway.wait_for(2)
    await h.settled()
    (n,) = h.to(BOB)
    assert [d["device_id"] for d in n["devices"]] == ["phone", "tablet"]
    assert n["msg_id"] == str(job.message.msg_id) and h.notifier.dropped == 1  # Carol's


# ------------------------------------------------------------------- pacing


@pytest_twisted.ensureDeferred
async def test_a_burst_is_one_request_at_once_and_one_coalesced_at_the_window_end(make) -> None:
    h = await make(interval_s=0.4)
    await h.register(BOB, "phone", "tok-bob")
    burst = [await h.send(ALICE, BOB, body=b"m0")]
    await h.gateway.wait_for(1)  # (its badge is read when it goes: before the next ones)
    burst += [await h.send(ALICE, BOB, body=b"m%d" % i) for i in (1, 2)]
    await h.gateway.wait_for(2)
    first, second = h.to(BOB)
    assert (first["msg_id"], first["content"], first["counts"]) == (
        str(burst[0].message.msg_id), "m0", {"unread": 1},
    )  # fmt: skip
    # The newest message, and the badge read at the window's end.
    assert (second["msg_id"], second["content"], second["counts"]) == (
        str(burst[2].message.msg_id), "m2", {"unread": 3},
    )  # fmt: skip
    gap = h.gateway.requests[1].at - h.gateway.requests[0].at
    assert gap >= 0.4 * 0.9
    await sleep(0.5)  # another window passes: nothing more
    assert len(h.to(BOB)) == 2 and h.notifier.sent == 2
    # A window that ended with nothing pending: the next message goes at once again.
    started = time.monotonic()
    await h.send(ALICE, BOB)
    await h.gateway.wait_for(3)
    assert time.monotonic() - started < 0.3


@pytest_twisted.ensureDeferred
async def test_previews_split_the_devices_and_only_text_is_previewed(make) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-phone", preview=True)
    await h.register(BOB, "tablet", "tok-tablet", preview=False)
    await h.register(BOB, "web", "tok-web", preview=True)
    await h.register(CAROL, "phone", "tok-carol", preview=True)
    await h.send(ALICE, BOB, body=b"secret")
    await h.send(ALICE, CAROL, body=b"\x00\x01", content_type=300)  # application-defined
    await h.settled()
    with_preview, without = h.to(BOB)
    assert with_preview["content"] == "secret"
    assert [d["device_id"] for d in with_preview["devices"]] == ["phone", "web"]
    assert "content" not in without
    assert [(d["device_id"], d["preview"]) for d in without["devices"]] == [("tablet", False)]
    assert with_preview["counts"] == without["counts"] == {"unread": 1}
    (carol,) = h.to(CAROL)
    assert "content" not in carol and carol["content_type"] == 300


# ------------------------------------------------------------------ failures


@pytest_twisted.ensureDeferred
async def test_5xx_and_429_are_retried_then_sent(make) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-bob")
    h.gateway.fail(1, 503)
    h.gateway.fail(1, 429)
    await h.send(ALICE, BOB)
    await h.gateway.wait_for(3)
    assert [r.answer for r in h.gateway.requests] == ["http 503", "http 429", "ok"]
    assert h.gateway.bodies[0] == h.gateway.bodies[2]  # the same request again
    await eventually(lambda: h.notifier.sent == 1)
    assert (h.notifier.retried, h.notifier.dropped) == (2, 0)


@pytest_twisted.ensureDeferred
async def test_a_hanging_gateway_times_out_and_the_request_is_retried(make) -> None:
    h = await make(timeout_s=0.2)
    await h.register(BOB, "phone", "tok-bob")
    h.gateway.hang(1)
    started = time.monotonic()
    await h.send(ALICE, BOB)
    await h.gateway.wait_for(2)
    assert [r.answer for r in h.gateway.requests] == ["hang", "ok"]
    assert time.monotonic() - started >= 0.2
    await eventually(lambda: h.notifier.sent == 1)
    assert (h.notifier.retried, h.notifier.dropped) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_exhausted_retries_and_other_4xx_drop_the_notification(make) -> None:
    h = await make(retries=2)
    failed_before = metrics.sample("improto_notifications_total", {"outcome": "failed"})
    retries_before = metrics.sample("improto_notifications_total", {"outcome": "retry"})
    await h.register(BOB, "phone", "tok-bob")
    await h.register(CAROL, "phone", "tok-carol")
    h.gateway.fail(3, 500)  # the first attempt and both retries
    await h.send(ALICE, BOB)
    await eventually(lambda: h.notifier.dropped == 1)
    assert h.notifier.retried == 2 and len(h.gateway.requests) == 3
    h.gateway.fail(1, 400)  # the request is wrong: no retry
    await h.send(ALICE, CAROL)
    await eventually(lambda: h.notifier.dropped == 2)
    assert h.notifier.retried == 2 and len(h.gateway.requests) == 4
    assert h.notifier.sent == 0
    failed = metrics.sample("improto_notifications_total", {"outcome": "failed"})
    retries = metrics.sample("improto_notifications_total", {"outcome": "retry"})
    assert (failed - failed_before, retries - retries_before) == (2, 2)


@pytest_twisted.ensureDeferred
async def test_a_connection_refused_gateway_is_retried_then_dropped(make) -> None:
    h = await make(retries=1)
    await h.register(BOB, "phone", "tok-bob")
    await h.gateway.stop()  # nobody listens on its port now
    await h.send(ALICE, BOB)
    await eventually(lambda: h.notifier.dropped == 1)
    assert (h.notifier.retried, h.notifier.sent) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_rejected_tokens_are_removed_but_not_a_newer_registration(make) -> None:
    h = await make()
    await h.register(BOB, "phone", "tok-dead")
    await h.register(BOB, "tablet", "tok-fine")
    h.gateway.reject("tok-dead")
    await h.send(ALICE, BOB)
    await eventually(lambda: h.notifier.rejected == 1)
    await h.settled()
    assert await h.tokens(BOB) == {"tablet": "tok-fine"}

    # Carol's phone registers a new token while the gateway answers about the old one.
    await h.register(CAROL, "phone", "tok-old")
    h.gateway.reject("tok-old")
    h.gateway.before_answer = lambda _: h.register(CAROL, "phone", "tok-new")
    await h.send(ALICE, CAROL)
    await eventually(lambda: h.notifier.rejected == 2)
    await h.settled()
    assert await h.tokens(CAROL) == {"phone": "tok-new"}


# -------------------------------------------------------------------- bounds


@pytest_twisted.ensureDeferred
async def test_requests_in_flight_and_waiting_users_are_bounded(make) -> None:
    h = await make(timeout_s=30, max_in_flight=1, max_pending=2)
    users = [101, 102, 103, 104]
    for u in users:
        await h.register(u, "phone", f"tok-{u}")
    h.gateway.hang(10)  # the first request never finishes: its slot stays taken
    await h.send(ALICE, users[0])
    await h.gateway.wait_for(1)
    for u in users[1:]:
        await h.send(ALICE, u)
    await h.send(ALICE, users[1])  # coalesced with its waiting notification: no new room
    await eventually(lambda: h.notifier.dropped == 1)
    await sleep(0.1)
    assert (h.notifier.in_flight, h.notifier.pending, h.notifier.dropped) == (1, 2, 1)
    assert len(h.gateway.requests) == 1  # one slot: the others wait
