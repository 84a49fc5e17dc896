"""Scenarios 2 (offline drain) and 3 (history page), improto next to Mosquitto.

    python bench/sync_pull.py [--quick] [--target all|improto|mosquitto] [--storage S ...]

Offline drain: user R gets N messages (10,000; quick 2,000) of 100 bytes from S while R is
offline; once every one is persisted, R connects with a fresh device and runs the sync loop
from cursor 0 at 200 per page until has_more = 0. Timed three times (fresh devices): total
(connect to last page, and first OFFLINE_PULL to last page) and per-page latency (request
sent to whole page received). Every page is decoded with improto.codec after the timed loop
and checked: exactly the N messages, in send order (one sender on one connection, so cursor
order is send order), none twice.

History: a 1:1 conversation of N messages (100,000; quick 10,000), then serially P pages of
20 (500; quick 200): half walking back from the newest, half at random positions; each page
must be 20 messages, newest first, consecutive in the conversation.

Mosquitto (the peer, offline drain only): a persistent session (clean_session=False) with a
QoS 1 subscription is away while N QoS 1 messages are published; the timed part is its
reconnect until all N arrived (each PUBACKed), with the time of every 200-message chunk.

Generators are blocking sockets with precomputed request frames, one process apart from the
server. Prints a final JSON line and writes bench/results/sync_pull.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import socket
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import servers
from abuse_wire import split_frames

from improto.codec import decode_payload, encode
from improto.enums import ConvKind
from improto.frames import (
    Hello,
    HelloOk,
    HistoryPage,
    HistoryPull,
    Message,
    OfflinePage,
    OfflinePull,
    Send,
)

RESULTS = Path(__file__).resolve().parent / "results" / "sync_pull.json"
PAGE_LIMIT = 200  # offline page size (the spec's default and maximum)
HISTORY_LIMIT = 20
BODY_SIZE = 100
DRAIN_RUNS = 3
IO_TIMEOUT_S = 30.0
RECV_SIZE = 1 << 20

_LEN = struct.Struct(">I")
_RID = struct.Struct(">I")
_U64 = struct.Struct(">Q")
T_SEND_ACK, T_OFFLINE_PAGE, T_HISTORY_PAGE, T_ERROR = 0x83, 0x85, 0x87, 0xFF


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"drain": 2_000, "history": 10_000, "pages": 200, "drain_window": 500,
                "history_window": 2_000}  # fmt: skip
    return {"drain": 10_000, "history": 100_000, "pages": 500, "drain_window": 500,
            "history_window": 2_000}  # fmt: skip


def percentiles(samples_s: Sequence[float]) -> dict[str, float | int]:
    """Exact nearest-rank p50/p99/max in ms (the sample counts here are small)."""
    if not samples_s:
        return {"n": 0}
    s = sorted(samples_s)

    def rank(q: float) -> float:
        return s[max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))]

    return {
        "n": len(s),
        "p50_ms": round(rank(0.50) * 1e3, 3),
        "p99_ms": round(rank(0.99) * 1e3, 3),
        "max_ms": round(s[-1] * 1e3, 3),
        "mean_ms": round(sum(s) / len(s) * 1e3, 3),
    }


def body(i: int) -> bytes:
    """The i-th message's 100-byte text body (its index first, so it can be checked)."""
    return f"m{i:09d} ".encode().ljust(BODY_SIZE, b"x")


# --------------------------------------------------------------------------- improto wire


class Wire:
    """A blocking connection that hands out whole frame payloads (u32 length prefix)."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def frames(self) -> list[bytes]:
        """Every whole frame buffered, reading until there is at least one."""
        while True:
            out = split_frames(self.buf)
            if out:
                return out
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def reply(self, rid: int, typ: int) -> bytes:
        """The next frame answering request `rid` (pushes and hints in between are skipped)."""
        while True:
            for i, p in enumerate(f := self.frames()):
                if _RID.unpack_from(p, 3)[0] != rid:
                    continue
                rest = f[i + 1 :]
                if rest:  # keep what came after it for the next call
                    self.buf[:0] = b"".join(_LEN.pack(len(x)) + x for x in rest)
                if p[1] == typ:
                    return p
                raise RuntimeError(f"request {rid}: {decode_payload(p)!r}")

    def close(self) -> None:
        self.sock.close()


def login(h: servers.ServerHandle, user: int, device: str) -> Wire:
    assert h.secret is not None
    w = Wire(h.host, h.port)
    token = servers.mint_token(h.secret, user, device)
    w.send(encode(Hello(1, 0, device, token, request_id=1)))
    frame = decode_payload(w.reply(1, 0x81))
    assert isinstance(frame, HelloOk) and frame.user_id == user, frame
    return w


def device() -> str:
    return "d-" + uuid.uuid4().hex[:16]


def prefill(h: servers.ServerHandle, sender: int, peer: int, n: int, window: int) -> list[int]:
    """Send n 1:1 messages sender -> peer with up to `window` unacknowledged; their msg_ids
    in send order (from the SEND_ACKs)."""
    frames = [
        encode(Send(uuid.uuid4().bytes, ConvKind.USER, peer, 1, body(i), request_id=i + 1))
        for i in range(n)
    ]
    w = login(h, sender, device())
    ids = [0] * n
    sent = acked = 0
    try:
        while acked < n:
            if sent < n and sent - acked <= window // 2:
                top = min(n, acked + window)
                w.send(b"".join(frames[sent:top]))
                sent = top
            for p in w.frames():
                if p[1] == T_SEND_ACK:
                    (rid,) = _RID.unpack_from(p, 3)
                    if ids[rid - 1] == 0:
                        acked += 1
                    ids[rid - 1] = _U64.unpack_from(p, 7 + 16)[0]
                    if p[-1] != 0:
                        raise RuntimeError(f"SEND {rid} acknowledged as a duplicate")
                elif p[1] == T_ERROR:
                    raise RuntimeError(f"SEND refused: {decode_payload(p)!r}")
    finally:
        w.close()
    return ids


def pull_frame(cursor: int, rid: int) -> bytes:
    return encode(OfflinePull(cursor, PAGE_LIMIT, request_id=rid))


def wait_inbox(h: servers.ServerHandle, user: int, n: int, timeout: float) -> float:
    """Sync a probe device incrementally until n messages are visible; seconds waited."""
    t0 = time.perf_counter()
    w = login(h, user, "probe-" + device())
    cursor, seen, rid = 0, 0, 1
    try:
        while seen < n:
            rid += 1
            w.send(pull_frame(cursor, rid))
            page = decode_payload(w.reply(rid, T_OFFLINE_PAGE))
            assert isinstance(page, OfflinePage)
            seen += len(page.messages)
            cursor = page.cursor
            if not page.has_more and seen < n:
                if time.perf_counter() - t0 > timeout:
                    raise TimeoutError(f"only {seen}/{n} messages persisted after {timeout}s")
                time.sleep(0.05)
    finally:
        w.close()
    return time.perf_counter() - t0


def drain_once(h: servers.ServerHandle, user: int, expected: list[int]) -> dict[str, Any]:
    """The timed sync loop of a fresh device; the pages are decoded and checked after it."""
    t_connect = time.perf_counter()
    w = login(h, user, device())
    pages: list[bytes] = []
    latencies: list[float] = []
    cursor, rid, more = 0, 1, True
    t_first = time.perf_counter()
    try:
        while more:
            rid += 1
            frame = pull_frame(cursor, rid)
            t = time.perf_counter()
            w.send(frame)
            p = w.reply(rid, T_OFFLINE_PAGE)
            latencies.append(time.perf_counter() - t)
            pages.append(p)
            (cursor,) = _U64.unpack_from(p, 7)  # cursor, has_more: the first body fields
            more = p[15] == 1
        t_end = time.perf_counter()
    finally:
        w.close()
    count, errors = check_drain(pages, expected)
    return {
        "total_s": round(t_end - t_connect, 4),
        "pull_s": round(t_end - t_first, 4),
        "pages": len(pages),
        "page": percentiles(latencies),
        "messages": count,
        "ok": not errors,
        "errors": errors[:5],
    }


def check_drain(pages: list[bytes], expected: list[int]) -> tuple[int, list[str]]:
    """How many messages the pages hold, and what is wrong with them (loss, duplicates,
    order, bodies)."""
    got: list[Message] = []
    for p in pages:
        page = decode_payload(p)
        assert isinstance(page, OfflinePage)
        got.extend(page.messages)
    ids = [m.msg_id for m in got]
    errors = []
    if len(set(ids)) != len(ids):
        errors.append(f"{len(ids) - len(set(ids))} duplicates")
    if ids != expected:
        missing = len(set(expected) - set(ids))
        errors.append(f"not the {len(expected)} sent in order: {len(ids)} got, {missing} missing")
    bodies = _bodies(len(got))
    errors += [f"msg {m.msg_id}: bad body" for m, b in zip(got, bodies, strict=True) if m.body != b]
    return len(got), errors


def _bodies(n: int) -> list[bytes]:
    return [body(i) for i in range(n)]


def offline_drain(h: servers.ServerHandle, n: int, window: int) -> dict[str, Any]:
    sender, receiver = _user(), _user()
    expected, timing = prefill_and_wait(
        h, sender, receiver, n, window, lambda _: wait_inbox(h, receiver, n, max(30.0, n / 500))
    )
    runs = [drain_once(h, receiver, expected) for _ in range(DRAIN_RUNS)]
    best = min(runs, key=lambda r: r["total_s"])
    return {
        "messages": n,
        "page_limit": PAGE_LIMIT,
        **timing,
        "runs": runs,
        "best": best,
        "ok": all(r["ok"] for r in runs),
    }


def _user() -> int:
    return random.randrange(1 << 32, 1 << 48)


def prefill_and_wait(
    h: servers.ServerHandle,
    sender: int,
    receiver: int,
    n: int,
    window: int,
    wait: Callable[[list[int]], float],
) -> tuple[list[int], dict[str, Any]]:
    """Prefill n messages from sender to receiver, then `wait(sent)` until they are persisted
    (it returns the seconds waited): the msg_ids sent, and the timings for the report."""
    t = time.perf_counter()
    sent = prefill(h, sender, receiver, n, window)
    prefill_s = time.perf_counter() - t
    wait_s = wait(sent)
    return sent, {
        "prefill_s": round(prefill_s, 3),
        "prefill_msg_s": round(n / prefill_s),
        "persist_wait_s": round(wait_s, 3),
    }


# ------------------------------------------------------------------------------ history


def history_frame(peer: int, before_id: int, rid: int, limit: int = HISTORY_LIMIT) -> bytes:
    return encode(HistoryPull(ConvKind.USER, peer, before_id, limit, request_id=rid))


def wait_history(
    h: servers.ServerHandle, user: int, peer: int, ids: list[int], timeout: float
) -> float:
    """Until the newest page shows the last message and the oldest one is reachable."""
    t0 = time.perf_counter()
    w = login(h, user, "probe-" + device())
    rid = 1
    try:
        while True:
            got = []
            for before in (0, ids[1]):
                rid += 1
                w.send(history_frame(peer, before, rid, 1))
                page = decode_payload(w.reply(rid, T_HISTORY_PAGE))
                assert isinstance(page, HistoryPage)
                got.append(page.messages[0].msg_id if page.messages else 0)
            if got == [ids[-1], ids[0]]:
                return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise TimeoutError(f"history not persisted after {timeout}s (ends {got})")
            time.sleep(0.1)
    finally:
        w.close()


def history(h: servers.ServerHandle, n: int, pages: int, window: int) -> dict[str, Any]:
    a, b = _user(), _user()
    sent, timing = prefill_and_wait(
        h, a, b, n, window, lambda ids: wait_history(h, b, a, sorted(ids), max(60.0, n / 1000))
    )
    ids = sorted(sent)  # history order is msg_id order
    index = {m: i for i, m in enumerate(ids)}
    rng = random.Random(n)
    w = login(h, b, device())
    walk: list[float] = []
    rand: list[float] = []
    errors: list[str] = []
    try:
        before, rid = 0, 1
        for _ in range(pages // 2):  # walking back from the newest
            rid += 1
            p = _timed_page(w, a, before, rid, walk)
            top = index[before] if before else n
            msgs = _check_page(p, ids[top - HISTORY_LIMIT : top], errors)
            before = msgs[-1].msg_id if msgs else ids[top - HISTORY_LIMIT]
        for _ in range(pages - pages // 2):  # random positions with a full page below
            top = rng.randrange(HISTORY_LIMIT, n)
            rid += 1
            p = _timed_page(w, a, ids[top], rid, rand)
            _check_page(p, ids[top - HISTORY_LIMIT : top], errors)
    finally:
        w.close()
    return {
        "conversation_messages": n,
        "page_limit": HISTORY_LIMIT,
        **timing,
        "page": percentiles(walk + rand),
        "walk": percentiles(walk),
        "random": percentiles(rand),
        "ok": not errors,
        "errors": errors[:5],
    }


def _timed_page(w: Wire, peer: int, before: int, rid: int, out: list[float]) -> bytes:
    frame = history_frame(peer, before, rid)
    t = time.perf_counter()
    w.send(frame)
    p = w.reply(rid, T_HISTORY_PAGE)
    out.append(time.perf_counter() - t)
    return p


def _check_page(p: bytes, expected_oldest_first: list[int], errors: list[str]) -> list[Message]:
    page = decode_payload(p)
    assert isinstance(page, HistoryPage)
    got = [m.msg_id for m in page.messages]
    want = expected_oldest_first[::-1]
    if got != want:
        errors.append(f"page {got[:2]}..: expected {len(want)} from {want[:1]}, newest first")
    return list(page.messages)


# ---------------------------------------------------------------------------- mosquitto


def mqtt_drain(n: int, window: int) -> dict[str, Any]:
    import mqtt_wire as mq

    h = servers.start_mosquitto(persistence=True)
    try:
        runs = [_mqtt_drain_once(mq, h, n, window) for _ in range(DRAIN_RUNS)]
    finally:
        h.stop()
    best = min(runs, key=lambda r: r["total_s"])
    return {"messages": n, "chunk": PAGE_LIMIT, "runs": runs, "best": best,
            "ok": all(r["ok"] for r in runs)}  # fmt: skip


class MqttConn:
    def __init__(self, mq: Any, h: servers.ServerHandle, client_id: str, clean: bool) -> None:
        self.mq = mq
        self.sock = socket.create_connection((h.host, h.port), timeout=IO_TIMEOUT_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.split = mq.Splitter()
        self.pending: list[tuple[int, int, bytes]] = []
        self.sock.sendall(mq.connect(client_id, clean_session=clean))
        self.expect(mq.CONNACK)

    def packets(self) -> list[tuple[int, int, bytes]]:
        while not self.pending:
            chunk = self.sock.recv(RECV_SIZE)
            if not chunk:
                raise ConnectionError("mosquitto closed the connection")
            self.pending = self.split.feed(chunk)
        out, self.pending = self.pending, []
        return out

    def expect(self, kind: int) -> bytes:
        while True:
            pkts = self.packets()
            for i, (typ, _, body_) in enumerate(pkts):
                if typ == kind:
                    self.pending = pkts[i + 1 :]
                    return body_

    def close(self) -> None:
        self.sock.sendall(self.mq.disconnect())
        self.sock.close()


def _mqtt_drain_once(mq: Any, h: servers.ServerHandle, n: int, window: int) -> dict[str, Any]:
    tag = uuid.uuid4().hex[:12]
    topic, sub_id = f"bench/sync/{tag}", f"sync-sub-{tag}"
    sub = MqttConn(mq, h, sub_id, clean=False)
    sub.sock.sendall(mq.subscribe(1, topic, 1))
    sub.expect(mq.SUBACK)
    sub.close()
    _mqtt_publish(mq, h, topic, n, window)
    t0 = time.perf_counter()
    sub = MqttConn(mq, h, sub_id, clean=False)
    marks = [time.perf_counter()]
    got: list[bytes] = []
    try:
        while len(got) < n:
            acks = []
            for typ, flags, body_ in sub.packets():
                if typ != mq.PUBLISH:
                    continue
                _, pid, payload = mq.parse_publish(flags, body_)
                got.append(payload)
                if pid is not None:
                    acks.append(mq.puback(pid))
                if len(got) % PAGE_LIMIT == 0:
                    marks.append(time.perf_counter())
            if acks:
                sub.sock.sendall(b"".join(acks))
        t_end = time.perf_counter()
    finally:
        sub.close()
    want = _bodies(n)
    errors = []
    if got != want:
        lost = len(set(want) - set(got))
        errors.append(f"{len(got)} received, {lost} lost, in order: {got == want}")
    chunks = [b - a for a, b in itertools.pairwise(marks)]
    return {"total_s": round(t_end - t0, 4), "chunks": len(chunks), "chunk": percentiles(chunks),
            "messages": len(got), "ok": not errors, "errors": errors}  # fmt: skip


def _mqtt_publish(mq: Any, h: servers.ServerHandle, topic: str, n: int, window: int) -> None:
    frames = [mq.publish(topic, body(i), 1, i % 65535 + 1) for i in range(n)]
    pub = MqttConn(mq, h, f"sync-pub-{uuid.uuid4().hex[:12]}", clean=True)
    sent = acked = 0
    try:
        while acked < n:
            if sent < n and sent - acked <= window // 2:
                top = min(n, acked + window)
                pub.sock.sendall(b"".join(frames[sent:top]))
                sent = top
            acked += sum(1 for typ, _, _ in pub.packets() if typ == mq.PUBACK)
    finally:
        pub.close()


# --------------------------------------------------------------------------------- main


def run(target: str, storage: str | None, quick: bool) -> dict[str, Any]:
    """One target: "improto" with a storage (embedded, memory, production), or "mosquitto"."""
    z = sizes(quick)
    out: dict[str, Any] = {"target": target, "storage": storage, "quick": quick}
    t0 = time.perf_counter()
    if target == "mosquitto":
        out["offline_drain"] = mqtt_drain(z["drain"], z["drain_window"])
        out["history"] = None  # no MQTT equivalent
    elif target == "improto":
        h = servers.start_improto(storage or "embedded")
        try:
            cpu0 = h.cpu_s()
            out["offline_drain"] = offline_drain(h, z["drain"], z["drain_window"])
            out["history"] = history(h, z["history"], z["pages"], z["history_window"])
            out["server_cpu_s"] = round(h.cpu_s() - cpu0, 2)
            out["server_rss_kib"] = h.rss_kib()
        finally:
            h.stop()
    else:
        raise ValueError(f"unknown target {target!r}")
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


def storages() -> list[str]:
    """The storages `imserver --help` lists (memory was added later than the others)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "improto_server", "--help"], capture_output=True, text=True
    ).stdout
    return [s for s in ("embedded", "memory", "production") if s in help_text]


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """Headline figures per target, and improto's as ratios to Mosquitto's drain."""
    rows: dict[str, Any] = {}
    for name, r in results.items():
        if "error" in r:
            rows[name] = {"error": r["error"]}
            continue
        best = r["offline_drain"]["best"]
        row = {"drain_total_s": best["total_s"],
               "drain_page_p99_ms": (best.get("page") or best.get("chunk"))["p99_ms"],
               "history_p50_ms": r["history"]["page"]["p50_ms"] if r["history"] else None,
               "history_p99_ms": r["history"]["page"]["p99_ms"] if r["history"] else None,
               "ok": r["offline_drain"]["ok"] and (r["history"] or {}).get("ok", True)}  # fmt: skip
        rows[name] = row
    peer = rows.get("mosquitto", {}).get("drain_total_s")
    for name, row in rows.items():
        if peer and "drain_total_s" in row and name != "mosquitto":
            row["drain_vs_mosquitto"] = round(row["drain_total_s"] / peer, 3)
    return rows


DRAIN_TARGET_S = 0.5
HISTORY_P99_TARGET_MS = 10.0


def _ms(p: dict[str, Any] | None) -> str:
    if not p or not p.get("n"):
        return "—"
    return f"{p['p50_ms']:.2f} / {p['p99_ms']:.2f} / {p['max_ms']:.2f}"


def section(results: dict[str, Any]) -> list[str]:
    """Markdown rows of scenarios 2 and 3 for the report table; `results` maps a target name
    ("improto/embedded", "mosquitto", ...) to what `run` returned, or is bench/run.py's
    {"summary": ..., "results": that}."""
    if isinstance(results.get("results"), dict):
        results = results["results"]
    peer = ((results.get("mosquitto") or {}).get("offline_drain") or {}).get("best") or {}
    drain = ["## 2. Offline drain: N queued messages, synced in pages of 200", "",
             "Total: connect to the last message. Per page: improto request sent to whole page "
             "received (serial sync loop); Mosquitto (QoS 1, persistent session): the time of "
             "each successive 200-message chunk of its redelivery, each message PUBACKed.", "",
             "| target | N | total s (best of 3) | first pull to last page s | pages "
             "| per page p50 / p99 / max ms | checked | vs Mosquitto | < 0.5 s |",
             "|---|---:|---:|---:|---:|---:|---|---:|---|"]  # fmt: skip
    hist = ["## 3. History: 20-message pages of a 1:1 conversation", "",
            "| target | conversation | pages | p50 / p99 / max ms | walk back p99 | random p99 "
            "| checked | p99 < 10 ms |",
            "|---|---:|---:|---:|---:|---:|---|---|"]  # fmt: skip
    for name, r in results.items():
        if name == "meta" or not isinstance(r, dict):  # bench/run.py adds its own "meta"
            continue
        if "error" in r:
            drain.append(f"| {name} | failed: {r['error'][:200]} |||||||")
            continue
        d = r["offline_drain"]
        best = d["best"]
        total = best["total_s"]
        ratio = f"{total / peer['total_s']:.2f}x" if peer.get("total_s") else "—"
        per = best.get("page") or best.get("chunk")
        drain.append(
            f"| {name} | {d['messages']:,} | {total:.3f} | {best.get('pull_s', total):.3f} "
            f"| {best.get('pages', best.get('chunks'))} | {_ms(per)} | "
            f"{'ok' if d['ok'] else 'FAILED'} | {ratio} | "
            f"{'yes' if total < DRAIN_TARGET_S else 'no'} |"
        )
        h = r.get("history")
        if h:
            p99 = h["page"].get("p99_ms")
            hist.append(
                f"| {name} | {h['conversation_messages']:,} | {h['page']['n']} | "
                f"{_ms(h['page'])} | {h['walk'].get('p99_ms')} | {h['random'].get('p99_ms')} "
                f"| {'ok' if h['ok'] else 'FAILED'} | "
                f"{'yes' if p99 is not None and p99 < HISTORY_P99_TARGET_MS else 'no'} |"
            )
        elif name.startswith("mosquitto"):
            hist.append(f"| {name} | — | — | no MQTT equivalent | — | — | — | — |")
    return [*drain, "", *hist, ""]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller counts (under ~60 s)")
    ap.add_argument("--target", choices=("all", "improto", "mosquitto"), default="all")
    ap.add_argument("--storage", action="append", help="improto storage (repeatable)")
    args = ap.parse_args(argv)
    plan: list[tuple[str, str | None]] = []
    if args.target in ("all", "improto"):
        plan += [("improto", s) for s in (args.storage or storages())]
    if args.target in ("all", "mosquitto"):
        plan.append(("mosquitto", None))
    results: dict[str, Any] = {}
    for target, storage in plan:
        name = f"{target}-{storage}" if storage else target
        try:
            results[name] = run(target, storage, args.quick)
        except Exception as e:  # one target failing must not lose the others' figures
            results[name] = {"target": target, "storage": storage, "error": repr(e)}
        print(f"# {name}: {json.dumps(summary({name: results[name]})[name])}", file=sys.stderr)
    final = {"scenario": "sync_pull", "quick": args.quick, "summary": summary(results),
             "results": results}  # fmt: skip
    path = RESULTS.with_name("sync_pull-quick.json") if args.quick else RESULTS
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(final, indent=1) + "\n")
    print(json.dumps(final))


if __name__ == "__main__":
    main()
