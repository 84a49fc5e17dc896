"""Server settings: defaults, an optional TOML file, and command-line flags over both."""

from __future__ import annotations

import math
import secrets
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from improto.limits import MAX_FRAME_LENGTH, MAX_GROUP_MEMBERS

DAY_MS = 86_400_000
_ONE_FRAME = 4 + 131_072  # a whole largest frame: length prefix + MAX_FRAME_LENGTH
_MAX_BODY = 65_535
_MAX_GROUP = MAX_GROUP_MEMBERS
_SECOND_DAYS = 1 / 86_400

# Valid ranges (inclusive) that check() enforces at start: (type, lowest, highest). int
# settings must be integers; float ones any finite number. 0 is refused wherever it would
# switch a mechanism off or make it refuse everything (a timeout, a rate, a burst, a cap);
# the upper bounds only catch typos (a value in ms or bytes where days or KiB were meant).
_RANGES: dict[str, tuple[type, float, float]] = {
    "heartbeat": (int, 1, 65_535),  # u16 seconds in HELLO_OK
    "idle_timeout": (int, 1, 65_535),
    # days, fractions allowed; at least one second, at most 100 years (spec 10.1, 11)
    "inbox_retention_days": (float, _SECOND_DAYS, 36_500),
    "history_retention_days": (float, _SECOND_DAYS, 36_500),
    "max_unacked_pushes": (int, 1, 1000),  # spec 9.3: at most 1000
    "sweep_interval_s": (float, 0.01, 86_400),
    "queue_partitions": (int, 1, 4096),
    "workers": (int, 1, 256),  # gateway processes of one supervisor (workers.MAX_WORKERS)
    # Limits
    "login_timeout_s": (float, 0.01, 3600),
    "output_high_water_bytes": (int, 1, 2**31),
    "output_hard_limit_bytes": (int, 1, 2**33),
    "slow_reader_timeout_s": (float, 0.01, 3600),
    "max_requests_in_flight": (int, 1, 65_536),
    "max_connections_per_address": (int, 1, 10**7),
    "max_prelogin_per_address": (int, 1, 10**7),
    "listen_backlog": (int, 1, 65_535),
    "send_rate": (float, 0.001, 10**6),
    "send_burst": (float, 1, 10**9),  # below 1 no SEND could ever pass
    "send_bytes_rate": (float, 1, 10**12),
    "send_bytes_burst": (float, _MAX_BODY, 10**12),  # a largest body must be able to pass
    "group_op_rate": (float, 0.0001, 10**6),
    "group_op_burst": (float, 1, 10**9),
    "added_by_others_per_day": (int, 1, 10**6),
    "state_op_rate": (float, 0.0001, 10**6),
    "state_op_burst": (float, 1, 10**9),
    "inbox_max_entries": (int, 1, 10**9),
    "inbox_max_bytes": (int, _ONE_FRAME, 2**40),  # room for a largest message
    "max_devices_per_user": (int, 1, 1024),
    "push_interval_s": (float, 0.001, 3600),
    "push_timeout_s": (float, 0.01, 600),
    "push_retries": (int, 0, 100),
    "push_max_in_flight": (int, 1, 100_000),
    "push_max_pending": (int, 1, 10**8),
    "push_ack_wait_s": (float, 0, 3600),  # 0: no notification for unacknowledged pushes
    "large_group_threshold": (int, 2, _MAX_GROUP),
}


def _check_range(name: str, value: object, kind: type, lo: float, hi: float) -> None:
    # bool is an int to Python, never a count or a duration here; NaN fails every comparison
    typed = isinstance(value, int) or (kind is float and isinstance(value, float))
    if not (
        typed
        and not isinstance(value, bool)
        and isinstance(value, int | float)
        and math.isfinite(value)
        and lo <= value <= hi
    ):
        what = "an integer" if kind is int else "a number"
        low = "1/86400 (one second)" if lo == _SECOND_DAYS else f"{lo:g}"
        raise ValueError(f"{name} must be {what} in {low}..{hi:g}, not {value!r}")


@dataclass
class Config:
    listen: list[str] = field(default_factory=lambda: ["tcp:5555:interface=127.0.0.1"])
    data_dir: str = "./var"
    jwt_secret: str | None = None  # None: read or create <data_dir>/jwt-secret
    node_id: int | None = None  # None: 0 embedded, a node leased in Redis in production
    gateway_id: str | None = None  # production: presence/routing name (None: random per start)
    heartbeat: int = 30  # seconds
    idle_timeout: int = 90  # seconds
    inbox_retention_days: float = 7.0
    history_retention_days: float = 180.0
    max_unacked_pushes: int = 1000
    sweep_interval_s: float = 600.0
    # Storage: "embedded" (SQLite under data_dir, in-process queue), "memory" (the same in
    # RAM: persistence off, nothing survives a restart; for benchmarks and demos) or
    # "production" (RabbitMQ queue, Redis inboxes/groups/dedup, HBase history).
    storage: str = "embedded"
    role: str = "all"  # all | gateway | persister (gateway/persister need production storage)
    redis: str = "127.0.0.1:6379"
    # production: seed nodes of a Redis Cluster, "host:port,host:port" (any of its nodes);
    # when set it is used instead of `redis` (docs/SERVICES.md, "Redis Cluster")
    redis_cluster: str = ""
    # Redis Cluster: before a persisted batch is acknowledged to the queue, its writes are on
    # this many replicas of each master (WAIT), else the batch is retried; 0: not waited for
    redis_wait_replicas: int = 0
    redis_wait_timeout_ms: int = 1000
    amqp: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    hbase: str = "127.0.0.1:9090"
    hbase_table: str = "improto_history"
    key_prefix: str = "im"  # Redis keys, queue names: lets deployments share services
    queue_partitions: int = 1
    # gateway processes sharing the listen port (workers.py; production storage only)
    workers: int = 1
    # Conversation state (spec 18): tell a 1:1 peer's devices when their messages were read
    read_receipts: bool = True
    # Push notifications (spec 19, spec/PUSH_GATEWAY.md): the push gateway's URL (None: no
    # notifications), the platforms devices may register, and the notifier's pacing.
    push_gateway: str | None = None
    push_platforms: list[str] = field(default_factory=lambda: ["apns", "fcm"])
    push_interval_s: float = 2.0  # at most one notification request per user this often
    push_timeout_s: float = 5.0  # a request to the gateway, then retried
    push_retries: int = 4  # retries of a failed request (backoff 0.5 s x 2^n), then dropped
    push_max_in_flight: int = 64  # requests to the gateway at once
    push_max_pending: int = 100_000  # users waiting for a notification; beyond: dropped
    # a connected device that leaves a PUSH unacknowledged this long (an app suspended in the
    # background, its socket kept) is notified as if offline; 0: never
    push_ack_wait_s: float = 5.0
    # The server API for the app's backend (spec/openapi.json): opened only with an api_key.
    api_listen: str = "tcp:5580:interface=127.0.0.1"
    api_key: str | None = None
    log_format: str = "text"  # text | json (one JSON object per line, twisted.logger)

    # Limits (docs/GUARANTEES.md, "Limits and abuse"; spec section 16). TOML keys; the
    # defaults fit a phone app. Each group is owned by the module that enforces it.
    # -- connections (session.py, app.py)
    login_timeout_s: float = 10.0  # HELLO_OK must come this soon after connecting
    output_high_water_bytes: int = 256 * 1024  # queued output: stop pushing, stop reading
    output_hard_limit_bytes: int = 8 * 1024 * 1024  # queued output: disconnect
    slow_reader_timeout_s: float = 30.0  # above the high-water mark this long: disconnect
    max_requests_in_flight: int = 32  # per connection; more are read only as others finish
    max_connections_per_address: int = 4096
    max_prelogin_per_address: int = 64  # connections of one address not yet logged in
    listen_backlog: int = 1024  # for tcp/ssl endpoints that do not set backlog= themselves
    # -- rates per user (rate_limits.py): token buckets, refilled per second. Per gateway
    # process: a user on N gateways gets up to N times these.
    send_rate: float = 20.0  # SENDs per second (a group SEND weighs 1 + members / 100)
    # an outbox flushed after a long time offline: up to a push window (1000) of messages
    send_burst: float = 2000.0
    send_bytes_rate: float = 1024 * 1024  # body bytes x receivers per second
    send_bytes_burst: float = 4 * 1024 * 1024
    group_op_rate: float = 0.5  # GROUP_CREATE / ADD / REMOVE per second
    group_op_burst: float = 600.0  # joining all of one's 500 groups at once (an import)
    added_by_others_per_day: int = 100  # groups others may add one user to, per day
    state_op_rate: float = 10.0  # READ_MARK / CONV_HIDE per second
    state_op_burst: float = 200.0  # marking many conversations read after a sync
    # -- storage (stores)
    inbox_max_entries: int = 20_000  # per user; the oldest are trimmed like expired ones
    inbox_max_bytes: int = 32 * 1024 * 1024  # per user, record bytes
    max_devices_per_user: int = 16  # online at once; positions kept for the latest 64
    # -- large groups (docs/design/large-groups.md): a group with more members than this is
    # read-diffused (its timeline, no inbox copies); small again at 90% of it or fewer
    large_group_threshold: int = 500

    def check(self) -> None:
        """Refuse combinations that cannot work, before anything starts."""
        if self.storage not in ("embedded", "memory", "production"):
            raise ValueError(
                f"storage must be embedded, memory or production, not {self.storage!r}"
            )
        if self.role not in ("all", "gateway", "persister", "notifier"):
            raise ValueError(f"role must be all, gateway, persister or notifier, not {self.role!r}")
        if self.role != "all" and self.storage != "production":
            raise ValueError("separate gateway/persister/notifier roles need storage = production")
        for name, (kind, lo, hi) in _RANGES.items():
            _check_range(name, getattr(self, name), kind, lo, hi)
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be text or json, not {self.log_format!r}")
        if self.role == "notifier" and not self.push_gateway:
            raise ValueError("role notifier needs push_gateway (the push gateway's URL)")
        if self.push_gateway is not None and not self.push_gateway.startswith(
            ("http://", "https://")
        ):
            raise ValueError(f"push_gateway must be an http(s) URL, not {self.push_gateway!r}")
        if not isinstance(self.push_platforms, list) or not all(
            isinstance(p, str) and p for p in self.push_platforms
        ):
            raise ValueError("push_platforms must be a list of platform names")
        if self.api_key is not None and len(self.api_key) < 16:
            raise ValueError("api_key must be at least 16 characters")
        if not isinstance(self.read_receipts, bool):  # TOML `true`/`false`, not "no"
            raise ValueError(f"read_receipts must be true or false, not {self.read_receipts!r}")
        if self.node_id is not None:
            _check_range("node_id", self.node_id, int, 0, 1023)
        from improto_server.workers import check as check_workers  # lazy: keeps config light

        check_workers(self)
        if self.idle_timeout <= self.heartbeat:
            raise ValueError(
                f"idle_timeout ({self.idle_timeout}) must exceed heartbeat ({self.heartbeat}):"
                " clients PING every heartbeat seconds"
            )
        if self.output_hard_limit_bytes < max(self.output_high_water_bytes, _ONE_FRAME):
            raise ValueError(
                "output_hard_limit_bytes must be at least output_high_water_bytes and one whole"
                f" frame ({_ONE_FRAME} bytes)"
            )

    @classmethod
    def from_file(cls, path: str | Path) -> Config:
        with open(path, "rb") as f:
            data = tomllib.load(f)
        return cls().merged(data, source=str(path))

    def merged(self, values: dict[str, Any], source: str = "flags") -> Config:
        """A copy with `values` (None entries skipped) applied; unknown keys are an error."""
        known = {f.name for f in fields(self)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{source}: unknown setting(s) {', '.join(sorted(unknown))}")
        out = Config(**{f.name: getattr(self, f.name) for f in fields(self)})
        for key, value in values.items():
            if value is not None:
                setattr(out, key, value)
        return out

    @property
    def inbox_caps(self) -> InboxCaps:
        return InboxCaps(self.inbox_max_entries, self.inbox_max_bytes)

    @property
    def inbox_retention_ms(self) -> int:
        return int(self.inbox_retention_days * DAY_MS)

    @property
    def history_retention_ms(self) -> int:
        return int(self.history_retention_days * DAY_MS)

    def secret(self) -> str:
        """The JWT secret: configured, or kept in the data directory (made on first use)."""
        if self.jwt_secret:
            return self.jwt_secret
        path = Path(self.data_dir) / "jwt-secret"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(secrets.token_hex(32) + "\n")
            path.chmod(0o600)
        return path.read_text().strip()


@dataclass(frozen=True, slots=True)
class InboxCaps:
    """The per-user inbox bounds the inbox stores enforce (inbox_max_entries, _bytes)."""

    max_entries: int = Config.inbox_max_entries
    max_bytes: int = Config.inbox_max_bytes

    def __post_init__(self) -> None:
        # Below one largest record (one frame), a cap would trim the entry just written.
        if self.max_entries < 1 or self.max_bytes < MAX_FRAME_LENGTH:
            raise ValueError(
                "inbox_max_entries must be at least 1 and inbox_max_bytes at least"
                f" {MAX_FRAME_LENGTH}, not {self.max_entries} and {self.max_bytes}"
            )
