"""The msg_ids a device holds above its positions in large groups' timelines (PROTOCOL.md
20.6, "Held ids"): what it lists in TIMELINE_PULL's `held`, so that a message it got by PUSH
(or sent itself) is not downloaded again by the pages.

The rule, per group:

- **held**: the msg_ids of the group's messages the device stored outside the timeline loop
  (PUSH, its own SEND_ACKs, a TIMELINE_PULL of its own, HISTORY_PAGE) that are above the
  group's `covered_id`, ascending; at most HELD_KEEP (4 x 1000): above that the lowest go (an id
  that stayed while 4000 newer ones came is most likely not in the timeline at all);
- **sent**: the lowest TIMELINE_HELD_MAX (1000) of them, on every pull (the nearest to the
  position, where the page starts);
- **covered_id**: the highest msg_id known to be at or below the stored position (the newest
  message of a page of the loop; the head's last_msg_id once the position reaches the head's
  done); the held ids at or below it are forgotten. A position that goes back (lost server
  data) resets it to 0.

A held id is never forgotten merely because a page said has_more = 0: a PUSH goes out when the
server accepts the message and the message gets its seq when it is stored, so it can be above
that page's done. msg_id order stands for seq order here (the server's read_seq does the same
with read marks); across gateways it can differ, and then a message is downloaded once more.
Either way nothing is lost: a held id always names a stored message.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from typing import Any

from improto.limits import TIMELINE_HELD_MAX, TIMELINE_PAGE_MAX

HELD_KEEP = 4 * TIMELINE_HELD_MAX  # held ids kept per group, the newest
HELD_FOLLOW = TIMELINE_PAGE_MAX  # every this many held ids of a group: run the timeline loop


class HeldIds:
    """Per group: the held msg_ids (ascending) and covered_id."""

    def __init__(self) -> None:
        self._held: dict[int, list[int]] = {}
        self.covered: dict[int, int] = {}  # group id -> covered_id (absent: 0)

    def hold(self, group_id: int, msg_id: int) -> bool:
        """Hold a stored message of the group; True if it is held now and was not before."""
        if msg_id <= self.covered.get(group_id, 0):
            return False  # the position covers it already
        ids = self._held.setdefault(group_id, [])
        i = bisect.bisect_left(ids, msg_id)
        if i < len(ids) and ids[i] == msg_id:
            return False
        ids.insert(i, msg_id)
        if len(ids) > HELD_KEEP:
            del ids[: len(ids) - HELD_KEEP]  # the lowest go
            return msg_id >= ids[0]
        return True

    def held(self, group_id: int) -> tuple[int, ...]:
        return tuple(self._held.get(group_id, ()))

    def count(self, group_id: int) -> int:
        return len(self._held.get(group_id, ()))

    def to_send(self, group_id: int) -> tuple[int, ...]:
        """TIMELINE_PULL's `held`: the lowest TIMELINE_HELD_MAX held ids, ascending."""
        return tuple(self._held.get(group_id, ())[:TIMELINE_HELD_MAX])

    def cover(self, group_id: int, msg_id: int) -> None:
        """`msg_id` is at or below the stored position: forget the held ids up to it."""
        if msg_id <= self.covered.get(group_id, 0):
            return
        self.covered[group_id] = msg_id
        ids = self._held.get(group_id)
        if ids:
            del ids[: bisect.bisect_right(ids, msg_id)]
            if not ids:
                del self._held[group_id]

    def reset(self, group_id: int) -> None:
        """The position went back (lost server data): nothing is known to be covered."""
        self.covered.pop(group_id, None)

    def keep_only(self, group_ids: Iterable[int]) -> None:
        """Drop the held ids of the groups not in `group_ids` (the groups of a
        TIMELINE_HEADS_PAGE: the others have no timeline to pull them from)."""
        keep = set(group_ids)
        for g in [g for g in self._held if g not in keep]:
            del self._held[g]

    def groups(self) -> set[int]:
        return set(self._held) | set(self.covered)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, HeldIds):
            return NotImplemented
        return self._held == other._held and self.covered == other.covered

    def __repr__(self) -> str:
        counts = {g: len(ids) for g, ids in self._held.items()}
        return f"HeldIds(held={counts}, covered={self.covered})"

    # --- persistence (a part of the state file: u64s as decimal strings)

    def group_json(self, group_id: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if group_id in self.covered:
            out["covered_id"] = str(self.covered[group_id])
        if self._held.get(group_id):
            out["held"] = [str(i) for i in self._held[group_id]]
        return out

    def load_group(self, group_id: int, obj: dict[str, Any]) -> None:
        covered = int(obj.get("covered_id", 0))
        if covered:
            self.covered[group_id] = covered
        ids = sorted({int(i) for i in obj.get("held", ()) if int(i) > covered})[-HELD_KEEP:]
        if ids:
            self._held[group_id] = ids
