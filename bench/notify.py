"""Push notifications and the server API (issue 15, spec 19, spec/PUSH_GATEWAY.md, openapi).

    python bench/notify.py [--quick] [--storage embedded,production] [--devices N]
                           [--messages N] [--api N] [--rate R] [--rounds K]

Two imservers run as child processes on 127.0.0.1: `notify`, with `--push-gateway` pointing at
a push gateway stand-in (tests/support/push_gateway.py, a twisted.web server in this process)
and `plain`, without one. Both have the server API on (`--api-key`), which the bench also
reads /metrics from. Clients are a small Twisted protocol in this process (frames encoded by
improto.codec), the API client is treq; all in this process's reactor, on one monotonic clock.

1. `latency`: max(N, devices) users each connect once, register a push target (FEATURES PUSH,
   PUSH_REGISTER) and disconnect. Then 10 senders send one 1:1 message to each of the first
   `devices` users, `paced` at --rate messages/s, and (after the users' push intervals ran
   out) all at once (`burst`, 500 unacknowledged per sender). Latency = the stand-in's
   receipt time of the notification carrying a msg_id minus the SEND_ACK time of that
   msg_id. push_interval_s is the default; each user gets one message per phase, so nothing
   is coalesced.
2. `throughput`: 4 senders pipeline --messages 1:1 messages (500 unacknowledged each), one
   to each of that many offline users: registered ones on `notify` (one notification each),
   never-connected ones on `plain`. Rounds alternate notify, plain (--rounds of each, every
   round after the users' push intervals ran out). Rates: SEND_ACKs/s (first SEND to last
   SEND_ACK), persisted/s (first SEND until the persister's job count on /metrics,
   `improto_persist_batch_size_sum`, polled every 50 ms, grew by N) and, on `notify`,
   notifications/s (first SEND to the last notification's receipt); server CPU us/message.
   The ratios notify / plain use the best round of each.
3. `api`: --api POST /v1/messages requests on `plain` (treq, a pool of 64 persistent
   connections, 64 in flight), each to a different offline user; then the same number of
   SENDs over one protocol connection with 64 unacknowledged. Requests/s and p50/p99 latency
   (request to response / SEND to SEND_ACK).

Figures go to stderr, a final JSON line to stdout; exit 1 when a notification or a
persisted message is missing, or a request failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import secrets
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import servers
import treq
from abuse_wire import split_frames

from twisted.internet import reactor, task
from twisted.internet.defer import Deferred, DeferredList, DeferredSemaphore, ensureDeferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool

from improto.codec import decode_payload, encode
from improto.enums import ConvKind, Feature
from improto.frames import (
    Features,
    FeaturesOk,
    Hello,
    HelloOk,
    Push,
    PushAck,
    PushRegister,
    PushRegisterOk,
    Send,
    SendAck,
)
from tests.support.push_gateway import PushGatewayStandIn

WINDOW = 500  # unacknowledged SENDs per pipelining sender
API_IN_FLIGHT = 64
REGISTER_IN_FLIGHT = 32
LATENCY_SENDERS = 10
THROUGHPUT_SENDERS = 4
PUSH_INTERVAL_S = 2.0  # the server's default push_interval_s (config.py)
CALL_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 120.0
BODY = "x" * 100


def log(msg: str) -> None:
    print(f"[notify] {msg}", file=sys.stderr, flush=True)


def _user() -> int:
    return random.randrange(1 << 32, 1 << 48)


def percentiles(samples_s: Sequence[float]) -> dict[str, Any]:
    """p50/p99/max in ms (nearest rank) of samples in seconds."""
    if not samples_s:
        return {"n": 0}
    s = sorted(samples_s)

    def rank(q: float) -> float:
        return round(s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] * 1e3, 2)

    return {"n": len(s), "p50_ms": rank(0.50), "p99_ms": rank(0.99), "max_ms": rank(1.0),
            "mean_ms": round(statistics.fmean(s) * 1e3, 2)}  # fmt: skip


def sleep(seconds: float) -> Deferred[None]:
    return task.deferLater(reactor, seconds, lambda: None)


async def until(cond: Callable[[], bool], timeout: float, what: str, step: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not within {timeout:.0f}s")
        await sleep(step)


class Conn(Protocol):
    """One improto connection: requests answered by request_id, PUSHes acknowledged, the
    monotonic time of each SEND_ACK kept by msg_id."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.rid = 0
        self.waiting: dict[int, Deferred[Any]] = {}
        self.acked_at: dict[int, float] = {}  # msg_id -> time.monotonic() of its SEND_ACK
        self.closed: Deferred[None] = Deferred()

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)  # type: ignore[attr-defined]

    def dataReceived(self, data: bytes) -> None:
        self.buf += data
        for p in split_frames(self.buf):
            f = decode_payload(p)
            if isinstance(f, SendAck):
                self.acked_at[f.msg_id] = time.monotonic()
            elif isinstance(f, Push):
                self.write(PushAck(f.message.msg_id))
                continue
            d = self.waiting.pop(f.request_id, None)
            if d is not None:
                d.callback(f)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        waiting, self.waiting = self.waiting, {}
        for d in waiting.values():
            d.errback(ConnectionError("connection lost"))
        self.closed.callback(None)

    def write(self, frame: Any) -> int:
        self.rid += 1
        self.transport.write(encode(dataclasses.replace(frame, request_id=self.rid)))  # type: ignore[attr-defined]
        return self.rid

    def call(self, frame: Any) -> Deferred[Any]:
        rid = self.write(frame)
        d: Deferred[Any] = Deferred()
        self.waiting[rid] = d
        return d

    async def ask(self, frame: Any, expect: type) -> Any:
        got = await self.call(frame).addTimeout(CALL_TIMEOUT_S, reactor)
        if not isinstance(got, expect):
            raise RuntimeError(f"{type(frame).__name__} answered by {got!r}")
        return got

    async def close(self) -> None:
        self.transport.loseConnection()  # type: ignore[attr-defined]
        await self.closed


async def login(h: servers.ServerHandle, user: int, device: str,
                features: tuple[int, ...] = ()) -> Conn:  # fmt: skip
    assert h.secret is not None
    conn = Conn()
    await connectProtocol(TCP4ClientEndpoint(reactor, h.host, h.port), conn)
    ok = await conn.ask(Hello(1, 0, device, servers.mint_token(h.secret, user, device)), HelloOk)
    assert ok.user_id == user
    if features:
        got = await conn.ask(Features(features), FeaturesOk)
        if not set(features) <= set(got.features):
            raise RuntimeError(f"FEATURES {features} -> FEATURES_OK {got.features}")
    return conn


async def bounded(n: int, jobs: Sequence[Callable[[], Deferred[Any]]]) -> list[Any]:
    """Run jobs with at most n at once; their results in order (first failure raised)."""
    sem = DeferredSemaphore(n)
    results = await DeferredList([sem.run(j) for j in jobs], fireOnOneErrback=True,
                                 consumeErrors=True)  # fmt: skip
    return [r for _, r in results]


async def register_devices(h: servers.ServerHandle, users: Sequence[int]) -> float:
    """Each user: connect, PUSH_REGISTER one device (preview on), disconnect. Seconds taken."""

    async def one(user: int) -> None:
        conn = await login(h, user, "phone", (Feature.PUSH,))
        await conn.ask(PushRegister("apns", f"tok-{user}", PushRegister.PREVIEW), PushRegisterOk)
        await conn.close()

    t = time.monotonic()
    await bounded(REGISTER_IN_FLIGHT, [lambda u=u: ensureDeferred(one(u)) for u in users])
    return time.monotonic() - t


async def pipeline(conn: Conn, frames: Sequence[Send], window: int) -> list[SendAck]:
    """SENDs with up to `window` unacknowledged; the acks in order."""

    async def one(f: Send) -> SendAck:
        ack: SendAck = await conn.ask(f, SendAck)
        return ack

    return await bounded(window, [lambda f=f: ensureDeferred(one(f)) for f in frames])


def sends(receivers: Sequence[int]) -> list[Send]:
    return [Send(uuid.uuid4().bytes, ConvKind.USER, r, 1, BODY.encode()) for r in receivers]


def split(items: Sequence[int], parts: int) -> list[list[int]]:
    return [list(items[i::parts]) for i in range(parts)]


class Metrics:
    """The server's /metrics, over its API port."""

    def __init__(self, api_port: int) -> None:
        self.url = f"http://127.0.0.1:{api_port}/metrics"

    async def read(self) -> dict[str, float]:
        r = await treq.get(self.url, persistent=False)
        text = (await r.content()).decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out

    async def persisted(self) -> float:
        return (await self.read()).get("improto_persist_batch_size_sum", 0.0)


class Setup:
    """The two servers and the gateway stand-in."""

    def __init__(self, storage: str, gateway: PushGatewayStandIn, gw_port: int) -> None:
        self.api_key = secrets.token_hex(16)
        self.api = {"notify": servers.free_port(), "plain": servers.free_port()}
        api_flags = ["--api-key", self.api_key, "--api-listen"]
        url = f"http://127.0.0.1:{gw_port}/_improto/push/v1/notify"
        assert url == gateway.url
        self.gateway = gateway
        self.servers: dict[str, servers.ServerHandle] = {}
        for name, extra in (("notify", ["--push-gateway", url]), ("plain", [])):
            flags = [*extra, *api_flags, f"tcp:{self.api[name]}:interface=127.0.0.1"]
            self.servers[name] = servers.start_improto(storage, extra=flags)
        self.metrics = {name: Metrics(port) for name, port in self.api.items()}

    def stop(self) -> None:
        for h in self.servers.values():
            h.stop()


def notified(gateway: PushGatewayStandIn, start: int) -> dict[int, float]:
    """msg_id -> receipt time of the notifications the stand-in answered since request `start`."""
    out: dict[int, float] = {}
    for r in gateway.requests[start:]:
        if r.answer == "ok":
            out.setdefault(int(r.body["notification"]["msg_id"]), r.at)
    return out


async def wait_notified(gw: PushGatewayStandIn, start: int, n: int, what: str) -> dict[int, float]:
    """Until n notifications came since request `start` (or the time ran out): notified()."""
    try:
        await until(lambda: len(notified(gw, start)) >= n, DRAIN_TIMEOUT_S,
                    f"{what}: notifications", step=0.02)  # fmt: skip
    except TimeoutError as e:
        log(str(e))
    return notified(gw, start)


async def latency_phase(s: Setup, users: Sequence[int], rate: float) -> dict[str, Any]:
    h, gw = s.servers["notify"], s.gateway
    conns = [await login(h, _user(), f"sender-{i}") for i in range(LATENCY_SENDERS)]
    out: dict[str, Any] = {"devices": len(users)}
    try:
        for pattern in ("paced", "burst"):
            start = len(gw.requests)
            groups = split(users, LATENCY_SENDERS)
            t0 = time.monotonic()
            if pattern == "paced":
                pending: list[Deferred[Any]] = []
                for k, user in enumerate(users):
                    delay = t0 + k / rate - time.monotonic()
                    if delay > 0:
                        await sleep(delay)
                    conn = conns[k % LATENCY_SENDERS]
                    pending.append(ensureDeferred(conn.ask(sends([user])[0], SendAck)))
                acks = await DeferredList(pending, fireOnOneErrback=True, consumeErrors=True)
                msg_ids = [a.msg_id for _, a in acks]
            else:
                runs = [
                    ensureDeferred(pipeline(c, sends(g), WINDOW))
                    for c, g in zip(conns, groups, strict=True)
                ]
                acked = await DeferredList(runs, fireOnOneErrback=True, consumeErrors=True)
                msg_ids = [a.msg_id for _, per in acked for a in per]
            send_s = time.monotonic() - t0
            ack_at = {m: c.acked_at[m] for c in conns for m in msg_ids if m in c.acked_at}
            got = await wait_notified(gw, start, len(msg_ids), pattern)
            lat = [got[m] - ack_at[m] for m in msg_ids if m in got]
            res = {"messages": len(msg_ids), "notified": len(lat), "send_seconds": round(send_s, 3),
                   "latency": percentiles(lat),
                   "requests": len(gw.requests) - start}  # fmt: skip
            if pattern == "paced":
                res["rate_per_s"] = rate
            out[pattern] = res
            p = res["latency"]
            log(f"  latency {pattern}: {res['notified']}/{res['messages']} notified, "
                f"p50 {p.get('p50_ms')} ms, p99 {p.get('p99_ms')} ms, "
                f"max {p.get('max_ms')} ms")  # fmt: skip
            await sleep(PUSH_INTERVAL_S + 0.5)  # the users' windows end: the next one is not held
    finally:
        for c in conns:
            await c.close()
    return out


async def throughput_round(s: Setup, name: str, users: Sequence[int]) -> dict[str, Any]:
    h, gw, metrics = s.servers[name], s.gateway, s.metrics[name]
    conns = [await login(h, _user(), f"sender-{i}") for i in range(THROUGHPUT_SENDERS)]
    frames = [sends(g) for g in split(users, THROUGHPUT_SENDERS)]
    n = len(users)
    base = await metrics.persisted()
    start = len(gw.requests)
    cpu0 = h.cpu_s()
    persisted_at: list[float] = []

    async def watch() -> None:
        while True:
            if await metrics.persisted() >= base + n:
                persisted_at.append(time.monotonic())
                return
            if time.monotonic() - t0 > DRAIN_TIMEOUT_S:
                return
            await sleep(0.05)

    t0 = time.monotonic()
    watcher = ensureDeferred(watch())
    runs = [ensureDeferred(pipeline(c, f, WINDOW)) for c, f in zip(conns, frames, strict=True)]
    acked = await DeferredList(runs, fireOnOneErrback=True, consumeErrors=True)
    ack_s = max(max(c.acked_at.values()) for c in conns) - t0
    msg_ids = [a.msg_id for _, per in acked for a in per]
    await watcher
    res: dict[str, Any] = {
        "messages": n,
        "acked": len(msg_ids),
        "acks_per_s": round(n / ack_s),
        "persisted": bool(persisted_at),
        "persisted_per_s": round(n / (persisted_at[0] - t0)) if persisted_at else None,
    }
    if name == "notify":
        got = await wait_notified(gw, start, n, "throughput")
        res["notified"] = len(got)
        res["notifications_per_s"] = round(len(got) / (max(got.values()) - t0)) if got else None
    res["server_cpu_us_per_msg"] = round((h.cpu_s() - cpu0) / n * 1e6, 1)
    for c in conns:
        await c.close()
    log(f"  throughput {name}: acks {res['acks_per_s']}/s, persisted {res['persisted_per_s']}/s"
        + (f", notifications {res.get('notifications_per_s')}/s" if name == "notify" else "")
        + f", server CPU {res['server_cpu_us_per_msg']} us/msg")  # fmt: skip
    return res


async def throughput_phase(s: Setup, users: Sequence[int], rounds: int) -> dict[str, Any]:
    runs: dict[str, list[dict[str, Any]]] = {"notify": [], "plain": []}
    plain_users = [_user() for _ in users]  # never connected: nothing registered
    for _ in range(rounds):
        for name in ("notify", "plain"):
            runs[name].append(
                await throughput_round(s, name, users if name == "notify" else plain_users)
            )
            if name == "notify":
                await sleep(PUSH_INTERVAL_S + 0.5)

    def best(name: str, key: str) -> float | None:
        values = [r[key] for r in runs[name] if r.get(key)]
        return max(values) if values else None

    ratios: dict[str, float | None] = {}
    for key in ("acks_per_s", "persisted_per_s"):
        a, b = best("notify", key), best("plain", key)
        ratios[key] = round(a / b, 3) if a and b else None
    return {"messages": len(users), "rounds": runs, "notify_vs_plain": ratios}


async def api_round(s: Setup, n: int) -> dict[str, Any]:
    """`n` POST /v1/messages, API_IN_FLIGHT at once (treq, persistent connections)."""
    url = f"http://127.0.0.1:{s.api['plain']}/v1/messages"
    pool = HTTPConnectionPool(reactor, persistent=True)
    pool.maxPersistentPerHost = API_IN_FLIGHT
    http = treq.client.HTTPClient(Agent(reactor, pool=pool))
    headers = {"Authorization": f"Bearer {s.api_key}", "Content-Type": "application/json"}
    senders = [_user() for _ in range(THROUGHPUT_SENDERS)]
    lat: list[float] = []
    statuses: dict[int, int] = {}

    async def post(k: int) -> None:
        body = {"sender_id": str(senders[k % len(senders)]), "to": {"user": str(_user())},
                "client_msg_id": uuid.uuid4().hex, "body": BODY}  # fmt: skip
        t = time.monotonic()
        r = await http.post(url, data=json.dumps(body).encode(), headers=headers)
        await r.content()
        lat.append(time.monotonic() - t)
        statuses[r.code] = statuses.get(r.code, 0) + 1

    t0 = time.monotonic()
    await bounded(API_IN_FLIGHT, [lambda k=k: ensureDeferred(post(k)) for k in range(n)])
    took = time.monotonic() - t0
    await pool.closeCachedConnections()
    return {"requests": n, "in_flight": API_IN_FLIGHT, "statuses": statuses,
            "requests_per_s": round(n / took), "latency": percentiles(lat)}  # fmt: skip


async def protocol_round(s: Setup, n: int) -> dict[str, Any]:
    """`n` SENDs on one connection, API_IN_FLIGHT unacknowledged."""
    conn = await login(s.servers["plain"], _user(), "sender-proto")
    lat: list[float] = []

    async def one(f: Send) -> None:
        t = time.monotonic()
        ack: SendAck = await conn.ask(f, SendAck)
        lat.append(conn.acked_at[ack.msg_id] - t)

    frames = sends([_user() for _ in range(n)])
    t0 = time.monotonic()
    await bounded(API_IN_FLIGHT, [lambda f=f: ensureDeferred(one(f)) for f in frames])
    took = time.monotonic() - t0
    await conn.close()
    return {"sends": n, "in_flight": API_IN_FLIGHT, "sends_per_s": round(n / took),
            "latency": percentiles(lat)}  # fmt: skip


async def api_phase(s: Setup, n: int, rounds: int) -> dict[str, Any]:
    """API and protocol rounds alternating, on `plain`; the ratio of the best of each."""
    api: list[dict[str, Any]] = []
    proto: list[dict[str, Any]] = []
    for _ in range(rounds):
        api.append(await api_round(s, n))
        proto.append(await protocol_round(s, n))
        a, p = api[-1], proto[-1]
        al, pl = a["latency"], p["latency"]
        log(f"  api: {a['requests_per_s']} req/s (p50 {al['p50_ms']} ms, p99 {al['p99_ms']} ms)"
            f" vs protocol {p['sends_per_s']} SENDs/s (p50 {pl['p50_ms']} ms, p99 "
            f"{pl['p99_ms']} ms)")  # fmt: skip
    best_api = max(r["requests_per_s"] for r in api)
    best_proto = max(r["sends_per_s"] for r in proto)
    return {"api": api, "protocol": proto,
            "api_vs_protocol": round(best_api / best_proto, 3)}  # fmt: skip


async def run_storage(storage: str, a: argparse.Namespace, gw: PushGatewayStandIn,
                      gw_port: int) -> dict[str, Any]:  # fmt: skip
    t, load = time.monotonic(), os.getloadavg()
    s = Setup(storage, gw, gw_port)
    try:
        users = [_user() for _ in range(max(a.devices, a.messages))]
        reg_s = await register_devices(s.servers["notify"], users)
        log(f"{storage}: {len(users)} devices registered in {reg_s:.1f}s")
        latency = await latency_phase(s, users[: a.devices], a.rate)
        throughput = await throughput_phase(s, users[: a.messages], a.rounds)
        api = await api_phase(s, a.api, a.rounds)
    finally:
        s.stop()
    return {"registered": len(users), "register_seconds": round(reg_s, 2), "latency": latency,
            "throughput": throughput, "api": api,
            "loadavg_before": [round(x, 2) for x in load],
            "seconds": round(time.monotonic() - t, 1)}  # fmt: skip


def check(results: dict[str, Any]) -> list[str]:
    problems = []
    for storage, r in results.items():
        for pattern in ("paced", "burst"):
            p = r["latency"][pattern]
            if p["notified"] < p["messages"]:
                problems.append(f"{storage} {pattern}: {p['notified']} of {p['messages']} notified")
        for name, rounds in r["throughput"]["rounds"].items():
            for k in rounds:
                if k["acked"] < k["messages"] or not k["persisted"]:
                    problems.append(f"{storage} throughput {name}: not all acked and persisted")
                if name == "notify" and k["notified"] < k["messages"]:
                    problems.append(
                        f"{storage} throughput: {k['notified']} of {k['messages']} notified"
                    )
        for k in r["api"]["api"]:
            if set(k["statuses"]) != {200}:
                problems.append(f"{storage} api: statuses {k['statuses']}")
    return problems


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="100 devices, 500 messages, embedded")
    p.add_argument("--storage", help="comma-separated (default embedded,production)")
    p.add_argument("--devices", type=int, help="offline registered devices (default 1,000)")
    p.add_argument("--messages", type=int, help="messages per throughput round (default 5,000)")
    p.add_argument("--api", type=int, help="API requests and SENDs (default 5,000)")
    p.add_argument("--rate", type=float, default=200.0, help="paced sends/s (default 200)")
    p.add_argument("--rounds", type=int, help="throughput rounds per server (default 2)")
    a = p.parse_args()
    storages = (a.storage or ("embedded" if a.quick else "embedded,production")).split(",")
    a.devices = a.devices or (100 if a.quick else 1_000)
    a.messages = a.messages or (500 if a.quick else 5_000)
    a.api = a.api or (500 if a.quick else 5_000)
    a.rounds = a.rounds or (1 if a.quick else 2)
    if "production" in storages:
        subprocess.run([str(servers.REPO / "scripts" / "services"), "start"], check=True,
                       stdout=sys.stderr)  # fmt: skip
    servers.raise_nofile()
    out: dict[str, Any] = {}

    async def run(_reactor: Any) -> None:
        gw_port = servers.free_port()
        gw = await PushGatewayStandIn.start(gw_port)
        try:
            results = {}
            for storage in storages:
                results[storage] = await run_storage(storage, a, gw, gw_port)
            problems = check(results)
            out.update({"bench": "notify", "quick": a.quick, "ok": not problems,
                        "problems": problems, "results": results})  # fmt: skip
        finally:
            await gw.stop()

    try:
        task.react(lambda r: ensureDeferred(run(r)))
    except SystemExit as e:
        if e.code:
            raise
    print(json.dumps(out))
    sys.exit(0 if out.get("ok") else 1)


if __name__ == "__main__":
    main()
