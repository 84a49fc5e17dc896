"""Redis Cluster key slots, so that batched multi-key scripts stay Cluster-ready.

A script may only touch keys of one slot on Redis Cluster. The stores batch many users' (or
senders') keys into one script call; with `cluster=True` they split each batch by slot first.
On a single Redis (or Sentinel), where every key lives on one server, one call takes all.
A key that must sit next to a batch of some slot (a set one call adds to) takes `slot_tag`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Mapping, Sized
from typing import TypeVar

_T = TypeVar("_T")

SLOTS = 16384


def _crc16_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return table


_TABLE = _crc16_table()


def crc16(data: bytes) -> int:
    """CRC-16/XMODEM, the checksum Redis Cluster uses for key slots."""
    crc = 0
    for byte in data:
        crc = ((crc << 8) & 0xFFFF) ^ _TABLE[((crc >> 8) ^ byte) & 0xFF]
    return crc


def key_slot(key: str | bytes) -> int:
    """The cluster slot of `key`: only the `{hash tag}` counts when it is non-empty."""
    raw = key.encode() if isinstance(key, str) else key
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            raw = raw[start + 1 : end]
    return crc16(raw) % SLOTS


@functools.cache
def _slot_tags() -> tuple[str, ...]:
    # "b0", "b1", ... until every slot has one: about 114,000 checksums, 0.15 s, once
    tags: list[str | None] = [None] * SLOTS
    left, n = SLOTS, 0
    while left:
        slot = crc16(b"b%d" % n) % SLOTS
        if tags[slot] is None:
            tags[slot] = f"b{n}"
            left -= 1
        n += 1
    return tuple(t for t in tags if t is not None)


def slot_tag(slot: int) -> str:
    """A hash tag whose key slot is `slot`: `key_slot("x:{" + slot_tag(s) + "}") == s`
    (computed on first use, then kept)."""
    return _slot_tags()[slot]


def slot_groups(items: Iterable[_T], key: Callable[[_T], str], cluster: bool) -> list[list[_T]]:
    """`items` split into groups whose keys share a slot (cluster), or one group; the order
    of items inside each group is kept."""
    items = list(items)
    if not cluster:
        return [items] if items else []
    groups: dict[int, list[_T]] = {}
    for item in items:
        groups.setdefault(key_slot(key(item)), []).append(item)
    return list(groups.values())


def slot_chunks(
    items: Iterable[_T], key: Callable[[_T], str], cluster: bool, size: int
) -> list[list[_T]]:
    """slot_groups, each cut into lists of at most `size` items: one script call each."""
    return [
        group[i : i + size]
        for group in slot_groups(items, key, cluster)
        for i in range(0, len(group), size)
    ]


def script_calls(
    entries: Mapping[int, Sized], key: Callable[[int], str], cluster: bool, max_entries: int
) -> list[list[int]]:
    """The users of `entries` (user -> that user's entries) as the user lists of script
    calls: many users per call (one round trip for a batch), about `max_entries` entries per
    call at most (one user's entries always in one call, so they apply in order), and split
    by slot on Redis Cluster. A user without entries still gets a place in a call."""
    calls: list[list[int]] = []
    for group in slot_groups(sorted(entries), key, cluster):
        calls.append([])
        size = 0
        for user in group:
            n = len(entries[user])
            if calls[-1] and size + n > max_entries:
                calls.append([])
                size = 0
            calls[-1].append(user)
            size += n
    return calls
