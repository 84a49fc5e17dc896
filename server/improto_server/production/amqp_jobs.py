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

    P.persist.<i>     durable classic queue, i in 0..partitions-1; arguments
                      x-single-active-consumer (one persister at a time per queue, the others
                      stand by) and x-dead-letter-exchange = P.persist.dlx.
    P.persist.dlx     durable fanout exchange, bound to P.persist.dead: jobs that cannot even
                      be decoded are dead-lettered there and kept for inspection.
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
