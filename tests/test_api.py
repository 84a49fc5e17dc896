"""The server API (server/improto_server/api.py) over real HTTP: treq against the API site on
127.0.0.1:0, beside a server in the same reactor whose clients (the client library, over
TCP) see what the API does. Embedded storage, and a production row: two gateways on one
Redis / RabbitMQ / HBase, the API on one of them reaching devices held by the other."""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest_twisted
from treq.client import HTTPClient

from twisted.internet import reactor
from twisted.internet.interfaces import IListeningPort
from twisted.web.client import Agent, HTTPConnectionPool

from improto.enums import CloseReason
from improto.frames import Message
from improto.tokens import mint
from improto_clients.client import IMClient
from improto_clients.errors import SessionClosed
from improto_server.api import MAX_BODY_BYTES, Api, make_api_site, make_ops_site
from improto_server.app import Server
from improto_server.config import Config
from improto_server.model import PushTarget
from improto_server.production.push_router import CLOSE, pack_routed, unpack_routed
from tests.support import services
from tests.support.waiting import eventually, sleep

SECRET = "api-test-secret-api-test-secret-0123456789"
KEY = "test-api-key-0123456789abcdef"
ALICE, BOB, CAROL = 31, 32, 33


@dataclass
class Reply:
    status: int
    body: Any
    headers: dict[str, str]


@dataclass
class Device:
    client: IMClient
    received: list[Message] = field(default_factory=list)
    closed: list[SessionClosed] = field(default_factory=list)


class Harness:
    """Servers (gateways), the API of one of them on its own port, HTTP and IM clients."""

    def __init__(self, servers: list[Server], api_server: Server) -> None:
        self.servers = servers
        self.api_server = api_server
        self.port: IListeningPort | None = None
        self.devices: list[Device] = []
        # Not persistent: no keep-alive connection outlives a test.
        self.http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))

    async def start_api(self) -> None:
        s = self.api_server
        assert s.backend is not None and s.router is not None
        backend: Any = s.backend  # devices and health(): not on every Backend in ports.py yet
        site = make_api_site(s.service, s.router, backend.devices, backend, KEY, reactor)
        self.port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]

    @property
    def url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port.getHost().port}"

    async def call(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        key: str | None = KEY,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        h = dict(headers or {})
        if key is not None:
            h["Authorization"] = f"Bearer {key}"
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        if data is not None:
            h.setdefault("Content-Type", "application/json")
        resp = await self.http.request(method, self.url + path, data=data, headers=h)
        content = await resp.content()
        ctype = resp.headers.getRawHeaders("content-type", [""])[0]
        parsed = json.loads(content) if ctype.startswith("application/json") else content
        flat = {k.decode().lower(): v[0].decode() for k, v in resp.headers.getAllRawHeaders()}
        return Reply(resp.code, parsed, flat)

    async def device(self, user: int, device: str, gateway: Server | None = None) -> Device:
        server = gateway or self.servers[0]
        port = server.bound_ports()[0]
        c = IMClient(f"tcp:host=127.0.0.1:port={port}", mint(SECRET, user, device), device,
                     reactor=reactor)  # fmt: skip
        d = Device(c)
        c.on_message = lambda conv, m: d.received.append(m)
        c.on_close = d.closed.append
        self.devices.append(d)
        await c.connect()
        await c.drain()
        return d

    async def stop(self) -> None:
        for d in self.devices:
            await d.client.close()
        if self.port is not None:
            await self.port.stopListening()
        for s in reversed(self.servers):
            await s.stop()


def _config(tmp: Path, **kw: Any) -> Config:
    return Config(listen=["tcp:0:interface=127.0.0.1"], data_dir=str(tmp), jwt_secret=SECRET, **kw)


async def _embedded(tmp: Path, **kw: Any) -> Harness:
    server = Server(_config(tmp, **kw), reactor)
    await server.start()
    h = Harness([server], server)
    await h.start_api()
    return h


@pytest_twisted.async_yield_fixture()
async def h(tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await _embedded(tmp_path)
    yield harness
    await harness.stop()


def cmid() -> str:
    return uuid.uuid4().hex


def error_code(reply: Reply) -> str:
    assert set(reply.body) == {"error"}, reply.body
    assert set(reply.body["error"]) == {"code", "message"}
    return str(reply.body["error"]["code"])


# -------------------------------------------------------------------- auth, routing


@pytest_twisted.ensureDeferred
async def test_every_v1_route_needs_the_key(h: Harness) -> None:
    for key in (None, "wrong", KEY + "x", ""):
        r = await h.call("GET", f"/v1/users/{BOB}/devices", key=key)
        assert r.status == 401 and error_code(r) == "unauthorized"
        assert r.headers["www-authenticate"] == "Bearer"
    r = await h.call("GET", "/v1/nowhere", headers={"Authorization": f"Basic {KEY}"}, key=None)
    assert r.status == 401  # the route is not revealed before the key
    r = await h.call("GET", f"/v1/users/{BOB}/devices")
    assert r.status == 200 and r.body == {"user_id": str(BOB), "devices": []}


@pytest_twisted.ensureDeferred
async def test_unknown_routes_and_methods_are_json_errors(h: Harness) -> None:
    for path in ("/v1/nowhere", "/v1/messages/x", "/v1/", "/", "/v2/messages"):
        r = await h.call("GET", path)
        assert r.status == 404 and error_code(r) == "not_found", path
    r = await h.call("GET", "/v1/messages")
    assert r.status == 405 and error_code(r) == "method_not_allowed"
    assert r.headers["allow"] == "POST"
    r = await h.call("POST", "/healthz", key=None)
    assert r.status == 405 and error_code(r) == "method_not_allowed"


@pytest_twisted.ensureDeferred
async def test_healthz_and_metrics_need_no_key(h: Harness) -> None:
    r = await h.call("GET", "/healthz", key=None)
    assert r.status == 200
    assert r.body["ok"] is True and r.body["services"] == {"sqlite": "ok"}
    assert isinstance(r.body["queue_depth"], int)
    r = await h.call("GET", "/metrics", key=None)
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.body.decode()
    assert 'improto_api_requests_total{route="GET /healthz",status="200"}' in text
    assert "improto_queue_depth" in text


def test_the_openapi_document_has_every_route() -> None:
    spec = json.loads((Path(__file__).parents[1] / "spec" / "openapi.json").read_text())
    assert spec["openapi"].startswith("3.1")
    routes = {(f"/v1/{template}", verb.lower()) for verb, template, _ in Api(*[None] * 3).routes}
    documented = {(path, verb) for path, ops in spec["paths"].items() for verb in ops}
    assert documented == routes | {("/healthz", "get"), ("/metrics", "get")}
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


@pytest_twisted.ensureDeferred
async def test_the_ops_site_has_health_and_metrics_only(h: Harness) -> None:
    site = make_ops_site(h.api_server.backend, reactor)  # type: ignore[arg-type]
    port = reactor.listenTCP(0, site, interface="127.0.0.1")  # type: ignore[attr-defined]
    base = f"http://127.0.0.1:{port.getHost().port}"
    try:
        health = await h.http.get(base + "/healthz")
        assert health.code == 200 and (await health.json())["services"] == {"sqlite": "ok"}
        assert (await h.http.get(base + "/metrics")).code == 200
        v1 = await h.http.get(
            base + "/v1/users/1/devices", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert v1.code == 404 and (await v1.json())["error"]["code"] == "not_found"
    finally:
        await port.stopListening()


# -------------------------------------------------------------------------- sending


@pytest_twisted.ensureDeferred
async def test_send_reaches_the_receiver_and_a_retry_is_a_duplicate(h: Harness) -> None:
    bob = await h.device(BOB, "phone")
    key = cmid()
    msg = {"sender_id": str(ALICE), "to": {"user": BOB}, "client_msg_id": key, "body": "hi bob"}
    first = await h.call("POST", "/v1/messages", msg)
    assert first.status == 200, first.body
    assert first.body["duplicate"] is False and isinstance(first.body["server_time"], int)
    msg_id = int(first.body["msg_id"])
    await eventually(lambda: len(bob.received) == 1)
    m = bob.received[0]
    assert (m.msg_id, m.sender_id, m.sender_device, m.conv_id, m.body) == (
        msg_id, ALICE, "api", BOB, b"hi bob",
    )  # fmt: skip
    again = await h.call("POST", "/v1/messages", msg)
    assert again.status == 200
    assert again.body == {**first.body, "duplicate": True}
    await sleep(0.1)
    assert len(bob.received) == 1  # a duplicate is not pushed again

    binary = bytes(range(256))
    r = await h.call("POST", "/v1/messages", {
        "sender_id": ALICE, "sender_device": "backend", "to": {"user": str(BOB)},
        "client_msg_id": cmid(), "content_type": 7, "body_b64": base64.b64encode(binary).decode(),
    })  # fmt: skip
    assert r.status == 200, r.body
    await eventually(lambda: len(bob.received) == 2)
    assert (bob.received[1].content_type, bob.received[1].body) == (7, binary)
    assert bob.received[1].sender_device == "backend"


@pytest_twisted.ensureDeferred
async def test_send_refuses_bad_requests(h: Harness) -> None:
    good = {"sender_id": ALICE, "to": {"user": BOB}, "client_msg_id": cmid(), "body": "x"}
    cases: list[tuple[Any, str]] = [
        ({k: v for k, v in good.items() if k != "client_msg_id"}, "invalid_field"),
        ({**good, "colour": "red"}, "invalid_field"),
        ({**good, "sender_id": 0}, "invalid_field"),
        ({**good, "sender_id": "-5"}, "invalid_field"),
        ({**good, "sender_id": True}, "invalid_field"),
        ({**good, "sender_id": str(2**64)}, "invalid_field"),
        ({**good, "to": {"user": BOB, "group": 1}}, "invalid_field"),
        ({**good, "to": {"room": 1}}, "invalid_field"),
        ({**good, "client_msg_id": "abc"}, "invalid_field"),
        ({**good, "content_type": 0}, "invalid_field"),
        ({**good, "body_b64": "eA=="}, "invalid_field"),  # both bodies
        ({**good, "body": "x" * 65_536}, "invalid_field"),
        ({**{k: v for k, v in good.items() if k != "body"}, "body_b64": "@@"}, "invalid_field"),
        ({**{k: v for k, v in good.items() if k != "body"}, "body_b64": "/w=="}, "bad_utf8"),
        ({**good, "sender_device": ""}, "invalid_field"),
        ({**good, "sender_device": "d" * 65}, "invalid_field"),
    ]
    for body, code in cases:
        r = await h.call("POST", "/v1/messages", body)
        assert (r.status, error_code(r)) == (400, code), body
    for raw in (b"{", b"[1, 2]", b"\xff\xfe", b'"text"'):
        r = await h.call("POST", "/v1/messages", raw=raw)
        assert (r.status, error_code(r)) == (400, "bad_json"), raw
    r = await h.call("POST", "/v1/messages", raw=b" " * (MAX_BODY_BYTES + 1))
    assert (r.status, error_code(r)) == (413, "body_too_large")


@pytest_twisted.ensureDeferred
async def test_send_to_a_group_follows_membership(h: Harness) -> None:
    r = await h.call("POST", "/v1/groups", {"owner_id": ALICE, "name": "team", "members": [BOB]})
    assert r.status == 200, r.body
    group = r.body["group_id"]
    bob = await h.device(BOB, "phone")
    ok = await h.call("POST", "/v1/messages", {
        "sender_id": ALICE, "to": {"group": group}, "client_msg_id": cmid(), "body": "all",
    })  # fmt: skip
    assert ok.status == 200, ok.body
    await eventually(lambda: any(m.msg_id == int(ok.body["msg_id"]) for m in bob.received))
    r = await h.call("POST", "/v1/messages", {
        "sender_id": CAROL, "to": {"group": group}, "client_msg_id": cmid(), "body": "me too",
    })  # fmt: skip
    assert (r.status, error_code(r)) == (403, "forbidden")
    r = await h.call("POST", "/v1/messages", {
        "sender_id": ALICE, "to": {"group": 999_999}, "client_msg_id": cmid(), "body": "?",
    })  # fmt: skip
    assert (r.status, error_code(r)) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_rate_limited_sends_are_429_with_retry_after(tmp_path: Path) -> None:
    h = await _embedded(tmp_path, send_rate=0.01, send_burst=1.0)
    try:
        msg = {"sender_id": ALICE, "to": {"user": BOB}, "body": "x"}
        r = await h.call("POST", "/v1/messages", {**msg, "client_msg_id": cmid()})
        assert r.status == 200
        r = await h.call("POST", "/v1/messages", {**msg, "client_msg_id": cmid()})
        assert (r.status, error_code(r)) == (429, "rate_limited")
        assert int(r.headers["retry-after"]) >= 1
    finally:
        await h.stop()


# --------------------------------------------------------------------------- groups


@pytest_twisted.ensureDeferred
async def test_group_routes(h: Harness) -> None:
    r = await h.call("POST", "/v1/groups", {"owner_id": str(ALICE), "name": "g"})
    assert r.status == 200
    gid = r.body["group_id"]
    path = f"/v1/groups/{gid}/members"
    r = await h.call("POST", path, {"by": ALICE, "users": [BOB, CAROL]})
    assert r.status == 200 and r.body == {"group_id": gid, "added": 2}
    r = await h.call("POST", path, {"by": ALICE, "users": [BOB]})
    assert r.body == {"group_id": gid, "added": 0}  # already a member
    r = await h.call("POST", path, {"by": 77, "users": [78]})
    assert (r.status, error_code(r)) == (403, "forbidden")  # not a member
    r = await h.call("DELETE", f"{path}/{CAROL}?by={BOB}")
    assert (r.status, error_code(r)) == (403, "forbidden")  # only the owner removes others
    r = await h.call("DELETE", f"{path}/{CAROL}?by={ALICE}")
    assert r.status == 200 and r.body == {"group_id": gid, "removed": 1}
    r = await h.call("DELETE", f"{path}/{BOB}")  # no `by`: the user leaves
    assert r.status == 200 and r.body == {"group_id": gid, "removed": 1}
    r = await h.call("POST", "/v1/groups/424242/members", {"by": ALICE, "users": [BOB]})
    assert (r.status, error_code(r)) == (404, "not_found")
    r = await h.call("POST", "/v1/groups/x/members", {"by": ALICE, "users": [BOB]})
    assert (r.status, error_code(r)) == (400, "invalid_field")
    r = await h.call("POST", "/v1/groups", {"owner_id": ALICE, "name": ""})
    assert (r.status, error_code(r)) == (400, "invalid_field")
    r = await h.call("POST", "/v1/groups", {"owner_id": ALICE, "name": "g", "members": [0]})
    assert (r.status, error_code(r)) == (400, "invalid_field")


# ------------------------------------------------------------------ devices, kick, revoke


@pytest_twisted.ensureDeferred
async def test_devices_and_kick(h: Harness) -> None:
    phone = await h.device(BOB, "phone")
    laptop = await h.device(BOB, "lap top/1")  # any id: percent-encoded in the path
    r = await h.call("GET", f"/v1/users/{BOB}/devices")
    assert r.body == {"user_id": str(BOB), "devices": [{"device_id": "lap top/1"},
                                                      {"device_id": "phone"}]}  # fmt: skip
    r = await h.call("POST", f"/v1/users/{BOB}/devices/lap%20top%2F1/kick")
    assert r.status == 200 and r.body == {"kicked": 1}
    await eventually(lambda: bool(laptop.closed))
    assert laptop.closed[0].reason == CloseReason.KICKED and not phone.closed
    r = await h.call("GET", f"/v1/users/{BOB}/devices")
    assert r.body["devices"] == [{"device_id": "phone"}]
    r = await h.call("POST", f"/v1/users/{BOB}/devices/tablet/kick")
    assert r.status == 200 and r.body == {"kicked": 0}
    r = await h.call("POST", f"/v1/users/{BOB}/devices/phone/kick", {"now": True})
    assert (r.status, error_code(r)) == (400, "invalid_field")


@pytest_twisted.ensureDeferred
async def test_revoke_closes_every_device(h: Harness) -> None:
    phone, laptop = await h.device(BOB, "phone"), await h.device(BOB, "laptop")
    alice = await h.device(ALICE, "phone")
    backend: Any = h.api_server.backend
    await backend.devices.set_target(BOB, "phone", PushTarget("apns", "a1b2", True))
    await backend.devices.set_target(ALICE, "phone", PushTarget("fcm", "c3d4", False))
    before = int(time.time() * 1000) // 1000 * 1000  # whole seconds, as tokens' iat
    r = await h.call("POST", f"/v1/users/{BOB}/revoke")
    assert r.status == 200 and r.body["kicked"] == 2 and r.body["unregistered"] == 1
    assert before <= r.body["revoked_before"] <= int(time.time() * 1000)
    assert r.body["revoked_before"] % 1000 == 0
    assert await backend.devices.targets([BOB, ALICE]) == {
        ALICE: {"phone": PushTarget("fcm", "c3d4", False)}
    }
    await eventually(lambda: bool(phone.closed and laptop.closed))
    assert {d.closed[0].reason for d in (phone, laptop)} == {CloseReason.KICKED}
    assert not alice.closed
    assert await backend.devices.revoked_before(BOB) == r.body["revoked_before"]


@pytest_twisted.ensureDeferred
async def test_storage_down_is_503(h: Harness) -> None:
    backend = h.api_server.backend
    assert backend is not None
    await backend.close()
    r = await h.call("GET", "/healthz", key=None)
    assert r.status == 503 and r.body["ok"] is False
    assert r.body["services"]["sqlite"] != "ok"
    r = await h.call("POST", "/v1/messages", {
        "sender_id": ALICE, "to": {"user": BOB}, "client_msg_id": cmid(), "body": "x",
    })  # fmt: skip
    assert (r.status, error_code(r)) == (503, "unavailable")
    r = await h.call("POST", f"/v1/users/{BOB}/revoke")
    assert (r.status, error_code(r)) == (503, "unavailable")


# --------------------------------------------------------------------- production


def test_a_routed_close_carries_its_reason_and_text() -> None:
    targets = [(BOB, "phone", "gw/3")]
    body = pack_routed(CLOSE, CloseReason.KICKED, targets, b"an operator closed the session")
    assert unpack_routed(body) == (CLOSE, 5, targets, b"an operator closed the session")
    assert body[0] == 4  # a kind of its own: the kick of a replaced device (2) is unchanged


@pytest_twisted.async_yield_fixture()
@services.needs()
async def two_gateways(tmp_path: Path) -> AsyncIterator[Harness]:
    """Gateway A (role all, the API) and gateway B (role gateway) on one production stack."""
    run = uuid.uuid4().hex[:10]
    prefix, table = f"apitest{run}", f"apitest_{run}"
    common = {"storage": "production", "key_prefix": prefix, "hbase_table": table,
              **services.config_fields()}  # fmt: skip
    a = Server(_config(tmp_path / "a", gateway_id=f"a{run}", **common), reactor)
    b = Server(_config(tmp_path / "b", gateway_id=f"b{run}", role="gateway", **common), reactor)
    started: list[Server] = []
    try:
        for s in (a, b):
            await s.start()
            started.append(s)
        harness = Harness([a, b], a)
        await harness.start_api()
        yield harness
        await harness.stop()
    finally:
        for s in started:
            if s.backend is not None:
                await s.stop()
        services.purge(prefix, table)


@pytest_twisted.ensureDeferred
async def test_production_send_devices_kick_across_gateways(two_gateways: Harness) -> None:
    h = two_gateways
    a, b = h.servers
    bob_b = await h.device(BOB, "phone", b)  # held by the gateway without the API
    bob_a = await h.device(BOB, "laptop", a)
    r = await h.call("GET", "/healthz", key=None)
    assert r.status == 200, r.body
    assert r.body["services"] == {"redis": "ok", "rabbitmq": "ok", "hbase": "ok"}
    assert isinstance(r.body["queue_depth"], int)

    key = cmid()
    msg = {"sender_id": ALICE, "to": {"user": BOB}, "client_msg_id": key, "body": "hi"}
    first = await h.call("POST", "/v1/messages", msg)
    assert first.status == 200, first.body
    await eventually(lambda: len(bob_b.received) == 1 and len(bob_a.received) == 1)
    assert bob_b.received[0].msg_id == int(first.body["msg_id"])
    again = await h.call("POST", "/v1/messages", msg)
    assert again.body == {**first.body, "duplicate": True}

    async def devices() -> list[str]:
        r = await h.call("GET", f"/v1/users/{BOB}/devices")
        return [d["device_id"] for d in r.body["devices"]]

    assert await devices() == ["laptop", "phone"]
    r = await h.call("POST", f"/v1/users/{BOB}/devices/phone/kick")
    assert r.body == {"kicked": 1}
    await eventually(lambda: bool(bob_b.closed))
    assert bob_b.closed[0].reason == CloseReason.KICKED and not bob_a.closed
    for _ in range(200):  # B withdraws the presence entry as the session closes
        if await devices() == ["laptop"]:
            break
        await sleep(0.02)
    assert await devices() == ["laptop"]


@pytest_twisted.ensureDeferred
async def test_production_revoke_reaches_every_gateway(two_gateways: Harness) -> None:
    h = two_gateways
    a, b = h.servers
    on_b, on_a = await h.device(BOB, "phone", b), await h.device(BOB, "laptop", a)
    carol = await h.device(CAROL, "phone", b)
    r = await h.call("POST", f"/v1/users/{BOB}/revoke")
    assert r.status == 200 and r.body["kicked"] == 2, r.body
    await eventually(lambda: bool(on_b.closed and on_a.closed))
    assert {d.closed[0].reason for d in (on_a, on_b)} == {CloseReason.KICKED}
    assert not carol.closed
    backend_b: Any = b.backend  # the other gateway: the same Redis
    assert await backend_b.devices.revoked_before(BOB) == r.body["revoked_before"] > 0
