"""Persistence jobs as AMQP messages: message types and bodies, and the partition queues.

A message of type BATCH_TYPE or MIXED_TYPE carries one or more jobs (`pack_jobs`: each job's
bytes behind a big-endian u32 length); one of type JOB_TYPE, or of no type (what older versions
published), carries exactly one PersistJob. A job's own bytes are `PersistJob.to_bytes()` or
`StateJob.to_bytes()`, told apart by their first byte (model.job_from_bytes; versioned, older
formats read too). A batch with a StateJob in it is published as MIXED_TYPE, one of messages
only as BATCH_TYPE, which versions before state jobs still read: during an upgrade (new
gateways before new persisters) only the conversation-state changes would be refused (dead-
lettered by the older persister), never messages that travel alone.

Broker layout (P = the prefix), declared by RabbitQueue:

    P.persist.<i>     durable quorum queue, i in 0..partitions-1; arguments
                      x-single-active-consumer (one persister at a time per queue, the others
                      stand by), x-dead-letter-exchange = P.persist.dlx, and at-least-once
                      dead-lettering (x-dead-letter-strategy, which needs x-overflow
                      reject-publish; no length limit is set, so nothing is ever rejected).
    P.persist.dlx     durable fanout exchange, bound to P.persist.dead (a durable quorum queue):
                      jobs that cannot even be decoded (e.g. a newer job type met by an older
                      persister during an upgrade) are dead-lettered there and kept.

and by RabbitNotifyQueue P.notify, a durable quorum queue with x-single-active-consumer. The
arguments are below (persist_queue_arguments ...). RabbitMQ compares them with those of a
queue that exists already: any difference (a classic queue of an earlier version) is a 406
PRECONDITION_FAILED, see amqp_connection.declare_queue.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from improto_server.model import ConvKey, PersistJob, QueuedJob, job_from_bytes

JOB_TYPE = "improto.persist.v1"  # the body is one PersistJob
BATCH_TYPE = "improto.persist.v2"  # the body is pack_jobs() of one or more PersistJobs
MIXED_TYPE = "improto.persist.v3"  # pack_jobs() of one or more jobs, StateJobs among them
_LEN = 4  # bytes of a job's length in a batch body

# The queue arguments (docs/SERVICES.md, "Quorum queues"). Quorum queues replicate over the
# broker's cluster nodes (a single node works too); a publisher confirm comes once a majority
# of a queue's replicas has the message on disk. No x-delivery-limit: on RabbitMQ 3.x a quorum
# queue without one redelivers a failing job forever, as a classic queue does (4.x applies a
# default of 20 unless a policy lifts it: docs/SERVICES.md).
QUEUE_TYPE = "quorum"


def persist_queue_arguments(dead_exchange: str) -> dict[str, object]:
    """The arguments of every partition queue P.persist.<i>."""
    return {
        "x-queue-type": QUEUE_TYPE,
        "x-single-active-consumer": True,
        "x-dead-letter-exchange": dead_exchange,
        # A dead-lettered job stays in its persist queue until P.persist.dead confirms it:
        # at-most-once (the default) would drop it if the dead queue was unreachable.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",  # required by at-least-once; no length limit is set
    }


DEAD_QUEUE_ARGUMENTS: dict[str, object] = {"x-queue-type": QUEUE_TYPE}
NOTIFY_QUEUE_ARGUMENTS: dict[str, object] = {
    "x-queue-type": QUEUE_TYPE,
    "x-single-active-consumer": True,
}


@dataclass(frozen=True, slots=True)
class QueueNames:
    partitions: tuple[str, ...]
    dead_exchange: str
    dead_queue: str


def queue_names(prefix: str, partitions: int) -> QueueNames:
    """The broker objects `RabbitQueue(prefix=prefix, partitions=partitions)` declares."""
    return QueueNames(
        tuple(f"{prefix}.persist.{i}" for i in range(partitions)),
        f"{prefix}.persist.dlx",
        f"{prefix}.persist.dead",
    )


def partition_of(key: ConvKey | str, partitions: int) -> int:
    """The queue index of a conversation: a hash that is the same in every process."""
    return zlib.crc32(str(key).encode()) % partitions


def pack_jobs(jobs: Sequence[bytes]) -> bytes:
    """A batch message body: each job's bytes behind a big-endian u32 length."""
    return b"".join(len(job).to_bytes(_LEN, "big") + job for job in jobs)


def split_jobs(body: bytes) -> list[bytes]:
    """The jobs' bytes in a pack_jobs() body; ValueError unless it splits exactly."""
    jobs: list[bytes] = []
    pos = 0
    while pos < len(body):
        if pos + _LEN > len(body):
            raise ValueError("truncated job length")
        n = int.from_bytes(body[pos : pos + _LEN], "big")
        pos += _LEN
        if n == 0 or pos + n > len(body):
            raise ValueError(f"job of {n} bytes at {pos} does not fit the body")
        jobs.append(body[pos : pos + n])
        pos += n
    if not jobs:
        raise ValueError("empty batch")
    return jobs


def unpack_jobs(body: bytes) -> list[QueuedJob]:
    """The jobs of a pack_jobs() body; ValueError unless it splits exactly."""
    return [job_from_bytes(data) for data in split_jobs(body)]


def decode_message(msg_type: str | None, body: bytes) -> list[QueuedJob]:
    """The jobs of a message of `msg_type`; ValueError (CorruptRecord included) if malformed."""
    if msg_type in (BATCH_TYPE, MIXED_TYPE):
        return unpack_jobs(body)
    return [PersistJob.from_bytes(body)]
