"""Scenario 5: idle authenticated connections held with heartbeats; server memory per connection.

Run from the repo root: `python bench/idle.py [--quick] [--n N] [--target T ...]`. For each target
(improto, mosquitto, bare relay) it starts the server, opens and closes 100 warm-up connections,
reads the server's RSS, opens N connections and authenticates each (improto: HELLO -> HELLO_OK;
MQTT: CONNECT clean_session=1 + SUBSCRIBE qos 1 -> SUBACK; bare: LOGIN + one heartbeat), keeps
them alive with heartbeats, reads the RSS again after ~3 s and at the end of the hold, and stops
the server. Per-connection memory = (RSS after - RSS before) / N, the larger of the two "after"
readings. The generator is this one process: non-blocking sockets on one selector, login frames
precomputed, connects bounded by a window of in-flight logins. Prints one JSON line and writes
bench/results/idle.json.
"""

from __future__ import annotations

import argparse
import errno
import heapq
import json
import socket
import struct
import subprocess
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mqtt_wire
import servers

from improto.codec import FrameReader, decode_payload
from improto.codec import encode as encode_frame
from improto.enums import FrameType
from improto.frames import Hello, HelloOk, Ping

TARGETS = ("improto", "mosquitto", "bare")
N_DEFAULT, N_QUICK = 20_000, 2_000
WARMUP = 100
# Client sockets per loopback source address (127.0.0.2, .3, ...). Ephemeral ports are
# 32768-60999, and connect() gets slow as one address's range fills: 19,900 connections from
# one address took 5.5 s to open to the bare relay, from four 1.5 s.
PER_SOURCE_IP = 5_000
FD_SPARE = 100  # descriptors the generator and each server need besides the connections
INFLIGHT = 256  # logins in flight at once: keeps the servers' accept backlogs from overflowing
RETRIES = 3  # per refused connect
RETRY_DELAY_S = 0.2
SETTLE_S = 3.0  # hold before the first "after" RSS reading
HOLD_S, HOLD_QUICK_S = 6.5, 3.5  # whole hold; > one heartbeat interval in the full run
HEARTBEAT_S = 5  # improto: --heartbeat 5 (the client pings at what HELLO_OK announces)
MQTT_KEEPALIVE = 10
OPEN_TIMEOUT_S, OPEN_TIMEOUT_QUICK_S = 60.0, 15.0
RESULTS = Path(__file__).resolve().parent / "results" / "idle.json"
_SO_LINGER_RST = struct.pack("ii", 1, 0)
_IP_BIND_ADDRESS_NO_PORT = 24  # linux/in.h: pick the port at connect(), per destination


# ----------------------------------------------------------------- protocols


class Login:
    """What a target's client sends and when it counts as authenticated."""

    heartbeat_s: float = HEARTBEAT_S

    def frames(self, n: int, base: int) -> list[bytes]:
        """Precomputed login bytes of connections base..base+n-1."""
        raise NotImplementedError

    def heartbeat(self) -> bytes:
        raise NotImplementedError

    def parser(self) -> Callable[[bytes], bool | None]:
        """A per-connection feed: True once authenticated, False if refused, None: more."""
        raise NotImplementedError


class ImprotoLogin(Login):
    def __init__(self, secret: str) -> None:
        self.secret = secret
        self._ping = encode_frame(Ping(request_id=0))

    def frames(self, n: int, base: int) -> list[bytes]:
        out = []
        for i in range(base, base + n):
            device = f"idle{i}"
            token = servers.mint_token(self.secret, i + 1, device)
            out.append(encode_frame(Hello(1, 1, device, token, request_id=1)))
        return out

    def heartbeat(self) -> bytes:
        return self._ping

    def parser(self) -> Callable[[bytes], bool | None]:
        reader = FrameReader()

        def feed(data: bytes) -> bool | None:
            for payload in reader.feed(data):
                if payload[1] == FrameType.HELLO_OK:
                    ok = decode_payload(payload)
                    assert isinstance(ok, HelloOk)
                    self.heartbeat_s = ok.heartbeat_s  # the interval the server asks for
                    return True
                if payload[1] in (FrameType.ERROR, FrameType.CLOSE):
                    return False
            return None

        return feed


class MqttLogin(Login):
    heartbeat_s = MQTT_KEEPALIVE / 2

    def frames(self, n: int, base: int) -> list[bytes]:
        return [
            mqtt_wire.connect(f"idle-{i}", clean_session=True, keepalive=MQTT_KEEPALIVE)
            + mqtt_wire.subscribe(1, f"idle/{i}", qos=1)
            for i in range(base, base + n)
        ]

    def heartbeat(self) -> bytes:
        return mqtt_wire.pingreq()

    def parser(self) -> Callable[[bytes], bool | None]:
        splitter = mqtt_wire.Splitter()

        def feed(data: bytes) -> bool | None:
            for ptype, _flags, body in splitter.feed(data):
                if ptype == mqtt_wire.CONNACK and body[1:2] != b"\x00":
                    return False
                if ptype == mqtt_wire.SUBACK:
                    return body[-1:] != b"\x80"  # 0x80: subscription refused
            return None

        return feed


class BareLogin(Login):
    """LOGIN (u64 user, u64 group 0) and one heartbeat; the relay answers nothing."""

    _HEARTBEAT = struct.pack(">IBQ", 9, 0, 0)

    def frames(self, n: int, base: int) -> list[bytes]:
        return [struct.pack(">IQQ", 16, i + 1, 0) + self._HEARTBEAT for i in range(base, base + n)]

    def heartbeat(self) -> bytes:
        return self._HEARTBEAT

    def parser(self) -> Callable[[bytes], bool | None]:
        return lambda data: None


# ---------------------------------------------------------------- generator


class Conn:
    __slots__ = ("feed", "index", "out", "retries", "sock", "state")

    def __init__(self, index: int) -> None:
        self.index = index
        self.sock: socket.socket | None = None
        self.state = "new"  # new | connecting | login | ready | dead
        self.out = b""
        self.retries = 0
        self.feed: Callable[[bytes], bool | None] | None = None


@dataclass
class Clients:
    """N client connections driven by one epoll loop: open, log in, heartbeat, close."""

    addr: tuple[str, int]
    login: Login
    frames: list[bytes]
    conns: list[Conn] = field(default_factory=list)
    ready: int = 0
    failed: int = 0
    refused_retries: int = 0
    heartbeats: int = 0
    lost: int = 0  # closed by the server after login
    _sel: Any = None
    _due: list[tuple[float, int]] = field(default_factory=list)  # heartbeat heap
    _retry: deque[tuple[float, Conn]] = field(default_factory=deque)

    def __post_init__(self) -> None:
        import selectors

        self._sel = selectors.DefaultSelector()
        self.conns = [Conn(i) for i in range(len(self.frames))]

    def open_all(self, timeout_s: float) -> float:
        """Connect and log in every connection; returns the seconds it took."""
        t0 = time.monotonic()
        todo = deque(self.conns)
        inflight = 0
        deadline = t0 + timeout_s
        while self.ready + self.failed < len(self.conns) and time.monotonic() < deadline:
            while todo and inflight < INFLIGHT:
                self._connect(todo.popleft())
                inflight += 1
            now = time.monotonic()
            while self._retry and self._retry[0][0] <= now:
                self._connect(self._retry.popleft()[1])
            before = self.ready + self.failed
            self._poll(0.02)
            inflight -= self.ready + self.failed - before
        for c in self.conns:  # still not logged in at the deadline
            if c.state not in ("ready", "dead"):
                self._fail(c)
        return time.monotonic() - t0

    def hold(self, seconds: float) -> None:
        """Keep the connections alive with heartbeats, draining what the server answers."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self._poll(min(0.05, max(0.0, end - time.monotonic())))

    def close_all(self) -> None:
        """Reset every socket (no TIME_WAIT left on loopback ports)."""
        for c in self.conns:
            if c.sock is not None:
                self._drop(c, reset=True)
        self._sel.close()

    # ---------------------------------------------------------------- internals

    def _connect(self, c: Conn) -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        if len(self.conns) > PER_SOURCE_IP:
            s.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            s.bind((f"127.0.0.{2 + c.index // PER_SOURCE_IP}", 0))
        c.sock, c.state = s, "connecting"
        err = s.connect_ex(self.addr)
        if err not in (0, errno.EINPROGRESS):
            self._refused(c, err)
            return
        self._sel.register(s, 2, c)  # EVENT_WRITE: connected (or failed)

    def _refused(self, c: Conn, err: int) -> None:
        if c.sock is not None:
            self._drop(c)
        if err in (errno.ECONNREFUSED, errno.ETIMEDOUT, errno.EAGAIN) and c.retries < RETRIES:
            c.retries += 1
            self.refused_retries += 1
            c.state = "new"
            self._retry.append((time.monotonic() + RETRY_DELAY_S, c))
        else:
            self._fail(c)

    def _poll(self, timeout: float) -> None:
        for key, mask in self._sel.select(timeout):
            c: Conn = key.data
            if c.state == "connecting":
                self._connected(c)
            elif mask & 2 and c.out:
                self._write(c, c.out)
            if mask & 1 and c.sock is not None:
                self._read(c)
        self._heartbeats()

    def _connected(self, c: Conn) -> None:
        assert c.sock is not None
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._sel.unregister(c.sock)
            self._refused(c, err)
            return
        c.state, c.feed = "login", self.login.parser()
        self._sel.modify(c.sock, 1, c)  # EVENT_READ from now on
        self._write(c, self.frames[c.index])
        if isinstance(self.login, BareLogin) and c.state == "login" and not c.out:
            self._logged_in(c)  # nothing comes back: written is logged in

    def _write(self, c: Conn, data: bytes) -> None:
        assert c.sock is not None
        try:
            sent = c.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            self._lose(c)
            return
        c.out = data[sent:]
        self._sel.modify(c.sock, 3 if c.out else 1, c)

    def _read(self, c: Conn) -> None:
        assert c.sock is not None
        try:
            data = c.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._lose(c)
            return
        if c.state == "login" and c.feed is not None:
            verdict = c.feed(data)
            if verdict is True:
                self._logged_in(c)
            elif verdict is False:
                self._fail(c)

    def _logged_in(self, c: Conn) -> None:
        c.state, c.feed = "ready", None
        self.ready += 1
        # The first heartbeat at a spread phase, then every interval: a steady trickle.
        phase = (c.index % 16 + 1) / 16
        heapq.heappush(self._due, (time.monotonic() + phase * self.login.heartbeat_s, c.index))

    def _heartbeats(self) -> None:
        now = time.monotonic()
        beat = self.login.heartbeat()
        while self._due and self._due[0][0] <= now:
            _, i = heapq.heappop(self._due)
            c = self.conns[i]
            if c.state != "ready":
                continue
            if not c.out:
                self._write(c, beat)
                self.heartbeats += 1
            heapq.heappush(self._due, (now + self.login.heartbeat_s, i))

    def _lose(self, c: Conn) -> None:
        if c.state == "ready":
            self.lost += 1
            self._drop(c)
            c.state = "dead"
        else:
            self._fail(c)

    def _fail(self, c: Conn) -> None:
        if c.state != "dead":
            self.failed += 1
        if c.sock is not None:
            self._drop(c)
        c.state = "dead"

    def _drop(self, c: Conn, reset: bool = False) -> None:
        s, c.sock = c.sock, None
        if s is None:
            return
        try:
            self._sel.unregister(s)
        except (KeyError, ValueError):
            pass
        if reset:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _SO_LINGER_RST)
        s.close()


# -------------------------------------------------------------------- runs


def _self_rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def improto_storage() -> str:
    """`memory` once the server offers it, else `embedded` (both: nothing external)."""
    out = subprocess.run(
        [sys.executable, "-m", "improto_server", "--help"], capture_output=True, text=True
    ).stdout
    return "memory" if "memory" in out else "embedded"


def _start(target: str) -> tuple[servers.ServerHandle, Login]:
    if target == "improto":
        h = servers.start_improto(improto_storage(), extra=["--heartbeat", str(HEARTBEAT_S)])
        assert h.secret is not None
        return h, ImprotoLogin(h.secret)
    if target == "mosquitto":
        return servers.start_mosquitto(persistence=False), MqttLogin()
    if target == "bare":
        return servers.start_bare_relay(), BareLogin()
    raise ValueError(f"unknown target {target!r}")


def usable_n(n: int) -> int:
    """n, or fewer if RLIMIT_NOFILE (the hard limit, where it cannot be raised) is lower: the
    generator and each server hold one descriptor per connection."""
    limit = servers.raise_nofile() - FD_SPARE
    if n > limit:
        print(f"idle: RLIMIT_NOFILE allows {limit} connections, not {n}", file=sys.stderr)
    return min(n, limit)


def run(target: str, n: int, quick: bool) -> dict[str, Any]:
    """Hold n idle connections on `target`; the server's memory per connection."""
    n = usable_n(n)
    handle, login = _start(target)
    try:
        addr = (handle.host, handle.port)
        warm = Clients(addr, login, login.frames(WARMUP, n))  # other ids than the measured ones
        warm.open_all(OPEN_TIMEOUT_QUICK_S)
        warm.close_all()
        frames = login.frames(n, 0)  # precomputed before the clock starts
        time.sleep(1.0)  # the server forgets the warm-up connections
        rss_before = handle.rss_kib()
        clients = Clients(addr, login, frames)
        open_s = clients.open_all(OPEN_TIMEOUT_QUICK_S if quick else OPEN_TIMEOUT_S)
        hold_s = HOLD_QUICK_S if quick else HOLD_S
        clients.hold(SETTLE_S)
        rss_settled = handle.rss_kib()
        clients.hold(hold_s - SETTLE_S)
        rss_end = handle.rss_kib()
        alive = clients.ready - clients.lost
        gen_rss = _self_rss_kib()
        clients.close_all()
    finally:
        handle.stop()
    rss_after = max(rss_settled, rss_end)
    per_conn = (rss_after - rss_before) * 1024 / alive if alive else float("nan")
    return {
        "target": target,
        "n": n,
        "authenticated": clients.ready,
        "alive_at_end": alive,
        "failed": clients.failed,
        "connect_retries": clients.refused_retries,
        "heartbeats_sent": clients.heartbeats,
        "rss_before_kib": rss_before,
        "rss_settled_kib": rss_settled,
        "rss_end_kib": rss_end,
        "rss_after_kib": rss_after,
        "bytes_per_conn": round(per_conn),
        "conns_per_gib": round(2**30 / per_conn) if per_conn > 0 else None,
        "open_s": round(open_s, 3),
        "opens_per_s": round(clients.ready / open_s) if open_s else None,
        "generator_rss_kib": gen_rss,
    }


def ratios(results: dict[str, dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """improto's figures over each peer's (memory: >1 means improto uses more)."""
    out: dict[str, dict[str, float | None]] = {}
    me = results.get("improto")
    for peer in ("mosquitto", "bare"):
        other = results.get(peer)
        if me is None or other is None:
            continue
        out[f"improto/{peer}"] = {
            k: (round(me[k] / other[k], 3) if me[k] and other[k] else None)
            for k in ("bytes_per_conn", "conns_per_gib", "open_s")
        }
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"N={N_QUICK}, shorter hold")
    p.add_argument("--n", type=int, help=f"connections per target (default {N_DEFAULT})")
    p.add_argument("--target", action="append", choices=TARGETS, help="repeatable; default all")
    args = p.parse_args(argv)
    n = usable_n(args.n or (N_QUICK if args.quick else N_DEFAULT))
    results: dict[str, dict[str, Any]] = {}
    for target in args.target or TARGETS:
        r = run(target, n, args.quick)
        results[target] = r
        print(
            f"{target:10} n={r['alive_at_end']:>6}/{n} open {r['open_s']:6.2f}s  "
            f"rss {r['rss_before_kib']:>8} -> {r['rss_after_kib']:>8} KiB  "
            f"{r['bytes_per_conn']:>7} B/conn  {r['conns_per_gib'] or 0:>10} conns/GiB  "
            f"gen rss {r['generator_rss_kib']} KiB",
            file=sys.stderr,
        )
    out = {"scenario": "idle", "quick": args.quick, "n": n, "results": results,
           "ratios": ratios(results)}  # fmt: skip
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
