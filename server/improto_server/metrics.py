"""Prometheus metrics of one server process, and the one-line helpers that record them.

Every metric lives in REGISTRY (not prometheus_client's global one, so that importing this
module twice in a test process or beside another user of the library cannot collide), with
the process and platform collectors. `/metrics` (MetricsResource) renders it; it needs no
API key, like /healthz: listen on an address only the scrapers reach.

Call sites stay one line (`metrics.frame_in(t)`); the hot ones (frames, sends) count in
plain ints (PlainCounts) rendered as counters when scraped, so a call is one dict update.

    improto_connections{state}                 gauge    connections by state (session.py)
    improto_connections_closed_total{reason}   counter  CLOSE reasons and drops
    improto_frames_received_total{type}        counter  frames read, by frame type
    improto_frames_sent_total{type}            counter  frames written, by frame type
    improto_sends_accepted_total{duplicate}    counter  SENDs acked (a retry: duplicate)
    improto_sends_refused_total{code}          counter  SENDs refused, by error code
    improto_push_window_stalls_total           counter  pushes held back by a full window
    improto_sync_hints_total                   counter  SYNC_HINTs sent
    improto_queue_depth                        gauge    jobs (AMQP: messages) waiting to persist
    improto_persist_lag_seconds                gauge    age of the oldest message of the last batch
    improto_persist_batch_size                 histogram jobs per persister batch
    improto_persist_batch_seconds              histogram time to write one batch
    improto_storage_errors_total{service}      counter  failed store calls: sqlite, redis, ...
    improto_notifications_total{outcome}       counter  push gateway requests by outcome
    improto_api_requests_total{route,status}   counter  server API requests
    improto_api_request_seconds{route}         histogram server API latency
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TypeVar

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from improto.enums import FrameType
from improto.errors import ErrorCode

_T = TypeVar("_T")

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)
PlatformCollector(registry=REGISTRY)
GCCollector(registry=REGISTRY)

CONNECTION_STATES = ("prelogin", "online", "closing")

CONNECTIONS = Gauge("improto_connections", "Connections by state.", ["state"], registry=REGISTRY)
CONNECTIONS_CLOSED = Counter(
    "improto_connections_closed",
    "Connections closed, by CLOSE reason (or 'dropped': closed without CLOSE).",
    ["reason"],
    registry=REGISTRY,
)
PUSH_WINDOW_STALLS = Counter(
    "improto_push_window_stalls",
    "Pushes not written at once because the connection's push window was full.",
    registry=REGISTRY,
)
SYNC_HINTS = Counter("improto_sync_hints", "SYNC_HINT frames sent.", registry=REGISTRY)
QUEUE_DEPTH = Gauge(
    "improto_queue_depth",
    "Jobs waiting in the persist queue (RabbitMQ: messages, each one or more jobs), as of the"
    " last health check.",
    registry=REGISTRY,
)
PERSIST_LAG = Gauge(
    "improto_persist_lag_seconds",
    "Age of the oldest message of the last batch the persister wrote, when it was written.",
    registry=REGISTRY,
)
PERSIST_BATCH_SIZE = Histogram(
    "improto_persist_batch_size",
    "Jobs per persister batch.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    registry=REGISTRY,
)
PERSIST_BATCH_SECONDS = Histogram(
    "improto_persist_batch_seconds",
    "Time to write one persister batch to the stores.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
STORAGE_ERRORS = Counter(
    "improto_storage_errors",
    "Failed storage calls, by service (sqlite, redis, rabbitmq, hbase).",
    ["service"],
    registry=REGISTRY,
)
NOTIFICATIONS = Counter(
    "improto_notifications",
    "Requests to the push gateway, by outcome (NOTIFICATION_OUTCOMES).",
    ["outcome"],
    registry=REGISTRY,
)
API_REQUESTS = Counter(
    "improto_api_requests",
    "Server API requests, by route and HTTP status.",
    ["route", "status"],
    registry=REGISTRY,
)
API_SECONDS = Histogram(
    "improto_api_request_seconds",
    "Server API request latency, by route.",
    ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)

# sent: the gateway took it (200); rejected: it reported dead tokens (counted per request);
# retry: a failed attempt that is retried; failed: given up after the retries or on a 4xx;
# dropped: never sent (too many users pending).
NOTIFICATION_OUTCOMES = ("sent", "rejected", "retry", "failed", "dropped")


def _label(name: str) -> str:
    return name.lower()


class PlainCounts(Collector):
    """A counter family with one label, for call sites that run per frame: a plain int per
    label value, rendered when scraped (a prometheus_client Counter takes a lock and a few
    calls per increment, and the reactor thread is the only one counting here). Keys outside
    `names` are counted under `other(key)`."""

    def __init__(
        self, name: str, doc: str, label: str, names: Mapping[int, str], other: Callable[[int], str]
    ) -> None:
        self.name, self.doc, self.label = name, doc, label
        self.names = dict(names)
        self.counts: dict[int, int] = dict.fromkeys(self.names, 0)  # every value shows, at 0
        self.other = other
        self.others: dict[str, int] = {}

    def inc(self, key: int) -> None:
        counts = self.counts
        if key in counts:
            counts[key] += 1
        else:
            label = self.other(key)
            self.others[label] = self.others.get(label, 0) + 1

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.doc, labels=[self.label])
        totals: dict[str, int] = {}
        for key, n in self.counts.items():
            totals[self.names[key]] = totals.get(self.names[key], 0) + n
        for label, n in self.others.items():
            totals[label] = totals.get(label, 0) + n
        for label, n in totals.items():
            family.add_metric([label], n)
        yield family


FRAMES_IN = PlainCounts(
    "improto_frames_received", "Frames read, by frame type.", "type",
    {t.value: _label(t.name) for t in FrameType}, lambda _: "unknown",
)  # fmt: skip
FRAMES_OUT = PlainCounts(
    "improto_frames_sent", "Frames written, by frame type.", "type",
    {t.value: _label(t.name) for t in FrameType}, lambda _: "unknown",
)  # fmt: skip
SENDS_ACCEPTED = PlainCounts(
    "improto_sends_accepted",
    "SENDs acknowledged (duplicate: a retry of an accepted client_msg_id).",
    "duplicate", {0: "false", 1: "true"}, str,
)  # fmt: skip
SENDS_REFUSED = PlainCounts(
    "improto_sends_refused", "SENDs refused, by error code.", "code",
    {c.value: _label(c.name) for c in ErrorCode}, str,
)  # fmt: skip
for _counts in (FRAMES_IN, FRAMES_OUT, SENDS_ACCEPTED, SENDS_REFUSED):
    REGISTRY.register(_counts)
_CONNECTIONS = {s: CONNECTIONS.labels(s) for s in CONNECTION_STATES}
for _outcome in NOTIFICATION_OUTCOMES:  # every outcome shows, at 0, from the start
    NOTIFICATIONS.labels(_outcome)


# ------------------------------------------------------------------------- sessions


def connection_state(old: str | None, new: str | None) -> None:
    """A connection moved from state `old` to `new` (None: not yet open / gone), both in
    CONNECTION_STATES."""
    if old is not None:
        _CONNECTIONS[old].dec()
    if new is not None:
        _CONNECTIONS[new].inc()


def connection_closed(reason: str) -> None:
    """A connection ended: the CLOSE reason's name (`CloseReason.X.name`) or 'dropped'."""
    CONNECTIONS_CLOSED.labels(_label(reason)).inc()


frame_in = FRAMES_IN.inc  # frame_in(frame_type): -1 (too short for a type) is "unknown"
frame_out = FRAMES_OUT.inc


def send_accepted(duplicate: bool) -> None:
    SENDS_ACCEPTED.inc(1 if duplicate else 0)


send_refused = SENDS_REFUSED.inc  # send_refused(code)


def push_window_stall() -> None:
    PUSH_WINDOW_STALLS.inc()


def sync_hint() -> None:
    SYNC_HINTS.inc()


# ------------------------------------------------------------------------- storage


def queue_depth(jobs: int) -> None:
    QUEUE_DEPTH.set(jobs)


def persist_batch(jobs: int, seconds: float, lag_s: float | None) -> None:
    """A persister batch of `jobs` was written in `seconds`; `lag_s`: the age of its oldest
    message then (None: a batch of state changes only)."""
    PERSIST_BATCH_SIZE.observe(jobs)
    PERSIST_BATCH_SECONDS.observe(seconds)
    if lag_s is not None:
        PERSIST_LAG.set(max(0.0, lag_s))


_SERVICES = (  # module name prefixes of the storage adapters -> the service they talk to
    ("improto_server.embedded.", "sqlite"),
    ("improto_server.production.redis_", "redis"),
    ("improto_server.production.rabbit_", "rabbitmq"),
    ("improto_server.production.hbase_", "hbase"),
)


def service_of(store: object) -> str:
    """The service behind a store object (its class's module), e.g. 'redis'."""
    module = type(store).__module__
    for prefix, service in _SERVICES:
        if module.startswith(prefix):
            return service
    return "other"


def storage_error(service: str) -> None:
    STORAGE_ERRORS.labels(service).inc()


def counting_errors(d: Deferred[_T], store: object) -> Deferred[_T]:
    """`d` (a call on `store`), its failure counted as a storage error of its service."""

    def count(failure: Failure) -> Failure:
        storage_error(service_of(store))
        return failure

    return d.addErrback(count)


# ------------------------------------------------------------------- notifications, API


def notification(outcome: str, n: int = 1) -> None:
    """`n` push gateway requests ended with `outcome` (one of NOTIFICATION_OUTCOMES)."""
    NOTIFICATIONS.labels(outcome).inc(n)


def api_request(route: str, status: int, seconds: float) -> None:
    """A server API request on `route` (its template: 'POST /v1/messages') answered."""
    API_REQUESTS.labels(route, str(status)).inc()
    API_SECONDS.labels(route).observe(seconds)


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one sample (tests, the benchmark): 0 if it has none yet."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


class MetricsResource(Resource):
    """GET /metrics: the registry in the Prometheus text format (rendered on the reactor:
    a few hundred samples take well under a millisecond)."""

    isLeaf = True

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", CONTENT_TYPE_LATEST.encode())
        return generate_latest(REGISTRY)
