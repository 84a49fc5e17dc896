"""Message ids: unique across gateways without coordination, increasing within a process.

Layout (informative in the spec): 41 bits of milliseconds since 2020-01-01Z, 10 bits of node
number, 12 bits of sequence. The top bit stays 0, so ids also fit a signed 64-bit column.
"""

from __future__ import annotations

import time
from collections.abc import Callable

EPOCH_MS = 1_577_836_800_000  # 2020-01-01T00:00:00Z
NODE_BITS = 10
SEQ_BITS = 12
MAX_NODE = (1 << NODE_BITS) - 1
_SEQ_MASK = (1 << SEQ_BITS) - 1


def wall_ms() -> int:
    """The wall clock in milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000


class IdGenerator:
    """Returns (msg_id, server_time_ms) pairs; never repeats and never goes backwards.

    If the wall clock steps back, or more than 4096 ids are taken in one millisecond, the
    generator keeps using (and then advances) its own last millisecond instead of the clock,
    so ids stay strictly increasing; server_time then runs slightly ahead until the clock
    catches up.
    """

    def __init__(self, node: int, clock_ms: Callable[[], int] = wall_ms) -> None:
        if not 0 <= node <= MAX_NODE:
            raise ValueError(f"node id must be 0..{MAX_NODE}")
        self.node = node
        self._clock_ms = clock_ms
        self._last_ms = 0
        self._seq = 0

    def next(self) -> tuple[int, int]:
        now = self._clock_ms()
        if now > self._last_ms:
            self._last_ms, self._seq = now, 0
        else:
            self._seq = (self._seq + 1) & _SEQ_MASK
            if self._seq == 0:
                self._last_ms += 1
        ms = self._last_ms
        msg_id = ((ms - EPOCH_MS) << (NODE_BITS + SEQ_BITS)) | (self.node << SEQ_BITS) | self._seq
        return msg_id, ms
