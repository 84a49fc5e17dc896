"""Bytes on the wire per delivered message for an always-online device (issue 13, spec 18).

    python bench/wire_once.py [--quick] [--storage embedded,production] [--messages N]
                              [--body BYTES] [--trickle-ms MS]

An online receiver R is sent N messages of BODY bytes by S (another connection). R PUSH_ACKs
every PUSH and follows the spec's client rules: with WIRE_ONCE it moves its cursor on each
INBOX_NOTICE (from == its cursor, every id held) and runs the sync loop on a SYNC_HINT; once
every message is covered it sends one OFFLINE_ACK. Counted from R's first frame after its
login sync until then: bytes and frames in each direction (length prefixes included, TCP/IP
headers not), per delivered message, next to the bare PUSH frame of one message. Then R
reconnects with the same device and runs the sync loop from its cursor: the messages and
bytes downloaded again. The same run with a version-1 receiver (no FEATURES) is the
comparison: its cursor stays where its login sync left it, so its reconnect downloads all N.

Two send patterns per receiver: `burst` (S pipelines all N, up to 500 unacknowledged: notices
batch many ids) and `trickle` (one message every MS ms, each acked before the next: one notice
per message, the worst case for the overhead). Target (issue 13): S->C bytes per delivered
message at most 1.1x the PUSH frame. Prints progress to stderr and a final JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import socket
import struct
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import servers
from abuse_wire import split_frames

from improto.codec import decode_payload, encode
from improto.enums import ConvKind, Feature, FrameType
from improto.frames import (
    Features,
    FeaturesOk,
    Hello,
    HelloOk,
    InboxNotice,
    OfflineAck,
    OfflinePage,
    OfflinePull,
    Push,
    PushAck,
    Send,
    SendAck,
    SyncHint,
)
from improto.records import push_frame, record_of

IO_TIMEOUT_S = 30.0
DONE_TIMEOUT_S = 60.0
WINDOW = 500
TARGET = 1.1
_LEN = struct.Struct(">I")


def log(msg: str) -> None:
    print(f"[wire_once] {msg}", file=sys.stderr, flush=True)


@dataclass
class Tally:
    """Bytes and frames one way, and frames by type name."""

    size: int = 0
    frames: int = 0
    types: Counter[str] = field(default_factory=Counter)

    def add(self, payload: bytes) -> None:
        self.size += 4 + len(payload)
        self.frames += 1
        try:
            self.types[FrameType(payload[1]).name] += 1
        except ValueError:
            self.types[f"0x{payload[1]:02x}"] += 1

    def as_dict(self, n: int) -> dict[str, Any]:
        return {
            "bytes": self.size,
            "frames": self.frames,
            "bytes_per_msg": round(self.size / n, 2),
            "frames_per_msg": round(self.frames / n, 3),
            "types": dict(sorted(self.types.items())),
        }


class Wire:
    """A blocking connection that counts every frame it writes and reads."""

    def __init__(self, h: servers.ServerHandle) -> None:
        self.sock = socket.create_connection((h.host, h.port), timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()
        self.up, self.down = Tally(), Tally()
        self.rid = 0
        self.queue: list[Any] = []  # decoded frames not yet handled, in arrival order

    def send(self, frame: Any) -> int:
        self.rid += 1
        data = encode(dataclasses.replace(frame, request_id=self.rid))
        self.sock.sendall(data)
        self.up.add(data[4:])
        return self.rid

    def read(self, timeout: float) -> None:
        """Queue whatever whole frames arrive within `timeout` (one read), decoded."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError:
            return
        if not chunk:
            raise ConnectionError("server closed the connection")
        self.buf += chunk
        for p in split_frames(self.buf):
            self.down.add(p)
            self.queue.append(decode_payload(p))

    def take(self) -> list[Any]:
        out, self.queue = self.queue, []
        return out

    def call(self, frame: Any, expect: type) -> Any:
        """Send a request, return its answer; other frames stay queued."""
        rid = self.send(frame)
        deadline = time.monotonic() + IO_TIMEOUT_S
        while time.monotonic() < deadline:
            for i, f in enumerate(self.queue):
                if f.request_id == rid:
                    del self.queue[i]
                    if not isinstance(f, expect):
                        raise RuntimeError(f"{type(frame).__name__} answered by {f!r}")
                    return f
            self.read(deadline - time.monotonic())
        raise TimeoutError(f"no answer to {type(frame).__name__}")

    def reset(self) -> None:
        self.up, self.down = Tally(), Tally()

    def close(self) -> None:
        self.sock.close()


def login(h: servers.ServerHandle, user: int, device: str, features: tuple[int, ...]) -> Wire:
    assert h.secret is not None
    w = Wire(h)
    token = servers.mint_token(h.secret, user, device)
    ok = w.call(Hello(1, 0, device, token), HelloOk)
    assert ok.user_id == user
    if features:
        got = w.call(Features(features), FeaturesOk)
        if set(got.features) != set(features):
            raise RuntimeError(f"FEATURES {features} -> FEATURES_OK {got.features}")
    return w


class Receiver:
    """R's client state: held msg_ids, its cursor, what came how."""

    def __init__(self, w: Wire, wire_once: bool) -> None:
        self.w = w
        self.wire_once = wire_once
        self.cursor = 0
        self.held: set[int] = set()
        self.covered: set[int] = set()  # msg_ids at or below the cursor
        self.pushes: Counter[int] = Counter()
        self.paged: Counter[int] = Counter()
        self.notices = self.hints = self.ignored_notices = 0
        self.push_bytes: list[int] = []

    def sync(self) -> None:
        while True:
            page: OfflinePage = self.w.call(OfflinePull(self.cursor, 200), OfflinePage)
            for m in page.messages:
                self.paged[m.msg_id] += 1
                self.held.add(m.msg_id)
                self.covered.add(m.msg_id)
            self.cursor = page.cursor
            self.handle(self.w.take())
            if not page.has_more:
                return

    def handle(self, frames: list[Any]) -> None:
        for f in frames:
            if isinstance(f, Push):
                self.pushes[f.message.msg_id] += 1
                self.held.add(f.message.msg_id)
                self.push_bytes.append(len(push_frame(record_of(f.message))))
                self.w.send(PushAck(f.message.msg_id))
            elif isinstance(f, InboxNotice):
                self.notices += 1
                if f.from_cursor == self.cursor and set(f.msg_ids) <= self.held:
                    self.cursor = f.to_cursor
                    self.covered.update(f.msg_ids)
                elif f.from_cursor == self.cursor:
                    self.sync()  # an id is missing: pull (spec 18 client rules)
                else:
                    self.ignored_notices += 1
            elif isinstance(f, SyncHint):
                self.hints += 1
                self.sync()


def sender_thread(
    h: servers.ServerHandle, peer: int, n: int, body: bytes, trickle_s: float, errors: list[str]
) -> threading.Thread:
    def run() -> None:
        try:
            w = login(h, _user(), "sender-" + uuid.uuid4().hex[:8], ())
            frames = [Send(uuid.uuid4().bytes, ConvKind.USER, peer, 1, body) for _ in range(n)]
            if trickle_s:
                for f in frames:
                    w.call(f, SendAck)
                    time.sleep(trickle_s)
            else:
                acked = sent = 0
                while acked < n:
                    while sent < n and sent - acked < WINDOW:
                        w.send(frames[sent])
                        sent += 1
                    w.read(IO_TIMEOUT_S)
                    for f in w.take():
                        if isinstance(f, SendAck):
                            acked += 1
                        elif not isinstance(f, Push | SyncHint):
                            raise RuntimeError(f"SEND answered by {f!r}")
            w.close()
        except Exception as e:  # reported in the result
            errors.append(f"sender: {e!r}")

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _user() -> int:
    return random.randrange(1 << 32, 1 << 48)


def one_run(h: servers.ServerHandle, wire_once: bool, n: int, body_size: int,
            trickle_s: float) -> dict[str, Any]:  # fmt: skip
    user, device = _user(), "recv-" + uuid.uuid4().hex[:8]
    features = (Feature.WIRE_ONCE,) if wire_once else ()
    w = login(h, user, device, features)
    r = Receiver(w, wire_once)
    r.sync()
    w.reset()
    errors: list[str] = []
    body = b"x" * body_size
    t0 = time.monotonic()
    sender = sender_thread(h, user, n, body, trickle_s, errors)
    deadline = t0 + DONE_TIMEOUT_S + n * trickle_s * 2
    while time.monotonic() < deadline and not errors:
        w.read(0.2)
        r.handle(w.take())
        got = len(r.held)
        if got >= n and (not wire_once or len(r.covered) >= n):
            break
    sender.join(IO_TIMEOUT_S)
    if not errors and len(r.held) < n:
        errors.append(f"only {len(r.held)} of {n} messages arrived")
    if wire_once and len(r.covered) < n:
        errors.append(f"notices and pages covered {len(r.covered)} of {n}")
    w.read(0.5)
    r.handle(w.take())  # anything late (a notice, a hint) still counts
    if wire_once:
        w.send(OfflineAck(r.cursor))  # the SHOULD of spec 18 after a run of notices
        w.read(0.2)
        r.handle(w.take())
    elapsed = time.monotonic() - t0
    online = {"s_to_c": w.down.as_dict(n), "c_to_s": w.up.as_dict(n)}
    w.close()
    # The app restarts: same device, sync from its persisted cursor.
    w2 = login(h, user, device, features)
    w2.reset()
    again = Receiver(w2, wire_once)
    again.cursor, again.held = r.cursor, set(r.held)
    again.sync()
    redownloaded = sum(again.paged.values())
    reconnect = {
        "messages": redownloaded,
        "s_to_c_bytes": w2.down.size,
        "c_to_s_bytes": w2.up.size,
        "pages": w2.down.types.get("OFFLINE_PAGE", 0),
    }
    w2.close()
    push = max(r.push_bytes, default=0)
    twice = sum(1 for i in r.pushes if r.paged[i]) + sum(k - 1 for k in r.pushes.values() if k > 1)
    return {
        "receiver": "wire_once" if wire_once else "v1",
        "messages": n,
        "body_bytes": body_size,
        "push_frame_bytes": push,
        "online": online,
        "s_to_c_vs_push": round(online["s_to_c"]["bytes_per_msg"] / push, 4) if push else None,
        "notices": r.notices,
        "sync_hints": r.hints,
        "ignored_notices": r.ignored_notices,
        "received_twice_online": twice,
        # what the day costs: online, then the reconnect's sync
        "s_to_c_per_msg_with_reconnect": round((w.down.size + w2.down.size) / n, 2),
        "reconnect": reconnect,
        "seconds": round(elapsed, 2),
        "errors": errors,
    }


def run_storage(storage: str, n: int, body: int, trickle_ms: float) -> dict[str, Any]:
    h = servers.start_improto(storage)
    out: dict[str, Any] = {}
    try:
        for pattern, trickle_s, count in (
            ("burst", 0.0, n),
            ("trickle", trickle_ms / 1000, n // 10),
        ):
            for wire_once in (True, False):
                name = f"{pattern}/{'wire_once' if wire_once else 'v1'}"
                res = one_run(h, wire_once, max(count, 10), body, trickle_s)
                log(f"{storage} {name}: S->C {res['online']['s_to_c']['bytes_per_msg']} B/msg "
                    f"({res['s_to_c_vs_push']}x PUSH {res['push_frame_bytes']} B), "
                    f"reconnect re-downloads {res['reconnect']['messages']}")  # fmt: skip
                out[name] = res
    finally:
        h.stop()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1,000 messages, embedded only")
    p.add_argument("--storage", help="comma-separated (default embedded,production)")
    p.add_argument("--messages", type=int, help="messages per burst run (default 10,000)")
    p.add_argument("--body", type=int, default=100, help="body bytes (default 100)")
    p.add_argument("--trickle-ms", type=float, default=20.0, help="gap in trickle runs")
    a = p.parse_args()
    storages = (a.storage or ("embedded" if a.quick else "embedded,production")).split(",")
    n = a.messages or (1_000 if a.quick else 10_000)
    if "production" in storages:
        import subprocess

        subprocess.run([str(servers.REPO / "scripts" / "services"), "start"], check=True,
                       stdout=sys.stderr)  # fmt: skip
    results = {s: run_storage(s, n, a.body, a.trickle_ms) for s in storages}
    runs = [r for per in results.values() for r in per.values()]
    wire_once = [r for r in runs if r["receiver"] == "wire_once"]
    ok = not any(r["errors"] for r in runs) and all(
        r["reconnect"]["messages"] == 0 and r["received_twice_online"] == 0 for r in wire_once
    )
    burst_ok = all(
        r["s_to_c_vs_push"] is not None and r["s_to_c_vs_push"] <= TARGET
        for per in results.values()
        for name, r in per.items()
        if name == "burst/wire_once"
    )
    print(json.dumps({"bench": "wire_once", "quick": a.quick, "target": TARGET,
                      "burst_within_target": burst_ok, "ok": ok, "results": results}))  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
