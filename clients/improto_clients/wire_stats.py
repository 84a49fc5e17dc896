"""Byte and frame counters of a client's connections, so that benchmarks and the chaos harness
can measure what crossed the wire (wire-once delivery: PROTOCOL.md section 18)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from improto.enums import FrameType
from improto.frames import Frame, OfflinePage, Push, TimelinePage

LENGTH_PREFIX = 4


@dataclass
class WireStats:
    """Counters in one direction pair. Frame counters are keyed by the type number (a
    `FrameType` compares equal to it; a type this client does not know counts under its
    number). Frame bytes include the 4-byte length prefix.

    `message_ids` (only with `track_ids`): how often each msg_id arrived in a PUSH, an
    OFFLINE_PAGE or a TIMELINE_PAGE, the ways a message is delivered (HISTORY_PAGE is a
    separate request). `timeline_messages_in`: the records of TIMELINE_PAGEs alone (large
    groups, section 20: what held ids save).
    """

    track_ids: bool = False
    bytes_in: int = 0
    bytes_out: int = 0
    frames_in: Counter[int] = field(default_factory=Counter)
    frames_out: Counter[int] = field(default_factory=Counter)
    frame_bytes_in: Counter[int] = field(default_factory=Counter)
    frame_bytes_out: Counter[int] = field(default_factory=Counter)
    messages_in: int = 0  # message records delivered by PUSH, OFFLINE_PAGE or TIMELINE_PAGE
    timeline_messages_in: int = 0  # of those, by TIMELINE_PAGE
    message_ids: Counter[int] = field(default_factory=Counter)

    def received(self, type_code: int, payload_len: int) -> None:
        self.frames_in[type_code] += 1
        self.frame_bytes_in[type_code] += payload_len + LENGTH_PREFIX

    def sent(self, type_code: int, frame_len: int) -> None:
        self.bytes_out += frame_len
        self.frames_out[type_code] += 1
        self.frame_bytes_out[type_code] += frame_len

    def delivered(self, frame: Frame) -> None:
        """Count the messages a decoded frame carries."""
        if isinstance(frame, Push):
            ids: tuple[int, ...] = (frame.message.msg_id,)
        elif isinstance(frame, OfflinePage):
            ids = tuple(m.msg_id for m in frame.messages)
        elif isinstance(frame, TimelinePage):
            ids = tuple(m.msg_id for m in frame.messages)
            self.timeline_messages_in += len(ids)
        else:
            return
        self.messages_in += len(ids)
        if self.track_ids:
            self.message_ids.update(ids)

    def repeated(self) -> dict[int, int]:
        """msg_id -> arrivals, for the ids that arrived more than once (needs track_ids)."""
        return {i: n for i, n in self.message_ids.items() if n > 1}

    @staticmethod
    def named(counter: Counter[int]) -> dict[str, int]:
        """A counter keyed by type name, for printing."""
        out: dict[str, int] = {}
        for code, n in sorted(counter.items()):
            try:
                out[FrameType(code).name] = n
            except ValueError:
                out[f"0x{code:02X}"] = n
        return out
