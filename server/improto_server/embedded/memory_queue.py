"""The persist queue of `--storage memory` (the PersistQueue port) on Python containers.

The in-RAM database keeps nothing across a restart, so its queue has nothing to make
durable: an accept is a dict lookup and an append, answered at the end of its turn with the
others of that turn, and the consumer takes the job objects themselves (no encoding to bytes
and back). What it keeps of the SQLite
queue's behaviour: dedup per (sender, client_msg_id) until `expire`, one consumer loop
delivering in acceptance order, a batch removed only once its handler succeeded (a failed one
is retried, in order), the same linger before a small batch, and `close()` waiting for the
handler in flight. `MemoryQueueData` holds the state, so a second queue over the same data
(a restart in the contract suite) finds the jobs the first one left.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from improto_server.embedded.consumer_loop import ConsumerLoop
from improto_server.embedded.queue import FETCH_BATCH, LINGER_S, Accept
from improto_server.model import Accepted, PersistJob, QueuedJob, StateJob
from improto_server.turn_batcher import TurnBatcher

ACCEPT_BATCH = 256  # accepts answered together at most (those of one reactor turn)

_log = Logger()


@dataclass
class MemoryQueueData:
    """What a memory queue holds: the dedup keys, in acceptance order, with the msg_id,
    server_time and wall time (ms) of their accept; the jobs not yet persisted."""

    dedup: dict[tuple[int, bytes], tuple[int, int, int]] = field(default_factory=dict)
    jobs: deque[QueuedJob] = field(default_factory=deque)


def _raise_refusal(outcome: Accepted | Exception | None) -> Accepted:
    if isinstance(outcome, Exception):
        raise outcome
    assert outcome is not None
    return outcome


class MemoryQueue(ConsumerLoop):
    """PersistQueue on a deque, consumed in order by one in-process loop."""

    def __init__(
        self,
        reactor: IReactorTime,
        now_ms: Callable[[], int],
        data: MemoryQueueData | None = None,
    ) -> None:
        super().__init__(reactor)
        self._now_ms = now_ms
        self.data = data if data is not None else MemoryQueueData()
        # Answered at the end of the turn, together, as the SQLite queue answers: answered
        # one by one, the acks leave one segment at a time and the clients' next SENDs come
        # in smaller reads, which costs more than the queue saves (docs/BENCHMARKS.md). State
        # jobs go the same way, so the deque keeps the order of the calls.
        self._accepts: TurnBatcher[Accept, Accepted | Exception | None] = TurnBatcher(
            reactor, self._accept_many, ACCEPT_BATCH, 0.0, adaptive=True
        )

    def __len__(self) -> int:
        """Jobs not yet persisted (the health check's queue depth)."""
        return len(self.data.jobs)

    def accept(self, job: PersistJob, client_msg_id: bytes) -> Deferred[Accepted]:
        return self._accepts.submit((job, client_msg_id)).addCallback(_raise_refusal)

    def accept_state(self, job: StateJob) -> Deferred[None]:
        return self._accepts.submit((job, None)).addCallback(lambda _: None)

    def _accept_many(self, items: list[Accept]) -> list[Accepted | Exception | None]:
        """Each accept in order (a later duplicate of an earlier one in the batch is seen);
        a job that does not encode gets its error back and the others go on."""
        out: list[Accepted | Exception | None] = []
        dedup, jobs, now = self.data.dedup, self.data.jobs, self._now_ms()
        for job, client_msg_id in items:
            if isinstance(job, StateJob):
                jobs.append(job)
                out.append(None)
                continue
            assert client_msg_id is not None
            m = job.message
            key = (m.sender_id, client_msg_id)
            seen = dedup.get(key)
            if seen is not None:
                out.append(Accepted(seen[0], seen[1], duplicate=True))
                continue
            try:
                job.record  # noqa: B018 - packs (so validates) the message before it is kept
            except Exception as e:
                out.append(e)
                continue
            dedup[key] = (m.msg_id, m.server_time, now)
            jobs.append(job)
            out.append(Accepted(m.msg_id, m.server_time, duplicate=False))
        self._wake()
        return out

    def expire(self, cutoff: int) -> int:
        """Forget the dedup keys stored before `cutoff` (ms), oldest first; returns how many
        went. (Keys are in acceptance order: a wall clock that stepped back keeps a few a
        little longer.)"""
        dedup = self.data.dedup
        old = []
        for key, (_, _, stored) in dedup.items():
            if stored >= cutoff:
                break
            old.append(key)
        for key in old:
            del dedup[key]
        return len(old)

    async def _run(self) -> None:
        jobs = self.data.jobs
        try:
            while not self._stopping:
                if not jobs:
                    self._idle = Deferred()
                    await self._idle  # woken by an accept or close()
                    await self._pause(LINGER_S)  # more jobs join the first one
                    continue
                batch = len(jobs)
                n = min(batch, self._max_batch)
                while not await self._deliver([jobs[i] for i in range(n)]):
                    if self._stopping:
                        return
                    await self._pause()
                for _ in range(n):
                    jobs.popleft()
                if n == batch and batch < FETCH_BATCH:  # no backlog: let the next one fill
                    await self._pause(LINGER_S)
        finally:
            self._stopped.set()

    async def _deliver(self, batch: list[QueuedJob]) -> bool:
        """Hand the jobs to the handler as one batch; True once it succeeded."""
        assert self._handler is not None
        try:
            await self._handler(batch)
        except Exception:
            _log.failure("persisting {n} queued jobs failed; will retry", n=len(batch))
            return False
        return True
