"""Codec throughput: decode and encode of a typical 150-byte chat frame, compiled vs interpreted.

Run from the repo root: `python bench/codec.py [--quick]`. One process on one core (pinned
when the OS allows). Prints a table to stderr and one JSON line to stdout; exits non-zero
only if the correctness check fails (the targets are reported, not asserted).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import construct

from improto.codec import COMPILED, INTERPRETED, Codec
from improto.frames import Frame, Push, Send
from improto.vectors import TEXT, valid_frames

FRAME_BYTES = 150  # whole frame as written to a socket, 4-byte length prefix included
DECODE_FPS_MIN = 100_000
RATIO_MIN = 3.0
CODECS: dict[str, Codec] = {"compiled": COMPILED, "interpreted": INTERPRETED}
OPS = ("decode", "encode")


def _body(n: int) -> bytes:
    """n bytes of ASCII chat text (TEXT repeated), so the body stays valid UTF-8."""
    return ((TEXT + b" ") * (n // len(TEXT) + 1))[:n]


def _sized(with_body: Callable[[bytes], Frame]) -> Frame:
    overhead = len(COMPILED.encode(with_body(b"")))
    return with_body(_body(FRAME_BYTES - overhead))


def bench_frames() -> dict[str, Frame]:
    vectors = {name: frame for name, _, frame in valid_frames()}
    push = vectors["push_text"]
    send = vectors["send_text_user"]
    assert isinstance(push, Push) and isinstance(send, Send)
    return {
        "push": _sized(
            lambda b: dataclasses.replace(push, message=dataclasses.replace(push.message, body=b))
        ),
        "send": _sized(lambda b: dataclasses.replace(send, body=b)),
    }


def check(name: str, frame: Frame) -> bytes:
    """Round trip on both codecs, identical bytes, exact size; raise on any mismatch."""
    data = {k: c.encode(frame) for k, c in CODECS.items()}
    if data["compiled"] != data["interpreted"]:
        raise AssertionError(f"{name}: compiled and interpreted bytes differ")
    wire = data["compiled"]
    if len(wire) != FRAME_BYTES:
        raise AssertionError(f"{name}: {len(wire)} bytes, expected {FRAME_BYTES}")
    for k, c in CODECS.items():
        if c.decode(wire) != frame:
            raise AssertionError(f"{name}: {k} decode(encode(f)) != f")
    return wire


def pin_one_cpu() -> int | None:
    if not hasattr(os, "sched_setaffinity"):
        return None
    try:
        cpu = min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return None
    return cpu


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(fn: Callable[[Any], Any], arg: Any, n: int) -> float:
    """Frames per second for n calls, GC off while timing (as timeit does)."""
    gc.disable()
    try:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        dt = time.perf_counter() - t0
    finally:
        gc.enable()
    return n / dt


def calibrate(fn: Callable[[Any], Any], arg: Any, seconds: float) -> int:
    """Warm up, then pick the call count that takes about `seconds`."""
    n = 100
    while True:
        t0 = time.perf_counter()
        for _ in range(n):
            fn(arg)
        dt = time.perf_counter() - t0
        if dt >= min(0.05, seconds / 2):
            return max(1, int(n * seconds / dt))
        n *= 2


def run_case(frame: Frame, wire: bytes, repeats: int, seconds: float) -> dict[str, Any]:
    """Time both ops; compiled and interpreted repeats alternate so noise hits both alike."""
    out: dict[str, Any] = {k: {} for k in CODECS}
    for op in OPS:
        jobs = {
            k: (c.decode, wire) if op == "decode" else (c.encode, frame) for k, c in CODECS.items()
        }
        counts = {k: calibrate(fn, arg, seconds) for k, (fn, arg) in jobs.items()}
        rates: dict[str, list[float]] = {k: [] for k in CODECS}
        order = list(CODECS)
        for _ in range(repeats):
            for k in order:
                fn, arg = jobs[k]
                rates[k].append(timed(fn, arg, counts[k]))
            order.reverse()
        for k, r in rates.items():
            out[k][f"{op}_fps"] = round(statistics.median(r))
            out[k][f"{op}_fps_best"] = round(max(r))
    out["ratio"] = {
        op: round(out["compiled"][f"{op}_fps"] / out["interpreted"][f"{op}_fps"], 2) for op in OPS
    }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats of ~0.1 s instead of 7 x 0.3 s")
    args = ap.parse_args(argv)
    repeats, seconds = (3, 0.1) if args.quick else (7, 0.3)

    frames = bench_frames()
    try:
        wires = {name: check(name, f) for name, f in frames.items()}
    except AssertionError as e:
        print(f"correctness check failed: {e}", file=sys.stderr)
        return 1

    pinned = pin_one_cpu()
    started = time.perf_counter()
    results = {name: run_case(f, wires[name], repeats, seconds) for name, f in frames.items()}
    elapsed = time.perf_counter() - started

    print(
        f"{'frame':<6} {'codec':<12} {'op':<7} {'median/s':>10} {'best/s':>10} {'ratio':>6}",
        file=sys.stderr,
    )
    for name, res in results.items():
        for op in OPS:
            for k in CODECS:
                ratio = f"{res['ratio'][op]:.2f}" if k == "compiled" else ""
                print(
                    f"{name:<6} {k:<12} {op:<7} {res[k][f'{op}_fps']:>10,} "
                    f"{res[k][f'{op}_fps_best']:>10,} {ratio:>6}",
                    file=sys.stderr,
                )

    push = results["push"]
    meets = (
        push["compiled"]["decode_fps"] >= DECODE_FPS_MIN
        and push["ratio"]["decode"] >= RATIO_MIN
        and push["ratio"]["encode"] >= RATIO_MIN
    )
    report = {
        "bench": "codec",
        "frame_bytes": FRAME_BYTES,
        "python": platform.python_version(),
        "construct": construct.__version__,
        "cpu": cpu_model(),
        "pinned_cpu": pinned,
        "mode": "quick" if args.quick else "full",
        "repeats": repeats,
        "seconds_per_repeat": seconds,
        "stat": "fps = median of repeats, fps_best = max; ratio = compiled/interpreted medians",
        **results,
        "targets": {"decode_fps_min": DECODE_FPS_MIN, "ratio_min": RATIO_MIN},
        "meets_targets": meets,
        "elapsed_s": round(elapsed, 1),
    }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
