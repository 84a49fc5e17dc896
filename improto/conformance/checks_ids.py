"""Identifiers an outsider must not be able to enumerate: spec sections 5 and 12.1."""

from __future__ import annotations

import itertools

from improto.conformance.checks_groups import create
from improto.conformance.conn import Env
from improto.conformance.runner import check
from improto.errors import ErrorCode
from improto.frames import GroupMembers
from improto.limits import U64_MAX

GROUPS = 16  # well within the per-user group limit and the group-operation burst


@check("groups.ids_not_enumerable")
def group_ids_not_enumerable(env: Env) -> str:
    """5/12.1: group ids are random: not in creation order, no two adjacent, and the
    neighbours of a real id are NOT_FOUND (a real group is FORBIDDEN to an outsider)."""
    owner, outsider = env.login(), env.login()
    ids = [create(owner, name=f"ids{i}") for i in range(GROUPS)]
    assert len(set(ids)) == GROUPS, f"GROUP_CREATE returned a group id twice: {ids}"
    ordered = sorted(ids)
    # For ids drawn at random from 2^53 values or more, each of these fails with a
    # probability below 2^-28; sequential or time-ordered ids fail them all.
    assert ids != ordered, f"{GROUPS} new group ids came in ascending order: {ids} (5)"
    gaps = [b - a for a, b in itertools.pairwise(ordered)]
    assert min(gaps) > 1 << 16, f"group ids {ordered} lie close together: enumerable (5)"
    for gid in ids[:3]:
        outsider.expect_error(GroupMembers(gid), ErrorCode.FORBIDDEN)
        for probe in (p for p in (gid - 1, gid + 1) if 1 <= p <= U64_MAX):
            outsider.expect_error(GroupMembers(probe), ErrorCode.NOT_FOUND)
    return f"smallest gap between {GROUPS} new ids: {min(gaps)}"
