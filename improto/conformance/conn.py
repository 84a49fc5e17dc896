"""A small blocking protocol client for the conformance suite.

Plain `socket` with timeouts, no framework: it speaks to any server over TCP. Frames are
encoded with `improto.codec`; everything the server sends is decoded strictly, and a frame the
codec refuses (other than an unknown type, which spec section 14 says a client skips) is a
conformance failure. Replies are matched by request_id; unsolicited PUSH, SYNC_HINT and CLOSE
frames are kept in arrival order for the checks to inspect.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import socket
import struct
import time
from collections.abc import Callable
from typing import TypeVar

from improto.codec import FrameReader, decode_payload, encode
from improto.enums import ClientKind, ContentType, ConvKind
from improto.errors import ErrorCode, ProtocolError, UnknownFrameType
from improto.frames import (
    Close,
    Error,
    Frame,
    Hello,
    HelloOk,
    Message,
    OfflineAck,
    OfflineAckOk,
    OfflinePage,
    OfflinePull,
    Ping,
    Pong,
    Push,
    Send,
    SendAck,
    SyncHint,
)
from improto.limits import MAX_FRAME_LENGTH
from improto.tokens import mint

# Hand-built frame bytes for the checks, shared with the invalid test vectors.
from improto.vectors import raw_frame as raw_frame
from improto.vectors import str8 as str8
from improto.vectors import str16 as str16

F = TypeVar("F", bound=Frame)
T = TypeVar("T")

# Frames the server sends on its own initiative (spec section 3: request_id 0).
UNSOLICITED = (Push, SyncHint, Close)


def code_name(code: int) -> str:
    try:
        return f"{code} {ErrorCode(code).name}"
    except ValueError:
        return str(code)


def describe(f: Frame | None) -> str:
    """A one-line rendering of a frame for failure messages."""
    if f is None:
        return "nothing"
    if isinstance(f, Error):
        return f"ERROR {code_name(f.code)} (request_id {f.request_id}, text {f.text!r})"
    if isinstance(f, Close):
        return f"CLOSE reason {f.reason} ({f.text!r})"
    return f"{f.TYPE.name} (request_id {f.request_id})"


class Conn:
    """One TCP connection to the server under test."""

    def __init__(self, host: str, port: int, timeout: float = 5.0, label: str = "") -> None:
        self.label = label or "conn"
        self.timeout = timeout
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = FrameReader(MAX_FRAME_LENGTH)
        self.queue: list[Frame] = []  # decoded frames not yet consumed, in arrival order
        self.eof = False
        self.skipped_unknown = 0
        self.user_id = 0
        self.device_id = ""
        self._rid = random.randrange(1, 1 << 30)

    # ---------------------------------------------------------------- output

    def next_rid(self) -> int:
        self._rid = self._rid % 0xFFFFFFFF + 1
        return self._rid

    def send(self, frame: Frame, rid: int | None = None) -> int:
        """Encode and write a frame with a fresh (or the given) request_id; return the id."""
        rid = self.next_rid() if rid is None else rid
        self.send_raw(encode(dataclasses.replace(frame, request_id=rid)))
        return rid

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    # ----------------------------------------------------------------- input

    def _read(self, deadline: float) -> bool:
        """Read once from the socket until `deadline`; False on timeout or end of stream."""
        if self.eof:
            return False
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        self.sock.settimeout(remaining)
        try:
            data = self.sock.recv(262144)
        except TimeoutError:
            return False
        except (ConnectionResetError, ConnectionAbortedError, BrokenPipeError):
            self.eof = True
            return False
        if not data:
            self.eof = True
            return False
        try:
            payloads = self.reader.feed(data)
        except ProtocolError as e:
            raise AssertionError(f"{self.label}: server sent an oversize frame: {e}") from None
        for payload in payloads:
            try:
                self.queue.append(decode_payload(payload))
            except UnknownFrameType:
                self.skipped_unknown += 1  # spec 14: a client skips unknown types
            except ProtocolError as e:
                raise AssertionError(
                    f"{self.label}: server sent an invalid frame ({e.code.name}: {e}): "
                    f"{payload[:48].hex()}"
                ) from None
        return True

    def wait_for(
        self, pred: Callable[[Frame], bool], timeout: float | None = None, what: str = "a frame"
    ) -> Frame:
        """Remove and return the first queued or arriving frame matching `pred`."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while True:
            for i, f in enumerate(self.queue):
                if pred(f):
                    return self.queue.pop(i)
            if self.eof:
                closes = [describe(f) for f in self.queue if isinstance(f, Close | Error)]
                extra = f" after {', '.join(closes)}" if closes else ""
                raise AssertionError(
                    f"{self.label}: connection closed by the server{extra} while waiting for {what}"
                )
            if not self._read(deadline) and not self.eof:
                raise AssertionError(f"{self.label}: no {what} within the timeout")

    def next_frame(self, timeout: float | None = None) -> Frame:
        """The next frame of any type, in arrival order."""
        return self.wait_for(lambda f: True, timeout, "frame")

    def drain(self, seconds: float) -> None:
        """Read everything already buffered or arriving within `seconds` into the queue."""
        deadline = time.monotonic() + max(seconds, 0.02)
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)

    def closed_within(self, seconds: float) -> bool:
        """True if the peer closes the connection within `seconds` (frames are kept)."""
        deadline = time.monotonic() + seconds
        while not self.eof and time.monotonic() < deadline:
            self._read(deadline)
        return self.eof

    # ------------------------------------------------------------- requests

    def reply(self, rid: int, what: str = "reply", timeout: float | None = None) -> Frame:
        """Wait for the reply (or ERROR) carrying request_id `rid`."""
        return self.wait_for(
            lambda f: not isinstance(f, UNSOLICITED) and f.request_id == rid,
            timeout,
            f"{what} to request_id {rid}",
        )

    def request(self, frame: Frame, timeout: float | None = None) -> Frame:
        """Send a request and return the frame answering it (reply or ERROR)."""
        rid = self.send(frame)
        return self.reply(rid, f"answer to {frame.TYPE.name}", timeout)

    def call(self, frame: Frame, expect: type[F], timeout: float | None = None) -> F:
        """Send a request and assert that it is answered by a frame of type `expect`."""
        rid = self.send(frame)
        got = self.reply(rid, f"{expect.TYPE.name} to {frame.TYPE.name}", timeout)
        assert isinstance(got, expect), (
            f"{self.label}: {frame.TYPE.name} answered by {describe(got)}, "
            f"expected {expect.TYPE.name}"
        )
        return got

    def expect_error(self, frame: Frame | bytes, code: int, rid: int | None = None) -> Error:
        """Send a frame (or raw bytes with request_id `rid`) and assert ERROR `code` echoing it."""
        if isinstance(frame, bytes):
            self.send_raw(frame)
            what = "raw frame"
            rid = 0 if rid is None else rid
        else:
            what = frame.TYPE.name
            rid = self.send(frame)
        got = self.reply(rid, f"ERROR {code_name(code)} to {what}")
        assert isinstance(got, Error) and got.code == code, (
            f"{self.label}: {what} answered by {describe(got)}, expected ERROR {code_name(code)}"
        )
        return got

    def ping(self) -> Pong:
        """A PING/PONG round trip: proves the connection is open and usable."""
        return self.call(Ping(), Pong)

    def login(
        self, secret: str, user_id: int, device_id: str, kind: int = ClientKind.DESKTOP
    ) -> HelloOk:
        token = mint(secret, user_id, device_id, 3600)
        ok = self.call(Hello(1, kind, device_id, token), HelloOk)
        self.user_id, self.device_id = user_id, device_id
        self.label = f"user {user_id}/{device_id}"
        return ok

    def send_msg(
        self,
        conv_id: int,
        body: bytes = b"hi",
        kind: int = ConvKind.USER,
        content_type: int = ContentType.TEXT,
        cmid: bytes | None = None,
    ) -> SendAck:
        """SEND one message and return its SEND_ACK (checks the echoed client_msg_id)."""
        cmid = os.urandom(16) if cmid is None else cmid
        ack = self.call(Send(cmid, kind, conv_id, content_type, body), SendAck)
        assert ack.client_msg_id == cmid, "SEND_ACK does not echo client_msg_id (spec 7 SEND_ACK)"
        return ack

    # --------------------------------------------------------------- pushes

    def next_push(
        self, pred: Callable[[Message], bool] = lambda m: True, timeout: float | None = None
    ) -> Push:
        f = self.wait_for(lambda f: isinstance(f, Push) and pred(f.message), timeout, "PUSH")
        assert isinstance(f, Push)
        return f

    def push_for(self, msg_id: int, timeout: float | None = None) -> Message:
        """Wait for the PUSH of `msg_id`; assert it carries request_id 0 (spec 3)."""
        p = self.next_push(lambda m: m.msg_id == msg_id, timeout)
        assert p.request_id == 0, f"{self.label}: PUSH has request_id {p.request_id}, not 0"
        return p.message

    def queued_pushes(self, msg_id: int | None = None) -> list[Message]:
        return [
            f.message
            for f in self.queue
            if isinstance(f, Push) and (msg_id is None or f.message.msg_id == msg_id)
        ]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


class Env:
    """What a check gets: the server address and secret, and factories for connections."""

    def __init__(
        self,
        host: str,
        port: int,
        secret: str,
        timeout: float = 5.0,
        large_threshold: int | None = None,
    ) -> None:
        self.host, self.port, self.secret, self.timeout = host, port, secret, timeout
        # the server's large-group threshold (spec 20.8), which a client cannot learn: given
        # to the runner (--large-group-threshold); None: the checks needing it do not run
        self.large_threshold = large_threshold
        self.conns: list[Conn] = []
        self.info: dict[str, int] = {}  # filled by the first login: HELLO_OK values

    def connect(self, label: str = "") -> Conn:
        c = Conn(self.host, self.port, self.timeout, label)
        self.conns.append(c)
        return c

    def login(self, user_id: int | None = None, device: str | None = None) -> Conn:
        """A new authenticated connection (fresh random user/device unless given)."""
        c = self.connect()
        c.login(self.secret, user_id or new_user(), device or new_device())
        return c

    def token(self, user_id: int, device: str, ttl_s: float = 3600.0) -> str:
        return mint(self.secret, user_id, device, ttl_s)

    def close_all(self) -> None:
        for c in self.conns:
            c.close()
        self.conns.clear()


# ----------------------------------------------------------------------- helpers


def new_user() -> int:
    """A fresh random 40-bit user id, so that checks never share state (re-runnable)."""
    return random.randrange(1 << 39, 1 << 40)


def new_device() -> str:
    return "conf-" + os.urandom(6).hex()


def huge_id() -> int:
    """An id no real server has assigned yet (for NOT_FOUND checks)."""
    return random.randrange(1 << 62, (1 << 64) - 1)


def u64(v: int) -> bytes:
    return struct.pack(">Q", v)


def ids16(ids: list[int]) -> bytes:
    return struct.pack(">H", len(ids)) + b"".join(u64(i) for i in ids)


def eventually(fn: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Call `fn` until it stops raising AssertionError (spec 11: persistence is asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(interval)
            interval = min(interval * 2, 0.25)


@dataclasses.dataclass
class SyncResult:
    messages: list[Message]
    pages: list[OfflinePage]
    cursor: int


def sync(conn: Conn, cursor: int = 0, limit: int = 200, max_pages: int = 1000) -> SyncResult:
    """Run the spec 10.2 sync loop and check each page's invariants on the way."""
    messages: list[Message] = []
    pages: list[OfflinePage] = []
    for _ in range(max_pages):
        page = conn.call(OfflinePull(cursor, limit), OfflinePage)
        eff = 200 if limit == 0 else limit
        assert len(page.messages) <= eff, f"page of {len(page.messages)} > limit {eff} (10.3)"
        assert page.gap == 0, "gap=1 although nothing can have expired (10.3)"
        pages.append(page)
        messages.extend(page.messages)
        if page.messages and pages[:-1]:
            assert page.cursor > pages[-2].cursor, (
                f"page cursor {page.cursor} not above previous {pages[-2].cursor} (10.3)"
            )
        cursor = page.cursor
        if not page.has_more:
            return SyncResult(messages, pages, cursor)
        assert page.messages, "empty page with has_more=1 (10.3: at least one entry)"
    raise AssertionError(f"sync loop did not end after {max_pages} pages")


def offline_ack(conn: Conn, cursor: int) -> int:
    return conn.call(OfflineAck(cursor), OfflineAckOk).cursor
