"""Push-notification checks of bench/chaos.py (`--push`, PROTOCOL.md 19, spec/PUSH_GATEWAY.md):
push-gateway faults during the chaos run, and a verdict on the notifications from the
gateway's view.

Setup. The push gateway is the stand-in of tests/support/push_gateway.py (twisted.web on
127.0.0.1, on a reactor thread of the harness), each server process posting to its own URL
path so that requests tell which notifier sent them. A TOML config (`--config`) sets
push_timeout_s = 1, push_retries = 2, push_interval_s = 1: a notification is given up after 3
attempts, at most ~4.5 s. Every process that runs a notifier serves /metrics (`--api-key`).
Production: both gateways (given a push gateway, a gateway process runs a notifier too) and
one `--role notifier` process, which the injector also kills (`notifier_kills`); the notify
queue has a single active consumer, the other notifiers stand by. Embedded: the one server.

Devices. About 40% of the devices (not the `--sync-state` ones) are push devices: they enable
PUSH (FEATURES) and register (PUSH_REGISTER: apns or fcm, preview on or off) after a login
whenever their token is new. They go to the background for long: at 15-50% of the chat time,
and again 10-30% of it after each return, a push device disconnects and stays away either
until the end (half the time) or for 30-50% of the chat time; the ordinary offline spells
(2-10 s) happen to them too.

Gateway faults (their own thread, one every 1.5-3.5 s; quick and default alike), each kind
once first, then at random:
- outage: every request answered 500, 502, 503 or 429 for 0.5-4 s;
- burst: the next 1-6 requests answered 500 or 503;
- stall: every request left unanswered for 1.5-5 s (longer than push_timeout_s);
- hang: the next 1-3 requests left unanswered;
- dead_token: a push device in background gets its token killed: from then on the gateway
  lists that pushkey in `rejected`; the device's platform gives it a new token, which it
  registers when it comes back (at most a third of the push devices' count of tokens die in
  a quick run, three times that in a default run).

After the chat and the outbox flush the harness waits for the notifications to drain: the
persist and notify queues empty and no request at the gateway for 6 s (at most 60 s).

Verdict (counted; the first three fail the run):
- expected: (device, message) pairs: a message acked to the device's user from another user,
  while the device was registered and in an offline spell (at least OFFLINE_MARGIN_S after it
  disconnected), the spell lasting until the drain or at least OFFLINE_AFTER_S (15 s) after
  the ack (COVER_LONG_S, 30 s, when a kill or a service crash was under way from 1 s before
  the ack to 13 s after it), and, if its token was reported dead, that long before the
  gateway first answered it as rejected.
- notified: the gateway answered 200 to a request for that device (its device_id with a
  pushkey it registered) about that message or a newer one (a request carries the newest
  message of the user's interval) within COVER_S (13 s: a notification may wait for the
  user's failing request, ~5.5 s, then fail as long itself) of the ack, or COVER_LONG_S (30 s)
  when a kill or a service crash was under way from 1 s before the ack to 13 s after it.
  dropped: not notified, but a server logged `notification dropped: user U msg M devices
  [...]` for it (M >= the message, within the same time).
- excused (reported): neither, and a notifier process was killed while it may have held that
  notification (a crash loses them: GUARANTEES 11): from 2 s before the ack to HOLD_S (3 s)
  after it, 11 s more if the gateway failed a request around then, the whole covering time
  if another kill or crash delayed persistence; or
  (production) the device was connected to a gateway killed up to PRESENCE_STALE_S before the
  ack (its presence entry outlives the gateway until another one reaps it: it looks online).
- push_unnotified: the other expected pairs.
- push_after_reject: a request carrying a pushkey more than REJECT_SLACK_S after the gateway
  first answered it as rejected, unless a retry of a body received by then (in flight).
- push_metric_mismatch: improto_notifications_total summed over every process life (scraped
  every 0.5 s) against the gateway and the logs: sent <= requests answered 200, rejected <=
  200 answers listing a dead key, sent + retry <= requests, failed + dropped <= logged drops
  (a killed process may take its last increments unscraped: <=, not =).
"""

from __future__ import annotations

import bisect
import json
import random
import re
import threading
import time
import urllib.request
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import servers  # noqa: F401  (the repository root on sys.path: tests.support)

from improto.conformance.conn import describe
from improto.enums import Feature
from improto.errors import ErrorCode
from improto.frames import Error, PushRegister, PushRegisterOk

if TYPE_CHECKING:
    from chaos import Device, Sim

    from twisted.web.server import Request

PROBLEMS = ("push_unnotified", "push_after_reject", "push_metric_mismatch")
CONFIG = {"push_interval_s": 1.0, "push_timeout_s": 1.0, "push_retries": 2}
# The longest a notifier holds a notification: its interval, 3 attempts, 2 backoffs.
RESIDENCE_S = 1.0 + 3 * 1.0 + 0.5 + 1.0
OFFLINE_MARGIN_S = 2.0  # after a disconnect: the server's presence has caught up
# A user's notification may wait for the user's running request (RESIDENCE_S at most), then
# take as long itself: its outcome is known 2 * RESIDENCE_S after the notifier got it.
OUTCOME_S = 2 * RESIDENCE_S
OFFLINE_AFTER_S = OUTCOME_S + 4.0  # offline this long after the ack: seen offline
# A request (or a logged drop) this long after the ack covers it; longer when a kill or a
# crash was under way from 1 s before the ack to COVER_S after it.
COVER_S = OUTCOME_S + 2.0
COVER_LONG_S = 30.0
HOLD_S = 3.0  # a notifier holds a notification this long at most while the gateway answers
PRESENCE_STALE_S = 15.0  # a killed gateway's presence entries are reaped within ~12 s
REJECT_SLACK_S = 2.0
DRAIN_QUIET_S = RESIDENCE_S + 1.5
DRAIN_MAX_S = 60.0
PUSH_DEVICE_P = 0.4
EXAMPLES = 5
API_KEY = "chaos-push-metrics-key-0123456789"
DROP_LINE = re.compile(
    r"^(\S+) \[improto_server\.notifier#warn\] notification dropped: user (\d+) msg (\d+) "
    r"devices \[(.*?)\]: (.*)$"
)
FAIL_LINE = re.compile(r"^(\S+) \[improto_server\.notifier#\w+\] notifying user (\d+) failed")
METRIC_LINE = re.compile(r'^improto_notifications_total\{outcome="(\w+)"\} (\S+)$', re.M)
INF = float("inf")


# ---------------------------------------------------------------------------- gateway


@dataclass
class Req:
    """One request the gateway got, and how it was answered."""

    at: float  # time.monotonic()
    source: str  # the server process (the URL's last path segment)
    answer: str  # "ok", "http <code>", "hang"
    user: int
    msg_id: int
    devices: tuple[tuple[str, str], ...]  # (device_id, pushkey)
    rejected: tuple[str, ...] = ()  # listed as dead in the 200 answer


def _gateway_class() -> type:
    """The stand-in with time-based faults and a record per request (imported late: it
    imports the reactor)."""
    from twisted.web.server import NOT_DONE_YET

    from tests.support.push_gateway import PushGatewayStandIn, Received

    class ChaosGateway(PushGatewayStandIn):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.log: list[Req] = []
            self.outage_until = 0.0
            self.outage_code = 503
            self.stall_until = 0.0

        def calm(self) -> None:
            """No fault from now on (dead tokens stay dead)."""
            self.outage_until = self.stall_until = 0.0
            self._fail.clear()
            self._hang = 0

        def _answer(self, request: Request) -> bytes | int:
            assert request.content is not None
            raw = request.content.read()
            try:
                body: Any = json.loads(raw)
                n = body["notification"]
                user, msg_id = int(n["user_id"]), int(n["msg_id"])
                devices = tuple((str(d["device_id"]), str(d["pushkey"])) for d in n["devices"])
            except (ValueError, KeyError, TypeError):
                body, user, msg_id, devices = None, 0, 0, ()
            now = time.monotonic()
            source = request.path.decode(errors="replace").rsplit("/", 1)[-1]
            code = 200
            if now < self.stall_until or (self._hang and not self._fail):
                if now >= self.stall_until:
                    self._hang -= 1
                self.requests.append(Received(body, now, "hang"))
                self.log.append(Req(now, source, "hang", user, msg_id, devices))
                self._hanging.append(request)
                return NOT_DONE_YET
            if now < self.outage_until:
                code = self.outage_code
            elif self._fail:
                code = self._fail.pop(0)
            if code != 200:
                self.requests.append(Received(body, now, f"http {code}"))
                self.log.append(Req(now, source, f"http {code}", user, msg_id, devices))
                request.setResponseCode(code)
                request.setHeader(b"content-type", b"application/json")
                return b'{"error": "on purpose"}'
            dead = tuple(k for _, k in devices if k in self.rejected)
            self.requests.append(Received(body, now, "ok"))
            self.log.append(Req(now, source, "ok", user, msg_id, devices, dead))
            request.setHeader(b"content-type", b"application/json")
            return json.dumps({"rejected": list(dead)}).encode()

    return ChaosGateway


class GatewayThread:
    """The stand-in on a reactor running in a daemon thread of the harness."""

    def __init__(self) -> None:
        from twisted.internet import reactor

        self.reactor: Any = reactor
        self.thread = threading.Thread(
            target=reactor.run, kwargs={"installSignalHandlers": False}, daemon=True,
            name="push-gateway",
        )  # fmt: skip
        self.gw: Any = None
        self.error: str | None = None

    def start(self) -> str:
        from twisted.internet.defer import Deferred
        from twisted.internet.threads import blockingCallFromThread

        self.thread.start()
        cls = _gateway_class()
        self.gw = blockingCallFromThread(self.reactor, lambda: Deferred.fromCoroutine(cls.start()))
        url: str = self.gw.url
        return url

    def call(self, f: Any, *args: Any) -> None:
        self.reactor.callFromThread(f, *args)

    def requests(self) -> list[Req]:
        return list(self.gw.log)

    def stop(self) -> None:
        from twisted.internet.defer import Deferred
        from twisted.internet.threads import blockingCallFromThread

        if not self.thread.is_alive():
            return
        if self.gw is not None:
            try:
                blockingCallFromThread(self.reactor, lambda: Deferred.fromCoroutine(self.gw.stop()))
            except Exception as e:  # the harness is ending anyway
                self.error = repr(e)
        self.reactor.callFromThread(self.reactor.stop)
        self.thread.join(5)


# ---------------------------------------------------------------------------- devices


@dataclass
class PushDevice:
    """The push state of one app installation (kept by the harness across connections)."""

    device_id: str
    platform: str
    preview: bool
    rng: random.Random
    gen: int = 0
    registered: str | None = None  # the token of the last PUSH_REGISTER_OK
    tokens: set[str] = field(default_factory=set)  # every token it registered
    dead_at: dict[str, float] = field(default_factory=dict)  # token -> marked dead
    spells: list[list[Any]] = field(default_factory=list)  # [start, end, registered token]
    conns: list[list[Any]] = field(default_factory=list)  # [gateway port, start, end]
    background_at: float | None = None
    background_s: float = 0.0
    in_background: bool = False

    @property
    def token(self) -> str:
        return f"{self.platform}-{self.device_id}-{self.gen}"

    @property
    def away(self) -> bool:
        return bool(self.spells) and self.spells[-1][1] == INF


def new_device(d: Device, seed: int) -> PushDevice | None:
    if not d.sim.plan.push or d.state.ext:
        return None
    rng = random.Random(seed ^ 0x5EED_0F_9005)  # its own stream: the plan's other draws stay
    if rng.random() >= PUSH_DEVICE_P:
        return None
    return PushDevice(d.device_id, rng.choice(["apns", "fcm"]), rng.random() < 0.5, rng)


def background(d: Device, now: float) -> bool:
    """The app goes to the background for long: True when it just did. The first spell
    begins at 15-50% of the chat time, the next ones 10-30% of it after the device came
    back; each lasts until the end (half of them) or 30-50% of the chat time."""
    p = d.push
    if p is None:
        return False
    secs = d.sim.plan.seconds
    if p.in_background and now >= d.offline_until:
        p.in_background = False
        p.background_at = None
    if p.background_at is None:
        first = not p.spells
        p.background_at = now + secs * (p.rng.uniform(0.15, 0.5) if first else
                                        p.rng.uniform(0.1, 0.3))  # fmt: skip
        p.background_s = INF if p.rng.random() < 0.5 else secs * p.rng.uniform(0.3, 0.5)
    if p.in_background or now < p.background_at or d.conn is None or d.bursts_due:
        return False
    p.in_background = True
    d.stats["push_background_spells"] += 1
    d.disconnect()
    went_offline(d)
    d.offline_until = now + p.background_s
    return True


def went_offline(d: Device) -> None:
    """An offline spell begins (the user closed the app)."""
    p = d.push
    if p is not None:
        p.spells.append([time.monotonic(), INF, p.registered])


def on_connect(d: Device, port: int) -> None:
    p = d.push
    if p is None:
        return
    now = time.monotonic()
    if p.away:
        p.spells[-1][1] = now
    p.conns.append([port, now, INF])


def on_disconnect(d: Device) -> None:
    p = d.push
    if p is not None and p.conns and p.conns[-1][2] == INF:
        p.conns[-1][2] = time.monotonic()


def features(d: Device) -> tuple[int, ...]:
    """PUSH on the connections where the device registers a new token (chaos.py sends one
    FEATURES with the other features)."""
    p = d.push
    return () if p is None or p.registered == p.token else (Feature.PUSH,)


def on_login(d: Device) -> None:
    """After HELLO_OK and FEATURES: register the token if it is new."""
    p = d.push
    if p is None or p.registered == p.token:
        return
    token = p.token
    if Feature.PUSH not in d.enabled:
        d.sim.harness_errors.append(f"{d.device_id}: FEATURES_OK without PUSH: {d.enabled}")
        return
    options = PushRegister.PREVIEW if p.preview else 0
    reply = d._conn().request(PushRegister(p.platform, token, options), 10.0)
    if isinstance(reply, PushRegisterOk):
        p.registered = token
        p.tokens.add(token)
        d.stats["push_registrations"] += 1
    elif isinstance(reply, Error) and reply.code in (ErrorCode.RATE_LIMITED,
                                                     ErrorCode.UNAVAILABLE):  # fmt: skip
        d.stats[f"push_register_error_{reply.code}"] += 1  # again at the next login
    else:
        d.sim.problem("anomalies", f"{d.device_id}: PUSH_REGISTER answered by {describe(reply)}")


# ---------------------------------------------------------------------------- faults


class GatewayFaults(threading.Thread):
    """Faults of the push gateway, one at a time, until stopped."""

    KINDS = ("outage", "burst", "stall", "hang", "dead_token")
    WEIGHTS = (2, 2, 2, 1, 1)

    def __init__(self, run: PushRun, rng: random.Random) -> None:
        super().__init__(name="push-faults", daemon=True)
        self.run_ = run
        self.rng = rng
        self.stopped = threading.Event()
        self.faults: Counter[str] = Counter(
            dict.fromkeys(("push_gateway_outages", "push_gateway_5xx_bursts",
                           "push_gateway_stalls", "push_gateway_hangs", "push_tokens_dead"), 0)
        )  # fmt: skip

    def run(self) -> None:
        plan = list(self.KINDS)
        self.rng.shuffle(plan)
        while not self.stopped.wait(self.rng.uniform(1.5, 3.5)):
            kind = plan.pop(0) if plan else self.rng.choices(self.KINDS, self.WEIGHTS)[0]
            try:
                self.inject(kind)
            except Exception as e:
                self.run_.sim.harness_errors.append(f"push fault {kind}: {e!r}")
                return

    def inject(self, kind: str) -> None:
        g, rng, log = self.run_.gateway, self.rng, self.run_.log
        gw = g.gw
        if kind == "outage":
            secs, code = rng.uniform(0.5, 4.0), rng.choice([500, 502, 503, 429])
            until = time.monotonic() + secs

            def outage() -> None:
                gw.outage_code, gw.outage_until = code, until

            g.call(outage)
            self.faults["push_gateway_outages"] += 1
            log(f"push gateway: every request answered {code} for {secs:.1f} s")
        elif kind == "burst":
            n, code = rng.randint(1, 6), rng.choice([500, 503])
            g.call(gw.fail, n, code)
            self.faults["push_gateway_5xx_bursts"] += 1
            log(f"push gateway: the next {n} requests answered {code}")
        elif kind == "stall":
            secs = rng.uniform(1.5, 5.0)
            until = time.monotonic() + secs

            def stall() -> None:
                gw.stall_until = until

            g.call(stall)
            self.faults["push_gateway_stalls"] += 1
            log(f"push gateway: no answer to any request for {secs:.1f} s")
        elif kind == "hang":
            n = rng.randint(1, 3)
            g.call(gw.hang, n)
            self.faults["push_gateway_hangs"] += 1
            log(f"push gateway: the next {n} requests never answered")
        else:
            self.dead_token()

    def dead_token(self) -> None:
        sim = self.run_.sim
        now = time.monotonic()
        pushers = [d for d in sim.devices if d.push is not None]
        dead = sum(len(d.push.dead_at) for d in pushers if d.push is not None)
        if dead >= max(1, len(pushers) // 3) * (1 if sim.plan.quick else 3):
            return
        away = [
            d for d in pushers
            if d.push is not None and d.push.away and d.offline_until > now + 3.0
            and d.push.registered == d.push.token and d.push.token not in d.push.dead_at
        ]  # fmt: skip
        if not away:
            return
        d = self.rng.choice(away)
        p = d.push
        assert p is not None
        token = p.token
        p.dead_at[token] = now
        p.gen += 1  # the platform hands out a new token: registered at the next login
        self.run_.gateway.call(self.run_.gateway.gw.reject, token)
        self.faults["push_tokens_dead"] += 1
        self.run_.log(f"push gateway: {d.device_id}'s token {token} is dead from now on")

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.run_.gateway.call(self.run_.gateway.gw.calm)


class Scraper(threading.Thread):
    """improto_notifications_total of every notifying process, every 0.5 s; a restarted
    process starts from 0, so the total is the sum of each life's last values."""

    def __init__(self, sim: Sim) -> None:
        super().__init__(name="push-metrics", daemon=True)
        self.sim = sim
        self.stopped = threading.Event()
        self.last: dict[tuple[str, int], dict[str, float]] = {}
        self.failures = 0

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            self.scrape()

    def scrape(self) -> None:
        for p in self.sim.cluster.notifying:
            if p.api_port is None or not p.alive:
                continue
            life = (p.name, p.starts)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{p.api_port}/metrics",
                                            timeout=2.0) as r:  # fmt: skip
                    text = r.read().decode()
            except OSError:
                self.failures += 1
                continue
            self.last[life] = {k: float(v) for k, v in METRIC_LINE.findall(text)}

    def totals(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        for values in self.last.values():
            for k, v in values.items():
                out[k] += int(v)
        return dict(out)

    def stop(self) -> None:
        self.stopped.set()
        self.join()
        self.scrape()


# ---------------------------------------------------------------------------- the run


class Newest:
    """The newest msg_id among (time, msg_id) events up to a time."""

    def __init__(self, events: list[tuple[float, int]]) -> None:
        events.sort()
        self.times = [at for at, _ in events]
        self.best: list[int] = []
        top = 0
        for _, msg_id in events:
            top = max(top, msg_id)
            self.best.append(top)

    def newest(self, until: float) -> int:
        i = bisect.bisect_right(self.times, until)
        return self.best[i - 1] if i else 0


class PushRun:
    """What `--push` adds to a chaos run: the gateway, its faults, metrics and the verdict."""

    def __init__(self, sim: Sim, workdir: Path, log: Any) -> None:
        self.sim = sim
        self.log = log
        self.workdir = workdir
        self.gateway = GatewayThread()
        self.faults: GatewayFaults | None = None
        self.scraper = Scraper(sim)
        self.wall_offset = time.time() - time.monotonic()
        self.t0 = time.monotonic()  # for the examples' times
        self.drain_end: float | None = None

    def start(self) -> None:
        """Before the cluster starts: the gateway up, the servers' flags set."""
        url = self.gateway.start()
        c = self.sim.cluster
        c.settings.update(CONFIG)  # the run's --config file
        c.push_url = url.rstrip("/")
        c.api_key = API_KEY
        c.notifiers_n = 0 if c.embedded else 1
        self.log(f"push gateway stand-in at {url}; {json.dumps(CONFIG)}")

    def start_faults(self) -> None:
        self.scraper.start()
        self.faults = GatewayFaults(self, random.Random(self.sim.plan.seed + 2))
        self.faults.start()

    def stop_faults(self) -> None:
        if self.faults is not None and self.faults.is_alive():
            self.faults.stop()

    def stop(self) -> None:
        self.stop_faults()
        if self.scraper.is_alive():
            self.scraper.stopped.set()
        self.gateway.stop()

    def drain(self) -> dict[str, Any]:
        """Wait until persistence and notifications are done: queues empty, gateway quiet."""
        c = self.sim.cluster
        start = time.monotonic()
        deadline = start + DRAIN_MAX_S
        while True:
            now = time.monotonic()
            reqs = self.gateway.gw.log
            last = max(reqs[-1].at if reqs else 0.0, start)
            try:
                backlog, notify = c.backlog(), c.notify_backlog()
            except Exception as e:  # a service still coming back: wait
                backlog = notify = -1
                self.log(f"drain: {e!r}")
            if backlog == 0 and notify == 0 and now - last >= DRAIN_QUIET_S:
                break
            if now > deadline:
                self.sim.harness_errors.append("notifications did not drain in time")
                break
            time.sleep(0.5)
        self.drain_end = time.monotonic()
        secs = round(self.drain_end - start, 1)
        self.log(f"notifications drained in {secs} s")
        return {"seconds": secs}

    # --- verdict

    def drops(
        self,
    ) -> tuple[list[tuple[float, int, int, tuple[str, ...]]], list[tuple[float, int]]]:
        """Logged drops (time, user, msg_id, devices) and failed requests (time, user)."""
        drops, fails = [], []
        for p in self.sim.cluster.notifying:
            try:
                lines = p.log.read_text(errors="replace").splitlines()
            except OSError:
                continue
            for line in lines:
                if m := DROP_LINE.match(line):
                    at = self._mono(m.group(1))
                    devices = tuple(re.findall(r"'([^']*)'", m.group(4)))
                    drops.append((at, int(m.group(2)), int(m.group(3)), devices))
                elif m := FAIL_LINE.match(line):
                    fails.append((self._mono(m.group(1)), int(m.group(2))))
        return drops, fails

    def _mono(self, stamp: str) -> float:
        try:
            return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S%z").timestamp() - self.wall_offset
        except ValueError:
            return 0.0

    def verify(self) -> dict[str, Any]:
        sim = self.sim
        self.scraper.stop()
        end = self.drain_end if self.drain_end is not None else time.monotonic()
        reqs = self.gateway.requests()
        drops, fails = self.drops()
        counts: Counter[str] = Counter()
        examples: dict[str, list[str]] = defaultdict(list)

        def problem(kind: str, example: str) -> None:
            sim.problem(kind, example)
            counts[kind] += 1

        # When each dead pushkey was first answered as rejected.
        rejected_at: dict[str, float] = {}
        for r in reqs:
            for k in r.rejected:
                rejected_at.setdefault(k, r.at)
        # Requests and drops per (user, device).
        ok_by: dict[tuple[int, str], list[tuple[float, int, str]]] = defaultdict(list)
        any_by: dict[tuple[int, str], list[Req]] = defaultdict(list)
        for r in reqs:
            for dev, key in r.devices:
                any_by[(r.user, dev)].append(r)
                if r.answer == "ok":
                    ok_by[(r.user, dev)].append((r.at, r.msg_id, key))
        drops_by: dict[tuple[int, str], list[tuple[float, int]]] = defaultdict(list)
        drops_user: dict[int, list[tuple[float, int]]] = defaultdict(list)
        for at, user, msg_id, devices in drops:
            if devices:
                for dev in devices:
                    drops_by[(user, dev)].append((at, msg_id))
            else:
                drops_user[user].append((at, msg_id))
        fails_by: dict[int, list[float]] = defaultdict(list)
        for at, user in fails:
            fails_by[user].append(at)
        outages = sim.injector.outages if sim.injector else []
        notifying = {p.name for p in sim.cluster.notifying}
        # A notifier kill loses only what the active consumer held: a process that sent
        # nothing in the 10 s before its kill was standing by.
        notifier_kills = [
            start for _, name, _, start, _ in outages
            if name in notifying
            and any(r.source == name and start - 10.0 <= r.at <= start for r in reqs)
        ]  # fmt: skip
        gateway_kills = [
            (port, start) for kind, _, port, start, _ in outages
            if kind == "gateway_kill" and port is not None
        ]  # fmt: skip
        delaying = [(start, stop) for _, _, _, start, stop in outages]
        # what delays persistence (embedded: the server's kill, a notifier kill too)
        persist_delays = [
            (start, stop) for kind, _, _, start, stop in outages
            if kind.endswith("_crash") or kind == "persister_kill"
        ]  # fmt: skip
        failed_at = [r.at for r in reqs if r.answer != "ok"]
        messages = sorted(
            (s for s in sim.ledger.by_id.values() if s.msg_id is not None),
            key=lambda s: s.msg_id or 0,
        )
        by_user: dict[int, list[Any]] = defaultdict(list)
        for s in messages:
            if sim.large.sent_of_group(s):
                continue  # 20.1: not notified while large (chaos_large)
            for u in s.receivers:
                if u != s.sender:
                    by_user[u].append(s)

        pushers = [d for d in sim.devices if d.push is not None]
        for d in pushers:
            p = d.push
            assert p is not None
            key = (d.user, d.device_id)
            notified = Newest([(at, m) for at, m, k in ok_by[key] if k in p.tokens])
            for start, stop, token in p.spells:
                if token is None:
                    continue
                to_end = stop == INF or (self.drain_end is not None and stop >= self.drain_end)
                stop = min(stop, end)
                for s in by_user[d.user]:
                    t = s.acked_at
                    if t is None or not start + OFFLINE_MARGIN_S <= t < stop:
                        continue
                    # a kill or a crash near the ack may delay persistence or the notifier
                    faulty = any(a < t + COVER_S and b > t - 1.0 for a, b in delaying)
                    cover = COVER_LONG_S if faulty else COVER_S
                    after = COVER_LONG_S if faulty else OFFLINE_AFTER_S
                    strict = to_end or t + after <= stop
                    dead = rejected_at.get(token)
                    if dead is not None and t + after > dead:
                        strict = False
                    msg_id = s.msg_id
                    hit = notified.newest(t + cover) >= msg_id
                    if not strict:
                        counts["loose"] += 1
                        counts["loose_notified"] += hit
                        continue
                    counts["expected"] += 1
                    if hit:
                        counts["notified"] += 1
                        continue
                    dropped = any(m >= msg_id and at <= t + cover + 1.5
                                  for at, m in drops_by[key] + drops_user[d.user])  # fmt: skip
                    dropped = dropped or any(t - 1.5 <= at <= t + cover + 1.5
                                             for at in fails_by[d.user])  # fmt: skip
                    if dropped:
                        counts["dropped"] += 1
                        continue
                    where = (f"{d.device_id} msg {msg_id} acked at {t - self.t0:.1f} s "
                             f"(spell {start - self.t0:.1f}-{stop - self.t0:.1f})")  # fmt: skip
                    # What a notifier killed then may have held: a user's notification waits for
                    # its interval, for longer while its gateway requests fail.
                    hold = HOLD_S
                    if any(t - RESIDENCE_S <= a <= t + OUTCOME_S + HOLD_S for a in failed_at):
                        hold += OUTCOME_S
                    if any(a < t + COVER_S and b > t - 1.0 for a, b in persist_delays):
                        hold = cover  # persistence delayed by another fault
                    if any(t - 2.0 <= k <= t + hold for k in notifier_kills):
                        counts["excused_notifier_crash"] += 1
                        if len(examples["excused"]) < EXAMPLES:
                            examples["excused"].append(f"{where}: notifier killed")
                        continue
                    stale = any(
                        cport == port and cstart <= k <= cstop and k <= t <= k + PRESENCE_STALE_S
                        for port, k in gateway_kills for cport, cstart, cstop in p.conns
                    )  # fmt: skip
                    if stale:
                        counts["excused_presence"] += 1
                        continue
                    seen = [r.answer for r in any_by[key] if r.msg_id >= msg_id
                            and r.at <= t + cover]  # fmt: skip
                    problem("push_unnotified", f"{where}: requests {Counter(seen)}")

        # (c) rejected tokens are unregistered: nothing carries them after the answer.
        tokens_dead = {k: at for d in pushers if d.push for k, at in d.push.dead_at.items()}
        for token, at in rejected_at.items():
            known = {(r.user, r.msg_id, r.devices) for r in reqs if r.at <= at}
            later = [r for r in reqs if r.at > at + REJECT_SLACK_S
                     and token in {k for _, k in r.devices}]  # fmt: skip
            for r in later:
                if (r.user, r.msg_id, r.devices) in known:
                    counts["rejected_retries_in_flight"] += 1
                    continue
                problem("push_after_reject", f"{token}: request at +{r.at - at:.1f} s "
                                             f"(msg {r.msg_id}, from {r.source})")  # fmt: skip

        # Metrics against the gateway and the logs.
        metrics = self.scraper.totals()
        answers = Counter(r.answer.split()[0] for r in reqs)
        ok, total = answers["ok"], len(reqs)
        listing = sum(1 for r in reqs if r.rejected)
        m = Counter(metrics)
        for what, lhs, rhs in (
            ("sent <= requests answered 200", m["sent"], ok),
            ("rejected <= 200 answers listing a dead key", m["rejected"], listing),
            ("sent + retry <= requests", m["sent"] + m["retry"], total),
            ("failed + dropped <= logged drops", m["failed"] + m["dropped"],
             len(drops) + len(fails)),
        ):  # fmt: skip
            if lhs > rhs:
                problem("push_metric_mismatch", f"{what}: {lhs} > {rhs}")
        for k in PROBLEMS:
            counts[k] += 0
        summary = {
            "devices": len(pushers),
            "registrations": sum(d.stats["push_registrations"] for d in pushers),
            "background_spells": sum(d.stats["push_background_spells"] for d in pushers),
            "expected": counts["expected"],
            "notified": counts["notified"],
            "dropped_logged": counts["dropped"],
            "excused_notifier_crash": counts["excused_notifier_crash"],
            "excused_presence": counts["excused_presence"],
            "loose": counts["loose"],
            "loose_notified": counts["loose_notified"],
            "gateway_requests": total,
            "gateway_answers": {"ok": ok, "5xx_429": answers["http"], "hang": answers["hang"]},
            "by_notifier": dict(Counter(r.source for r in reqs)),
            "metrics": {
                k: metrics.get(k, 0) for k in ("sent", "retry", "failed", "dropped", "rejected")
            },
            "logged_drops": len(drops),
            "logged_failures": len(fails),
            "tokens_dead": len(tokens_dead),
            "tokens_rejected": len(rejected_at),
            "rejected_retries_in_flight": counts["rejected_retries_in_flight"],
            "scrape_failures": self.scraper.failures,
        }
        if examples:
            summary["examples"] = dict(examples)
        return {"counts": {k: counts[k] for k in PROBLEMS}, "summary": summary}
