"""Large groups (issue 14) end to end: a group above large_group_threshold next to the same
group under write diffusion, a member catching up on 50 busy large groups next to the same
backlog in small groups, Redis bytes per message, and the small-group/1:1 path before and
after the large groups (a same-run A/B).

    python bench/large_group.py [--quick] [--storage production|embedded]
                                [--part fanout|catchup|ab ...] [--ab-rounds R]
                                [--ab-base COMMIT] [--ab-now COMMIT|.] [--git REPO]

Parts (all by default; loopback only; every count bounded; it stops by itself):

- `fanout`: in this process, the gateway's ChatService and a persister on the chosen storage
  (no sockets). One group of M members (10,000; quick 2,000) with 1% of them online (fake
  connections registered in the gateway's Hub: the PUSH bytes each would write are counted),
  the online members sending in turn. Mode `large`: large_group_threshold 500, so the group
  is read-diffused; mode `write_diffusion`: threshold 10,000 (the maximum), so the same group
  is not large and every message is copied into every member's inbox, as before issue 14.
  Phases as bench/persist.py: `accept` (SEND through ChatService, 500 in flight, nothing
  consuming: the pushes go out here) then `drain` (a Persister starts on the full queue; the
  clock stops when every message is stored and the conversation lists are folded). The
  persister's stores are wrapped to count what it writes: inbox entries, timeline rows,
  history rows, conversation rows folded, state jobs. The same for a 100-member group (large
  with threshold 50, write diffusion with the default 500). Production storage: Redis bytes
  per message = (MEMORY USAGE SAMPLES 0 summed over the run's keys after the drain, minus the
  same before the first SEND) / messages, by key family.
- `catchup`: a real server (`imserver --role all`, a child process) whose stores were filled
  beforehand through the queue and a persister in this process: user L in G large groups
  (50; quick 10; 1,000 members each, quick 600, default threshold 500), user S in G small
  groups (5 members), B messages (1,000; quick 200) from another member in each group. A
  fresh device of each user connects with the reference client (improto_clients IMClient,
  every feature, LARGE_GROUPS included) and the clock runs from connect() until its login
  sync loop is done (OFFLINE_PULL pages, then TIMELINE_HEADS and TIMELINE_PULL pages):
  seconds, bytes in/out (frames with their length prefix), frames by type, messages
  delivered (each exactly once). Rounds alternate L and S, each with a fresh device.
- `ab`: bench/persist.py (1:1 over 1,000 pairs, and a 100-member group) run from the commit
  before the large groups reached the send path (--ab-base, default 4e6fd2a, extracted with
  `git archive` into a temp dir) and from this checkout as it is (or --ab-now COMMIT),
  alternately (the order flips every round), R rounds (3; quick 1), each tree's packages on
  PYTHONPATH: each phase's median messages/s of both, their ratio and the median of the
  per-round ratios. --git: the repository the commits come from (when this script runs from
  an unpacked snapshot).

Prints human lines on stderr and a final JSON line on stdout. Production storage (the
default) needs `scripts/services start`; the run uses fresh key prefixes and HBase tables and
deletes them (and its temp dirs and child processes) at the end, also after a failure.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import servers  # first: puts the repository root on sys.path
from persist import Meter, own_cpu, service_cpu

from twisted.internet import defer, task
from twisted.internet.defer import Deferred

from improto.enums import CloseReason, ContentType, ConvKind
from improto.frames import Message, Send
from improto.limits import MAX_GROUP_MEMBERS
from improto.records import OFFLINE_RECORD_BYTES
from improto_clients.client import DEFAULT_FEATURES, IMClient
from improto_server.app import make_backend
from improto_server.config import Config
from improto_server.hub import Hub
from improto_server.ids import IdGenerator
from improto_server.model import PersistJob
from improto_server.persister import Persister
from improto_server.rate_limits import RateLimits
from improto_server.service import Caller, ChatService
from tests.support import server as support_server
from tests.support import services

BASE_COMMIT = "4e6fd2a"  # the parent of 9c0a001 (issue 14 steps 2-5: the send path)
IN_FLIGHT = 500
BODY = b"x" * 100
FILLER = 100_000  # user ids of group members who only receive
_made: list[tuple[str, str]] = []  # (key prefix, HBase table) made by this run: purged


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def names(tag: str) -> tuple[str, str]:
    run = uuid.uuid4().hex[:10]
    prefix, table = f"benchlg{tag}{run}", f"benchlg{tag}_{run}"
    _made.append((prefix, table))
    return prefix, table


@atexit.register
def purge_all() -> None:
    """Every key prefix, queue and HBase table this run made (after a failure too)."""
    while _made:
        prefix, table = _made.pop()
        with contextlib.suppress(Exception):
            services.purge(prefix, table)


def make_config(storage: str, data_dir: str, prefix: str, table: str, **values: Any) -> Config:
    """bench/unlimited.toml (rate limits out of the way) plus `values`."""
    base = Config.from_file(servers.UNLIMITED)
    return base.merged({
        "data_dir": data_dir, "storage": storage, "key_prefix": prefix, "hbase_table": table,
        **services.config_fields(), **values,
    })  # fmt: skip


# ---------------------------------------------------------------- counting the writes


class _Wrapped:
    def __init__(self, inner: Any, counts: Counter[str]) -> None:
        self._inner = inner
        self._counts = counts

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class CountedInbox(_Wrapped):
    def append_many(self, jobs: Sequence[PersistJob]) -> Deferred[None]:
        self._counts["inbox_entries"] += sum(len(j.inbox_users) for j in jobs)
        return self._inner.append_many(jobs)  # type: ignore[no-any-return]


class CountedHistory(_Wrapped):
    def append_many(self, items: Sequence[Any]) -> Deferred[None]:
        self._counts["history_rows"] += len(items)
        return self._inner.append_many(items)  # type: ignore[no-any-return]


class CountedTimeline(_Wrapped):
    def append(self, jobs: Sequence[PersistJob]) -> Deferred[Any]:
        self._counts["timeline_rows"] += len(jobs)
        return self._inner.append(jobs)  # type: ignore[no-any-return]


class CountedConversations(_Wrapped):
    def fold(self, users: Sequence[int]) -> Deferred[Any]:
        self._counts["conversation_rows_folded"] += len(users)
        return self._inner.fold(users)  # type: ignore[no-any-return]

    def apply(self, jobs: Sequence[Any]) -> Deferred[Any]:
        self._counts["state_jobs"] += len(jobs)
        return self._inner.apply(jobs)  # type: ignore[no-any-return]


def counted_persister(backend: Any, counts: Counter[str], reactor: Any) -> Persister:
    return Persister(
        backend.queue, CountedInbox(backend.inbox, counts),  # type: ignore[arg-type]
        CountedHistory(backend.history, counts),  # type: ignore[arg-type]
        CountedConversations(backend.conversations, counts),  # type: ignore[arg-type]
        clock=reactor, timeline=CountedTimeline(backend.timeline, counts),  # type: ignore[arg-type]
    )  # fmt: skip


async def drained(reactor: Any, persister: Persister, target: int) -> float:
    """Until `target` message jobs are stored; then the lists folded (at once: the work
    counts, not FOLD_DELAY_S). Returns the seconds until stored."""
    t0 = time.perf_counter()
    while persister.persisted < target:
        await task.deferLater(reactor, 0.005, lambda: None)
    stored = time.perf_counter() - t0
    await persister.fold_now()
    return stored


# ------------------------------------------------------------------- Redis memory

_USAGE = """
local out = {}
for i, k in ipairs(KEYS) do out[i] = redis.call('MEMORY', 'USAGE', k, 'SAMPLES', '0') or 0 end
return out
"""


async def redis_usage(redis: Any, prefix: str) -> dict[str, int]:
    """MEMORY USAGE (SAMPLES 0: every element) of each key under `prefix:`, summed by key
    family (the name's first part after the prefix, e.g. inbox, tl, conv, dedup)."""
    keys: list[bytes] = []
    cursor: Any = b"0"
    while True:
        cursor, found = await redis.execute_command(
            "SCAN", cursor, "MATCH", f"{prefix}:*", "COUNT", 1000
        )
        keys.extend(found)
        if cursor in (b"0", 0, "0"):
            break
    families: Counter[str] = Counter()
    for i in range(0, len(keys), 500):
        chunk = keys[i : i + 500]
        sizes = await redis.execute_command("EVAL", _USAGE, len(chunk), *chunk)
        for key, size in zip(chunk, sizes, strict=True):
            name = key.decode(errors="replace")[len(prefix) + 1 :]
            families[name.split(":", 1)[0].split("{", 1)[0] or "other"] += int(size or 0)
    return dict(families)


# ------------------------------------------------------------------------- fan-out


@dataclass(eq=False)
class Online:
    """An online member's connection as the Hub sees it (the Pushable a Session is)."""

    user_id: int
    seen: dict[int, bytes]  # msg_id -> the first receiver's frame (shared by all)
    device_id: str = "bench"
    pushes: int = 0
    push_bytes: int = 0
    not_shared: int = 0  # frames that were not the same bytes object as the first receiver's
    sent: int = 0  # messages this member sent (not pushed back to it)
    msg_ids: list[int] = field(default_factory=list)

    def push(self, msg_id: int, data: bytes) -> None:
        self.pushes += 1
        self.push_bytes += len(data)
        first = self.seen.setdefault(msg_id, data)
        self.not_shared += first is not data
        self.msg_ids.append(msg_id)

    def notify(self, data: bytes, feature: int) -> bool:
        return False

    def close(self, reason: CloseReason, text: str) -> None:
        pass


async def fanout_case(reactor: Any, storage: str, tmp: str, members: int, large: bool,
                      n: int) -> dict[str, Any]:  # fmt: skip
    """One group of `members`, 1% online; n SENDs accepted (pushes), then drained."""
    if large:
        threshold = 500 if members > 500 else max(2, members // 2)
    else:
        threshold = MAX_GROUP_MEMBERS  # the maximum: no group is above it
    mode = "large" if large else "write_diffusion"
    prefix, table = names("f")
    config = make_config(storage, str(Path(tmp) / prefix), prefix, table,
                         large_group_threshold=threshold)  # fmt: skip
    backend = make_backend(config, reactor)
    await backend.start()
    try:
        ids = IdGenerator(node=1)
        hub = Hub()
        svc = ChatService(
            ids, backend.queue, backend.inbox, backend.history, backend.groups, hub,
            limits=RateLimits(config, reactor), conversations=backend.conversations,
            timeline=backend.timeline,
        )  # fmt: skip
        everyone = tuple(range(FILLER, FILLER + members))
        gid = await backend.groups.create(everyone[0], "bench", everyone[1:], ids.next()[0])
        info = await backend.groups.info(gid)
        assert info is not None and info.large == large, (info and info.large, large)
        n_online = max(2, members // 100)
        seen: dict[int, bytes] = {}
        online = [Online(u, seen) for u in everyone[:: members // n_online][:n_online]]
        for conn in online:
            hub.register(conn)
        redis = getattr(backend, "redis", None)
        before = await redis_usage(redis, prefix) if redis is not None else {}

        sem = defer.DeferredSemaphore(IN_FLIGHT)

        def send(i: int) -> Deferred[Any]:
            conn = online[i % len(online)]
            conn.sent += 1
            req = Send(uuid.uuid4().bytes, ConvKind.GROUP, gid, ContentType.TEXT, BODY)
            caller = Caller(conn.user_id, conn.device_id, conn)
            return sem.run(lambda: Deferred.fromCoroutine(svc.send(caller, req)))

        meter = Meter()
        await defer.gatherResults([send(i) for i in range(n)], consumeErrors=True)
        accept = meter.result(n, 1)
        del accept["inbox_entries_per_s"]

        counts: Counter[str] = Counter()
        persister = counted_persister(backend, counts, reactor)
        meter = Meter()
        persister.start()
        stored_s = await drained(reactor, persister, n)
        drain = meter.result(n, 1)
        drain["inbox_entries_per_s"] = round(counts["inbox_entries"] / drain["seconds"])
        drain["stored_s"] = round(stored_s, 3)
        drain["stored_messages_per_s"] = round(n / stored_s) if stored_s else None
        persister.stop()

        # what the stores hold now: the timeline's head, an offline member's inbox
        heads = await backend.timeline.heads([gid])
        done = heads[gid].done if gid in heads else 0
        offline_member = everyone[-1] if everyone[-1] not in {c.user_id for c in online} else 0
        page = await backend.inbox.page(offline_member, 0, 200, OFFLINE_RECORD_BYTES)
        after = await redis_usage(redis, prefix) if redis is not None else {}

        expected = [n - c.sent for c in online]
        got = [c.pushes for c in online]
        order_ok = all(c.msg_ids == sorted(c.msg_ids) for c in online)
        out: dict[str, Any] = {
            "mode": mode, "members": members, "threshold": threshold, "large": info.large,
            "online": len(online), "messages": n, "accept": accept, "drain": drain,
            "writes_per_message": {k: round(v / n, 2) for k, v in sorted(counts.items())},
            "writes": dict(sorted(counts.items())),
            "timeline_done": done, "offline_member_inbox_entries_page": len(page.records),
            "pushes": {
                "total": sum(got), "per_message": round(sum(got) / n, 2),
                "each_as_expected": got == expected, "in_msg_id_order": order_ok,
                "bytes_per_push": round(sum(c.push_bytes for c in online) / max(1, sum(got)), 1),
                "frames_not_shared": sum(c.not_shared for c in online),
            },
        }  # fmt: skip
        if redis is not None:
            delta = {
                k: after.get(k, 0) - before.get(k, 0) for k in sorted(set(after) | set(before))
            }
            out["redis_bytes_per_message"] = round(sum(delta.values()) / n, 1)
            out["redis_bytes_per_message_by_family"] = {
                k: round(v / n, 1) for k, v in delta.items() if v
            }
            out["redis_group_keys_bytes"] = sum(before.values())
        return out
    finally:
        await backend.close()
        if storage == "production":
            services.purge(prefix, table)
        with contextlib.suppress(ValueError):
            _made.remove((prefix, table))


def fanout_line(r: dict[str, Any]) -> str:
    w = r["writes_per_message"]
    p = r["pushes"]
    mem = (
        f", Redis {r['redis_bytes_per_message']:,.0f} B/msg"
        if "redis_bytes_per_message" in r
        else ""
    )
    return (
        f"  {r['members']:>6,} members {r['mode']:<15} (threshold {r['threshold']:,}, large="
        f"{r['large']}): {r['messages']:,} msgs; per msg: inbox {w.get('inbox_entries', 0):,.0f}, "
        f"timeline {w.get('timeline_rows', 0):g}, history {w.get('history_rows', 0):g}, "
        f"list rows folded {w.get('conversation_rows_folded', 0):,.1f}; accept "
        f"{r['accept']['messages_per_s']:,}/s, drain {r['drain']['messages_per_s']:,}/s; "
        f"pushes {p['per_message']}/msg (as expected: {p['each_as_expected']}){mem}"
    )


# ------------------------------------------------------------------------- catch-up


async def populate(reactor: Any, config: Config, groups: int, backlog: int,
                   large_members: int) -> dict[str, Any]:  # fmt: skip
    """Users LARGE_USER (in `groups` large groups) and SMALL_USER (in `groups` 5-member
    groups), `backlog` messages from SENDER in each group, interleaved; stored through the
    queue and a persister, lists folded."""
    backend = make_backend(config, reactor)
    await backend.start()
    try:
        ids = IdGenerator(node=1)
        fillers = tuple(range(FILLER, FILLER + large_members - 2))
        large_gids, small_gids = [], []
        for g in range(groups):
            large_gids.append(await backend.groups.create(
                SENDER, f"large {g}", (LARGE_USER, *fillers), ids.next()[0]
            ))  # fmt: skip
            small = (SMALL_USER, *range(FILLER + 3 * g, FILLER + 3 * g + 3))
            small_gids.append(await backend.groups.create(
                SENDER, f"small {g}", small, ids.next()[0]
            ))  # fmt: skip
        infos = [await backend.groups.info(g) for g in (large_gids[0], small_gids[0])]
        assert infos[0] is not None and infos[0].large, "the large groups are not large"
        assert infos[1] is not None and not infos[1].large
        small_members = {g: (await backend.groups.info(g)).members for g in small_gids}  # type: ignore[union-attr]
        sem = defer.DeferredSemaphore(IN_FLIGHT)

        def accept(gid: int, large: bool) -> Deferred[Any]:
            msg_id, now = ids.next()
            cmid = uuid.uuid4().bytes
            m = Message(msg_id, now, SENDER, "bench", ConvKind.GROUP, gid, ContentType.TEXT,
                        cmid, BODY)  # fmt: skip
            job = PersistJob.for_timeline(m) if large else PersistJob(m, small_members[gid])
            return sem.run(backend.queue.accept, job, cmid)

        t0 = time.perf_counter()
        persister = Persister(
            backend.queue, backend.inbox, backend.history, backend.conversations,
            clock=reactor, timeline=backend.timeline,
        )  # fmt: skip
        persister.start()
        calls = []
        for _ in range(backlog):
            for gid in large_gids:
                calls.append(accept(gid, True))
            for gid in small_gids:
                calls.append(accept(gid, False))
        await defer.gatherResults(calls, consumeErrors=True)
        await drained(reactor, persister, 2 * groups * backlog)
        persister.stop()
        heads = await backend.timeline.heads(large_gids)
        assert all(heads[g].done == backlog for g in large_gids), "timelines incomplete"
        return {"seconds": round(time.perf_counter() - t0, 1), "large_groups": large_gids,
                "small_groups": small_gids}  # fmt: skip
    finally:
        await backend.close()


LARGE_USER, SMALL_USER, SENDER = 11, 12, 13


async def catch_up(reactor: Any, handle: Any, user: int, device: str, expect: int
                   ) -> dict[str, Any]:  # fmt: skip
    """A fresh device of `user` logs in; its login sync loop runs to the end."""
    token = servers.mint_token(handle.secret, user, device)
    client = IMClient(handle.endpoint, token, device, reactor=reactor,
                      features=DEFAULT_FEATURES, track_ids=True, push_sync_delay=None,
                      notice_ack_delay=None, request_timeout=60.0)  # fmt: skip
    errors: list[BaseException] = []
    client.on_error = errors.append
    cpu, svc, srv = own_cpu(), service_cpu(), handle.cpu_s()
    t0 = time.perf_counter()
    await client.connect()
    await client.drain()
    seconds = time.perf_counter() - t0
    cpu, srv = own_cpu() - cpu, handle.cpu_s() - srv
    svc = {k: round(v - svc[k], 2) for k, v in service_cpu().items() if v - svc[k] > 0}
    wire = client.wire
    await client.close()
    if errors:
        raise RuntimeError(f"catch-up of user {user}: {errors[0]!r}")
    repeated = len(wire.repeated())
    if wire.messages_in != expect or repeated:
        raise RuntimeError(f"user {user} got {wire.messages_in} messages ({repeated} twice), "
                           f"not {expect}")  # fmt: skip
    frames = wire.named(wire.frames_in)
    return {
        "seconds": round(seconds, 3), "messages": wire.messages_in,
        "messages_per_s": round(wire.messages_in / seconds),
        "bytes_in": wire.bytes_in,
        "bytes_out": wire.bytes_out,
        "bytes_in_per_message": round(sum(wire.frame_bytes_in.values()) / expect, 1),
        "frames_in": frames, "frames_out": wire.named(wire.frames_out),
        "cpu_s": {"client": round(cpu, 2), "server": round(srv, 2), **svc},
    }  # fmt: skip


async def catchup_part(reactor: Any, storage: str, tmp: str, groups: int, backlog: int,
                       large_members: int, rounds: int) -> dict[str, Any]:  # fmt: skip
    prefix, table = names("c")
    workdir = Path(tmp) / prefix
    extra_cfg = {"inbox_max_entries": max(20_000, 2 * groups * backlog)}
    toml = workdir / "bench.toml"
    workdir.mkdir(parents=True)
    toml.write_text(servers.UNLIMITED.read_text() + "".join(
        f"{k} = {v}\n" for k, v in extra_cfg.items()
    ))  # fmt: skip
    config = make_config(storage, str(workdir / "data"), prefix, table, **extra_cfg)
    log(f"catch-up: filling {groups} large groups ({large_members:,} members) and {groups} "
        f"small groups (5 members), {backlog:,} messages each ...")  # fmt: skip
    filled = await populate(reactor, config, groups, backlog, large_members)
    log(f"  stored in {filled['seconds']} s; starting imserver ({storage})")
    handle = support_server.start_improto(
        "--config", str(toml), workdir=workdir, storage=storage,
        key_prefix=prefix if storage == "production" else None,
        hbase_table=table if storage == "production" else None,
        preexec=servers._child_setup,
    )  # fmt: skip
    runs: dict[str, list[dict[str, Any]]] = {"large": [], "small": []}
    try:
        for r in range(rounds):
            order = ("large", "small") if r % 2 == 0 else ("small", "large")
            for kind in order:
                user = LARGE_USER if kind == "large" else SMALL_USER
                got = await catch_up(reactor, handle, user, f"{kind}-{r}", groups * backlog)
                runs[kind].append(got)
                log(f"  round {r + 1} {kind:<5}: {got['seconds']:.2f} s, "
                    f"{got['bytes_in']:,} bytes in, {got['bytes_out']:,} out, "
                    f"frames in {got['frames_in']}")  # fmt: skip
    finally:
        handle.stop()
        if storage == "production":
            services.purge(prefix, table)
        with contextlib.suppress(ValueError):
            _made.remove((prefix, table))
    out: dict[str, Any] = {"groups": groups, "backlog_per_group": backlog,
                           "large_members": large_members, "small_members": 5,
                           "storage": storage, "fill_seconds": filled["seconds"]}  # fmt: skip
    for kind, rs in runs.items():
        out[kind] = {
            "seconds_median": statistics.median(r["seconds"] for r in rs),
            "bytes_in": statistics.median(r["bytes_in"] for r in rs),
            "bytes_out": statistics.median(r["bytes_out"] for r in rs),
            "rounds": rs,
        }
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(runs["large"], runs["small"],
                                                          strict=True)]  # fmt: skip
    large, small = out["large"], out["small"]
    out["ratio_large_over_small"] = {
        "seconds_of_medians": round(large["seconds_median"] / small["seconds_median"], 3),
        "seconds_median_of_rounds": round(statistics.median(ratios), 3),
        "bytes_in": round(large["bytes_in"] / small["bytes_in"], 3),
        "bytes_out": round(large["bytes_out"] / small["bytes_out"], 3),
    }
    return out


# ------------------------------------------------------------------------------ A/B


def run_persist(tree: Path, storage: str, messages: int, pythonpath: str | None,
                timeout: float) -> dict[str, Any]:  # fmt: skip
    env = dict(os.environ)
    if pythonpath is not None:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, str(tree / "bench" / "persist.py"), "--storage", storage,
           "--messages", str(messages), "--case", "one_to_one", "--case", "group_100"]  # fmt: skip
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, timeout=timeout,
                          preexec_fn=support_server.die_with_parent)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{done.stderr.decode()[-2000:]}")
    return json.loads(done.stdout.decode().strip().splitlines()[-1])  # type: ignore[no-any-return]


def tree_path(tree: Path) -> str:
    """PYTHONPATH that makes a source tree's packages the ones imported (its source roots
    come before the editable install of this checkout)."""
    return os.pathsep.join(str(tree / p) for p in ("", "server", "clients"))


def extract(git: Path, rev: str, into: Path) -> Path:
    """`git archive rev` of the repository `git`, unpacked into `into` (read-only on git)."""
    archive = subprocess.run(["git", "-C", str(git), "archive", rev],
                             capture_output=True, check=True).stdout  # fmt: skip
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def check_tree(tree: Path) -> None:
    """The tree's own packages load under tree_path(tree), not this checkout's."""
    code = (
        "import improto, improto_server, improto_clients as c; print(improto.__file__, "
        "improto_server.__file__, c.__file__)"
    )
    found = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True,
                           env={**os.environ, "PYTHONPATH": tree_path(tree)}, check=True,
                           ).stdout.decode().split()  # fmt: skip
    if not all(f.startswith(str(tree)) for f in found):
        raise RuntimeError(f"{tree}: its packages did not load: {found}")


def describe(tree: Path) -> str:
    """The commit of a git work tree (+ "working tree" if server code differs from it)."""
    git = ["git", "-C", str(tree)]
    head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True)  # fmt: skip
    if head.returncode != 0:
        return f"{tree} (not a git work tree)"
    dirty = subprocess.run([*git, "status", "--porcelain", "server", "improto", "clients"],
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    return head.stdout.strip() + (" + uncommitted changes" if dirty else "")


def ab_part(storage: str, rounds: int, messages: int, base: str, now: str,
            git: Path) -> dict[str, Any]:  # fmt: skip
    """bench/persist.py from `base` and from `now` (".": this tree as it is), alternately
    (the order flips every round): medians, their ratio (now / base) and the median of the
    per-round ratios."""
    with tempfile.TemporaryDirectory(prefix="bench-lg-ab-") as tmp:
        trees = {"base": extract(git, base, Path(tmp) / "base")}
        trees["now"] = servers.REPO if now == "." else extract(git, now, Path(tmp) / "now")
        for tree in trees.values():
            check_tree(tree)
        results: dict[str, list[dict[str, Any]]] = {"base": [], "now": []}
        for r in range(rounds):
            order = ("base", "now") if r % 2 == 0 else ("now", "base")
            for which in order:
                tree = trees[which]
                got = run_persist(tree, storage, messages, tree_path(tree), timeout=600.0)
                results[which].append(got)
                brief = {c: {p: got[c][p]["messages_per_s"] for p in ("drain", "end_to_end")}
                         for c in ("one_to_one", "group_100")}  # fmt: skip
                log(f"  round {r + 1} {which}: {brief}")
    out: dict[str, Any] = {
        "base": base, "now": describe(servers.REPO) if now == "." else now,
        "rounds": rounds, "messages": messages, "storage": storage,
    }  # fmt: skip
    for case in ("one_to_one", "group_100"):
        for phase in ("accept", "drain", "end_to_end", "two_processes"):
            a = [r[case][phase]["messages_per_s"] for r in results["now"] if phase in r[case]]
            b = [r[case][phase]["messages_per_s"] for r in results["base"] if phase in r[case]]
            if not a or not b:
                continue
            paired = [x / y for x, y in zip(a, b, strict=True)]
            out.setdefault(case, {})[phase] = {
                "now": statistics.median(a), "base": statistics.median(b),
                "ratio": round(statistics.median(a) / statistics.median(b), 3),
                "paired_ratio": round(statistics.median(paired), 3),
                "rounds_now": a, "rounds_base": b,
            }  # fmt: skip
    return out


# ----------------------------------------------------------------------------- main


def sizes(quick: bool) -> dict[str, int]:
    if quick:
        return {"members": 2_000, "large_messages": 2_000, "diffused_messages": 20,
                "small_members": 100, "small_large_messages": 2_000,
                "small_diffused_messages": 200, "groups": 10, "backlog": 200,
                "catchup_members": 600, "catchup_rounds": 2, "ab_rounds": 1,
                "ab_messages": 2_000}  # fmt: skip
    return {"members": 10_000, "large_messages": 10_000, "diffused_messages": 30,
            "small_members": 100, "small_large_messages": 10_000,
            "small_diffused_messages": 1_000, "groups": 50, "backlog": 1_000,
            "catchup_members": 1_000, "catchup_rounds": 3, "ab_rounds": 3,
            "ab_messages": 10_000}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--storage", choices=["production", "embedded"], default="production")
    p.add_argument("--quick", action="store_true", help="small counts (under a minute)")
    p.add_argument("--part", choices=["fanout", "catchup", "ab"], action="append",
                   help="run only this part (repeatable; default all)")  # fmt: skip
    p.add_argument("--ab-rounds", type=int, default=None, help="A/B rounds (3; quick 1)")
    p.add_argument("--ab-base", default=BASE_COMMIT, help="the commit the A/B compares with")
    p.add_argument("--ab-now", default=".",
                   help="what the A/B measures: a commit, or . (this tree as it is)")  # fmt: skip
    p.add_argument("--git", type=Path, default=servers.REPO,
                   help="the repository of the A/B commits (default: this one)")  # fmt: skip
    args = p.parse_args()
    size = sizes(args.quick)
    if args.ab_rounds is not None:
        size["ab_rounds"] = args.ab_rounds
    parts = args.part or ["fanout", "catchup", "ab"]
    if args.storage == "production":
        gone = services.missing(services.NAMES)
        if gone:
            raise SystemExit("services not reachable (scripts/services start): " + "; ".join(gone))
    started = time.perf_counter()
    summary: dict[str, Any] = {
        "bench": "large_group", "storage": args.storage, "quick": args.quick,
        "python": platform.python_version(), "cpus": os.cpu_count(), "cpu_model": cpu_model(),
        "sizes": size,
    }  # fmt: skip

    if "ab" in parts:  # subprocesses only: before this process's reactor runs
        log(f"A/B: bench/persist.py at {args.ab_base} vs this checkout, {size['ab_rounds']} "
            f"round(s), {size['ab_messages']:,} 1:1 messages ({args.storage})")  # fmt: skip
        ab = ab_part(args.storage, size["ab_rounds"], size["ab_messages"], args.ab_base,
                     args.ab_now, args.git)  # fmt: skip
        summary["ab"] = ab
        for case in ("one_to_one", "group_100"):
            for phase, v in ab.get(case, {}).items():
                log(
                    f"  {case:<10} {phase:<13} now {v['now']:>7,}/s base {v['base']:>7,}/s "
                    f"ratio {v['ratio']:.2f} (median of rounds {v['paired_ratio']:.2f})"
                )

    async def run(reactor: Any) -> None:
        with tempfile.TemporaryDirectory(prefix="bench-lg-") as tmp:
            if "fanout" in parts:
                log(f"fan-out and store writes ({args.storage}), 1% online:")
                cases = [
                    (size["members"], True, size["large_messages"]),
                    (size["members"], False, size["diffused_messages"]),
                    (size["small_members"], True, size["small_large_messages"]),
                    (size["small_members"], False, size["small_diffused_messages"]),
                ]
                got = []
                for members, large, n in cases:
                    r = await fanout_case(reactor, args.storage, tmp, members, large, n)
                    log(fanout_line(r))
                    got.append(r)
                summary["fanout"] = got
                big_l, big_w = got[0], got[1]
                ratios = {
                    "drain_msgs_per_s_large_over_diffused": round(
                        big_l["drain"]["messages_per_s"] / big_w["drain"]["messages_per_s"], 1),
                    "accept_msgs_per_s_large_over_diffused": round(
                        big_l["accept"]["messages_per_s"] / big_w["accept"]["messages_per_s"], 2),
                    "pushes_per_message_equal": big_l["pushes"]["per_message"]
                    == big_w["pushes"]["per_message"],
                    "drain_target_1000_met": big_l["drain"]["messages_per_s"] >= 1000,
                }  # fmt: skip
                if "redis_bytes_per_message" in big_l:
                    ratios["redis_bytes_per_msg"] = {
                        f"{r['members']}_{r['mode']}": r["redis_bytes_per_message"] for r in got
                    }
                summary["fanout_summary"] = ratios
                log(f"  {ratios}")
            if "catchup" in parts:
                c = await catchup_part(reactor, args.storage, tmp, size["groups"],
                                       size["backlog"], size["catchup_members"],
                                       size["catchup_rounds"])  # fmt: skip
                summary["catchup"] = c
                log(f"  catch-up large/small: {c['ratio_large_over_small']}")
        summary["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(summary))

    task.react(lambda r: Deferred.fromCoroutine(run(r)))


if __name__ == "__main__":
    main()
