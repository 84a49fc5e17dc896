"""Pieces of bench/abuse.py that speak the wire or read /proc: no attack logic here.

- `Client`: one blocking loopback connection (login, requests, replies matched by request_id,
  frames in between kept), and `send_all` / `drain` for peers that misbehave on purpose;
- `history_ids`: every msg_id of one conversation as a reader sees it (the loss check);
- `odd_token`: an HS256 JWT signed with the server's secret over a raw JSON payload, so claims
  JSON cannot express through `jwt.encode` (NaN, 1e400) can be sent;
- `ProcStats` / `Sampler`: VmRSS and open fds summed over the server's processes, sampled on a
  thread;
- `percentiles`, `source_address`.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from improto.codec import decode_payload, encode
from improto.errors import ProtocolError
from improto.frames import (
    Error,
    Frame,
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    OfflinePage,
    OfflinePull,
    Send,
)
from improto.tokens import mint

HOST = "127.0.0.1"
_LEN = struct.Struct(">I")
_RID = struct.Struct(">I")
RECV = 1 << 18
T_HELLO_OK, T_SEND_ACK, T_PUSH, T_CLOSE, T_SYNC_HINT, T_ERROR = 0x81, 0x83, 0xA0, 0xA1, 0xA2, 0xFF
T_HISTORY_PAGE = 0x87
BODY_64K = 65_535


def source_address(index: int, per_address: int) -> str:
    """The loopback address for the index-th attacking connection, `per_address` per address
    (127.0.0.2 and up; 127.0.0.1 stays the bystander's and the server's)."""
    n = 2 + index // per_address
    return f"127.0.{n // 250}.{2 + n % 250}" if n >= 250 else f"127.0.0.{n}"


def device() -> str:
    return "ab-" + uuid.uuid4().hex[:12]


def send_frame(conv: int, body: bytes, rid: int, content_type: int = 2) -> bytes:
    """A 1:1 SEND (content type 2: opaque bytes, no UTF-8 check on the client side)."""
    return encode(Send(uuid.uuid4().bytes, 1, conv, content_type, body, request_id=rid))


def group_send_frame(group: int, body: bytes, rid: int) -> bytes:
    return encode(Send(uuid.uuid4().bytes, 2, group, 2, body, request_id=rid))


class Closed(ConnectionError):
    """The server closed the connection (`error`: the ERROR it sent first, if any)."""

    def __init__(self, message: str, error: int | None = None) -> None:
        super().__init__(message)
        self.error = error


@dataclass
class Client:
    """A blocking connection that hands out whole frame payloads."""

    port: int
    host: str = HOST
    source: str | None = None
    timeout: float = 10.0
    sock: socket.socket = field(init=False)
    buf: bytearray = field(default_factory=bytearray)
    errors: dict[int, int] = field(default_factory=dict)  # ERROR code -> count seen
    user: int = 0
    rid: int = 0

    def __post_init__(self) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        if self.source is not None:
            s.bind((self.source, 0))
        s.connect((self.host, self.port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = s

    def next_rid(self) -> int:
        self.rid = self.rid % 0xFFFFFFF0 + 1
        return self.rid

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(self, frame_bytes: bytes) -> None:
        self.sock.sendall(frame_bytes)

    def frames(self, timeout: float | None = None) -> list[bytes]:
        """Whole frames buffered, reading until there is at least one."""
        self.sock.settimeout(self.timeout if timeout is None else timeout)
        while True:
            out = split_frames(self.buf)
            if out:
                return out
            try:
                chunk = self.sock.recv(RECV)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise Closed("server closed the connection")
            self.buf += chunk

    def reply(self, rid: int, timeout: float | None = None) -> Frame:
        """The frame answering request `rid` (others before it are dropped; ERRORs counted)."""
        while True:
            got = self.frames(timeout)
            for i, p in enumerate(got):
                if p[1] == T_ERROR:
                    code = struct.unpack_from(">H", p, 7)[0]
                    self.errors[code] = self.errors.get(code, 0) + 1
                if _RID.unpack_from(p, 3)[0] == rid and p[1] not in (T_PUSH, T_SYNC_HINT):
                    rest = got[i + 1 :]
                    if rest:
                        self.buf[:0] = b"".join(_LEN.pack(len(x)) + x for x in rest)
                    return decode_payload(p)

    def login(self, secret: str, user: int, dev: str | None = None) -> HelloOk:
        dev = dev or device()
        rid = self.next_rid()
        self.send(encode(Hello(1, 0, dev, mint(secret, user, dev), request_id=rid)))
        f = self.reply(rid)
        if not isinstance(f, HelloOk):
            raise RuntimeError(f"login of user {user}: {f!r}")
        self.user = user
        return f

    def close(self, reset: bool = False) -> None:
        with contextlib.suppress(OSError):
            if reset:  # RST: no TIME_WAIT left on loopback ports
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.sock.close()


def split_frames(buf: bytearray) -> list[bytes]:
    off, out = 0, []
    while len(buf) - off >= 4:
        (n,) = _LEN.unpack_from(buf, off)
        if len(buf) - off - 4 < n:
            break
        out.append(bytes(buf[off + 4 : off + 4 + n]))
        off += 4 + n
    if off:
        del buf[:off]
    return out


def login(port: int, secret: str, user: int, **kw: Any) -> Client:
    c = Client(port, **kw)
    c.login(secret, user)
    return c


def send_all(sock: socket.socket, data: bytes, stall_s: float) -> tuple[int, bool]:
    """Write as much of `data` as the server reads; stop when it has read nothing for `stall_s`
    (it stopped reading: back-pressure) or closed. Returns (bytes written, stalled)."""
    sock.settimeout(stall_s)
    view, sent = memoryview(data), 0
    while sent < len(data):
        try:
            sent += sock.send(view[sent : sent + (1 << 20)])
        except TimeoutError:
            return sent, True
        except OSError:
            return sent, False
    return sent, False


@dataclass
class Drained:
    bytes: int = 0
    frames: dict[int, int] = field(default_factory=dict)  # frame type -> count
    errors: dict[int, int] = field(default_factory=dict)  # ERROR code -> count
    acks: list[int] = field(default_factory=list)  # msg_ids of SEND_ACKs
    closed: bool = False

    def feed(self, buf: bytearray, chunk: bytes, any_rid: bool = False) -> int:
        """Count `chunk` and the whole frames it completes in `buf` (taken out of it); return
        how many answer a request: ERRORs, SEND_ACKs and the other frames but pushes, hints
        and CLOSE that carry a request_id (or any, with `any_rid`)."""
        self.bytes += len(chunk)
        buf += chunk
        answered = 0
        for p in split_frames(buf):
            t = p[1]
            self.frames[t] = self.frames.get(t, 0) + 1
            if t == T_ERROR:
                code = struct.unpack_from(">H", p, 7)[0]
                self.errors[code] = self.errors.get(code, 0) + 1
                answered += 1
            elif t == T_SEND_ACK:
                self.acks.append(struct.unpack_from(">Q", p, 7 + 16)[0])
                answered += 1
            elif t not in (T_PUSH, T_SYNC_HINT, T_CLOSE):
                answered += 1 if any_rid or _RID.unpack_from(p, 3)[0] else 0
        return answered


def drain(sock: socket.socket, seconds: float, quiet_s: float = 1.0, out: Drained | None = None,
          expect_acks: int = 0) -> Drained:  # fmt: skip
    """Read everything the server sends for up to `seconds` (stop earlier once it closed, once
    `expect_acks` replies to requests came, or after `quiet_s` of silence); frames are only
    counted (SEND_ACK msg_ids and ERROR codes kept)."""
    d = out or Drained()
    buf = bytearray()
    end = time.monotonic() + seconds
    answered = 0
    while time.monotonic() < end:
        sock.settimeout(max(0.01, min(quiet_s, end - time.monotonic())))
        try:
            chunk = sock.recv(RECV)
        except TimeoutError:
            break
        except OSError:
            chunk = b""
        if not chunk:
            d.closed = True
            break
        answered += d.feed(buf, chunk)
        if expect_acks and answered >= expect_acks:
            break
    return d


def is_closed(sock: socket.socket, wait_s: float = 0.0) -> bool:
    """Whether the server closed it, reading (and dropping) what is buffered first."""
    return drain(sock, max(wait_s, 0.05), quiet_s=max(wait_s, 0.05)).closed


def history_ids(c: Client, conv_kind: int, conv_id: int, limit: int = 100) -> set[int]:
    """Every msg_id in one conversation's history as c's user sees it (newest first, paged)."""
    ids: set[int] = set()
    before = 0
    while True:
        rid = c.next_rid()
        c.send(encode(HistoryPull(conv_kind, conv_id, before, limit, request_id=rid)))
        page = c.reply(rid, timeout=30.0)
        if not isinstance(page, HistoryPage):
            raise RuntimeError(f"history of {conv_kind}/{conv_id}: {page!r}")
        ids.update(m.msg_id for m in page.messages)
        if not page.has_more or not page.messages:
            return ids
        before = page.messages[-1].msg_id


def inbox_ids(c: Client, conv_kind: int, conv_id: int) -> set[int]:
    """The msg_ids of one conversation in c's user's offline inbox (pulled from cursor 0)."""
    ids: set[int] = set()
    cursor = 0
    while True:
        rid = c.next_rid()
        c.send(encode(OfflinePull(cursor, 200, request_id=rid)))
        page = c.reply(rid, timeout=30.0)
        if not isinstance(page, OfflinePage):
            raise RuntimeError(f"offline pull: {page!r}")
        for m in page.messages:
            peer = m.conv_id if m.sender_id == c.user or conv_kind == 2 else m.sender_id
            if m.conv_kind == conv_kind and peer == conv_id:
                ids.add(m.msg_id)
        if not page.has_more:
            return ids
        cursor = page.cursor


def missing_acked(port: int, secret: str, reader: int, conv_kind: int, conv_id: int,
                  acked: Iterable[int], timeout_s: float = 20.0) -> tuple[int, str]:  # fmt: skip
    """How many acked msg_ids are in neither the reader's history of the conversation nor its
    inbox, and how that was read ("history", "inbox": history failed, or the error that kept
    both from being read). Both are written just after the ack (production: by the
    persister), so re-read until none is missing or `timeout_s` passes."""
    want = set(acked)
    if not want:
        return 0, "none acked"
    c = login(port, secret, reader, timeout=30.0)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            how, problems = "", []
            found: set[int] = set()
            for name, read in (("history", history_ids), ("inbox", inbox_ids)):
                try:
                    found |= read(c, conv_kind, conv_id)
                    how = how or name
                except (RuntimeError, TimeoutError) as e:
                    problems.append(f"{name}: {e}"[:200])
                if want <= found:
                    break
            if not how:
                return len(want), "; ".join(problems)
            missing = want - found
            if not missing or time.monotonic() > deadline:
                return len(missing), how if not problems else f"{how} ({'; '.join(problems)})"
            time.sleep(0.5)
    finally:
        c.close()


# ----------------------------------------------------------------------------- tokens


def _b64(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def odd_token(secret: str, payload_json: str) -> str:
    """HS256 JWT with a genuine signature over exactly this claims text."""
    head = _b64(b'{"alg":"HS256","typ":"JWT"}')
    body = _b64(payload_json.encode())
    sig = hmac.new(secret.encode(), head + b"." + body, hashlib.sha256).digest()
    return (head + b"." + body + b"." + _b64(sig)).decode()


def hello_outcome(port: int, token: str, dev: str) -> str:
    """'hello_ok', 'error <code> then closed', 'error <code>' (left open), 'closed without
    ERROR' or 'no answer'."""
    c = Client(port, timeout=5.0)
    try:
        try:
            c.send(encode(Hello(1, 0, dev, token, request_id=7)))
            f = c.reply(7)
        except Closed:
            return "closed without ERROR"
        except TimeoutError:
            return "no answer"
        except ProtocolError as e:
            return f"undecodable reply ({e})"
        if isinstance(f, HelloOk):
            return "hello_ok"
        if isinstance(f, Error):
            return f"error {f.code}" + (" then closed" if is_closed(c.sock, 2.0) else "")
        return f"unexpected {type(f).__name__}"
    finally:
        c.close()


# --------------------------------------------------------------------------- /proc


class ProcStats:
    """VmRSS (KiB) and open fds summed over the server's processes (exited ones count 0)."""

    def __init__(self, pids: Sequence[int]) -> None:
        self.pids = list(pids)

    def rss_kib(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        return total

    def fds(self) -> int:
        total = 0
        for pid in self.pids:
            with contextlib.suppress(OSError):
                total += len(os.listdir(f"/proc/{pid}/fd"))
        return total

    def alive(self) -> bool:
        return all(Path(f"/proc/{pid}").exists() for pid in self.pids)


class Sampler(threading.Thread):
    """(monotonic time, RSS KiB, fds) every `interval` seconds until stopped."""

    def __init__(self, stats: ProcStats, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.stats, self.interval = stats, interval
        self.samples: list[tuple[float, int, int]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.samples.append((time.monotonic(), self.stats.rss_kib(), self.stats.fds()))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(2.0)

    def peak(self, t0: float, t1: float) -> tuple[int, int]:
        """Largest RSS (KiB) and fd count sampled within [t0, t1]."""
        inside = [(r, f) for t, r, f in self.samples if t0 <= t <= t1]
        if not inside:
            return self.stats.rss_kib(), self.stats.fds()
        return max(r for r, _ in inside), max(f for _, f in inside)


def percentiles(ms: Sequence[float]) -> dict[str, float | int]:
    """p50/p99/max of latencies in ms (nearest rank), and the sample count."""
    if not ms:
        return {"n": 0, "p50": 0.0, "p99": 0.0, "max": 0.0}
    s = sorted(ms)

    def rank(q: float) -> float:
        return round(s[min(len(s) - 1, max(0, int(q * len(s) + 0.999999) - 1))], 2)

    return {"n": len(s), "p50": rank(0.50), "p99": rank(0.99), "max": round(s[-1], 2)}


def json_line(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
