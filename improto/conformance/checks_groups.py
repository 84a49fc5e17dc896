"""Groups: spec sections 7 (GROUP_*), 9.2 (group fan-out) and 12."""

from __future__ import annotations

import json
import os
import random

from improto.codec import encode
from improto.conformance.checks_offline import wait_inbox
from improto.conformance.checks_send import QUIET, assert_no_push, assert_record
from improto.conformance.conn import Conn, Env, describe, eventually, huge_id, new_user, sync
from improto.conformance.runner import check
from improto.enums import ConvKind
from improto.errors import ErrorCode
from improto.frames import (
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupList,
    GroupMemberList,
    GroupMembers,
    GroupRemove,
    GroupRemoveOk,
    HistoryPage,
    HistoryPull,
    Message,
    MyGroups,
    Send,
)


def create(c: Conn, members: tuple[int, ...] = (), name: str = "conformance") -> int:
    gid = c.call(GroupCreate(name, members), GroupCreated).group_id
    assert gid >= 1
    return gid


def members_of(c: Conn, gid: int) -> GroupMemberList:
    ml = c.call(GroupMembers(gid), GroupMemberList)
    assert ml.group_id == gid, f"GROUP_MEMBER_LIST for group {ml.group_id}, asked {gid}"
    assert list(ml.members) == sorted(set(ml.members)), "members not ascending/unique (7)"
    return ml


def check_event(
    m: Message, gid: int, actor: Conn, event: str, members: set[int], name: str | None = None
) -> None:
    """A group event record as 12.3 defines it."""
    where = f"group event {event!r}"
    assert (m.content_type, m.conv_kind, m.conv_id) == (0, ConvKind.GROUP, gid), (
        f"{where}: content_type/conv_kind/conv_id {m.content_type}/{m.conv_kind}/{m.conv_id}, "
        f"want 0/2/{gid}"
    )
    assert (m.sender_id, m.sender_device) == (actor.user_id, actor.device_id), (
        f"{where}: sender {m.sender_id}/{m.sender_device}, want {actor.user_id}/{actor.device_id}"
    )
    try:
        body = json.loads(m.body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise AssertionError(f"{where}: body is not UTF-8 JSON: {e}") from None
    assert isinstance(body, dict), f"{where}: body is not a JSON object"
    assert body.get("event") == event, f"{where}: event is {body.get('event')!r}"
    assert body.get("group_id") == str(gid), (
        f"{where}: group_id {body.get('group_id')!r}, want the decimal string {str(gid)!r}"
    )
    got = body.get("members")
    assert isinstance(got, list) and all(isinstance(x, str) for x in got), (
        f"{where}: members {got!r} is not an array of decimal strings"
    )
    assert {int(x) for x in got} == members and len(got) == len(members), (
        f"{where}: members {sorted(got)}, want {sorted(members)}"
    )
    if event == "created":
        assert body.get("name") == name, f"{where}: name {body.get('name')!r}, want {name!r}"
    else:
        assert "name" not in body, f"{where}: has a name key (only in 'created')"


def event_push(c: Conn, gid: int, event: str) -> Message:
    def is_event(m: Message) -> bool:
        if m.conv_id != gid or m.content_type != 0:
            return False
        try:
            return bool(json.loads(m.body).get("event") == event)
        except ValueError:
            return True  # let check_event report the malformed body

    return c.next_push(is_event).message


@check("groups.create")
def group_create(env: Env) -> None:
    """12.1/7 GROUP_CREATE: creator is owner and member; duplicates and self ignored; ascending."""
    a, b = env.login(), env.login()
    c_id = new_user()
    name = "team ✓"
    gid = create(a, (b.user_id, c_id, a.user_id, b.user_id, c_id), name)
    for viewer in (a, b):
        ml = members_of(viewer, gid)
        assert ml.owner_id == a.user_id, f"owner {ml.owner_id}, want the creator {a.user_id}"
        assert ml.name == name, f"name {ml.name!r}"
        assert list(ml.members) == sorted({a.user_id, b.user_id, c_id}), (
            f"members {list(ml.members)}, want {sorted({a.user_id, b.user_id, c_id})}"
        )
    gid2 = create(a)
    assert gid2 != gid, "two groups got the same id"
    assert list(members_of(a, gid2).members) == [a.user_id], "a group created alone"


@check("groups.created_event")
def created_event(env: Env) -> None:
    """12.2/12.3: the 'created' event (all initial members) is pushed to members and stored."""
    alice, bob = new_user(), new_user()
    a1, a2 = env.login(alice), env.login(alice)
    b1, b2 = env.login(bob), env.login(bob)
    other = new_user()
    gid = create(a1, (bob, other), "launch")
    want = {alice, bob, other}
    seen = []
    for c in (a2, b1, b2):
        m = event_push(c, gid, "created")
        check_event(m, gid, a1, "created", want, "launch")
        seen.append(m.msg_id)
    assert len(set(seen)) == 1, "the devices got different event messages"
    msgs = wait_inbox(env.login(other), {seen[0]})
    check_event(next(m for m in msgs if m.msg_id == seen[0]), gid, a1, "created", want, "launch")


@check("groups.add")
def group_add(env: Env) -> None:
    """7 GROUP_ADD/12.2: count skips existing members; 'added' event lists the new ones only."""
    a, b = env.login(), env.login()
    d = env.login()
    e_id = new_user()
    gid = create(a, (b.user_id,))
    event_push(b, gid, "created")
    ok = b.call(GroupAdd(gid, (a.user_id, d.user_id, e_id, d.user_id)), GroupAddOk)  # non-owner
    assert (ok.group_id, ok.count) == (gid, 2), f"GROUP_ADD_OK {ok.group_id}/{ok.count}, want 2"
    want = sorted({a.user_id, b.user_id, d.user_id, e_id})
    assert list(members_of(a, gid).members) == want
    for c in (a, d):  # an existing member and a new one get the event
        check_event(event_push(c, gid, "added"), gid, b, "added", {d.user_id, e_id})
    again = a.call(GroupAdd(gid, (b.user_id, d.user_id)), GroupAddOk)
    assert again.count == 0, f"adding only members: count {again.count}, want 0"
    marker = a.send_msg(gid, b"marker", kind=ConvKind.GROUP)
    d.push_for(marker.msg_id)
    extra = [m for m in d.queued_pushes() if m.content_type == 0]
    assert not extra, "a GROUP_ADD with count 0 produced a group event (12.2)"


@check("groups.add_forbidden_not_found")
def add_forbidden_not_found(env: Env) -> None:
    """12.1/7: non-members may not add (FORBIDDEN); unknown group NOT_FOUND; nothing changes."""
    a, outsider = env.login(), env.login()
    gid = create(a)
    outsider.expect_error(GroupAdd(gid, (outsider.user_id,)), ErrorCode.FORBIDDEN)
    assert list(members_of(a, gid).members) == [a.user_id], "a refused GROUP_ADD changed members"
    a.expect_error(GroupAdd(huge_id(), (outsider.user_id,)), ErrorCode.NOT_FOUND)
    a.expect_error(GroupRemove(huge_id(), (a.user_id,)), ErrorCode.NOT_FOUND)
    a.expect_error(GroupMembers(huge_id()), ErrorCode.NOT_FOUND)
    outsider.expect_error(GroupMembers(gid), ErrorCode.FORBIDDEN)


@check("groups.remove_rules")
def remove_rules(env: Env) -> None:
    """12.1/12.2: only the owner removes others; removed user gets the 'removed' event."""
    a, b, c = env.login(), env.login(), env.login()
    gid = create(a, (b.user_id, c.user_id))
    b.expect_error(GroupRemove(gid, (c.user_id,)), ErrorCode.FORBIDDEN)
    assert c.user_id in members_of(a, gid).members, "a refused GROUP_REMOVE removed the member"
    ok = a.call(GroupRemove(gid, (c.user_id, new_user())), GroupRemoveOk)
    assert (ok.group_id, ok.count) == (gid, 1), f"GROUP_REMOVE_OK count {ok.count}, want 1"
    for viewer in (c, b):
        check_event(event_push(viewer, gid, "removed"), gid, a, "removed", {c.user_id})
    assert list(members_of(a, gid).members) == sorted([a.user_id, b.user_id])
    none = a.call(GroupRemove(gid, (c.user_id,)), GroupRemoveOk)
    assert none.count == 0, f"removing a non-member: count {none.count}, want 0"


@check("groups.leave")
def leave(env: Env) -> None:
    """12.1/12.2: removing oneself leaves; leaver and members get 'removed' [self]; access ends."""
    a = env.login()
    leaver = new_user()
    b1, b2 = env.login(leaver), env.login(leaver)  # b1 leaves, b2 is the leaver's other device
    gid = create(a, (leaver,))
    ok = b1.call(GroupRemove(gid, (leaver,)), GroupRemoveOk)
    assert (ok.group_id, ok.count) == (gid, 1), f"leaving: count {ok.count}, want 1"
    for viewer in (b2, a):
        check_event(event_push(viewer, gid, "removed"), gid, b1, "removed", {leaver})
    b1.expect_error(GroupMembers(gid), ErrorCode.FORBIDDEN)
    b1.expect_error(Send(os.urandom(16), ConvKind.GROUP, gid, 1, b"x"), ErrorCode.FORBIDDEN)
    groups = b1.call(MyGroups(), GroupList).groups
    assert gid not in [g.group_id for g in groups], "MY_GROUPS still lists a group left"
    assert list(members_of(a, gid).members) == [a.user_id]


@check("groups.owner_leaves")
def owner_leaves(env: Env) -> None:
    """12.1: when the owner leaves, the earliest-joined member owns (lower id on a tie)."""
    base = random.randrange(1 << 39, (1 << 40) - 10_000)
    early, late_low = base + 5000, base  # `late_low` joins later but has the lower id
    a = env.login()
    gid = create(a, (early,))
    a.call(GroupAdd(gid, (late_low,)), GroupAddOk)
    a.call(GroupRemove(gid, (a.user_id,)), GroupRemoveOk)
    watcher = env.login(early)
    ml = members_of(watcher, gid)
    assert ml.owner_id == early, (
        f"owner after the owner left is {ml.owner_id}; want {early}, who joined earliest "
        f"(not {late_low}, the lower id that joined later)"
    )
    # Tie (joined together at creation): the lower user id becomes owner.
    b = env.login()
    gid2 = create(b, (base + 7000, base + 6000))
    b.call(GroupRemove(gid2, (b.user_id,)), GroupRemoveOk)
    ml2 = members_of(env.login(base + 7000), gid2)
    assert ml2.owner_id == base + 6000, f"tie: owner {ml2.owner_id}, want the lower id"
    # The new owner may remove others.
    env.login(base + 6000).call(GroupRemove(gid2, (base + 7000,)), GroupRemoveOk)


@check("groups.empty_group")
def empty_group(env: Env) -> None:
    """12.1: a group whose last member left still exists (FORBIDDEN, not NOT_FOUND)."""
    a = env.login()
    gid = create(a)
    a.call(GroupRemove(gid, (a.user_id,)), GroupRemoveOk)
    a.expect_error(GroupMembers(gid), ErrorCode.FORBIDDEN)
    a.expect_error(GroupAdd(gid, (a.user_id,)), ErrorCode.FORBIDDEN)
    a.expect_error(HistoryPull(ConvKind.GROUP, gid, 0, 0), ErrorCode.FORBIDDEN)
    assert create(a) != gid, "a new group reused the id of an empty group"


@check("groups.my_groups")
def my_groups(env: Env) -> None:
    """7 MY_GROUPS/12.1: the caller's current groups, ascending group id, with names."""
    u, v = env.login(), env.login()
    assert u.call(MyGroups(), GroupList).groups == (), "a new user is in groups"
    g1, g2 = create(u, name="one"), create(u, name="two")
    g3 = create(v, (u.user_id,), name="three")
    g4 = create(u, name="four")
    u.call(GroupRemove(g2, (u.user_id,)), GroupRemoveOk)
    got = [(g.group_id, g.name) for g in u.call(MyGroups(), GroupList).groups]
    want = sorted([(g1, "one"), (g3, "three"), (g4, "four")])
    assert got == want, f"MY_GROUPS {got}, want {want}"


@check("groups.send_errors")
def send_errors(env: Env) -> None:
    """9.1(2)/12.1: SEND to a group as a non-member -> FORBIDDEN; to no such group -> NOT_FOUND."""
    a, outsider = env.login(), env.login()
    gid = create(a)
    outsider.expect_error(Send(os.urandom(16), 2, gid, 1, b"x"), ErrorCode.FORBIDDEN)
    a.expect_error(Send(os.urandom(16), 2, huge_id(), 1, b"x"), ErrorCode.NOT_FOUND)
    a.ping()


@check("groups.message_fanout")
def message_fanout(env: Env) -> None:
    """9.2: a group message reaches every member's devices and the sender's other devices only."""
    alice, bob = new_user(), new_user()
    a1, a2 = env.login(alice), env.login(alice)
    b1, b2 = env.login(bob), env.login(bob)
    c, gone, outsider = env.login(), env.login(), env.login()
    gid = create(a1, (bob, c.user_id, gone.user_id))
    a1.call(GroupRemove(gid, (gone.user_id,)), GroupRemoveOk)
    body = "group ✓".encode()
    ack = a1.send_msg(gid, body, kind=ConvKind.GROUP)
    for r in (a2, b1, b2, c):
        assert_record(r.push_for(ack.msg_id), ack, a1, 2, gid, 1, body, f"PUSH on {r.label}")
    assert_no_push([a1, a2, b1, b2, c, gone, outsider], ack.msg_id, QUIET)


@check("groups.events_in_inbox_and_history")
def events_in_inbox_and_history(env: Env) -> None:
    """12.2: group events reach inboxes (also a removed user's) and the members' history."""
    a = env.login()
    b_id, c_id = new_user(), new_user()
    gid = create(a, (b_id, c_id), "evs")
    a.call(GroupRemove(gid, (c_id,)), GroupRemoveOk)

    def events(msgs: list[Message] | tuple[Message, ...]) -> list[str]:
        return [json.loads(m.body)["event"] for m in msgs if m.content_type == 0]

    def b_view() -> None:
        inbox = events(sync(env.login(b_id)).messages)
        assert inbox == ["created", "removed"], f"member's inbox events {inbox}"
        hist = a.call(HistoryPull(2, gid, 0, 100), HistoryPage).messages
        assert events(hist) == ["removed", "created"], f"history events (newest first) {hist}"

    def c_view() -> None:
        inbox = events(sync(env.login(c_id)).messages)
        assert inbox == ["created", "removed"], f"removed user's inbox events {inbox}"

    eventually(b_view)
    eventually(c_view)


@check("groups.limit_groups_per_user")
def limit_groups_per_user(env: Env) -> None:
    """12.1/16: a user is in at most 500 groups: the 501st create/add -> LIMIT_EXCEEDED, whole."""
    u = env.login()
    rids = [u.next_rid() for _ in range(500)]
    u.send_raw(b"".join(encode(GroupCreate(f"g{i}", (), request_id=r)) for i, r in enumerate(rids)))
    for r in rids:
        got = u.reply(r, "GROUP_CREATED", timeout=20.0)
        assert isinstance(got, GroupCreated), f"GROUP_CREATE {len(rids)} answered {describe(got)}"
    u.expect_error(GroupCreate("one too many", ()), ErrorCode.LIMIT_EXCEEDED)
    other = env.login()
    gid = create(other)
    bystander = new_user()
    other.expect_error(GroupAdd(gid, (bystander, u.user_id)), ErrorCode.LIMIT_EXCEEDED)
    assert list(members_of(other, gid).members) == [other.user_id], (
        "a GROUP_ADD refused with LIMIT_EXCEEDED added someone (12.1: refused whole)"
    )
    assert len(u.call(MyGroups(), GroupList).groups) == 500


@check("groups.limit_members_per_group")
def limit_members_per_group(env: Env) -> None:
    """12.1/16: at most 10000 members: an add past it -> LIMIT_EXCEEDED and nothing is added."""
    a = env.login()
    base = random.randrange(1 << 39, (1 << 40) - 20_000)
    gid = create(a, tuple(range(base, base + 1000)))  # 1001 members
    for k in range(1, 9):  # 9001 members
        ids = tuple(range(base + 1000 * k, base + 1000 * (k + 1)))
        assert a.call(GroupAdd(gid, ids), GroupAddOk, timeout=20.0).count == 1000
    over = tuple(range(base + 9000, base + 10_000))
    a.expect_error(GroupAdd(gid, over), ErrorCode.LIMIT_EXCEEDED)  # would be 10001
    assert len(members_of(a, gid).members) == 9001, "a refused GROUP_ADD added members (whole)"
    assert a.call(GroupAdd(gid, over[:999]), GroupAddOk, timeout=20.0).count == 999
    ml = members_of(a, gid)
    assert len(ml.members) == 10_000, f"{len(ml.members)} members, want exactly 10000"
    a.expect_error(GroupAdd(gid, (over[999],)), ErrorCode.LIMIT_EXCEEDED)


@check("groups.event_members_ascending")
def event_members_ascending(env: Env) -> None:
    """12.3: event `members` are ascending user ids (unsigned, creator included in 'created'),
    each once, with the group_id key; client_msg_id is the server's own for each event."""
    low, mid = new_user(), new_user()
    top = (1 << 64) - 1 - random.randrange(1 << 20)  # above 2^63: ordered as unsigned
    actor = env.login(max(low, mid) + 1 + random.randrange(1 << 20))  # creator: not the lowest
    a2 = env.login(actor.user_id)  # gets the events as PUSHes (the actor gets replies)
    gid = create(actor, (top, mid, low, mid), "order")
    wide, half = top - 1 - random.randrange(1 << 20), (1 << 63) + random.randrange(1 << 20)
    assert actor.call(GroupAdd(gid, (wide, half, wide)), GroupAddOk).count == 2
    assert actor.call(GroupRemove(gid, (top, low, half)), GroupRemoveOk).count == 3
    want = {
        "created": sorted({actor.user_id, low, mid, top}),
        "added": sorted({wide, half}),
        "removed": sorted({top, low, half}),
    }
    cmids = set()
    for event, users in want.items():
        m = event_push(a2, gid, event)
        check_event(m, gid, actor, event, set(users), "order" if event == "created" else None)
        got = json.loads(m.body)["members"]
        assert got == [str(u) for u in users], (
            f"{event!r} event members {got}, want ascending unsigned order {users} (12.3)"
        )
        cmids.add(m.client_msg_id)
    assert len(cmids) == 3, "two group events share a client_msg_id"
