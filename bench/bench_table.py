"""The side-by-side table of a bench/run.py report (Markdown), with ratios and target checks."""

from __future__ import annotations

from typing import Any


def _f(v: Any, nd: int = 1) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:,.{nd}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def _ratio(a: float | None, b: float | None) -> str:
    if not a or not b:
        return "—"
    return f"{a / b:.2f}x"


def _relay_rows(res: dict[str, Any], unit: float, what: str) -> list[str]:
    """One row per target: max sustained rate (x unit), p50/p99 there, p50/p99 at the fixed
    rate, and the max rate as a ratio of Mosquitto (with persistence) and of the bare relay."""
    mosq = res.get("mosquitto/persistence", {}).get("max_sustained") or {}
    bare = res.get("bare", {}).get("max_sustained") or {}
    rows = []
    for name, r in res.items():
        if name == "meta":
            continue
        if "skipped" in r:  # bench/run.py --quick without ejabberd
            rows.append(f"| {name} | {r['skipped']} | | | | |")
            continue
        best, fixed = r.get("max_sustained") or {}, r.get("fixed") or {}
        rate = best.get("rate")
        # no fixed step: a ladder without one (ejabberd/archive's is below it)
        mark = "" if fixed.get("ok") else " (failed)" if fixed else " (not run)"
        rows.append(
            f"| {name} | {_f(rate * unit if rate else None, 0)} | {_f(best.get('p50_ms'), 2)} "
            f"/ {_f(best.get('p99_ms'), 2)} | {_f(fixed.get('p50_ms'), 2)} / "
            f"{_f(fixed.get('p99_ms'), 2)}{mark} | "
            f"{_ratio(rate, mosq.get('rate'))} | {_ratio(rate, bare.get('rate'))} |"
        )
    head = [
        f"| target | max sustained {what} | p50 / p99 ms there | p50 / p99 ms at the fixed rate "
        "| vs Mosquitto | vs bare relay |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    return head + rows


def _sync_section(res: dict[str, Any]) -> list[str]:
    rows = res["summary"]
    mosq = rows.get("mosquitto", {}).get("drain_total_s")
    sizes = next((r for r in res["results"].values() if r.get("history")), {})
    drained = (sizes.get("offline_drain") or {}).get("messages")
    hist = sizes.get("history") or {}
    pages = (hist.get("page") or {}).get("n")
    out = [f"## 2-3. Offline drain ({_f(drained)} messages, pages of 200) and history "
           "(pages of 20)",
           "Drain: connect + HELLO + the sync loop from cursor 0, best of 3 fresh devices; "
           "Mosquitto: a persistent session (QoS 1) reconnecting, 200-message chunks; "
           "ejabberd: a never-online account's login (SASL PLAIN, bind, XEP-0198, presence) "
           "until mod_offline's last message, 200-message chunks. History: "
           f"{_f(pages)} pages on a {_f(hist.get('conversation_messages'))}-message "
           "conversation (walk back + random positions).", "",
           "| target | drain total s | per-page p99 ms | vs Mosquitto | history p50 / p99 ms |",
           "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in rows.items():
        if "error" in r:
            skipped = res["results"].get(name, {}).get("skipped")
            why = skipped or f"error: {r['error'][:80]}"
            out.append(f"| {name} | {why} | | | |")
            continue
        out.append(f"| {name} | {_f(r['drain_total_s'], 3)} | {_f(r['drain_page_p99_ms'], 2)} | "
                   f"{_ratio(r['drain_total_s'], mosq) if name != 'mosquitto' else '1.00x'} | "
                   f"{_f(r['history_p50_ms'], 2)} / {_f(r['history_p99_ms'], 2)} |")  # fmt: skip
    return [*out, ""]


def _idle_section(res: dict[str, Any]) -> list[str]:
    me = res.get("improto", {}).get("bytes_per_conn")
    out = ["## 5. Idle authenticated connections with heartbeats",
           "Server RSS after all are logged in and held, minus RSS before (after a warm-up).", "",
           "| target | connections | bytes each | connections per GiB | improto / this |",
           "|---|---:|---:|---:|---:|"]  # fmt: skip
    for name, r in res.items():
        if name == "meta" or not isinstance(r, dict) or "bytes_per_conn" not in r:
            continue
        out.append(f"| {name} | {_f(r['alive_at_end'])} | {_f(r['bytes_per_conn'])} | "
                   f"{_f(r['conns_per_gib'])} | {_ratio(me, r['bytes_per_conn'])} |")  # fmt: skip
    return [*out, ""]


def _redis_section(res: dict[str, Any]) -> list[str]:
    out = [f"## Physical limit: redis-benchmark (Redis {res.get('redis')}, "
           f"{res.get('value_bytes')}-byte values, private server)", "",
           "| run | test | requests/s | p50 ms | p99 ms |", "|---|---|---:|---:|---:|"]  # fmt: skip
    for name, r in res["runs"].items():
        for test, t in r["tests"].items():
            out.append(f"| {name} | {test} | {_f(t['rps'], 0)} | {_f(t['p50_ms'], 3)} | "
                       f"{_f(t['p99_ms'], 3)} |")  # fmt: skip
    return [*out, ""]


def _headroom(res: dict[str, Any]) -> str:
    """The generator check: it drove the bare relay at N x the best improto rate."""
    bare = (res.get("bare", {}).get("max_sustained") or {}).get("rate")
    ours = [
        (r.get("max_sustained") or {}).get("rate") or 0
        for name, r in res.items()
        if name.startswith("improto")
    ]
    if not bare or not ours or not max(ours):
        return "Generator headroom: not measured (no bare relay or no passing improto step)."
    ratio = bare / max(ours)
    verdict = "enough" if ratio >= 1.5 else "NOT enough: the generator may bound improto"
    return (
        f"Generator headroom: the same generator drove the bare relay at {bare:,.0f} msg/s, "
        f"{ratio:.1f}x improto's best ({max(ours):,.0f}); 1.5x is needed: {verdict}."
    )


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    out = [
        f"# bench/run.py{' --quick' if report['quick'] else ''} — {m['date']}",
        "",
        f"{m['cpus']} CPU ({m['cpu']}), {m['mem_gib']} GiB, Python {m['python']}, kernel "
        f"{m['kernel']}, commit {m['commit']}; {report.get('seconds')} s in total.",
        "",
    ]
    results = report["results"]
    if "relay" in results:
        out += ["## 1. Online 1:1 relay, 1000 pairs, 150-byte messages",
                "p99 under 50 ms, no loss, in order, every send acknowledged (a failed "
                "step is tried twice); fixed rate 5,000/s.",
                "", *_relay_rows(results["relay"], 1, "msg/s"), "",
                _headroom(results["relay"]), ""]  # fmt: skip
    if "fanout" in results:
        out += ["## 4. Group fan-out, 500 online members",
                "Latency of a message = that of its last recipient; fixed rate 20 msg/s "
                "(10,000 deliveries/s).",
                "", *_relay_rows(results["fanout"], 500, "deliveries/s"), ""]  # fmt: skip
    for name in ("sync", "idle", "redis"):
        if name in results:
            renderer = globals().get(f"_{name}_section")
            if renderer is not None:
                out += renderer(results[name])
    for name, err in report.get("failed", {}).items():
        out += [f"## {name}: FAILED", "", "```", err.strip()[-2000:], "```", ""]
    return "\n".join(out) + "\n"
