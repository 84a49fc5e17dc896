"""Byte-level mutations of encoded frames for the codec's hypothesis tests: a strategy of
mutations and the function that applies one (tests/test_codec_properties.py,
tests/test_codec_fast.py)."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

u8 = st.integers(0, 255)

BYTE_MUTATIONS = (
    st.tuples(st.just("flip"), st.integers(0), st.integers(1, 255)),
    st.tuples(st.just("set"), st.integers(0), u8),
    st.tuples(st.just("insert"), st.integers(0), st.binary(min_size=1, max_size=4)),
    st.tuples(st.just("delete"), st.integers(0), st.integers(1, 4)),
    st.tuples(st.just("truncate"), st.integers(0)),
    st.tuples(st.just("append"), st.binary(min_size=1, max_size=8)),
)


def mutate(payload: bytes, mutation: tuple[Any, ...]) -> bytes:
    """`payload` with one of BYTE_MUTATIONS applied (positions taken modulo its length)."""
    kind = mutation[0]
    if kind == "append":
        return payload + mutation[1]
    if not payload:
        return payload
    pos = mutation[1] % len(payload)
    if kind == "flip":
        return payload[:pos] + bytes([payload[pos] ^ mutation[2]]) + payload[pos + 1 :]
    if kind == "set":
        return payload[:pos] + bytes([mutation[2]]) + payload[pos + 1 :]
    if kind == "insert":
        return payload[:pos] + mutation[2] + payload[pos:]
    if kind == "delete":
        return payload[:pos] + payload[pos + mutation[2] :]
    assert kind == "truncate", kind
    return payload[:pos]
