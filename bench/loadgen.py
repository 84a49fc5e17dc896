"""Load generator worker: one process driving many connections at a scheduled rate.

    python bench/loadgen.py          (started by bench/relay.py; JSON commands on stdin)

The same design serves every target (improto, MQTT to Mosquitto, XMPP to ejabberd, the bare
relay):
- every message carries the same 150-byte text payload ending in MAGIC + the sequence number
  as 8 ASCII digits, so a receiver finds it in the last 16 bytes of any frame, undecoded
  (XMPP: the server adds elements after the body, so a receiver searches the stanza for it);
- frames are built before a step starts (one struct/bytes operation each), so sending is a
  `transport.write` of ready bytes;
- message k of a step is *scheduled* at t0 + k / rate (t0 on CLOCK_MONOTONIC, shared by
  all worker processes); latency is arrival minus the scheduled time, so a generator that
  falls behind shows up as latency instead of hiding it (no coordinated omission);
- closed loop instead (`closed`): each sender keeps `window` messages in flight and sends the
  next one when one of them is both delivered to its receiver and acknowledged to it;
  latency is arrival minus the actual send time.

Commands (one JSON object per line on stdin, one JSON reply per line on stdout):
  {"cmd": "setup", "target": ..., "host", "port", "secret", "mode": "pairs"|"fanout",
   "users": [[sender, receiver], ...] | {"sender": id, "members": [...], "group": g}}
  {"cmd": "step", "rate": r, "count": n, "t0": t, "seq0": s, "workers": P, "index": w,
   "grace": seconds}
  {"cmd": "closed", "window": W, "seconds": d, "t0": t, "seq0": s, "workers": P, "index": w,
   "grace": seconds}   (closed: the drain ends after `grace` s without progress, or 60 s)
  {"cmd": "quit"}
"""

from __future__ import annotations

import json
import os
import resource
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from twisted.internet import protocol, reactor, stdio
from twisted.internet.defer import Deferred
from twisted.protocols.basic import LineReceiver

MAGIC = b"LGSEQ001"  # text: improto checks UTF-8 in text bodies
PAYLOAD = 150  # bytes of content per message, the same for every target
_FILL = b"x" * (PAYLOAD - 16)
_U64 = struct.Struct(">Q")
_U32 = struct.Struct(">I")
_U16 = struct.Struct(">H")
_mono = time.monotonic
CLOSED_DRAIN_S = 60.0  # the longest drain after a closed-loop step


def payload(seq: int) -> bytes:
    """Valid UTF-8 text (content type 1), ending in MAGIC + 8 decimal digits of `seq`."""
    return _FILL + MAGIC + b"%08d" % (seq % 100_000_000)


class Recorder:
    """What one worker saw during one step: arrivals per sequence number."""

    def __init__(self, seq0: int, total: int, rate: float, t0: float) -> None:
        self.seq0, self.total, self.rate, self.t0 = seq0, total, rate, t0
        self.lat: dict[int, list[float]] = {}  # seq -> latencies (ms) of its recipients
        self.order_errors = 0
        self.acks = 0
        self.errors = 0

    def arrived(self, seq: int, now: float, conn: Conn) -> None:
        k = seq - self.seq0
        if 0 <= k < self.total:
            ms = (now - (self.t0 + k / self.rate)) * 1000.0
            got = self.lat.get(seq)
            if got is None:
                self.lat[seq] = [ms]
            else:
                got.append(ms)


class ClosedRecorder:
    """A closed-loop step: the send time of every message in flight, latencies of arrivals."""

    def __init__(self, stop: float) -> None:
        self.stop = stop  # the end of the sending window: arrivals after it are the drain
        self.sent_at: dict[int, float] = {}  # seq -> send time; -1.0 once delivered
        self.lat: list[float] = []
        self.in_window = 0
        self.duplicates = 0
        self.order_errors = 0
        self.acks = 0
        self.errors = 0

    def arrived(self, seq: int, now: float, conn: Conn) -> None:
        t = self.sent_at.get(seq)
        if t is None:  # not of this step (an earlier one's, late)
            return
        if t < 0:
            self.duplicates += 1
            return
        self.sent_at[seq] = -1.0
        self.lat.append((now - t) * 1000.0)
        if now <= self.stop:
            self.in_window += 1
        conn.worker.delivered(conn)


class Conn(protocol.Protocol):
    """One client connection; subclasses know one wire format."""

    worker: Worker
    user: int
    pair = -1  # closed loop: the index of this connection's pair in its worker

    def __init__(self) -> None:
        self.buf = b""
        self.ready: Deferred[Conn] = Deferred()
        self.last_seq = -1
        self.acked = 0  # sends acknowledged by the server (SEND_ACK, PUBACK, XEP-0198 h)

    def got_acks(self, n: int) -> None:
        self.acked += n
        rec = self.worker.rec
        if rec is not None:
            rec.acks += n
            if self.worker.closed:
                self.worker.progress(self.pair)

    def connectionMade(self) -> None:
        self.transport.setTcpNoDelay(True)
        self.transport.write(self.worker.login(self))

    def message(self, seq: int) -> None:
        rec = self.worker.rec
        if rec is None:
            return
        if seq <= self.last_seq:
            rec.order_errors += 1
        self.last_seq = seq
        rec.arrived(seq, _mono(), self)

    def became_ready(self) -> None:
        if not self.ready.called:
            self.ready.callback(self)


class ImprotoConn(Conn):
    """improto: HELLO, then PUSHes (answered with PUSH_ACK) and SEND_ACKs."""

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        acks = []
        while end - pos >= 4:
            n = _U32.unpack_from(buf, pos)[0]
            stop = pos + 4 + n
            if stop > end:
                break
            ftype = buf[pos + 5]
            if ftype == 0xA0:  # PUSH: msg_id right after the header; ours end in MAGIC+seq
                acks.append(buf[pos + 11 : pos + 19])
                if buf[stop - 16 : stop - 8] == MAGIC:
                    self.message(int(buf[stop - 8 : stop]))
            elif ftype == 0x83:  # SEND_ACK
                self.got_acks(1)
            elif ftype == 0x81 or ftype == 0x90:  # HELLO_OK, GROUP_CREATED
                self.worker.reply(self, ftype, buf[pos + 4 : stop])
            elif ftype == 0xFF:
                self.worker.error(self, buf[pos + 4 : stop])
            pos = stop
        self.buf = buf[pos:]
        if acks:  # PUSH_ACK: header (version 1, type 4, flags 0, request_id 0) + msg_id
            self.transport.write(b"".join(_PUSH_ACK + a for a in acks))


_PUSH_ACK = _U32.pack(15) + bytes([1, 4, 0, 0, 0, 0, 0])


class MqttConn(Conn):
    """MQTT 3.1.1: CONNECT + SUBSCRIBE; PUBLISH qos 1 answered with PUBACK."""

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        acks = []
        while end - pos >= 2:
            first = buf[pos]
            # remaining length: up to 4 bytes of 7-bit groups
            i, mult, length = pos + 1, 1, 0
            while True:
                if i >= end:
                    length = -1
                    break
                b = buf[i]
                length += (b & 0x7F) * mult
                i += 1
                if b < 0x80:
                    break
                mult <<= 7
            if length < 0 or i + length > end:
                break
            stop = i + length
            ptype = first >> 4
            if ptype == 3:  # PUBLISH
                tlen = _U16.unpack_from(buf, i)[0]
                if first & 0x06:  # qos > 0: packet id after the topic
                    pid = buf[i + 2 + tlen : i + 4 + tlen]
                    acks.append(pid)
                if buf[stop - 16 : stop - 8] == MAGIC:
                    self.message(int(buf[stop - 8 : stop]))
            elif ptype == 4:  # PUBACK of our publish
                self.got_acks(1)
            elif ptype == 2 or ptype == 9:  # CONNACK, SUBACK
                self.worker.reply(self, ptype, buf[i:stop])
            pos = stop
        self.buf = buf[pos:]
        if acks:
            self.transport.write(b"".join(b"\x40\x02" + a for a in acks))


_TAG_END = frozenset(b" /\t\r\n>")


class XmppConn(Conn):
    """XMPP (bench/xmpp_wire.py): SASL PLAIN, bind, XEP-0198; `<a h/>` acknowledges sends."""

    def connectionMade(self) -> None:
        import xmpp_wire

        self.x = xmpp_wire
        self.split = xmpp_wire.Splitter()
        self.authed = False
        self.sm = False
        self.h_in = 0  # stanzas received since <enabled/>
        self.h_base = 1  # stanzas we sent after <enable/> that are not messages: presence
        super().connectionMade()

    def dataReceived(self, data: bytes) -> None:
        x = self.x
        out = []
        for it in self.split.feed(data):
            c = it[1]
            if c == 0x6D or c == 0x70 or c == 0x69:  # message, presence, iq: stanzas
                if self.sm:
                    self.h_in += 1
                if c == 0x6D:
                    i = it.find(MAGIC)
                    if i >= 0:
                        self.message(int(it[i + 8 : i + 16]))
            elif c == 0x72 and it[2] in _TAG_END:  # <r/>
                out.append(x.ack(self.h_in))
            elif c == 0x61 and it[2] in _TAG_END:  # <a h='n'/>: it handled ours up to n
                h = x.attr(it, b"h")
                if h is not None:
                    n = int(h) - self.h_base
                    if n > self.acked:
                        self.got_acks(n - self.acked)
            else:
                tag = x.name(it)
                if tag == b"stream:features":
                    if not self.authed:
                        out.append(x.auth_plain(x.jid_user(self.user), x.password(self.user)))
                    else:
                        out.append(x.session_setup(f"lg{self.user}"))
                elif tag == b"success":
                    self.authed = True
                    self.split = x.Splitter()  # stream restart: the server sends nothing more
                    out.append(x.stream_open())
                elif tag == b"enabled":
                    self.sm = True
                    self.became_ready()
                elif tag in (b"failure", b"stream:error", b"/stream:stream"):
                    self.worker.error(self, it)
        if out:
            self.transport.write(b"".join(out))


class BareConn(Conn):
    """The bare relay: u32 length + (kind u8, target u64, payload); no acks, no login reply."""

    def connectionMade(self) -> None:
        super().connectionMade()
        self.became_ready()

    def dataReceived(self, data: bytes) -> None:
        buf = self.buf + data if self.buf else data
        pos, end = 0, len(buf)
        while end - pos >= 4:
            stop = pos + 4 + _U32.unpack_from(buf, pos)[0]
            if stop > end:
                break
            if buf[stop - 16 : stop - 8] == MAGIC:
                self.message(int(buf[stop - 8 : stop]))
            pos = stop
        self.buf = buf[pos:]


class Worker:
    """The connections of this process and the step loop."""

    def __init__(self, out: Callable[[dict[str, Any]], None]) -> None:
        self.out = out
        self.rec: Recorder | ClosedRecorder | None = None
        self.senders: list[Conn] = []
        self.receivers: list[Conn] = []
        self.spec: dict[str, Any] = {}
        self.group = 0
        self.pending: dict[int, Deferred[bytes]] = {}
        self.error_frames: list[str] = []
        # closed loop: per pair, messages sent and delivered; None outside a closed step
        self.closed: dict[str, Any] | None = None

    # ---------------------------------------------------------------- per target

    def login(self, conn: Conn) -> bytes:
        target, user = self.spec["target"], conn.user
        if target == "improto":
            from improto.codec import encode
            from improto.frames import Hello
            from improto.tokens import mint

            dev = f"lg{user}"
            token = mint(self.spec["secret"], user, dev)
            return encode(Hello(1, 0, dev, token, request_id=1))
        if target == "mqtt":
            import mqtt_wire

            topic = f"g/{self.group}" if self.group and conn in self.receivers else f"u/{user}"
            return mqtt_wire.connect(f"lg{user}", clean_session=True, keepalive=60) + (
                mqtt_wire.subscribe(1, topic, qos=1)
            )
        if target == "xmpp":
            import xmpp_wire

            return xmpp_wire.stream_open()
        return _U32.pack(16) + _U64.pack(user) + _U64.pack(self.group)

    def reply(self, conn: Conn, ftype: int, body: bytes) -> None:
        target = self.spec["target"]
        if (target == "improto" and ftype == 0x81) or (target == "mqtt" and ftype == 9):
            conn.became_ready()
        elif ftype == 0x90 and conn.user in self.pending:
            self.pending.pop(conn.user).callback(body)

    def error(self, conn: Conn, payload: bytes) -> None:
        if self.rec is not None:
            self.rec.errors += 1
        if len(self.error_frames) < 5:
            if self.spec["target"] == "xmpp":
                self.error_frames.append(payload[:300].decode(errors="replace"))
                return
            from improto.codec import decode_payload

            self.error_frames.append(repr(decode_payload(payload)))

    # ---------------------------------------------------------------- closed loop

    def delivered(self, conn: Conn) -> None:
        if self.closed is not None:
            self.closed["delivered"][conn.pair] += 1
            self.progress(conn.pair)

    def progress(self, j: int) -> None:
        """Pair j: a message is done when delivered and acknowledged; keep `window` in flight."""
        c = self.closed
        if c is None or not c["sending"]:
            return
        sender = self.senders[j]
        done = c["delivered"][j]
        if c["acks"]:
            done = min(done, sender.acked - c["acked0"][j])
        free = c["window"] - (c["sent"][j] - done)
        if free > 0:
            self._send_closed(j, free)

    def _send_closed(self, j: int, n: int) -> None:
        c, rec = self.closed, self.rec
        assert c is not None and isinstance(rec, ClosedRecorder)
        sender, target = self.senders[j], self.targets[j]
        frames = []
        now = _mono()
        for _ in range(n):
            # unique across workers: worker `index` sends seq0 + index + workers * k
            seq = c["seq0"] + c["index"] + c["workers"] * c["next"]
            c["next"] += 1
            frames.append(self.frame(sender.user, 1, target, seq))
            rec.sent_at[seq] = now
        c["sent"][j] += n
        sender.transport.write(b"".join(frames))

    async def closed_step(self, cmd: dict[str, Any]) -> dict[str, Any]:
        if self.spec["mode"] != "pairs":
            raise ValueError("the closed loop runs 1:1 pairs only")
        t0, window = cmd["t0"], cmd["window"]
        stop = t0 + cmd["seconds"]
        n = len(self.senders)
        rec = ClosedRecorder(stop)
        self.closed = {
            "window": window, "sending": False, "acks": self.spec["target"] != "bare",
            "sent": [0] * n, "delivered": [0] * n, "acked0": [s.acked for s in self.senders],
            "next": 0, "seq0": cmd["seq0"], "index": cmd["index"], "workers": cmd["workers"],
        }  # fmt: skip
        while _mono() < t0:
            await _sleep(min(0.01, max(0.0, t0 - _mono())))
        self.rec = rec
        self.closed["sending"] = True
        for j in range(n):
            self._send_closed(j, window)
        while _mono() < stop:
            await _sleep(min(0.05, max(0.0, stop - _mono())))
        self.closed["sending"] = False
        sent = sum(self.closed["sent"])
        # the drain: up to `grace` without progress (a slow server's window still arrives),
        # and at most CLOSED_DRAIN_S in all
        last, hard = (-1, -1), _mono() + max(cmd["grace"], CLOSED_DRAIN_S)
        deadline = hard
        while (now := _mono()) < deadline:
            acked = sum(s.acked - a for s, a in zip(self.senders, self.closed["acked0"],
                                                     strict=True))  # fmt: skip
            if len(rec.lat) >= sent and (not self.closed["acks"] or acked >= sent):
                break
            if (len(rec.lat), acked) != last:
                last = (len(rec.lat), acked)
                deadline = min(hard, now + cmd["grace"])
            await _sleep(0.01)
        self.rec = None
        self.closed = None
        return {
            "sent": sent,
            "delivered": len(rec.lat),
            "in_window": rec.in_window,
            "acks": rec.acks,
            "errors": rec.errors,
            "error_frames": self.error_frames[:3],
            "duplicates": rec.duplicates,
            "order_errors": rec.order_errors,
            "lat": [round(x, 3) for x in rec.lat],
        }

    def frame(self, sender: int, kind: int, target: int, seq: int) -> bytes:
        """One message from `sender` to user/group `target`, sequence `seq`."""
        body = payload(seq)
        t = self.spec["target"]
        if t == "improto":  # SEND: header, client_msg_id, conv_kind, conv_id, type 1, body
            cmid = _U64.pack(sender) + _U64.pack(seq)
            return _SEND.pack(_SEND.size - 4, 1, 3, 0, seq & 0xFFFFFFFF, cmid, kind, target, 1,
                              PAYLOAD, body)  # fmt: skip
        if t == "mqtt":
            import mqtt_wire

            topic = f"g/{target}" if kind == 2 else f"u/{target}"
            return mqtt_wire.publish(topic, body, qos=1, packet_id=seq % 65535 + 1)
        if t == "xmpp":  # a chat message, then <r/>: the server's <a/> is its acknowledgement
            import xmpp_wire

            to = f"{xmpp_wire.jid_user(target)}@{xmpp_wire.DOMAIN}"
            return xmpp_wire.message(to, body, f"m{seq}") + xmpp_wire.R
        return _U32.pack(9 + PAYLOAD) + bytes([kind]) + _U64.pack(target) + body

    # ---------------------------------------------------------------- commands

    async def setup(self, spec: dict[str, Any]) -> dict[str, Any]:
        self.spec = spec
        start = _mono()
        classes = {"improto": ImprotoConn, "mqtt": MqttConn, "xmpp": XmppConn, "bare": BareConn}
        cls = classes[spec["target"]]
        if spec["mode"] == "pairs":
            pairs = spec["users"]
            self.senders = [self._conn(cls, s) for s, _ in pairs]
            self.receivers = [self._conn(cls, r) for _, r in pairs]
            self.targets = [r for _, r in pairs]
            for j, (snd, rcv) in enumerate(zip(self.senders, self.receivers, strict=True)):
                snd.pair = rcv.pair = j
        else:
            self.group = spec["group"]
            self.receivers = [self._conn(cls, m) for m in spec["members"]]
            self.senders = [self._conn(cls, spec["sender"])] if spec.get("sender") else []
        conns = self.senders + self.receivers
        for i in range(0, len(conns), 200):  # bounded connect bursts: no accept-queue drops
            batch = conns[i : i + 200]
            for c in batch:
                reactor.connectTCP(spec["host"], spec["port"], _Factory(c), timeout=30)
            for c in batch:
                await c.ready
        if spec["mode"] == "fanout" and spec["target"] == "improto" and self.senders:
            self.group = await self._improto_group(spec["create_with"])
        return {"ok": True, "conns": len(conns), "setup_s": round(_mono() - start, 3),
                "group": self.group}  # fmt: skip

    def _conn(self, cls: type[Conn], user: int) -> Conn:
        c = cls()
        c.worker, c.user = self, user
        return c

    async def _improto_group(self, members: list[int]) -> int:
        from improto.codec import decode_payload, encode
        from improto.frames import GroupCreate

        sender = self.senders[0]
        d: Deferred[bytes] = Deferred()
        self.pending[sender.user] = d
        sender.transport.write(encode(GroupCreate("fanout", tuple(members), request_id=2)))
        created = decode_payload(await d)
        return int(created.group_id)

    async def step(self, cmd: dict[str, Any]) -> dict[str, Any]:
        rate, count, t0, seq0 = cmd["rate"], cmd["count"], cmd["t0"], cmd["seq0"]
        workers, index = cmd["workers"], cmd["index"]
        fanout = self.spec["mode"] == "fanout"
        # This worker sends the sequences k with k % workers == index (fan-out: worker 0 all).
        if fanout:
            mine = list(range(count)) if self.senders else []
        else:
            mine = list(range(index, count, workers))
        conns, frames = [], []
        for j, k in enumerate(mine):
            if fanout:
                conns.append(self.senders[0])
                frames.append(self.frame(self.senders[0].user, 2, self.group, seq0 + k))
            else:
                p = j % len(self.senders)
                conns.append(self.senders[p])
                frames.append(self.frame(self.senders[p].user, 1, self.targets[p], seq0 + k))
        rec = self.rec = Recorder(seq0, count, rate, t0)
        expected = len(self.receivers) if fanout else len(mine)
        lag_max = 0.0
        i, n = 0, len(mine)
        while _mono() < t0:
            await _sleep(min(0.01, max(0.0, t0 - _mono())))
        while i < n:
            now = _mono()
            due = i
            while due < n and t0 + mine[due] / rate <= now:
                due += 1
            if due > i:
                lag_max = max(lag_max, now - (t0 + mine[i] / rate))
                for j in range(i, due):
                    conns[j].transport.write(frames[j])
                i = due
            if i < n:
                await _sleep(max(0.0, min(0.002, t0 + mine[i] / rate - _mono())))
        sent_end = _mono()
        # a worker with nothing to send (fan-out receivers) still listens for the whole step
        deadline = max(sent_end, t0 + (count - 1) / rate) + cmd["grace"]
        while _mono() < deadline:
            got = sum(len(v) for v in rec.lat.values())
            want = expected * (count if fanout else 1)
            acks_due = 0 if self.spec["target"] == "bare" else len(mine)
            if got >= want and rec.acks >= acks_due:
                break
            await _sleep(0.01)
        self.rec = None
        return {
            "sent": n,
            "send_s": round(sent_end - t0, 4),
            "lag_max_ms": round(lag_max * 1000, 3),
            "acks": rec.acks,
            "errors": rec.errors,
            "error_frames": self.error_frames[:3],
            "order_errors": rec.order_errors,
            "receivers": len(self.receivers),
            "lat": {str(s): [round(x, 3) for x in v] for s, v in rec.lat.items()},
        }


_SEND = struct.Struct(f">IBBBI16sBQHH{PAYLOAD}s")


class _Factory(protocol.ClientFactory):
    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    def buildProtocol(self, addr: Any) -> Conn:
        return self.conn

    def clientConnectionFailed(self, connector: Any, reason: Any) -> None:
        if not self.conn.ready.called:
            self.conn.ready.errback(reason)


def _sleep(seconds: float) -> Deferred[None]:
    d: Deferred[None] = Deferred()
    reactor.callLater(seconds, d.callback, None)
    return d


class Commands(LineReceiver):
    delimiter = b"\n"
    MAX_LENGTH = 1 << 26

    def __init__(self) -> None:
        self.worker = Worker(self.send)

    def send(self, obj: dict[str, Any]) -> None:
        self.transport.write(json.dumps(obj).encode() + b"\n")

    def lineReceived(self, line: bytes) -> None:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            reactor.stop()
            return
        run = {"setup": self.worker.setup, "step": self.worker.step,
               "closed": self.worker.closed_step}[cmd["cmd"]]  # fmt: skip
        d = Deferred.fromCoroutine(run(cmd))
        d.addCallbacks(self.send, lambda f: self.send({"ok": False, "error": f.getTraceback()}))


def main() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 200_000
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(hard, want)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    stdio.StandardIO(Commands())
    reactor.run()


if __name__ == "__main__":
    main()
