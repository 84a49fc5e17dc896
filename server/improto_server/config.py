"""Server settings: defaults, an optional TOML file, and command-line flags over both."""

from __future__ import annotations

import secrets
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DAY_MS = 86_400_000


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
    amqp: str = "amqp://guest:guest@127.0.0.1:5672/%2F"
    hbase: str = "127.0.0.1:9090"
    hbase_table: str = "improto_history"
    key_prefix: str = "im"  # Redis keys, queue names: lets deployments share services
    queue_partitions: int = 1

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
    # -- rates per user (rate_limits.py): token buckets, refilled per second
    send_rate: float = 20.0  # SENDs per second (a group SEND weighs 1 + members / 100)
    send_burst: float = 100.0
    send_bytes_rate: float = 1024 * 1024  # body bytes x receivers per second
    send_bytes_burst: float = 4 * 1024 * 1024
    group_op_rate: float = 0.5  # GROUP_CREATE / ADD / REMOVE per second
    group_op_burst: float = 20.0
    added_by_others_per_day: int = 100  # groups others may add one user to, per day
    # -- storage (stores)
    inbox_max_entries: int = 20_000  # per user; the oldest are trimmed like expired ones
    inbox_max_bytes: int = 32 * 1024 * 1024  # per user, record bytes
    max_devices_per_user: int = 16  # online at once; positions kept for the latest 64

    def check(self) -> None:
        """Refuse combinations that cannot work, before anything starts."""
        if self.storage not in ("embedded", "memory", "production"):
            raise ValueError(
                f"storage must be embedded, memory or production, not {self.storage!r}"
            )
        if self.role not in ("all", "gateway", "persister"):
            raise ValueError(f"role must be all, gateway or persister, not {self.role!r}")
        if self.role != "all" and self.storage != "production":
            raise ValueError("separate gateway/persister roles need storage = production")

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
