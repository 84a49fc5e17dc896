"""The fake clock of store tests and the retentions they run with."""

from __future__ import annotations

import time

DAY_MS = 86_400_000
INBOX_RETENTION_MS = 7 * DAY_MS  # imserver's defaults (--inbox/--history-retention-days)
HISTORY_RETENTION_MS = 180 * DAY_MS
START_MS = 1_750_000_000_000  # the fake clock's start: a plausible wall-clock time


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class FakeClock:
    """A millisecond clock (a `now_ms` callable) that moves only when a test says so."""

    def __init__(self, now: int = START_MS) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ms: int) -> None:
        self.now += ms
