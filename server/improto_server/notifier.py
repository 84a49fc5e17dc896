"""The notifier: asks the push gateway to notify the registered devices that are not online
when a message reaches their user (spec section 19, spec/PUSH_GATEWAY.md).

It consumes the notify queue, which the persister fills with each batch's messages once
their inbox entries are written, so a notification never precedes what the device will
fetch, and it runs apart from the send path: a slow or dead gateway delays nothing but
notifications.

For each message, the receivers are its inbox users minus the sender (a user's own message
notifies none of its devices; neither do the server's group events). Of a receiver's
registered devices (DeviceStore), those not online (PushRouter.online_devices, a presence
hint) are notified. A DeviceNotifyJob (a gateway's: a connected device left a PUSH
unacknowledged for push_ack_wait_s) notifies its one device if it is registered, online or
not; it is paced with the user's other notifications, and the device stays in the request
made at the window's end even though it is online (`_User.forced`).

Pacing, per user: the first notification goes out at once and opens a window of
`interval_s`; messages arriving in the window are coalesced into one request at its end,
carrying the newest of them and the badge (total unread) read then, for the devices
registered and offline then. So a burst costs a user two requests, not one per message.

Bounds: at most `max_in_flight` users' requests at once (a user's devices may need two
requests, with and without previews: they go one after the other); at most `max_pending`
users with a notification waiting (for its window's end or for a request slot): a message
for one more is dropped, logged and counted. A request the gateway fails is retried with
backoff (PushGatewayClient), then dropped, logged and counted.

A queue batch is acknowledged once its notifications are scheduled, not sent: a crash or a
stop loses the coalesced notifications still waiting (at most one window's worth per user),
never blocks the queue behind a gateway outage, and never notifies a message twice unless
the batch itself is redelivered.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from twisted.internet.defer import CancelledError, Deferred, fail
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from improto.enums import ContentType
from improto_server import metrics
from improto_server.deferreds import as_deferred
from improto_server.model import DeviceNotifyJob, NotifyJob, PushTarget
from improto_server.ports import ConversationStore, DeviceStore, NotifyQueue
from improto_server.push_gateway import Delivery, PushGatewayClient, notification_body

_log = Logger()

MAX_BATCH = 256  # queued messages per handler call
LOOKUP_USERS = 1000  # users per DeviceStore.targets / online_devices call
BADGE_BYTES = 10**6  # by_activity's byte budget when only total_unread is read
FOLD_USERS = 256  # users per ConversationStore.fold call (one SQLite transaction)

Devices = dict[str, PushTarget]


class OnlineDevices(Protocol):
    """Who is connected now: PushRouter.online_devices, or presence alone in a process
    without a gateway (--role notifier)."""

    def online_devices(self, user_ids: Sequence[int]) -> Deferred[dict[int, set[str]]]: ...


class NotifierStopped(Exception):
    """A batch handed over after stop(): it stays queued for the next start."""


@dataclass(eq=False)
class _User:
    """A user notified within the current window, or waiting to be."""

    user_id: int
    job: NotifyJob | None = None  # the newest message not notified yet
    devices: Devices | None = None  # its offline targets (None: look them up when sent)
    # devices notified with that job even if online (DeviceNotifyJob); a frozenset, so that
    # the common empty one is shared, not one set per waiting user
    forced: frozenset[str] = frozenset()
    window: IDelayedCall | None = None  # the window's end, while it is open
    queued: bool = False  # waiting for a request slot
    busy: bool = False  # its request is running


class Notifier:
    """Consumes `queue` (`start()`), notifies through `gateway`; `stop()`.

    Counters: `sent` (requests the gateway took), `retried` (attempts after a first one),
    `dropped` (requests given up and notifications not sent for lack of room), `rejected`
    (push keys the gateway reported dead: their registrations are removed). The same go to
    metrics.notification: sent, retry, failed (given up) / dropped (no room), rejected (per
    request reporting dead keys)."""

    def __init__(
        self,
        queue: NotifyQueue,
        devices: DeviceStore,
        router: OnlineDevices,
        conversations: ConversationStore,
        gateway: PushGatewayClient,
        clock: IReactorTime,
        *,
        interval_s: float = 2.0,
        max_in_flight: int = 64,
        max_pending: int = 100_000,
        max_batch: int = MAX_BATCH,
    ) -> None:
        if max_in_flight < 1 or max_pending < 1:
            raise ValueError("max_in_flight and max_pending must be at least 1")
        self._queue = queue
        self._devices = devices
        self._router = router
        self._convs = conversations
        self._gateway = gateway
        self._clock = clock
        self.interval_s = interval_s
        self.max_in_flight = max_in_flight
        self.max_pending = max_pending
        self._max_batch = max_batch
        self._users: dict[int, _User] = {}
        self._ready: deque[_User] = deque()  # due, waiting for a request slot
        self.in_flight = 0
        self.pending = 0  # users with a job not sent yet (their window or a slot)
        self._running: set[Deferred[None]] = set()
        self._stopping = False
        self.handled = 0  # message jobs looked at (notified or not)
        self.sent = 0
        self.retried = 0
        self.dropped = 0
        self.rejected = 0

    def start(self) -> None:
        self._queue.consume(self.handle, self._max_batch)

    @as_deferred
    async def stop(self) -> None:
        """Stop notifying: cancel the requests running and forget the waiting ones (logged);
        batches handed over from now on fail and stay queued. Close the queue first (its
        close waits for the handler call running) so that none comes."""
        self._stopping = True
        waiting = self.pending
        for user in self._users.values():
            if user.window is not None and user.window.active():
                user.window.cancel()
        self._users.clear()
        self._ready.clear()
        self.pending = 0
        for d in list(self._running):
            d.cancel()
        if waiting:
            _log.info("notifier stopped; {n} waiting notifications not sent", n=waiting)
        await self._gateway.close()

    # ------------------------------------------------------------------ the queue

    def handle(self, jobs: Sequence[NotifyJob]) -> Deferred[None]:
        """Schedule the notifications of a batch; fires once they are (then the queue drops
        the batch). A failed lookup fails the batch: the queue hands it over again."""
        if self._stopping:
            return fail(NotifierStopped("the notifier is stopping"))
        return self._handle(jobs)

    @as_deferred
    async def _handle(self, jobs: Sequence[NotifyJob]) -> None:
        messages = [j for j in jobs if j.message.content_type != ContentType.GROUP_EVENT]
        users = sorted({u for j in messages for u in _receivers(j)})
        targets: dict[int, Devices] = {}
        online: dict[int, set[str]] = {}
        for i in range(0, len(users), LOOKUP_USERS):
            targets.update(await self._devices.targets(users[i : i + LOOKUP_USERS]))
        registered = sorted(targets)
        for i in range(0, len(registered), LOOKUP_USERS):
            online.update(await self._router.online_devices(registered[i : i + LOOKUP_USERS]))
        if self._stopping:
            raise NotifierStopped("the notifier is stopping")
        arrivals: list[tuple[int, NotifyJob, Devices, frozenset[str]]] = []
        for job in messages:  # in queue order: the newest message of a user comes last
            if isinstance(job, DeviceNotifyJob):  # that device, registered, online or not
                u, device = job.user_id, job.device_id
                target = (targets.get(u) or {}).get(device)
                if target is not None and u in _receivers(job):
                    arrivals.append((u, job, {device: target}, frozenset((device,))))
                continue
            for u in _receivers(job):
                if devices := _offline(targets.get(u), online.get(u)):
                    arrivals.append((u, job, devices, frozenset()))
        # The badges count these messages: the users' lists are folded here, once per batch
        # (one store call for many users), not per notification.
        notified = sorted({u for u, _, _, _ in arrivals})
        try:
            for i in range(0, len(notified), FOLD_USERS):
                await self._convs.fold(notified[i : i + FOLD_USERS])
        except Exception:
            _log.failure("folding the lists of notified users failed (badges may lag)")
        for u, job, devices, forced in arrivals:
            self._arrive(u, job, devices, forced)
        self.handled += len(jobs)

    # ------------------------------------------------------------------ pacing

    def _arrive(
        self, user_id: int, job: NotifyJob, devices: Devices, forced: frozenset[str]
    ) -> None:
        user = self._users.get(user_id)
        if user is not None and user.job is not None:
            if job.message.msg_id > user.job.message.msg_id:  # coalesced: the newest wins
                user.job = job
            if user.devices is not None:  # it goes without a lookup: to these devices too
                user.devices = {**user.devices, **devices}
            if forced:
                user.forced |= forced
            return
        if self.pending >= self.max_pending:
            self._drop(user_id, job, devices, f"{self.pending} users waiting already", "dropped")
            return
        if user is None:
            user = self._users[user_id] = _User(user_id)
        user.job, user.devices, user.forced = job, devices, forced
        self.pending += 1
        if user.window is None and not user.busy:
            self._enqueue(user)  # the first of a window goes at once
        # else: sent at the window's end, or when the running request finishes

    def _enqueue(self, user: _User) -> None:
        user.queued = True
        self._ready.append(user)
        self._pump()

    def _pump(self) -> None:
        while self.in_flight < self.max_in_flight and self._ready:
            self._begin(self._ready.popleft())

    def _begin(self, user: _User) -> None:
        job, devices, forced = user.job, user.devices, user.forced
        assert job is not None and user.window is None
        user.queued, user.busy = False, True
        user.job = user.devices = None
        user.forced = frozenset()
        self.pending -= 1
        self.in_flight += 1
        user.window = self._clock.callLater(self.interval_s, self._window_ended, user)
        d = self._notify(user.user_id, job, devices, forced)
        self._running.add(d)
        d.addBoth(self._finished, user, d)

    def _window_ended(self, user: _User) -> None:
        user.window = None
        if user.busy:
            return  # _finished goes on
        if user.job is not None:
            user.devices = None  # looked up again: devices came online, or unregistered
            self._enqueue(user)
        else:
            del self._users[user.user_id]

    def _finished(self, result: object, user: _User, d: Deferred[None]) -> None:
        self._running.discard(d)
        if self._stopping:
            return
        if isinstance(result, Failure):
            self.dropped += 1
            metrics.notification("failed")
            _log.failure("notifying user {user} failed", result, user=user.user_id)
        self.in_flight -= 1
        user.busy = False
        if user.window is None:  # the request outlasted the window
            if user.job is not None:
                user.devices = None
                self._enqueue(user)
            else:
                del self._users[user.user_id]
        self._pump()

    # ------------------------------------------------------------------ requests

    @as_deferred
    async def _notify(
        self, user_id: int, job: NotifyJob, devices: Devices | None, forced: frozenset[str]
    ) -> None:
        if devices is None:
            try:
                devices = await self._lookup(user_id, forced)
            except CancelledError:
                raise
            except Exception:
                _log.failure("looking up the devices of user {user} failed", user=user_id)
                self._drop(user_id, job, {}, "device lookup failed", "failed")
                return
            if not devices:
                return  # all online (or unregistered) now
        unread = await self._badge(user_id)
        with_preview = [(d, t) for d, t in sorted(devices.items()) if t.preview]
        without = [(d, t) for d, t in sorted(devices.items()) if not t.preview]
        for group in (with_preview, without):
            if group:
                body = notification_body(user_id, job.message, unread, group)
                delivery = await self._gateway.send(body)
                await self._delivered(user_id, job, dict(group), delivery)

    async def _lookup(self, user_id: int, forced: frozenset[str]) -> Devices:
        """The user's registered devices that are offline, or `forced`."""
        targets = (await self._devices.targets([user_id])).get(user_id)
        if not targets:
            return {}
        online = (await self._router.online_devices([user_id])).get(user_id)
        devices = _offline(targets, online)
        if forced:
            devices = {**devices, **{d: t for d, t in targets.items() if d in forced}}
        return devices

    async def _badge(self, user_id: int) -> int | None:
        """The user's total unread now (its list was folded when the message arrived here);
        None if the store could not say (the notification goes without a badge)."""
        try:
            rows = await self._convs.by_activity(user_id, 0, 1, BADGE_BYTES)
        except CancelledError:
            raise
        except Exception:
            _log.failure("reading the unread count of user {user} failed", user=user_id)
            return None
        return rows.total_unread

    async def _delivered(
        self, user_id: int, job: NotifyJob, devices: Devices, delivery: Delivery
    ) -> None:
        self.retried += delivery.retries
        if delivery.retries:
            metrics.notification("retry", delivery.retries)
        if not delivery.sent:
            self._drop(user_id, job, devices, delivery.reason, "failed")
            return
        self.sent += 1
        metrics.notification("sent")
        dead = set(delivery.rejected)
        if dead & {t.token for t in devices.values()}:
            metrics.notification("rejected")
        for device_id, target in sorted(devices.items()):
            if target.token not in dead:
                continue
            self.rejected += 1
            try:
                # Only if still that token: the device may have registered a new one since.
                await self._devices.remove_target(user_id, device_id, target.token)
            except CancelledError:
                raise
            except Exception:
                _log.failure(
                    "removing the rejected push target of user {user} device {device} failed",
                    user=user_id, device=device_id,
                )  # fmt: skip
            else:
                _log.info(
                    "push gateway rejected the token of user {user} device {device}: removed",
                    user=user_id, device=device_id,
                )  # fmt: skip

    def _drop(
        self, user_id: int, job: NotifyJob, devices: Devices, reason: str, outcome: str
    ) -> None:
        """Count and log a notification not sent: `outcome` "failed" (the gateway or a
        store failed) or "dropped" (no room)."""
        self.dropped += 1
        metrics.notification(outcome)
        _log.warn(
            "notification dropped: user {user} msg {msg_id} devices {devices}: {reason}",
            user=user_id, msg_id=job.message.msg_id, devices=sorted(devices), reason=reason,
        )  # fmt: skip


def _receivers(job: NotifyJob) -> tuple[int, ...]:
    """Who a job may notify: its users but the sender (a user's own message notifies none of
    its devices)."""
    sender = job.message.sender_id
    users = (job.user_id,) if isinstance(job, DeviceNotifyJob) else job.inbox_users
    return tuple(u for u in users if u != sender)


def _offline(targets: Devices | None, online: set[str] | None) -> Devices:
    """The registered devices that are not online."""
    if not targets:
        return {}
    if not online:
        return targets
    return {d: t for d, t in targets.items() if d not in online}
