"""The conversation list of a user with 1,000 conversations (issue 13, spec 18).

    python bench/conv_list.py [--quick] [--storage embedded,production] [--convs N]

Seeding, through the real server: user U sends one message to each of N peers (one pipelined
connection) and N/10 of those peers answer (so rows carry unread counts and peer read
positions); then U's CONV_LIST is polled until it lists N rows. Timed on a fresh connection
with CONVERSATIONS, RUNS times each: the full CONV_LIST round trip (first request to last page,
all pages, at limit 100 and at the default 50) with the bytes it downloads; then one peer
sends one new message, and once it is visible CONV_CHANGES(V) (V = the first page's version)
is timed: the incremental round trip a client with the list makes. Also printed: how long
after the SEND_ACK the change showed (the persister's delay, spec 11). Final JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

import servers
from wire_once import Wire, login

from improto.enums import ConvKind, Feature
from improto.frames import ConvChanges, ConvChangesPage, ConvList, ConvPage, Send, SendAck

RUNS = 5
WINDOW = 500
SEED_TIMEOUT_S = 120.0


def log(msg: str) -> None:
    print(f"[conv_list] {msg}", file=sys.stderr, flush=True)


def _user() -> int:
    return random.randrange(1 << 32, 1 << 48)


def send_many(w: Wire, frames: list[Send]) -> list[SendAck]:
    """Pipeline SENDs with up to WINDOW unacknowledged; the acks in send order."""
    rids: list[int] = []
    acks: dict[int, SendAck] = {}
    sent = 0
    while len(acks) < len(frames):
        while sent < len(frames) and sent - len(acks) < WINDOW:
            rids.append(w.send(frames[sent]))
            sent += 1
        w.read(30.0)
        for f in w.take():
            if isinstance(f, SendAck):
                acks[f.request_id] = f
    return [acks[r] for r in rids]


def list_all(w: Wire, limit: int) -> tuple[int, int, int]:
    """CONV_LIST until has_more = 0: (rows, pages, first page's version)."""
    rows = pages = version = 0
    before = 0
    while True:
        page: ConvPage = w.call(ConvList(before, limit), ConvPage)
        pages += 1
        rows += len(page.convs)
        version = version or page.list_version
        if not page.has_more:
            return rows, pages, version
        last = page.convs[-1].last
        before = last[0].msg_id


def seed(h: servers.ServerHandle, n: int) -> tuple[int, list[int]]:
    me, peers = _user(), [_user() for _ in range(n)]
    w = login(h, me, "seed-" + uuid.uuid4().hex[:8], ())
    t = time.monotonic()
    send_many(w, [Send(uuid.uuid4().bytes, ConvKind.USER, p, 1, b"hello %d" % p) for p in peers])
    w.close()
    for p in peers[: n // 10]:
        pw = login(h, p, "peer", ())
        pw.call(Send(uuid.uuid4().bytes, ConvKind.USER, me, 1, b"hi back"), SendAck)
        pw.close()
    log(f"seeded {n} conversations in {time.monotonic() - t:.1f}s; waiting for the list")
    probe = login(h, me, "probe", (Feature.CONVERSATIONS,))
    deadline = time.monotonic() + SEED_TIMEOUT_S
    while list_all(probe, 100)[0] < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"CONV_LIST did not reach {n} rows in {SEED_TIMEOUT_S}s")
        time.sleep(0.2)
    probe.close()
    return me, peers


def timed_list(h: servers.ServerHandle, me: int, limit: int) -> dict[str, Any]:
    times, down, up = [], 0, 0
    rows = pages = version = 0
    for _ in range(RUNS):
        w = login(h, me, "bench-" + uuid.uuid4().hex[:8], (Feature.CONVERSATIONS,))
        w.reset()
        t = time.perf_counter()
        rows, pages, version = list_all(w, limit)
        times.append(time.perf_counter() - t)
        down, up = w.down.size, w.up.size
        w.close()
    return {
        "limit": limit,
        "rows": rows,
        "pages": pages,
        "version": version,
        "best_ms": round(min(times) * 1e3, 2),
        "median_ms": round(statistics.median(times) * 1e3, 2),
        "s_to_c_bytes": down,
        "c_to_s_bytes": up,
        "bytes_per_row": round(down / max(rows, 1), 1),
    }


def timed_changes(h: servers.ServerHandle, me: int, peer: int, version: int) -> dict[str, Any]:
    pw = login(h, peer, "peer", ())
    ack = pw.call(Send(uuid.uuid4().bytes, ConvKind.USER, me, 1, b"one more"), SendAck)
    t_ack = time.monotonic()
    pw.close()
    w = login(h, me, "bench-" + uuid.uuid4().hex[:8], (Feature.CONVERSATIONS,))
    while True:
        page: ConvChangesPage = w.call(ConvChanges(version, 0), ConvChangesPage)
        if any(c.last and c.last[0].msg_id == ack.msg_id for c in page.convs):
            visible_s = time.monotonic() - t_ack
            break
        if time.monotonic() - t_ack > 30:
            raise TimeoutError("the new message never showed in CONV_CHANGES")
        time.sleep(0.005)
    times, rows = [], 0
    w.reset()
    for _ in range(RUNS):
        t = time.perf_counter()
        page = w.call(ConvChanges(version, 0), ConvChangesPage)
        times.append(time.perf_counter() - t)
        rows = len(page.convs)
    per_call = w.down.size // RUNS, w.up.size // RUNS
    w.close()
    return {
        "rows": rows,
        "best_ms": round(min(times) * 1e3, 3),
        "median_ms": round(statistics.median(times) * 1e3, 3),
        "s_to_c_bytes": per_call[0],
        "c_to_s_bytes": per_call[1],
        "visible_after_ack_ms": round(visible_s * 1e3, 1),
    }


def run_storage(storage: str, n: int) -> dict[str, Any]:
    h = servers.start_improto(storage)
    try:
        me, peers = seed(h, n)
        full = timed_list(h, me, 100)
        default = timed_list(h, me, 0)
        changes = timed_changes(h, me, peers[-1], full["version"])
        log(f"{storage}: {n} rows in {full['pages']} pages: best {full['best_ms']} ms, "
            f"{full['s_to_c_bytes']} B; changes {changes['best_ms']} ms, "
            f"{changes['s_to_c_bytes']} B")  # fmt: skip
        return {"conversations": n, "list_limit_100": full, "list_default": default,
                "changes_after_one_message": changes}  # fmt: skip
    finally:
        h.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="embedded only")
    p.add_argument("--storage", help="comma-separated (default embedded,production)")
    p.add_argument("--convs", type=int, default=1000, help="conversations (default 1,000)")
    a = p.parse_args()
    storages = (a.storage or ("embedded" if a.quick else "embedded,production")).split(",")
    if "production" in storages:
        subprocess.run([str(servers.REPO / "scripts" / "services"), "start"], check=True,
                       stdout=sys.stderr)  # fmt: skip
    results = {s: run_storage(s, a.convs) for s in storages}
    ok = all(r["list_limit_100"]["rows"] == a.convs for r in results.values())
    print(json.dumps({"bench": "conv_list", "quick": a.quick, "ok": ok, "results": results}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
