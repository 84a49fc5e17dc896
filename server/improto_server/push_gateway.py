"""The push gateway client: one notification request (spec/PUSH_GATEWAY.md), over HTTP(S)
with treq, retried with backoff.

The gateway is the app's own service (like a Matrix push gateway such as Sygnal) that turns a
request into APNs / FCM calls; the server only knows its URL. A request is a JSON POST; the
answer says which push keys are dead. What is retried and what is not follows the usual HTTP
rules: a server-side failure, an overload (429), a timeout or a connection that could not be
made may pass; any other 4xx is the server's request being wrong and will not improve.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import treq
from treq.client import HTTPClient

from twisted.internet.defer import CancelledError, Deferred, TimeoutError, succeed
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers

from improto.enums import ContentType, ConvKind
from improto.frames import Message
from improto_server.deferreds import as_deferred
from improto_server.model import PushTarget
from improto_server.reactor_types import IServerReactor

_log = Logger()

BACKOFF_S = 0.5  # the pause before retry n (0, 1, ...) is BACKOFF_S * 2**n
# Characters of a message's text a preview carries at most: APNs payloads are limited to
# 4 KB, FCM's to 4 KB of data; the gateway may cut further.
MAX_PREVIEW_CHARS = 1000
_HEADERS = Headers({"Content-Type": ["application/json"], "User-Agent": ["improto-notifier"]})


@dataclass(frozen=True, slots=True)
class Delivery:
    """What became of one notification request."""

    sent: bool  # the gateway took it (a 2xx); False: dropped
    rejected: tuple[str, ...] = ()  # push keys the gateway reported dead (sent only)
    retries: int = 0  # attempts after the first
    reason: str = ""  # why it was dropped: "http 400", "timeout", a connection error


def notification_body(
    user_id: int,
    message: Message,
    unread: int | None,
    devices: Sequence[tuple[str, PushTarget]],
) -> dict[str, Any]:
    """The request body for `devices` (device id, target) of `user_id`. `content` only when
    every device allows previews and the message is text; `counts` only when the badge is
    known (None: reading it failed). u64 ids as decimal strings (JSON numbers lose precision
    beyond 2**53 in most parsers)."""
    m = message
    group = m.conv_kind == ConvKind.GROUP
    # The conversation as the user's list names it: the group, or the 1:1 peer.
    conv_id = m.conv_id if group or m.sender_id == user_id else m.sender_id
    n: dict[str, Any] = {
        "user_id": str(user_id),
        "msg_id": str(m.msg_id),
        "server_time": m.server_time,
        "sender_id": str(m.sender_id),
        "conv_kind": "group" if group else "user",
        "conv_id": str(conv_id),
        "content_type": m.content_type,
    }
    if m.content_type == ContentType.TEXT and devices and all(t.preview for _, t in devices):
        n["content"] = m.body.decode("utf-8", errors="replace")[:MAX_PREVIEW_CHARS]
    if unread is not None:
        n["counts"] = {"unread": unread}
    n["devices"] = [
        {"device_id": d, "platform": t.platform, "pushkey": t.token, "preview": t.preview}
        for d, t in devices
    ]
    return {"notification": n}


class _Retry(Exception):
    """An answer that may be different later (5xx, 429)."""


class _Dropped(Exception):
    """An answer that retrying will not change (a 4xx other than 429, a redirect)."""


class PushGatewayClient:
    """POSTs notifications to `url`. Each attempt (request and answer) gets `timeout_s`;
    a transient failure is retried up to `retries` times, BACKOFF_S * 2**n apart, then the
    notification is dropped. Connections are kept alive and reused (`max_connections`);
    `close()` drops them."""

    def __init__(
        self,
        url: str,
        reactor: IServerReactor,
        *,
        timeout_s: float,
        retries: int,
        backoff_s: float = BACKOFF_S,
        max_connections: int = 64,
        http: HTTPClient | None = None,
    ) -> None:
        self.url = url
        self._reactor = reactor
        self._timeout = timeout_s
        self._retries = retries
        self._backoff = backoff_s
        self._pool: HTTPConnectionPool | None = None
        if http is None:
            self._pool = HTTPConnectionPool(reactor, persistent=True)
            self._pool.maxPersistentPerHost = max_connections
            self._pool.retryAutomatically = False  # retries are ours, with backoff
            http = HTTPClient(Agent(reactor, pool=self._pool))
        self._http = http

    @as_deferred
    async def send(self, body: dict[str, Any]) -> Delivery:
        data = json.dumps(body, separators=(",", ":")).encode()
        retries = 0
        while True:
            attempt = Deferred.fromCoroutine(self._attempt(data))
            attempt.addTimeout(self._timeout, self._reactor, onTimeoutCancel=_timed_out)
            try:
                rejected = await attempt
            except _Dropped as e:
                return Delivery(False, (), retries, str(e))
            except _Retry as e:
                reason = str(e)
            except TimeoutError:
                reason = "timeout"
            except CancelledError:
                raise
            except Exception as e:  # refused, reset, DNS, TLS: the gateway is not reachable
                reason = f"{type(e).__name__}: {e}"
            else:
                return Delivery(True, rejected, retries)
            if retries >= self._retries:
                return Delivery(False, (), retries, reason)
            delay = self._backoff * 2**retries
            _log.debug("push gateway: {reason}; retry in {delay} s", reason=reason, delay=delay)
            await deferLater(self._reactor, delay, lambda: None)
            retries += 1

    async def _attempt(self, data: bytes) -> tuple[str, ...]:
        """One request: the rejected push keys of a 2xx answer; _Retry or _Dropped for
        other answers."""
        response = await self._http.post(
            self.url, data=data, headers=_HEADERS, allow_redirects=False
        )
        content = await treq.content(response)  # read whole: the connection can be reused
        code = response.code
        if 200 <= code < 300:
            return _rejected(content) if code == 200 else ()
        if code >= 500 or code == 429:
            raise _Retry(f"http {code}")
        raise _Dropped(f"http {code}")

    def close(self) -> Deferred[None]:
        """Close the idle kept-alive connections."""
        if self._pool is None:
            return succeed(None)  # the caller's client: the caller's connections
        return self._pool.closeCachedConnections()


def _timed_out(result: object, timeout: float) -> object:
    """addTimeout's conversion of a cancelled attempt: treq fails a cancelled request with
    ResponseNeverReceived (wrapping the CancelledError), not CancelledError, which the default
    conversion lets through; whatever the cancelled attempt failed with, it timed out."""
    if isinstance(result, Failure):
        return Failure(TimeoutError(timeout, "push gateway request"))
    return result


def _rejected(content: bytes) -> tuple[str, ...]:
    """The push keys of a 200 answer's "rejected" (a body that is not the documented JSON
    rejects nothing: the notification was taken)."""
    try:
        doc = json.loads(content)
        keys = doc.get("rejected", []) if isinstance(doc, dict) else []
    except ValueError:
        _log.warn("push gateway answered 200 with a body that is not JSON")
        return ()
    if not isinstance(keys, list):
        return ()
    return tuple(k for k in keys if isinstance(k, str))
