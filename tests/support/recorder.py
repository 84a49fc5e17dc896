"""A persist-queue consumer for tests: records every batch handed over, fails on request."""

from __future__ import annotations

from collections.abc import Sequence

from twisted.internet.defer import Deferred, fail, succeed

from improto_server.model import PersistJob


class Recorder:
    """A batch handler that records every delivery; the first `fail[msg_id]` batches holding
    that job fail (the whole batch, as a store write covering it would)."""

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.calls: list[int] = []  # msg_id of every job handed over, failed attempts too
        self.done: list[PersistJob] = []  # jobs whose handler call succeeded
        self.batches: list[int] = []  # the size of every batch handed over
        self._fail = dict(fail or {})

    def __call__(self, batch: Sequence[PersistJob]) -> Deferred[None]:
        assert batch, "a batch is never empty"
        self.batches.append(len(batch))
        failing = []
        for job in batch:
            mid = job.message.msg_id
            self.calls.append(mid)
            if self._fail.get(mid, 0) > 0:
                self._fail[mid] -= 1
                failing.append(mid)
        if failing:
            return fail(RuntimeError(f"handler failure for {failing} (on purpose)"))
        self.done.extend(batch)
        return succeed(None)

    def done_ids(self) -> list[int]:
        return [j.message.msg_id for j in self.done]
