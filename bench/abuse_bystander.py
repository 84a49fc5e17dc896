"""The bystander of bench/abuse.py: ordinary users chatting while the attacks run.

    python bench/abuse_bystander.py PORT SECRET RATE OUT USER...   (started by bench/abuse.py)

Pairs of users (USER list: sender, receiver, sender, receiver, ...) exchange small 1:1 SENDs
at RATE messages/s in total, spread over the pairs, each SEND scheduled at t0 + k / RATE on
CLOCK_MONOTONIC (shared with the parent process, which times its phases on the same clock).
SEND->ACK latency is the ack's arrival minus the scheduled time, so a stalled generator shows
as latency (no coordinated omission). Receivers ack every PUSH. Its own process: the attacks'
load in the parent does not delay it. Runs until stdin closes or says "stop", then writes OUT
(JSON): every SEND as [scheduled time, latency ms or null, msg_id, pair, error code], and the
disconnects it suffered.
"""

from __future__ import annotations

import gc
import json
import os
import selectors
import struct
import sys
import time
import uuid

import servers  # noqa: F401  (puts the repository root on sys.path)
from abuse_wire import T_ERROR, T_PUSH, T_SEND_ACK, Client, split_frames

from improto.codec import encode
from improto.frames import PushAck, Send

_RID = struct.Struct(">I")
BODY = b"bystander " * 10


class Peer:
    def __init__(self, port: int, secret: str, user: int) -> None:
        self.port, self.secret, self.user = port, secret, user
        self.client = Client(port)
        self.client.login(secret, user)
        self.sock = self.client.sock
        self.sock.setblocking(False)
        self.buf = bytearray(self.client.buf)
        self.out = bytearray()


def main() -> None:
    port, secret, rate, out_path = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), sys.argv[4]
    users = [int(u) for u in sys.argv[5:]]
    pairs = [(users[i], users[i + 1]) for i in range(0, len(users), 2)]
    sel = selectors.DefaultSelector()
    peers: dict[int, Peer] = {}  # index: 2 * pair (sender), 2 * pair + 1 (receiver)
    disconnects: list[list[object]] = []

    def connect(i: int) -> None:
        user = pairs[i // 2][i % 2]
        for _ in range(50):
            try:
                p = Peer(port, secret, user)
                break
            except (OSError, RuntimeError) as e:
                disconnects.append([time.monotonic(), user, f"reconnect failed: {e}"])
                time.sleep(0.2)
        else:
            raise SystemExit(f"bystander user {user} cannot log in")
        peers[i] = p
        sel.register(p.sock, selectors.EVENT_READ, i)

    for i in range(2 * len(pairs)):
        connect(i)
    sel.register(sys.stdin, selectors.EVENT_READ, -1)
    samples: list[list[object]] = []  # [t_sched, latency_ms, msg_id, pair, error]
    pending: dict[int, int] = {}  # request_id -> index into samples
    # its own full collections would show up as the server's latency
    gc.collect()
    gc.freeze()
    print("ready", flush=True)
    t0 = time.monotonic()
    k = 0
    running = True
    while running:
        now = time.monotonic()
        while t0 + k / rate <= now:
            pair = k % len(pairs)
            rid = k + 1
            frame = Send(uuid.uuid4().bytes, 1, pairs[pair][1], 1, BODY, request_id=rid)
            samples.append([t0 + k / rate, None, 0, pair, 0])
            pending[rid] = len(samples) - 1
            peers[2 * pair].out += encode(frame)
            k += 1
        for p in peers.values():
            if p.out:
                try:
                    n = p.sock.send(p.out)
                    del p.out[:n]
                except BlockingIOError:
                    pass
                except OSError:
                    pass  # seen as a close on the next read
        timeout = max(0.0, t0 + k / rate - time.monotonic())
        for key, _ in sel.select(timeout):
            i = key.data
            if i == -1:
                line = sys.stdin.readline()
                if not line or line.strip() == "stop":
                    running = False
                continue
            p = peers[i]
            try:
                chunk = p.sock.recv(1 << 16)
            except BlockingIOError:
                continue
            except OSError:
                chunk = b""
            now = time.monotonic()
            if not chunk:
                sel.unregister(p.sock)
                p.sock.close()
                disconnects.append([now, p.user, "closed by the server"])
                connect(i)
                continue
            p.buf += chunk
            for f in split_frames(p.buf):
                t, rid = f[1], _RID.unpack_from(f, 3)[0]
                if t == T_PUSH:
                    p.out += encode(PushAck(struct.unpack_from(">Q", f, 7)[0]))
                elif t in (T_SEND_ACK, T_ERROR) and rid in pending:
                    s = samples[pending.pop(rid)]
                    s[1] = round((now - float(s[0])) * 1000.0, 3)  # type: ignore[arg-type]
                    if t == T_SEND_ACK:
                        s[2] = struct.unpack_from(">Q", f, 7 + 16)[0]
                    else:
                        s[4] = struct.unpack_from(">H", f, 7)[0]
    result = {"pairs": pairs, "samples": samples, "disconnects": disconnects}
    tmp = out_path + ".tmp"
    with open(tmp, "w") as fp:
        json.dump(result, fp)
    os.replace(tmp, out_path)
    for p in peers.values():
        try:
            p.sock.close()
        except OSError:
            pass


if __name__ == "__main__":
    main()
