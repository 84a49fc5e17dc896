"""MQTT 3.1.1 packets for the load generators: pure functions returning bytes (precomputable),
and an incremental splitter of the byte stream into packets.

Fixed header: type << 4 | flags, then the remaining length as a base-128 varint (1-4 bytes);
packet ids are u16 big-endian; strings (topics, client ids) are u16-length-prefixed UTF-8.
"""

from __future__ import annotations

import struct

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
MAX_REMAINING = 268_435_455  # 4 varint bytes
_U16 = struct.Struct(">H")
_PUBACK = bytes([PUBACK << 4, 2])


def encode_length(n: int) -> bytes:
    """The remaining-length varint: 7 bits per byte, least significant first, high bit = more."""
    if not 0 <= n <= MAX_REMAINING:
        raise ValueError(f"remaining length {n} out of range")
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | 0x80 if n else byte)
        if not n:
            return bytes(out)


def _string(s: str) -> bytes:
    raw = s.encode()
    return _U16.pack(len(raw)) + raw


def _packet(type_: int, flags: int, body: bytes) -> bytes:
    return bytes([type_ << 4 | flags]) + encode_length(len(body)) + body


def connect(client_id: str, clean_session: bool = True, keepalive: int = 60) -> bytes:
    """CONNECT, protocol level 4 (3.1.1), no will, no credentials."""
    flags = 0x02 if clean_session else 0x00
    header = _string("MQTT") + bytes([4, flags]) + _U16.pack(keepalive)
    return _packet(CONNECT, 0, header + _string(client_id))


def subscribe(packet_id: int, topic: str, qos: int = 1) -> bytes:
    """SUBSCRIBE to one topic filter (fixed-header flags are 0b0010 by the spec)."""
    return _packet(SUBSCRIBE, 0x02, _U16.pack(packet_id) + _string(topic) + bytes([qos]))


def publish(
    topic: str, payload: bytes, qos: int = 1, packet_id: int = 1, dup: bool = False
) -> bytes:
    """PUBLISH, not retained; the packet id is written only for qos > 0."""
    flags = (0x08 if dup else 0) | qos << 1
    variable = _string(topic) + (_U16.pack(packet_id) if qos else b"")
    return _packet(PUBLISH, flags, variable + payload)


def puback(packet_id: int) -> bytes:
    return _PUBACK + _U16.pack(packet_id)


def pingreq() -> bytes:
    return bytes([PINGREQ << 4, 0])


def disconnect() -> bytes:
    return bytes([DISCONNECT << 4, 0])


def parse_publish(flags: int, body: bytes) -> tuple[str, int | None, bytes]:
    """A PUBLISH body: (topic, packet id or None for qos 0, payload)."""
    end = 2 + _U16.unpack_from(body)[0]
    topic = body[2:end].decode()
    if not (flags >> 1) & 3:
        return topic, None, body[end:]
    return topic, _U16.unpack_from(body, end)[0], body[end + 2 :]


def packet_id(body: bytes) -> int:
    """The packet id that opens a PUBACK, SUBACK (and other ack) body."""
    return int(_U16.unpack_from(body)[0])


def connack_code(body: bytes) -> int:
    """CONNACK return code (0: accepted); body[0] bit 0 is session-present."""
    return body[1]


def _header(data: bytes, pos: int, size: int) -> tuple[int, int]:
    """(remaining length, body start) of the packet at pos; (-1, bytes needed) if incomplete."""
    length, shift, i = 0, 0, pos + 1
    while True:
        if i >= size:
            return -1, i - pos + 1
        byte = data[i]
        length |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return length, i
        shift += 7
        if shift > 21:
            raise ValueError("malformed remaining length (more than 4 bytes)")


class Splitter:
    """Cuts one connection's stream into (packet type, flags, body). Complete packets are sliced
    straight from the read; only a trailing partial packet is kept, until it is complete."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._need = 0

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return []
            data = bytes(buf)
            buf.clear()
        out: list[tuple[int, int, bytes]] = []
        size, pos = len(data), 0
        while pos < size:
            length, start = _header(data, pos, size)
            if length < 0:
                self._need = start
                break
            end = start + length
            if end > size:
                self._need = end - pos
                break
            first = data[pos]
            out.append((first >> 4, first & 0x0F, data[start:end]))
            pos = end
        if pos < size:
            buf += memoryview(data)[pos:]
        return out
