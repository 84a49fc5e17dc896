"""Unit tests of the benchmark wire modules: bench/mqtt_wire.py, bench/bare_relay.py and
bench/abuse_wire.py."""

from __future__ import annotations

import struct
import time

import pytest

from twisted.internet.testing import StringTransport

from bench import abuse_wire as aw
from bench import bare_relay
from bench import mqtt_wire as m
from improto.codec import encode
from improto.frames import Ping

# --- mqtt_wire


@pytest.mark.parametrize(
    ("n", "encoded"),
    [
        (0, b"\x00"),
        (127, b"\x7f"),
        (128, b"\x80\x01"),
        (16383, b"\xff\x7f"),
        (16384, b"\x80\x80\x01"),
        (2_097_151, b"\xff\xff\x7f"),
        (2_097_152, b"\x80\x80\x80\x01"),
        (268_435_455, b"\xff\xff\xff\x7f"),
    ],
)
def test_remaining_length_edges(n: int, encoded: bytes) -> None:
    assert m.encode_length(n) == encoded
    packet = bytes([m.PUBACK << 4]) + encoded + b"x" * min(n, 20_000)
    if n <= 20_000:  # the splitter reads the same length back
        assert m.Splitter().feed(packet) == [(m.PUBACK, 0, b"x" * n)]


def test_remaining_length_out_of_range() -> None:
    with pytest.raises(ValueError):
        m.encode_length(268_435_456)
    with pytest.raises(ValueError):
        m.Splitter().feed(b"\x30\x80\x80\x80\x80\x01")


@pytest.mark.parametrize("size", [0, 1, 100, 150, 16_000, 20_000])
def test_publish_round_trip(size: int) -> None:
    payload = bytes(range(256)) * (size // 256) + bytes(size % 256)
    packet = m.publish("u/42", payload, qos=1, packet_id=513, dup=True)
    [(kind, flags, body)] = m.Splitter().feed(packet)
    assert kind == m.PUBLISH and flags == 0x08 | 0x02
    assert m.parse_publish(flags, body) == ("u/42", 513, payload)


def test_publish_qos0_has_no_packet_id() -> None:
    [(kind, flags, body)] = m.Splitter().feed(m.publish("t/é", b"hi", qos=0))
    assert (kind, flags) == (m.PUBLISH, 0)
    assert body == b"\x00\x04t/\xc3\xa9hi"
    assert m.parse_publish(flags, body) == ("t/é", None, b"hi")


def test_split_at_every_byte() -> None:
    """Every split point of a stream of several packets yields the same packets."""
    stream = (
        m.publish("a", b"x" * 200, packet_id=1)
        + m.puback(7)
        + bytes([m.PINGRESP << 4, 0])
        + m.publish("b/c", b"", packet_id=65535)
    )
    want = m.Splitter().feed(stream)
    assert [k for k, _, _ in want] == [m.PUBLISH, m.PUBACK, m.PINGRESP, m.PUBLISH]
    for cut in range(len(stream) + 1):
        splitter = m.Splitter()
        assert splitter.feed(stream[:cut]) + splitter.feed(stream[cut:]) == want
    splitter = m.Splitter()
    assert [p for i in range(len(stream)) for p in splitter.feed(stream[i : i + 1])] == want


def test_fixed_packets() -> None:
    assert m.puback(0x0102) == b"\x40\x02\x01\x02"
    assert m.pingreq() == b"\xc0\x00"
    assert m.disconnect() == b"\xe0\x00"
    assert m.subscribe(5, "u/1", 1) == b"\x82\x08\x00\x05\x00\x03u/1\x01"
    # CONNECT: "MQTT", level 4, flags (clean session bit 1), keepalive 60, client id
    assert m.connect("c1", clean_session=True) == (
        b"\x10\x0e\x00\x04MQTT\x04\x02\x00\x3c\x00\x02c1"
    )
    assert m.connect("c1", clean_session=False, keepalive=0)[9:12] == b"\x00\x00\x00"


# --- bare_relay


def frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def login(user: int, group: int = 0) -> bytes:
    return frame(struct.pack(">QQ", user, group))


def routed(kind: int, target: int, body: bytes = b"msg") -> bytes:
    return frame(struct.pack(">BQ", kind, target) + body)


class Relay:
    """A RelayFactory with connections on StringTransports."""

    def __init__(self) -> None:
        self.factory = bare_relay.RelayFactory()

    def connect(self, user: int, group: int = 0) -> tuple[bare_relay.Relay, StringTransport]:
        proto = self.factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(login(user, group))
        return proto, transport


def test_route_to_user_writes_same_bytes() -> None:
    relay = Relay()
    alice, alice_t = relay.connect(1)
    _, bob_t = relay.connect(2)
    msg = routed(1, 2, b"\x00" * 150)
    alice.dataReceived(msg + routed(1, 99))  # the second: unknown target, dropped
    assert bob_t.value() == msg
    assert alice_t.value() == b""
    assert not alice_t.disconnecting


def test_group_fan_out_excludes_sender() -> None:
    relay = Relay()
    conns = [relay.connect(user, group=7) for user in range(1, 5)]
    _, outsider_t = relay.connect(10, group=8)
    msg = routed(2, 7, b"to the group")
    conns[0][0].dataReceived(msg)
    assert conns[0][1].value() == b""
    assert [t.value() for _, t in conns[1:]] == [msg] * 3
    assert outsider_t.value() == b""


def test_heartbeat_ignored() -> None:
    relay = Relay()
    alice, alice_t = relay.connect(1, group=7)
    _, bob_t = relay.connect(2, group=7)
    alice.dataReceived(routed(0, 2) + routed(0, 7))
    assert bob_t.value() == alice_t.value() == b""
    assert not alice_t.disconnecting


def test_frames_split_across_reads() -> None:
    relay = Relay()
    alice, _ = relay.connect(1)
    _, bob_t = relay.connect(2)
    stream = routed(1, 2, b"a" * 300) + routed(1, 2, b"") + routed(1, 2, b"c" * 5)
    for i in range(len(stream)):
        alice.dataReceived(stream[i : i + 1])
    assert bob_t.value() == stream
    bob_t.clear()
    for cut in range(len(stream) + 1):  # and split in two at every byte
        alice.dataReceived(stream[:cut])
        alice.dataReceived(stream[cut:])
    assert bob_t.value() == stream * (len(stream) + 1)


def test_login_split_and_relogin_replaces() -> None:
    relay = Relay()
    proto = relay.factory.buildProtocol(None)
    old_t = StringTransport()
    proto.makeConnection(old_t)
    data = login(2, group=7)
    proto.dataReceived(data[:5])
    proto.dataReceived(data[5:])
    _, new_t = relay.connect(2, group=7)
    sender, _ = relay.connect(1, group=7)
    sender.dataReceived(routed(1, 2) + routed(2, 7))
    assert old_t.value() == b""
    assert new_t.value() == routed(1, 2) + routed(2, 7)
    proto.connectionLost()  # the replaced connection going away keeps the new registration
    sender.dataReceived(routed(1, 2))
    assert new_t.value() == routed(1, 2) + routed(2, 7) + routed(1, 2)


def test_oversized_and_short_frames_close() -> None:
    relay = Relay()
    alice, alice_t = relay.connect(1)
    alice.dataReceived(struct.pack(">I", bare_relay.MAX_PAYLOAD + 1))
    assert alice_t.disconnecting
    bob, bob_t = relay.connect(2)
    bob.dataReceived(frame(b"\x01\x00"))  # shorter than kind + target
    assert bob_t.disconnecting


def test_disconnect_unregisters() -> None:
    relay = Relay()
    alice, _ = relay.connect(1, group=7)
    bob, bob_t = relay.connect(2, group=7)
    bob.connectionLost()
    alice.dataReceived(routed(1, 2) + routed(2, 7))
    assert bob_t.value() == b""
    assert relay.factory.users.keys() == {1}
    assert relay.factory.groups == {7: {alice}}


# --- abuse_wire (bench/abuse.py's helpers)


def test_abuse_odd_token_is_genuinely_signed() -> None:
    """The suite's hand-made tokens carry a valid signature: a refusal is about the claims."""
    from improto.tokens import TokenError, verify

    claims = f'{{"sub":"5","dev":"d1","exp":{int(time.time()) + 3600}}}'
    assert verify("s3cret", aw.odd_token("s3cret", claims), "d1").user_id == 5
    with pytest.raises(TokenError):  # another secret: the signature is wrong
        verify("other", aw.odd_token("s3cret", claims), "d1")


def test_abuse_split_frames_at_every_byte() -> None:
    frames = [encode(Ping(request_id=i)) for i in range(1, 4)]
    stream = b"".join(frames)
    for cut in range(len(stream) + 1):
        buf = bytearray(stream[:cut])
        got = aw.split_frames(buf)
        buf += stream[cut:]
        got += aw.split_frames(buf)
        assert [struct.pack(">I", len(p)) + p for p in got] == frames
        assert not buf


def test_abuse_percentiles_nearest_rank() -> None:
    assert aw.percentiles([]) == {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    p = aw.percentiles([float(x) for x in range(100, 0, -1)])
    assert (p["n"], p["p50"], p["p99"], p["max"]) == (100, 50.0, 99.0, 100.0)


def test_abuse_source_addresses_distinct_and_not_the_bystanders() -> None:
    per = 50
    addrs = [aw.source_address(i * per, per) for i in range(600)]
    assert len(set(addrs)) == 600 and "127.0.0.1" not in addrs
    assert all(a.startswith("127.") and 0 <= int(a.rsplit(".", 1)[1]) <= 255 for a in addrs)
    assert aw.source_address(per - 1, per) == aw.source_address(0, per)
