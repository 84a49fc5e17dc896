"""Contract backend "production": all four ports on the real services at once (RabbitMQ
queue, Redis inboxes/groups/dedup, HBase history), as `imserver --storage production` runs
them. Names derive from the test's data directory, so a restart reaches the same data; the
fixture's teardown calls destroy() to delete them. Services unreachable: skip, or fail
under CI."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from services import cleanup, require_services

from improto_server.config import Config
from improto_server.production.backend import ProductionBackend

DAY_MS = 86_400_000


class ContractProductionBackend(ProductionBackend):
    def __init__(self, data_dir: Path, clock: Any) -> None:
        require_services()
        digest = hashlib.sha1(str(Path(data_dir).resolve()).encode()).hexdigest()[:12]
        self.prefix, self.table = f"contract{digest}", f"contract_{digest}"
        config = Config(
            storage="production",
            key_prefix=self.prefix,
            hbase_table=self.table,
            inbox_retention_days=7,
            history_retention_days=180,
        )
        # The fake clock is far from wall time: HBase's own TTL would hide every cell.
        super().__init__(config, None, now_ms=clock, hbase_family_ttl=False)

    def destroy(self) -> None:
        cleanup(self.prefix, self.table)


def register(backends: dict[str, Any]) -> None:
    backends["production"] = ContractProductionBackend
