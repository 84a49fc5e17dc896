"""Scenarios 1 and 4: online 1:1 relay and group fan-out, any target, through loadgen workers;
and the closed loop.

    python bench/relay.py --target improto --storage memory [--quick]
    python bench/relay.py --target mosquitto --persistence [--quick]
    python bench/relay.py --target ejabberd --config archive|routing [--quick]
    python bench/relay.py --target bare --scenario fanout
    python bench/relay.py --target improto --scenario closed

1:1 relay: 1000 pairs (a sender and a receiver connection each), 150-byte messages, offered
at a ladder of rates; a step passes when every message arrived exactly once, in order per
receiver, every send was acknowledged (improto SEND_ACK, MQTT PUBACK), and the p99 latency
(arrival minus *scheduled* send time) is under 50 ms. Reported: the highest passing rate, and
p50/p99 at 5,000 msg/s. Fan-out: one sender, a 500-member group (improto group, MQTT topic
with 500 subscribers, bare relay group), the same ladder in messages/s; per message the
latency of the *last* of its 500 recipients. Light load: the relay ladder always has steps at
1,000 msg/s (latency) and 2,000 msg/s (CPU per message), reported as "light" (not run when
the server saturated below them). Closed loop: `pairs x window` (100 x 10 and 20 x 1), each
sender keeps `window` messages in flight and sends the next when one is delivered and
acknowledged; rate, latency (arrival minus actual send), CPU per delivered message. ejabberd
(XMPP, 1:1 only): every Run logs in fresh users, so nothing an earlier Run left in its
offline store reaches it. Prints a final JSON line.
"""

from __future__ import annotations

import argparse
import json
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import servers
from persist import service_cpu

HERE = Path(__file__).resolve().parent
P99_LIMIT_MS = 50.0
RESULTS = HERE / "results"


class Workers:
    """loadgen.py child processes, spoken to with JSON lines."""

    def __init__(self, n: int) -> None:
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(HERE / "loadgen.py")],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            for _ in range(n)
        ]

    def pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def all(self, cmds: list[dict[str, Any]], timeout: float = 120.0) -> list[dict[str, Any]]:
        for p, c in zip(self.procs, cmds, strict=True):
            assert p.stdin is not None
            p.stdin.write(json.dumps(c) + "\n")
            p.stdin.flush()
        out = []
        deadline = time.monotonic() + timeout
        for p in self.procs:
            assert p.stdout is not None
            # A worker whose peer never answers (a server that crashed its sessions) would
            # otherwise hold the whole run: wait at most `timeout` for its line.
            if not select.select([p.stdout], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise RuntimeError(f"loadgen worker {p.pid}: no reply within {timeout} s")
            line = p.stdout.readline()
            if not line:
                raise RuntimeError(f"loadgen worker {p.pid} died (exit {p.poll()})")
            reply = json.loads(line)
            if reply.get("ok") is False:
                raise RuntimeError(f"loadgen worker failed:\n{reply['error']}")
            out.append(reply)
        return out

    def close(self) -> None:
        for p in self.procs:
            try:
                if p.poll() is None and p.stdin is not None:
                    p.stdin.write('{"cmd": "quit"}\n')
                    p.stdin.flush()
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    i = min(len(sorted_values) - 1, max(0, round(q / 100.0 * len(sorted_values) + 0.5) - 1))
    return round(sorted_values[i], 3)


WIRE = {"mosquitto": "mqtt", "ejabberd": "xmpp"}  # target -> loadgen wire format
CLOSED_SEQS = 1_000_000  # sequence numbers reserved per closed-loop step (its count is open)


class Run:
    """One target, one scenario: the workers, the step ladder, the verdicts."""

    def __init__(self, handle: servers.ServerHandle, target: str, scenario: str,
                 workers: int, pairs: int, members: int,
                 user_base: int = 0) -> None:  # fmt: skip
        self.handle, self.target, self.scenario = handle, target, scenario
        self.nworkers = workers
        self.workers = Workers(workers)
        self.seq = 0
        self.pairs, self.members = pairs, members
        wire = WIRE.get(target, target)
        base = {"target": wire, "host": handle.host, "port": handle.port,
                "secret": handle.secret}  # fmt: skip
        if scenario != "relay" and wire == "xmpp":
            raise ValueError("ejabberd: 1:1 only (a MUC room is another product)")
        if scenario == "relay":
            pairs_all = [[user_base + 2 * i + 1, user_base + 2 * i + 2] for i in range(pairs)]
            specs = [dict(base, mode="pairs", users=pairs_all[w::workers]) for w in range(workers)]
        else:
            ids = list(range(2, members + 2))
            specs = [
                dict(base, mode="fanout", group=1, members=ids[w::workers],
                     sender=1 if w == 0 else None)
                for w in range(workers)
            ]  # fmt: skip
            specs[0]["create_with"] = ids  # improto: the sender creates the group with all
        t = time.monotonic()
        replies = self.workers.all([dict(s, cmd="setup") for s in specs])
        self.setup_s = round(time.monotonic() - t, 2)
        self.conns = sum(r["conns"] for r in replies)

    def step(self, rate: float, seconds: float, grace: float) -> dict[str, Any]:
        count = max(1, int(rate * seconds))
        t0 = time.monotonic() + 0.5 + count * 4e-6  # time for the workers to build frames
        seq0, self.seq = self.seq, self.seq + count
        cmds = [
            {"cmd": "step", "rate": rate, "count": count, "t0": t0, "seq0": seq0,
             "workers": self.nworkers, "index": w, "grace": grace}
            for w in range(self.nworkers)
        ]  # fmt: skip
        replies, cpu0, cpu1, services = self._measured(cmds, seconds + grace + 90)
        verdict = self._verdict(rate, count, replies, cpu0, cpu1, seconds)
        if self.target == "improto":  # Redis, RabbitMQ, HBase: used by production storage
            verdict["services_cpu_us_per_msg"] = {
                k: round(v / count * 1e6, 1) for k, v in services.items()
            }
        return verdict

    def _measured(
        self, cmds: list[dict[str, Any]], timeout: float
    ) -> tuple[list[dict[str, Any]], tuple[float, float], tuple[float, float], dict[str, float]]:
        """The workers' replies to `cmds`, with the CPU seconds (server, generator) before and
        after, and each service's CPU seconds in between."""
        cpu0 = (self.handle.cpu_s(), servers.cpu_seconds(self.workers.pids()))
        svc0 = service_cpu()
        replies = self.workers.all(cmds, timeout=timeout)
        cpu1 = (self.handle.cpu_s(), servers.cpu_seconds(self.workers.pids()))
        svc1 = service_cpu()
        return replies, cpu0, cpu1, {k: svc1[k] - svc0[k] for k in svc1}

    def closed(self, window: int, seconds: float, grace: float) -> dict[str, Any]:
        """One closed-loop step: every sender keeps `window` messages in flight."""
        t0 = time.monotonic() + 0.3
        seq0, self.seq = self.seq, self.seq + CLOSED_SEQS
        cmds = [
            {"cmd": "closed", "window": window, "seconds": seconds, "t0": t0, "seq0": seq0,
             "workers": self.nworkers, "index": w, "grace": grace}
            for w in range(self.nworkers)
        ]  # fmt: skip
        replies, cpu0, cpu1, services = self._measured(cmds, seconds + grace + 90)
        lats = sorted(x for r in replies for x in r["lat"])
        sent = sum(r["sent"] for r in replies)
        delivered = len(lats)
        acks = sum(r["acks"] for r in replies)
        dup = sum(r["duplicates"] for r in replies)
        order = sum(r["order_errors"] for r in replies)
        errors = sum(r["errors"] for r in replies)
        acked_ok = self.target == "bare" or acks >= sent
        per = max(1, delivered)
        out = {
            "pairs": self.pairs, "window": window, "seconds": seconds,
            "ok": sent == delivered and dup == 0 and order == 0 and errors == 0 and acked_ok,
            "rate": round(sum(r["in_window"] for r in replies) / seconds, 1),
            "sent": sent, "delivered": delivered, "lost": sent - delivered,
            "duplicates": dup, "order_errors": order, "errors": errors, "acks": acks,
            "p50_ms": percentile(lats, 50), "p99_ms": percentile(lats, 99),
            "max_ms": percentile(lats, 100),
            # over the sending window and the drain after it, per delivered message
            "server_cpu_us_per_msg": round((cpu1[0] - cpu0[0]) / per * 1e6, 1),
            "generator_cpu_us_per_msg": round((cpu1[1] - cpu0[1]) / per * 1e6, 1),
            "error_frames": [e for r in replies for e in r["error_frames"]][:3],
        }  # fmt: skip
        if self.target == "improto":
            out["services_cpu_us_per_msg"] = {
                k: round(v / per * 1e6, 1) for k, v in services.items()
            }
        return out

    def _verdict(self, rate: float, count: int, replies: list[dict[str, Any]],
                 cpu0: tuple[float, float], cpu1: tuple[float, float],
                 seconds: float) -> dict[str, Any]:  # fmt: skip
        per_seq: dict[str, list[float]] = {}
        for r in replies:
            for s, v in r["lat"].items():
                per_seq.setdefault(s, []).extend(v)
        fan = self.scenario == "fanout"
        want = self.members if fan else 1
        complete = [v for v in per_seq.values() if len(v) >= want]
        lost = count - len(complete)  # fan-out: a message missing one recipient is lost
        deliveries = sum(len(v) for v in per_seq.values())
        dup = sum(max(0, len(v) - want) for v in per_seq.values())
        # fan-out: the latency of a message is that of its last recipient
        lats = sorted(max(v) for v in complete)
        sent = sum(r["sent"] for r in replies)
        acks = sum(r["acks"] for r in replies)
        errors = sum(r["errors"] for r in replies)
        order = sum(r["order_errors"] for r in replies)
        acked_ok = self.target == "bare" or acks >= sent
        p99 = percentile(lats, 99)
        ok = (lost == 0 and dup == 0 and order == 0 and errors == 0 and acked_ok
              and p99 is not None and p99 < P99_LIMIT_MS)  # fmt: skip
        return {
            "rate": rate, "messages": count, "ok": ok, "lost": lost, "duplicates": dup,
            "order_errors": order, "errors": errors, "acks": acks,
            "deliveries": deliveries,
            "p50_ms": percentile(lats, 50), "p99_ms": p99, "max_ms": percentile(lats, 100),
            "send_lag_max_ms": max(r["lag_max_ms"] for r in replies),
            # CPU over the whole step (its sends, the drain after, the verdict) per message
            "server_cpu_us_per_msg": round((cpu1[0] - cpu0[0]) / count * 1e6, 1),
            "generator_cpu_us_per_msg": round((cpu1[1] - cpu0[1]) / count * 1e6, 1),
            "error_frames": [e for r in replies for e in r["error_frames"]][:3],
        }  # fmt: skip

    def close(self) -> None:
        self.workers.close()


def wait_idle(handle: servers.ServerHandle, limit_s: float = 20.0) -> float:
    """Wait until the server uses < 5% of a core (a backlog of the last step is done)."""
    start = time.monotonic()
    while time.monotonic() - start < limit_s:
        c0 = handle.cpu_s()
        time.sleep(0.25)
        if handle.cpu_s() - c0 < 0.0125:
            break
    return round(time.monotonic() - start, 2)


def ladder(run: Run, rates: list[float], seconds: float, grace: float,
           fixed: float | None, log: Any) -> dict[str, Any]:  # fmt: skip
    """Offer rising rates until one fails twice in a row, then one midpoint; the fixed rate
    is one of the steps (run after the ladder if the ladder stopped below it). Between steps
    the server gets idle first, so a step never inherits the backlog of the one before."""
    steps: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    failed: float | None = None
    fixed_step: dict[str, Any] | None = None

    def do(rate: float) -> dict[str, Any]:
        waited = wait_idle(run.handle)
        s = run.step(rate, seconds, grace)
        s["idle_wait_s"] = waited
        steps.append(s)
        log(f"  {run.target} {run.scenario} {rate:>9.0f}/s ok={s['ok']} lost={s['lost']} "
            f"p50={s['p50_ms']} p99={s['p99_ms']} lag={s['send_lag_max_ms']} "
            f"cpu us/msg server={s['server_cpu_us_per_msg']} gen={s['generator_cpu_us_per_msg']}"
            + (f" services={s['services_cpu_us_per_msg']}" if "services_cpu_us_per_msg" in s
               else "")
            + ("" if s["ok"] else f" [dup={s['duplicates']} order={s['order_errors']} "
               f"errors={s['errors']} acks={s['acks']}/{s['messages']}]"))  # fmt: skip
        return s

    ladder_rates = sorted(set(rates) | ({fixed} if fixed else set()))
    for rate in ladder_rates:
        s = do(rate)
        if not s["ok"]:  # one scheduling hiccup on a shared machine must not end the ladder
            s = do(rate)
        if rate == fixed:
            fixed_step = s
        if s["ok"]:
            best = s
        else:
            failed = rate
            break
    if failed is not None:
        low = best["rate"] if best else 0
        mid = (low + failed) / 2
        if mid > low * 1.1:
            s = do(mid)
            if s["ok"]:
                best = s
    if fixed and fixed_step is None:
        fixed_step = do(fixed)
    return {"max_sustained": best, "fixed": fixed_step, "saturated_at": failed, "steps": steps}


RELAY_RATES = [1000, 2000, 3500, 5000, 7000, 10000, 14000, 20000, 28000, 40000, 56000, 80000,
               112000, 160000]  # fmt: skip
# ejabberd with its archive on SQLite saturates in the hundreds per second: a ladder of its own
ARCHIVE_RATES = [100, 200, 350, 500, 700, 1000, 1400, 2000, 2800, 4000]
FANOUT_RATES = [5, 10, 20, 40, 80, 160, 320, 640, 1280]  # messages/s, each to 500 members
LIGHT_RATES = (1000.0, 2000.0)  # latency at the first, CPU per message at the second
CLOSED_CASES = ((100, 10), (20, 1))  # pairs x messages in flight per sender


def start(target: str, storage: str, persistence: bool,
          config: str = "routing") -> servers.ServerHandle:  # fmt: skip
    if target == "improto":  # production: a gateway process and a persister process
        return servers.start_improto(storage, split=storage == "production")
    if target == "mosquitto":
        return servers.start_mosquitto(persistence)
    if target == "ejabberd":
        return servers.start_ejabberd(config)
    return servers.start_bare_relay()


def light(result: dict[str, Any]) -> dict[str, Any]:
    """The ladder's steps at LIGHT_RATES (the last one run at each rate)."""
    out: dict[str, Any] = {}
    for rate in LIGHT_RATES:
        runs = [s for s in result["steps"] if s["rate"] == rate]
        if runs:
            out[str(int(rate))] = runs[-1]
        else:
            out[str(int(rate))] = {
                "rate": rate,
                "ok": False,
                "skipped": f"above its saturation rate ({result['saturated_at']}/s)",
            }
    return out


def closed_loop(handle: servers.ServerHandle, target: str, workers: int, quick: bool,
                log: Any) -> dict[str, Any]:  # fmt: skip
    """CLOSED_CASES one after the other, each with its own connections and fresh users."""
    seconds, grace = (1.0, 1.0) if quick else (4.0, 3.0)
    out: dict[str, Any] = {}
    base = 0
    for pairs, window in CLOSED_CASES:
        waited = wait_idle(handle)
        r = Run(handle, target, "relay", workers, pairs=pairs, members=0, user_base=base)
        base += 2 * pairs
        try:
            s = r.closed(window, seconds, grace)
        finally:
            r.close()
        s.update({"setup_s": r.setup_s, "idle_wait_s": waited})
        out[f"{pairs}x{window}"] = s
        log(
            f"  {target} closed {pairs}x{window}: {s['rate']:.0f}/s ok={s['ok']} "
            f"lost={s['lost']} p50={s['p50_ms']} p99={s['p99_ms']} max={s['max_ms']} "
            f"cpu us/msg server={s['server_cpu_us_per_msg']} "
            f"gen={s['generator_cpu_us_per_msg']}"
            + (
                f" services={s['services_cpu_us_per_msg']}"
                if "services_cpu_us_per_msg" in s
                else ""
            )
            + (
                ""
                if s["ok"]
                else f" [dup={s['duplicates']} order={s['order_errors']} "
                f"errors={s['errors']} acks={s['acks']}/{s['sent']} {s['error_frames']}]"
            )
        )
    return out


def _facts(target: str, storage: str, persistence: bool, config: str) -> dict[str, Any]:
    if target == "improto":
        return {"storage": storage, "persistence": storage != "memory"}
    if target == "ejabberd":
        return {"config": config, "persistence": config == "archive"}
    return {"storage": None, "persistence": persistence if target == "mosquitto" else False}


def run(target: str, scenario: str, *, storage: str = "memory", persistence: bool = False,
        config: str = "routing", quick: bool = False, workers: int = 2, log: Any = None,
        profile: str | None = None,
        rates: list[float] | None = None) -> dict[str, Any]:  # fmt: skip
    """Start the server, run the scenario's ladder, stop everything; the result dict."""
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    servers.raise_nofile()
    handle = start(target, storage, persistence, config)
    r: Run | None = None
    try:
        rss0 = handle.rss_kib()
        if scenario == "closed":
            spies = [_py_spy(pid, f"{profile}.{i}") for i, pid in
                     enumerate([handle.pid, *handle.helper_pids])] if profile else []  # fmt: skip
            res = closed_loop(handle, target, workers, quick, log)
            _stop_spies(spies)
            return {"target": target, "scenario": scenario, "workers": workers,
                    **_facts(target, storage, persistence, config), "cases": res,
                    "server_rss_kib": {"before": rss0, "after": handle.rss_kib()}}  # fmt: skip
        r = Run(handle, target, scenario, workers, pairs=1000, members=500)
        seconds, grace = (1.0, 1.0) if quick else (4.0, 2.0)
        spies = [_py_spy(pid, f"{profile}.{i}") for i, pid in
                 enumerate([handle.pid, *handle.helper_pids])] if profile else []  # fmt: skip
        if scenario == "relay":
            archive = target == "ejabberd" and config == "archive"
            ladder_rates = ARCHIVE_RATES if archive else RELAY_RATES
            rates = rates or (ladder_rates[1::2] if quick else ladder_rates)
            # its fixed rate would be 10x what it sustains: the backlog outlasts the step
            result = ladder(r, sorted(set(rates) | set(LIGHT_RATES)), seconds, grace,
                            None if archive else 5000.0, log)  # fmt: skip
            result["light"] = light(result)
        else:
            rates = rates or (FANOUT_RATES[1::2] if quick else FANOUT_RATES)
            result = ladder(r, rates, seconds, grace, 20.0, log)
        _stop_spies(spies)
        result.update({
            "target": target, "scenario": scenario,
            **_facts(target, storage, persistence, config),
            "connections": r.conns, "setup_s": r.setup_s, "workers": workers,
            "server_rss_kib": {"before": rss0, "after": handle.rss_kib()},
        })  # fmt: skip
        return result
    finally:
        if r is not None:
            r.close()
        handle.stop()


def _stop_spies(spies: list[subprocess.Popen[bytes]]) -> None:
    for spy in spies:
        spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
    for spy in spies:
        spy.wait(30)


def _py_spy(pid: int, out: str) -> subprocess.Popen[bytes]:
    """Sample the server while it holds the GIL (its Python CPU), collapsed stacks."""
    exe = Path(sys.executable).parent / "py-spy"
    cmd = [str(exe) if exe.exists() else "py-spy", "record", "-p", str(pid), "--format", "raw",
           "-o", out, "--threads", "--nonblocking", "--gil", "--rate", "1000"]  # fmt: skip
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    return p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", choices=["improto", "mosquitto", "ejabberd", "bare"],
                    default="improto")  # fmt: skip
    ap.add_argument("--scenario", choices=["relay", "fanout", "closed"], default="relay")
    ap.add_argument(
        "--config",
        choices=servers.EJABBERD_CONFIGS,
        default="routing",
        help="ejabberd: archive (mod_mam on SQLite) or routing (no archive)",
    )
    ap.add_argument("--storage", default="memory", help="improto: memory|embedded|production")
    ap.add_argument("--persistence", action="store_true", help="mosquitto: persistence true")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--profile", metavar="FILE",
                    help="py-spy each server process: FILE.0, FILE.1 (raw stacks)")  # fmt: skip
    ap.add_argument("--rates", help="comma-separated ladder instead of the default")
    a = ap.parse_args()
    rates = [float(x) for x in a.rates.split(",")] if a.rates else None
    res = run(a.target, a.scenario, storage=a.storage, persistence=a.persistence,
              config=a.config, quick=a.quick, workers=a.workers, profile=a.profile,
              rates=rates)  # fmt: skip
    print(json.dumps(res))


if __name__ == "__main__":
    main()
