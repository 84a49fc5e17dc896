"""The server API: HTTP + JSON for the app's backend (spec/openapi.json).

Send a message as a user, manage groups, list a user's connected devices, close a device's
session, revoke a user's sessions; plus /healthz and /metrics, which need no key. Every /v1
route needs `Authorization: Bearer <api_key>` (compared in constant time). Every error is
{"error": {"code": "<snake_case>", "message": "..."}} with its HTTP status.

The routes call the same ChatService methods as the frames, with a Caller for the user the
request names, so the rules are the frames' rules: membership, limits, rates (an API send
counts against its sender's rate like a SEND), and client_msg_id dedup (a repeated one
returns the first message's id with "duplicate": true). The service's error codes map to
HTTP statuses (STATUS_OF). Sessions on other gateways are reached through the PushRouter
(presence in Redis, a routed close over RabbitMQ), so any gateway's API reaches every device.

Ids are u64: JSON numbers or decimal strings in requests, decimal strings in responses (a
JavaScript number loses precision past 2^53). Request bodies are capped at MAX_BODY_BYTES
(413), bounded in memory as they arrive.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import io
import json
import math
import re
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from improto.enums import CloseReason, ConvKind
from improto.errors import ErrorCode, ProtocolError
from improto.frames import GroupAdd, GroupCreate, GroupRemove, Send
from improto.limits import MAX_BODY, MAX_DEVICE_ID, MAX_GROUP_NAME, U64_MAX
from improto_server import metrics
from improto_server.health import HealthResource, HealthSource
from improto_server.ids import wall_ms
from improto_server.ports import DeviceStore, PushRouter
from improto_server.service import Caller, ChatService, RequestError

log = Logger()

MAX_BODY_BYTES = 256 * 1024  # a largest message body in base64 plus room for the JSON
API_DEVICE = "api"  # the device id of API callers unless a request names one

# The service's error codes as HTTP statuses (the body's code is the name in lower case).
STATUS_OF: dict[int, int] = {
    ErrorCode.MALFORMED_FRAME: 400,
    ErrorCode.INVALID_FIELD: 400,
    ErrorCode.BAD_UTF8: 400,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.LIMIT_EXCEEDED: 409,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
    ErrorCode.UNAVAILABLE: 503,
}
_CMID = re.compile(r"[0-9a-fA-F]{32}")
_SEND_REQUIRED = frozenset({"sender_id", "to", "client_msg_id"})
_SEND_OPTIONAL = frozenset({"sender_device", "content_type", "body", "body_b64"})
_DECIMAL = re.compile(r"[0-9]{1,20}")


class ApiError(Exception):
    """An error answer: HTTP status, snake_case code, message (and extra headers)."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message
        self.headers = dict(headers or {})

    @classmethod
    def of(cls, e: RequestError | ProtocolError) -> ApiError:
        code = ErrorCode(e.code)
        text = e.text if isinstance(e, RequestError) else e.message
        headers = {}
        if isinstance(e, RequestError) and code == ErrorCode.RATE_LIMITED:
            headers["Retry-After"] = str(max(1, math.ceil(e.retry_after_s)))
        return cls(STATUS_OF.get(code, 500), code.name.lower(), text or code.name, headers)


def _invalid(message: str) -> ApiError:
    return ApiError(400, "invalid_field", message)


# ------------------------------------------------------------------------ fields


def _id(value: object, name: str) -> int:
    """A u64 id (1..2^64-1): a JSON integer or a decimal string."""
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        value = int(value)
    if type(value) is not int or not 1 <= value <= U64_MAX:
        raise _invalid(f"{name}: not an id (1..2^64-1, a number or a decimal string)")
    return value


def _ids(value: object, name: str, most: int = 1000) -> tuple[int, ...]:
    if not isinstance(value, list) or len(value) > most:
        raise _invalid(f"{name}: a list of at most {most} ids")
    return tuple(_id(v, name) for v in value)


def _text(value: object, name: str, lo: int, hi: int) -> str:
    """A string of lo..hi UTF-8 bytes."""
    if not isinstance(value, str):
        raise _invalid(f"{name}: a string")
    try:
        size = len(value.encode())
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
        raise ApiError(400, "bad_utf8", f"{name}: not valid Unicode") from None
    if not lo <= size <= hi:
        raise _invalid(f"{name}: {size} bytes of UTF-8, allowed {lo}..{hi}")
    return value


def _fields(
    body: Mapping[str, Any], required: frozenset[str], optional: frozenset[str] = frozenset()
) -> None:
    """Refuse a missing field, and an unknown one (a typo must not pass as absent)."""
    missing = sorted(required - body.keys())
    if missing:
        raise _invalid(f"missing field(s): {', '.join(missing)}")
    unknown = sorted(body.keys() - required - optional)
    if unknown:
        raise _invalid(f"unknown field(s): {', '.join(unknown)}")


def _valid(frame: Send | GroupCreate | GroupAdd | GroupRemove) -> None:
    try:
        frame.validate()
    except ProtocolError as e:
        raise ApiError.of(e) from None


# ------------------------------------------------------------------------ routes


@dataclass(frozen=True, slots=True)
class Call:
    """One request as a route handler sees it."""

    params: dict[str, str]  # the path's {placeholders}, percent-decoded
    body: dict[str, Any]  # the JSON object ({} without a body)
    query: dict[str, str]  # the first value of each query argument


Handler = Callable[[Call], Awaitable[dict[str, Any]]]


class Api:
    """The /v1 route handlers over the service, the push router and the device store."""

    def __init__(
        self,
        service: ChatService,
        router: PushRouter,
        devices: DeviceStore | None,
        now_ms: Callable[[], int] = wall_ms,
    ) -> None:
        self.service = service
        self.router = router
        self.devices = devices
        self.now_ms = now_ms
        # (method, path template under /v1, handler); the template names the route in metrics
        self.routes: list[tuple[str, str, Handler]] = [
            ("POST", "messages", self.send_message),
            ("POST", "groups", self.create_group),
            ("POST", "groups/{group_id}/members", self.add_members),
            ("DELETE", "groups/{group_id}/members/{user_id}", self.remove_member),
            ("GET", "users/{user_id}/devices", self.online_devices),
            ("POST", "users/{user_id}/devices/{device_id}/kick", self.kick),
            ("POST", "users/{user_id}/revoke", self.revoke),
        ]

    async def send_message(self, call: Call) -> dict[str, Any]:
        body = call.body
        _fields(body, _SEND_REQUIRED, _SEND_OPTIONAL)
        sender = _id(body["sender_id"], "sender_id")
        device = _text(body.get("sender_device", API_DEVICE), "sender_device", 1, MAX_DEVICE_ID)
        to = body["to"]
        if not isinstance(to, dict) or len(to) != 1 or not to.keys() <= {"user", "group"}:
            raise _invalid('to: {"user": id} or {"group": id}')
        ((kind_name, conv),) = to.items()
        kind = ConvKind.USER if kind_name == "user" else ConvKind.GROUP
        cmid = body["client_msg_id"]
        if not isinstance(cmid, str) or not _CMID.fullmatch(cmid):
            raise _invalid("client_msg_id: 32 hex digits (16 bytes)")
        content_type = body.get("content_type", 1)
        if type(content_type) is not int or not 1 <= content_type <= 65535:
            raise _invalid("content_type: 1..65535 (0 is the server's group events)")
        if ("body" in body) == ("body_b64" in body):
            raise _invalid("exactly one of body (text) and body_b64 (base64)")
        if "body" in body:
            data = _text(body["body"], "body", 0, MAX_BODY).encode()
        else:
            data = _base64(body["body_b64"])
        frame = Send(bytes.fromhex(cmid), kind, _id(conv, f"to.{kind_name}"), content_type, data)
        _valid(frame)
        ack = await self.service.send(Caller(sender, device), frame)
        return {
            "msg_id": str(ack.msg_id),
            "server_time": ack.server_time,
            "duplicate": bool(ack.duplicate),
        }

    async def create_group(self, call: Call) -> dict[str, Any]:
        body = call.body
        _fields(body, frozenset({"owner_id", "name"}), frozenset({"members"}))
        owner = _id(body["owner_id"], "owner_id")
        name = _text(body["name"], "name", 1, MAX_GROUP_NAME)
        frame = GroupCreate(name, _ids(body.get("members", []), "members"))
        _valid(frame)
        created = await self.service.group_create(Caller(owner, API_DEVICE), frame)
        return {"group_id": str(created.group_id)}

    async def add_members(self, call: Call) -> dict[str, Any]:
        body = call.body
        _fields(body, frozenset({"by", "users"}))
        group = _id(call.params["group_id"], "group_id")
        frame = GroupAdd(group, _ids(body["users"], "users"))
        _valid(frame)
        done = await self.service.group_add(Caller(_id(body["by"], "by"), API_DEVICE), frame)
        return {"group_id": str(group), "added": done.count}

    async def remove_member(self, call: Call) -> dict[str, Any]:
        group = _id(call.params["group_id"], "group_id")
        user = _id(call.params["user_id"], "user_id")
        by = _id(call.query["by"], "by") if "by" in call.query else user  # none: leaving
        frame = GroupRemove(group, (user,))
        _valid(frame)
        done = await self.service.group_remove(Caller(by, API_DEVICE), frame)
        return {"group_id": str(group), "removed": done.count}

    async def online_devices(self, call: Call) -> dict[str, Any]:
        user = _id(call.params["user_id"], "user_id")
        found = await _available(self.router.online_devices([user]))
        devices = sorted(found.get(user, ()))
        return {"user_id": str(user), "devices": [{"device_id": d} for d in devices]}

    async def kick(self, call: Call) -> dict[str, Any]:
        user = _id(call.params["user_id"], "user_id")
        device = _text(call.params["device_id"], "device_id", 1, MAX_DEVICE_ID)
        _fields(call.body, frozenset())
        kicked = await _available(self.router.kick(user, device, CloseReason.KICKED))
        return {"kicked": kicked}

    async def revoke(self, call: Call) -> dict[str, Any]:
        user = _id(call.params["user_id"], "user_id")
        _fields(call.body, frozenset())
        if self.devices is None:
            raise ApiError(501, "not_supported", "this server's backend keeps no revocations")
        # Whole seconds, as tokens' iat: a token minted right after the revocation, in the
        # same second, logs in (else it would be refused for up to a second).
        await _available(self.devices.revoke(user, self.now_ms() // 1000 * 1000))
        before = await _available(self.devices.revoked_before(user))
        kicked = await _available(self.router.kick(user, None, CloseReason.KICKED))
        # A revoked device must not keep getting notifications (a lost phone, with previews).
        targets = (await _available(self.devices.targets([user]))).get(user, {})
        removed = 0
        for device, target in targets.items():
            removed += await _available(self.devices.remove_target(user, device, target.token))
        return {"revoked_before": before, "kicked": kicked, "unregistered": removed}


def _base64(value: object) -> bytes:
    if not isinstance(value, str):
        raise _invalid("body_b64: a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _invalid("body_b64: not base64") from None
    if len(data) > MAX_BODY:
        raise _invalid(f"body_b64: {len(data)} bytes, allowed 0..{MAX_BODY}")
    return data


async def _available(d: Awaitable[Any]) -> Any:
    """A presence or device store call: its failure (a service down) is 503."""
    try:
        return await d
    except Exception:
        log.failure("server API: a storage call failed")
        raise ApiError(503, "unavailable", "storage unavailable; retry") from None


# ----------------------------------------------------------------------- HTTP


class _CappedBody(io.BytesIO):
    """A request body kept in memory up to `cap` bytes; past it, dropped and flagged."""

    def __init__(self, cap: int, declared: int | None) -> None:
        super().__init__()
        self.cap = cap
        self.too_large = declared is not None and declared > cap

    def write(self, data: Any) -> int:
        if not self.too_large and self.tell() + len(data) <= self.cap:
            return super().write(data)
        if not self.too_large:
            self.too_large = True
            self.seek(0)
            self.truncate()
        return len(data)


class ApiSite(Site):
    """A Site whose request bodies are capped (twisted.web asks it for the body's file)."""

    max_body = MAX_BODY_BYTES

    def getContentFile(self, length: int | None) -> _CappedBody:
        return _CappedBody(self.max_body, length)


def _route_match(template: str, segments: list[str]) -> dict[str, str] | None:
    parts = template.split("/")
    if len(parts) != len(segments):
        return None
    params: dict[str, str] = {}
    for part, segment in zip(parts, segments, strict=True):
        if part.startswith("{"):
            if not segment:
                return None
            params[part[1:-1]] = segment
        elif part != segment:
            return None
    return params


class V1Resource(Resource):
    """/v1/...: authentication, routing, JSON in and out, errors, metrics."""

    isLeaf = True

    def __init__(self, api: Api, api_key: str, clock: IReactorTime) -> None:
        super().__init__()
        if not api_key:
            raise ValueError("the server API needs an api_key")
        self.api = api
        self._key = api_key.encode()
        self._clock = clock

    def render(self, request: Request) -> int:
        start = self._clock.seconds()
        gone: list[Failure] = []  # the client went away before the answer
        request.notifyFinish().addErrback(gone.append)
        route = ["unmatched"]  # a fixed label: a client must not make up metric series

        def answer(result: tuple[int, dict[str, Any], dict[str, str]]) -> None:
            status, body, headers = result
            if not gone:
                request.setResponseCode(status)
                request.setHeader(b"content-type", b"application/json")
                request.setHeader(b"cache-control", b"no-store")
                for name, value in headers.items():
                    request.setHeader(name.encode(), value.encode())
                request.write(json.dumps(body).encode())
                request.finish()
            metrics.api_request(route[0], status, self._clock.seconds() - start)

        d = Deferred.fromCoroutine(self._serve(request, route))
        d.addCallback(answer)
        d.addErrback(lambda f: log.failure("server API: answering failed", f))
        return NOT_DONE_YET

    async def _serve(
        self, request: Request, route: list[str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """(status, JSON body, headers); `route[0]` is set to the matched route's name."""
        try:
            return 200, await self._dispatch(request, route), {}
        except ApiError as e:
            error = {"error": {"code": e.code, "message": e.message}}
            return e.status, error, e.headers
        except RequestError as e:
            a = ApiError.of(e)
            return a.status, {"error": {"code": a.code, "message": a.message}}, a.headers
        except Exception:
            log.failure("server API: {route} failed", route=route[0])
            return 500, {"error": {"code": "internal", "message": "internal error"}}, {}

    async def _dispatch(self, request: Request, route: list[str]) -> dict[str, Any]:
        method = (request.method or b"").decode("latin-1")
        try:
            segments = [s.decode() for s in request.postpath or []]
        except UnicodeDecodeError:
            segments = []  # no route has such a path
        found: tuple[Handler, dict[str, str]] | None = None
        allowed: list[str] = []
        for verb, template, handler in self.api.routes:
            params = _route_match(template, segments)
            if params is not None and verb == method:
                found, route[0] = (handler, params), f"{verb} /v1/{template}"
                break
            if params is not None:
                allowed.append(verb)
        self._authenticate(request)  # before any answer that tells whether a route exists
        if found is None and allowed:
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed here",
                           {"Allow": ", ".join(allowed)})  # fmt: skip
        if found is None:
            raise ApiError(404, "not_found", "no such route")
        handler, params = found
        return await handler(Call(params, _body(request), _query(request)))

    def _authenticate(self, request: Request) -> None:
        header = request.getHeader(b"authorization") or b""
        scheme, _, key = header.partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(key.strip(), self._key):
            raise ApiError(401, "unauthorized", "a valid 'Authorization: Bearer <api_key>'"
                           " header is required", {"WWW-Authenticate": "Bearer"})  # fmt: skip


def _body(request: Request) -> dict[str, Any]:
    content = request.content
    if isinstance(content, _CappedBody) and content.too_large:
        raise ApiError(413, "body_too_large", f"request bodies are limited to {MAX_BODY_BYTES}"
                       " bytes", {"Connection": "close"})  # fmt: skip
    raw = content.read() if content is not None else b""
    if not raw.strip():
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "bad_json", "the body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "bad_json", "the body must be a JSON object")
    return body


def _query(request: Request) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, values in (request.args or {}).items():
        try:
            out[name.decode()] = values[0].decode()
        except UnicodeDecodeError:
            raise _invalid("query arguments must be UTF-8") from None
    return out


def _error_page(request: Request, status: int, code: str, message: str) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps({"error": {"code": code, "message": message}}).encode()


class _NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return _error_page(request, 404, "not_found", "no such route")


class _GetOnly(Resource):
    """`inner` for GET; other methods get the API's JSON 405 (not twisted.web's HTML)."""

    isLeaf = True

    def __init__(self, inner: Resource) -> None:
        super().__init__()
        self._inner = inner

    def render(self, request: Request) -> bytes | int:
        if request.method != b"GET":
            request.setHeader(b"allow", b"GET")
            return _error_page(request, 405, "method_not_allowed", "only GET is allowed here")
        return self._inner.render(request)


class _Root(Resource):
    def getChild(self, path: bytes, request: Request) -> Resource:
        return _NotFound()

    def render(self, request: Request) -> bytes:
        return _NotFound().render(request)


def make_api_site(
    service: ChatService,
    router: PushRouter,
    devices: DeviceStore | None,
    health: HealthSource,
    api_key: str,
    clock: IReactorTime,
    *,
    now_ms: Callable[[], int] = wall_ms,
) -> ApiSite:
    """The API's Site: /v1 (bearer `api_key`), /healthz (backend health), /metrics.
    `clock` times the requests; `now_ms` stamps revocations (wall time, as tokens' iat)."""
    site = make_ops_site(health, clock)
    v1 = V1Resource(Api(service, router, devices, now_ms), api_key, clock)
    site.resource.putChild(b"v1", v1)
    return site


def make_ops_site(health: HealthSource, clock: IReactorTime) -> ApiSite:
    """/healthz and /metrics alone: for a process without a gateway (--role persister)."""
    root = _Root()
    root.putChild(b"healthz", _GetOnly(HealthResource(health, clock)))
    root.putChild(b"metrics", _GetOnly(metrics.MetricsResource()))
    site = ApiSite(root, parsePOSTFormSubmission=False, reactor=clock)
    site.displayTracebacks = False
    site.noisy = False
    return site
