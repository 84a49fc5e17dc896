"""The metrics (server/improto_server/metrics.py): the helpers move their samples, the
persister records its batches and storage errors, and /metrics renders the registry in the
Prometheus text format over real HTTP."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest_twisted
from prometheus_client.parser import text_string_to_metric_families
from treq.client import HTTPClient

from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from improto.enums import ConvKind, FrameType
from improto.errors import ErrorCode
from improto.frames import Message
from improto_server import metrics
from improto_server.embedded.backend import SQLiteBackend
from improto_server.ids import wall_ms
from improto_server.model import PersistJob
from improto_server.persister import Persister
from improto_server.production.hbase_history import HBaseHistory
from improto_server.production.rabbit_queue import RabbitQueue
from improto_server.production.redis_inbox import RedisInbox

# Every metric the module documents, as its text-format family name.
FAMILIES = {
    "improto_connections", "improto_connections_closed", "improto_frames_received",
    "improto_frames_sent", "improto_sends_accepted", "improto_sends_refused",
    "improto_push_window_stalls", "improto_sync_hints", "improto_queue_depth",
    "improto_persist_lag_seconds", "improto_persist_batch_size",
    "improto_persist_batch_seconds", "improto_storage_errors", "improto_notifications",
    "improto_api_requests", "improto_api_request_seconds",
}  # fmt: skip


def test_the_helpers_move_their_samples() -> None:
    s = metrics.sample
    before = s("improto_frames_received_total", {"type": "send"})
    metrics.frame_in(FrameType.SEND)
    metrics.frame_in(FrameType.SEND)
    assert s("improto_frames_received_total", {"type": "send"}) == before + 2
    unknown = s("improto_frames_sent_total", {"type": "unknown"})
    metrics.frame_out(0x7E)  # not a frame type: one label for all of them
    assert s("improto_frames_sent_total", {"type": "unknown"}) == unknown + 1

    refused = s("improto_sends_refused_total", {"code": "rate_limited"})
    metrics.send_refused(ErrorCode.RATE_LIMITED)
    assert s("improto_sends_refused_total", {"code": "rate_limited"}) == refused + 1
    dup = s("improto_sends_accepted_total", {"duplicate": "true"})
    metrics.send_accepted(True)
    assert s("improto_sends_accepted_total", {"duplicate": "true"}) == dup + 1

    online = s("improto_connections", {"state": "online"})
    metrics.connection_state(None, "prelogin")
    metrics.connection_state("prelogin", "online")
    assert s("improto_connections", {"state": "online"}) == online + 1
    metrics.connection_state("online", None)
    assert s("improto_connections", {"state": "online"}) == online
    kicked = s("improto_connections_closed_total", {"reason": "kicked"})
    metrics.connection_closed("KICKED")
    assert s("improto_connections_closed_total", {"reason": "kicked"}) == kicked + 1

    stalls, hints = s("improto_push_window_stalls_total"), s("improto_sync_hints_total")
    metrics.push_window_stall()
    metrics.sync_hint()
    assert s("improto_push_window_stalls_total") == stalls + 1
    assert s("improto_sync_hints_total") == hints + 1

    metrics.queue_depth(17)
    assert s("improto_queue_depth") == 17
    for outcome in metrics.NOTIFICATION_OUTCOMES:  # shown at 0 before the first request
        assert metrics.REGISTRY.get_sample_value(
            "improto_notifications_total", {"outcome": outcome}
        ) is not None  # fmt: skip
    sent = s("improto_notifications_total", {"outcome": "sent"})
    metrics.notification("sent", 3)
    assert s("improto_notifications_total", {"outcome": "sent"}) == sent + 3

    route = {"route": "POST /v1/messages", "status": "200"}
    calls = s("improto_api_requests_total", route)
    metrics.api_request("POST /v1/messages", 200, 0.004)
    assert s("improto_api_requests_total", route) == calls + 1


def test_stores_are_named_by_the_service_behind_them(tmp_path: Path) -> None:
    backend = SQLiteBackend(tmp_path / "x.sqlite3", reactor=reactor)  # never started
    assert {metrics.service_of(p) for p in (backend.inbox, backend.history, backend.queue,
                                            backend.conversations)} == {"sqlite"}  # fmt: skip
    # the adapters' classes, not connected: only the type matters
    assert metrics.service_of(RedisInbox.__new__(RedisInbox)) == "redis"
    assert metrics.service_of(HBaseHistory.__new__(HBaseHistory)) == "hbase"
    assert metrics.service_of(RabbitQueue.__new__(RabbitQueue)) == "rabbitmq"
    assert metrics.service_of(object()) == "other"


@pytest_twisted.async_yield_fixture()
async def backend(tmp_path: Path) -> AsyncIterator[SQLiteBackend]:
    b = SQLiteBackend(tmp_path / "improto.sqlite3", reactor=reactor)
    await b.start()
    yield b
    await b.close()


def _job(msg_id: int, server_time: int) -> PersistJob:
    m = Message(msg_id, server_time, 1, "phone", ConvKind.USER, 2, 1, b"k" * 16, b"hello")
    return PersistJob(m, (1, 2))


@pytest_twisted.ensureDeferred
async def test_the_persister_records_batches_lag_and_storage_errors(
    backend: SQLiteBackend,
) -> None:
    s = metrics.sample
    persister = Persister(backend.queue, backend.inbox, backend.history, backend.conversations)
    batches = s("improto_persist_batch_size_count")
    jobs = s("improto_persist_batch_size_sum")
    five_s_ago = wall_ms() - 5000
    await persister.handle([_job(10, five_s_ago), _job(11, wall_ms())])
    assert s("improto_persist_batch_size_count") == batches + 1
    assert s("improto_persist_batch_size_sum") == jobs + 2
    assert s("improto_persist_batch_seconds_count") >= 1
    assert 5 <= s("improto_persist_lag_seconds") < 60  # the oldest message of the batch

    errors = s("improto_storage_errors_total", {"service": "sqlite"})
    await backend.close()  # the stores now refuse every call
    try:
        await persister.handle([_job(12, wall_ms())])
    except RuntimeError:
        pass
    else:
        raise AssertionError("a batch on a closed database must fail")
    assert s("improto_storage_errors_total", {"service": "sqlite"}) >= errors + 1


@pytest_twisted.ensureDeferred
async def test_metrics_render_in_the_prometheus_text_format() -> None:
    root = metrics.MetricsResource()
    port = reactor.listenTCP(0, Site(root), interface="127.0.0.1")  # type: ignore[attr-defined]
    http = HTTPClient(Agent(reactor, pool=HTTPConnectionPool(reactor, persistent=False)))
    try:
        metrics.frame_in(FrameType.PING)
        resp = await http.get(f"http://127.0.0.1:{port.getHost().port}/")
        assert resp.code == 200
        assert resp.headers.getRawHeaders("content-type")[0].startswith("text/plain")
        text = (await resp.content()).decode()
    finally:
        await port.stopListening()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert FAMILIES <= families.keys(), FAMILIES - families.keys()
    assert "process_cpu_seconds" in families  # the process collector is registered too
    ping = [x for x in families["improto_frames_received"].samples if x.labels == {"type": "ping"}]
    assert ping and ping[0].value >= 1
