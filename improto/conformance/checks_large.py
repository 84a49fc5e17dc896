"""Large groups (spec section 20, LARGE_GROUPS): the feature's negotiation, the timeline
requests' errors and pages, and what a large group changes: its messages are pushed and in its
timeline, not in the inboxes; a late joiner's window; read positions across devices; crossing
the threshold both ways.

Whether a group is large is a server setting that a client cannot learn (20): the checks that
need a large group run only when the runner is given the server's threshold
(`--large-group-threshold N`, `Env.large_threshold`; the improto server's
`large_group_threshold`, default 500). Without it they are reported as SKIP, "not run", never
as passed. The other checks need only a group of at most 2 members, which no threshold (2 at
least, 20) makes large.
"""

from __future__ import annotations

import functools
import json
import random
import struct
from collections.abc import Iterable, Sequence

from improto.codec import encode
from improto.conformance.checks_ext import GROUP, ext_login, mark, negotiate
from improto.conformance.checks_history import wait_history
from improto.conformance.checks_offline import send_many
from improto.conformance.conn import (
    Conn,
    Env,
    describe,
    eventually,
    huge_id,
    ids16,
    new_user,
    raw_frame,
    sync,
)
from improto.conformance.runner import Skip, check
from improto.enums import ContentType, Feature, FrameType
from improto.errors import ErrorCode
from improto.frames import (
    GroupAdd,
    GroupAddOk,
    GroupCreate,
    GroupCreated,
    GroupRemove,
    GroupRemoveOk,
    Message,
    PushAck,
    TimelineHead,
    TimelineHeads,
    TimelineHeadsPage,
    TimelinePage,
    TimelinePull,
)
from improto.limits import (
    MAX_GROUP_MEMBERS,
    MAX_IDS_PER_REQUEST,
    TIMELINE_HELD_MAX,
    TIMELINE_PAGE_DEFAULT,
    TIMELINE_PAGE_MAX,
    U64_MAX,
)

LARGE, CONVERSATIONS, WIRE_ONCE, PUSH = (
    Feature.LARGE_GROUPS,
    Feature.CONVERSATIONS,
    Feature.WIRE_ONCE,
    Feature.PUSH,
)
TIMELINE_TYPES = (FrameType.TIMELINE_HEADS, FrameType.TIMELINE_PULL)
U32_MAX = 2**32 - 1
# A timeline message is readable shortly after its SEND_ACK (20.2), an inbox entry as well (11);
# an earlier check's 10,000-member group can keep the persister busy for a while.
STORED_WAIT_S = 30.0
MARK_WAIT_S = 5.0  # a READ_MARK shows in the heads shortly after READ_MARK_OK (18.4)
GROUP_CALL_S = 30.0  # GROUP_CREATE / GROUP_ADD / GROUP_REMOVE of up to 1000 ids
PAGES_SENT = TIMELINE_PAGE_DEFAULT + 5  # one default page and a short one
NOT_RUN = (
    "not run: needs the server's large-group threshold, which a client cannot learn "
    "(give --large-group-threshold N; the improto server's large_group_threshold)"
)


# ----------------------------------------------------------------------- helpers


def large_login(env: Env, user: int | None = None, *more: int) -> Conn:
    """A logged-in connection with LARGE_GROUPS (and `more`) enabled; skip if the server
    does not enable them."""
    return ext_login(env, [LARGE, *more], user)


def pull_bytes(gid: int, after: int, limit: int, rid: int) -> bytes:
    """TIMELINE_PULL as the codec encodes it, group_id, after_seq and limit then overwritten
    (values the codec refuses to encode): the fields come right after the 7-byte header."""
    data = bytearray(encode(TimelinePull(1, 0, 0, request_id=rid)))
    struct.pack_into(">QQH", data, 4 + 7, gid, after, limit)
    return bytes(data)


def heads(c: Conn) -> list[TimelineHead]:
    """TIMELINE_HEADS, with the invariants of 20.3 checked on every head."""
    rid = c.send(TimelineHeads())
    page = c.reply(rid, "TIMELINE_HEADS_PAGE")
    assert isinstance(page, TimelineHeadsPage), f"TIMELINE_HEADS answered by {describe(page)}"
    hs = list(page.heads)
    gids = [h.group_id for h in hs]
    assert gids == sorted(set(gids)), f"heads' group ids {gids} not strictly ascending (20.3)"
    for h in hs:
        assert h.read_seq <= h.done, f"group {h.group_id}: read_seq {h.read_seq} > done (20.3)"
        want = min(h.done - h.read_seq, U32_MAX)
        assert h.unread == want, (
            f"group {h.group_id}: unread {h.unread}, done {h.done} - read_seq {h.read_seq} = "
            f"{want} (20.3)"
        )
        if h.done == 0:
            assert h.last_msg_id == 0, f"group {h.group_id}: done 0, last_msg_id {h.last_msg_id}"
    return hs


def head_of(c: Conn, gid: int) -> TimelineHead | None:
    return next((h for h in heads(c) if h.group_id == gid), None)


def tpull(c: Conn, gid: int, after: int = 0, limit: int = 0) -> TimelinePage:
    """TIMELINE_PULL, with the invariants of 20.3/20.4 checked on the page."""
    page = c.call(TimelinePull(gid, after, limit), TimelinePage)
    where = f"TIMELINE_PULL({gid}, after {after}, limit {limit})"
    assert page.group_id == gid, f"{where}: page of group {page.group_id} (20.3)"
    assert page.position <= page.done, f"{where}: position {page.position} > done {page.done}"
    assert page.has_more == (page.position < page.done), (
        f"{where}: has_more {page.has_more} with position {page.position}, done {page.done} (20.3)"
    )
    eff = limit or TIMELINE_PAGE_DEFAULT
    assert len(page.messages) <= eff, f"{where}: {len(page.messages)} messages > {eff}"
    if after < page.done:  # a run of seqs above after_seq: the page covers at least one
        assert page.position > after, (
            f"{where}: position {page.position} does not move past after_seq, done {page.done}"
        )
        assert len(page.messages) <= page.position - after, (
            f"{where}: {len(page.messages)} messages for the {page.position - after} seqs "
            f"{after + 1}..{page.position} (20.4: one message per seq)"
        )
    else:  # nothing above after_seq: an empty page at done (also when after_seq is above it)
        assert (page.messages, page.position, page.has_more) == ((), page.done, 0), (
            f"{where}: at or above done {page.done}: {len(page.messages)} messages, position "
            f"{page.position}, has_more {page.has_more}; want none, done, 0 (20.4)"
        )
    ids = [m.msg_id for m in page.messages]
    assert len(set(ids)) == len(ids), f"{where}: a message twice in one page"
    return page


def walk(
    c: Conn, gid: int, after: int = 0, limit: int = 0, max_pages: int = 2000
) -> tuple[list[Message], list[TimelinePage]]:
    """The sync loop of 20.6 for one group: TIMELINE_PULL from `after` until has_more = 0,
    each next after_seq the previous page's position."""
    msgs: list[Message] = []
    pages: list[TimelinePage] = []
    for _ in range(max_pages):
        page = tpull(c, gid, after, limit)
        if pages:
            assert page.done >= pages[-1].done, f"done moved back: {pages[-1].done}->{page.done}"
        pages.append(page)
        msgs.extend(page.messages)
        after = page.position
        if not page.has_more:
            ids = [m.msg_id for m in msgs]
            assert len(set(ids)) == len(ids), f"a message in two pages of group {gid} (20.4)"
            return msgs, pages
    raise AssertionError(f"timeline paging of group {gid} did not end after {max_pages} pages")


def non_events(msgs: Iterable[Message]) -> list[int]:
    return [m.msg_id for m in msgs if m.content_type != ContentType.GROUP_EVENT]


def events(msgs: Iterable[Message]) -> list[str]:
    return [json.loads(m.body)["event"] for m in msgs if m.content_type == ContentType.GROUP_EVENT]


def inbox_of(env: Env, user: int, gid: int) -> list[Message]:
    """The group's messages in `user`'s offline inbox (sync loop from 0), read by one device
    of its own that logs in, syncs and disconnects (polling must not pile up devices: 8.1)."""
    c = env.login(user, f"conf-inbox-{user:x}")
    try:
        msgs = sync(c).messages
    finally:
        c.close()
        env.conns.remove(c)
    return [m for m in msgs if m.conv_id == gid and m.conv_kind == GROUP]


def threshold(env: Env, members_needed: int = 2) -> int:
    """The server's threshold from the runner (skip without it, or when no group can be
    larger than it with `members_needed` more members)."""
    n = env.large_threshold
    if n is None:
        raise Skip(NOT_RUN)
    if n + members_needed > MAX_GROUP_MEMBERS:
        raise Skip(
            f"not run: threshold {n}: a group of {n + members_needed} members exceeds "
            f"{MAX_GROUP_MEMBERS} (16)"
        )
    return n


class Group:
    """A group the check builds, following the flag as spec 20.8 sets it: large once a
    change leaves it with more than `threshold` members, small once one leaves it with
    threshold * 9 // 10 or fewer. Counts the group events that went to the timeline (a
    change's event is placed by the flag before the change, 20.8)."""

    def __init__(
        self, owner: Conn, threshold: int, size: int, wanted: Sequence[int], name: str = "large"
    ) -> None:
        """A group of exactly `size` members: the owner, `wanted`, then filler users nobody
        logs in as (`fillers`, removable). GROUP_CREATE with the first 1000 ids, GROUP_ADDs of
        1000 for the rest."""
        spare = size - 1 - len(wanted)
        if spare < 0:
            raise Skip(f"not run: threshold {threshold} too small for a group of this check")
        base = random.randrange(1 << 39, (1 << 40) - size)
        self.owner, self.threshold = owner, threshold
        self.fillers = list(range(base, base + spare))
        ids = [*wanted, *self.fillers]
        first = ids[:MAX_IDS_PER_REQUEST]
        created = owner.call(GroupCreate(name, tuple(first)), GroupCreated, GROUP_CALL_S)
        self.gid = created.group_id
        self.count = 1 + len(first)
        self.large = self.count > threshold
        self.timeline_events = 0
        self.add(ids[MAX_IDS_PER_REQUEST:])

    def add(self, ids: Sequence[int]) -> None:
        for i in range(0, len(ids), MAX_IDS_PER_REQUEST):
            chunk = tuple(ids[i : i + MAX_IDS_PER_REQUEST])
            ok = self.owner.call(GroupAdd(self.gid, chunk), GroupAddOk, GROUP_CALL_S)
            assert ok.count == len(chunk), f"GROUP_ADD of {len(chunk)} new users added {ok.count}"
            self.timeline_events += self.large
            self.count += len(chunk)
            self.large = self.large or self.count > self.threshold

    def remove(self, ids: Sequence[int]) -> None:
        for i in range(0, len(ids), MAX_IDS_PER_REQUEST):
            chunk = tuple(ids[i : i + MAX_IDS_PER_REQUEST])
            ok = self.owner.call(GroupRemove(self.gid, chunk), GroupRemoveOk, GROUP_CALL_S)
            assert ok.count == len(chunk), f"GROUP_REMOVE of {len(chunk)} members: {ok.count}"
            self.timeline_events += self.large
            self.count -= len(chunk)
            self.large = self.large and self.count > self.threshold * 9 // 10

    def send(self, c: Conn, body: bytes) -> int:
        return c.send_msg(self.gid, body, kind=GROUP).msg_id


def wait_done(c: Conn, gid: int, done: int) -> TimelineHead:
    """The group's head once its done reaches `done` (asserting it never goes past it)."""

    def reached() -> TimelineHead:
        h = head_of(c, gid)
        assert h is not None, f"group {gid} has no head in TIMELINE_HEADS_PAGE (20.4)"
        assert h.done <= done, f"group {gid}: done {h.done}, only {done} seqs were made"
        assert h.done == done, f"group {gid}: done {h.done}, want {done} (not stored yet?)"
        return h

    return eventually(reached, STORED_WAIT_S)


# ------------------------------------------------------- without a large group


@check("large.features_negotiation")
def features_negotiation(env: Env) -> str:
    """18.1/20: TIMELINE_HEADS works once FEATURES_OK lists LARGE_GROUPS (5), per connection;
    a FEATURES without 5 turns 0x37/0x38 back into UNKNOWN_FRAME_TYPE."""
    c = env.login()
    c.expect_error(TimelineHeads(), ErrorCode.UNKNOWN_FRAME_TYPE)
    got = negotiate(c, [LARGE])
    if LARGE not in got:
        raise Skip(f"the server does not enable LARGE_GROUPS (FEATURES_OK {list(got)})")
    assert got == (LARGE,), f"FEATURES [5] answered by FEATURES_OK {list(got)}"
    heads(c)
    tpull(c, c.call(GroupCreate("negotiation", ()), GroupCreated).group_id)
    every = negotiate(c, [PUSH, LARGE, 4242, WIRE_ONCE, LARGE, CONVERSATIONS])
    assert list(every) == sorted(set(every)) and LARGE in every, f"FEATURES_OK {list(every)}"
    heads(c)
    other = env.login(c.user_id)  # the set is per connection
    other.expect_error(TimelineHeads(), ErrorCode.UNKNOWN_FRAME_TYPE)
    for without in ([CONVERSATIONS, WIRE_ONCE], []):
        negotiate(c, without)
        c.expect_error(TimelineHeads(), ErrorCode.UNKNOWN_FRAME_TYPE)
        c.expect_error(TimelinePull(1, 0, 0), ErrorCode.UNKNOWN_FRAME_TYPE)
    assert negotiate(c, [LARGE]) == (LARGE,)
    heads(c)
    return f"FEATURES_OK {list(every)} when asked for every feature"


@check("large.types_need_feature")
def types_need_feature(env: Env) -> None:
    """20/14: without LARGE_GROUPS (before HELLO, a v1 connection, other features enabled),
    0x37 and 0x38 with any body -> UNKNOWN_FRAME_TYPE, as in version 1."""
    pre = env.connect()
    for t in TIMELINE_TYPES:
        pre.expect_error(raw_frame(t, b"", rid=t), ErrorCode.UNKNOWN_FRAME_TYPE, rid=t)
    c = env.login()
    valid_pull = pull_bytes(1, 0, 0, 0)[11:]
    bodies = (b"", b"\x00", valid_pull, pull_bytes(0, 0, 201, 0)[11:])
    for t in TIMELINE_TYPES:
        for i, body in enumerate(bodies):
            rid = t * 16 + i
            c.expect_error(raw_frame(t, body, rid=rid), ErrorCode.UNKNOWN_FRAME_TYPE, rid=rid)
    try:
        got = negotiate(c, [WIRE_ONCE, CONVERSATIONS, PUSH])
    except Skip:
        got = ()
    if got:
        c.expect_error(TimelineHeads(), ErrorCode.UNKNOWN_FRAME_TYPE)
        c.expect_error(TimelinePull(1, 0, 0), ErrorCode.UNKNOWN_FRAME_TYPE)
    c.ping()


@check("large.heads_page")
def heads_page(env: Env) -> None:
    """20.3/20.4: TIMELINE_HEADS -> TIMELINE_HEADS_PAGE echoing the request_id, heads
    well-formed (ascending group ids, read_seq <= done, unread = done - read_seq); a user in
    small groups only has none; a body byte -> MALFORMED_FRAME."""
    c = large_login(env)
    assert heads(c) == [], "a new user has timeline heads"
    other = env.login()
    small = other.call(GroupCreate("small", (c.user_id,)), GroupCreated).group_id
    own = c.call(GroupCreate("alone", ()), GroupCreated).group_id
    other.send_msg(small, b"small", kind=GROUP)
    c.send_msg(own, b"alone", kind=GROUP)
    got = heads(c)
    assert not {h.group_id for h in got} & {small, own}, (
        f"groups of 1 and 2 members (never large) have heads: {got} (20.4)"
    )
    rid = 0x3737
    c.expect_error(raw_frame(FrameType.TIMELINE_HEADS, b"\x00", rid=rid), ErrorCode.MALFORMED_FRAME,
                   rid=rid)  # fmt: skip
    c.ping()


@check("large.pull_errors")
def pull_errors(env: Env) -> None:
    """20.5: TIMELINE_PULL of a group that never existed -> NOT_FOUND; of one the user is not
    in, or no longer in -> FORBIDDEN; group_id 0 or limit 201 -> INVALID_FIELD (before the
    group is looked at); the connection stays usable."""
    c = large_login(env)
    other = env.login()
    theirs = other.call(GroupCreate("not mine", ()), GroupCreated).group_id
    left = other.call(GroupCreate("left", (c.user_id,)), GroupCreated).group_id
    tpull(c, left)
    other.call(GroupRemove(left, (c.user_id,)), GroupRemoveOk)
    c.expect_error(TimelinePull(huge_id(), 0, 0), ErrorCode.NOT_FOUND)
    c.expect_error(TimelinePull(theirs, 5, 1), ErrorCode.FORBIDDEN)
    c.expect_error(TimelinePull(left, 0, 0), ErrorCode.FORBIDDEN)
    assert head_of(c, left) is None, "a former member has a head of the group (20.5)"
    cases = [
        (0, 0, 0, ErrorCode.INVALID_FIELD),
        (0, 0, 201, ErrorCode.INVALID_FIELD),
        (left, 0, TIMELINE_PAGE_MAX + 1, ErrorCode.INVALID_FIELD),
        (huge_id(), 0, 0xFFFF, ErrorCode.INVALID_FIELD),  # values before the meaning (13.2)
        (theirs, U64_MAX, 201, ErrorCode.INVALID_FIELD),
    ]
    for i, (gid, after, limit, code) in enumerate(cases):
        rid = 3800 + i
        c.expect_error(pull_bytes(gid, after, limit, rid), code, rid=rid)
    page = tpull(c, c.call(GroupCreate("mine", ()), GroupCreated).group_id, 0, TIMELINE_PAGE_MAX)
    assert page.done == 0
    c.ping()


@check("large.small_group_empty")
def small_group_empty(env: Env) -> None:
    """20.4: a member of a group that never was large (2 members) pulls its timeline: no
    messages, position 0, done 0, has_more 0, whatever after_seq and limit; its messages are
    in the inboxes (10.1), as in version 1."""
    c = large_login(env)
    other = env.login()
    gid = other.call(GroupCreate("small", (c.user_id,)), GroupCreated).group_id
    sent = [other.send_msg(gid, b"small %d" % i, kind=GROUP).msg_id for i in range(3)]
    eventually(lambda: _in_inbox(env, c.user_id, gid, set(sent)), STORED_WAIT_S)
    for after, limit in ((0, 0), (0, 1), (7, 200), (U64_MAX, 0)):
        page = tpull(c, gid, after, limit)
        got = (len(page.messages), page.position, page.done, page.has_more)
        assert got == (0, 0, 0, 0), (
            f"small group, after {after} limit {limit}: (messages, position, done, has_more) "
            f"{got}, want (0, 0, 0, 0) (20.4)"
        )
    assert head_of(c, gid) is None, "a small group has a head"


def _in_inbox(env: Env, user: int, gid: int, want: set[int]) -> list[Message]:
    msgs = inbox_of(env, user, gid)
    missing = want - {m.msg_id for m in msgs}
    assert not missing, f"{sorted(missing)} not in the offline inbox of {user}"
    return msgs


# --------------------------------------------- with a large group (the threshold given)


@check("large.push_not_inbox")
def push_not_inbox(env: Env) -> str:
    """20.1/20.7: a message of a group of threshold+1 members is pushed to its online members
    (v1 and LARGE_GROUPS devices) and in its history and timeline, and not in a member's
    offline inbox (only the 'created' event is)."""
    n = threshold(env)
    v1_id, lg_id, off_id = new_user(), new_user(), new_user()
    owner = env.login()
    v1 = env.login(v1_id)
    lg = large_login(env, lg_id)
    g = Group(owner, n, n + 1, [v1_id, lg_id, off_id])
    assert g.large
    ack = owner.send_msg(g.gid, b"to a large group", kind=GROUP)
    for c in (v1, lg):
        m = c.push_for(ack.msg_id, STORED_WAIT_S)
        assert (m.conv_kind, m.conv_id, m.sender_id, m.body) == (
            GROUP,
            g.gid,
            owner.user_id,
            b"to a large group",
        ), f"{c.label}: PUSH of the large group's message: {m}"
        c.send(PushAck(ack.msg_id))
    h = wait_done(lg, g.gid, g.timeline_events + 1)
    assert h.last_msg_id == ack.msg_id, f"head last_msg_id {h.last_msg_id}, want {ack.msg_id}"
    msgs, _ = walk(lg, g.gid)
    assert non_events(msgs) == [ack.msg_id], f"timeline holds {non_events(msgs)}"
    wait_history(lg, GROUP, g.gid, {ack.msg_id}, STORED_WAIT_S)
    for user in (off_id, v1_id):
        inbox = inbox_of(env, user, g.gid)
        assert ack.msg_id not in {m.msg_id for m in inbox}, (
            f"the large group's message is in the offline inbox of {user} (20.1)"
        )
        assert events(inbox)[:1] == ["created"] and not non_events(inbox), (
            f"inbox of {user}: {[(m.msg_id, m.content_type) for m in inbox]}, want the "
            "'created' event only"
        )
    v1.drain(0.2)
    assert not v1.skipped_unknown, "a version-1 connection got frames of unknown types"
    return f"threshold {n}: a group of {g.count} members"


@check("large.timeline_heads")
def timeline_heads(env: Env) -> None:
    """20.3/20.4: TIMELINE_HEADS of a member of two large groups and a small one: a head per
    large group, ascending; done, read_seq (0 for an initial member; done after its own
    message: sending reads), unread, last_msg_id."""
    n = threshold(env)
    me = large_login(env)
    owner = env.login()
    g1, g2 = (Group(owner, n, n + 1, [me.user_id], f"heads {i}") for i in (1, 2))
    small = owner.call(GroupCreate("small", (me.user_id,)), GroupCreated).group_id
    owner.send_msg(small, b"small", kind=GROUP)
    last1 = [g1.send(owner, b"one %d" % i) for i in range(2)][-1]
    g2.send(owner, b"two")
    mine = g2.send(me, b"mine")
    h1 = wait_done(me, g1.gid, g1.timeline_events + 2)
    assert (h1.read_seq, h1.last_msg_id) == (0, last1), (
        f"group 1: read_seq {h1.read_seq}, last_msg_id {h1.last_msg_id}; want 0 (an initial "
        f"member who read nothing), {last1}"
    )
    done2 = g2.timeline_events + 2

    def sent_reads() -> list[TimelineHead]:
        hs = heads(me)
        h2 = next((h for h in hs if h.group_id == g2.gid), None)
        assert h2 is not None and (h2.done, h2.read_seq, h2.unread, h2.last_msg_id) == (
            done2,
            done2,
            0,
            mine,
        ), f"group 2 after my own message: {h2}; want done {done2} = read_seq, unread 0 (20.2)"
        return hs

    hs = eventually(sent_reads, STORED_WAIT_S)
    assert [h.group_id for h in hs] == sorted([g1.gid, g2.gid]), (
        f"heads of groups {[h.group_id for h in hs]}, want the two large ones "
        f"{sorted([g1.gid, g2.gid])} ascending (small group {small})"
    )


@check("large.timeline_pages")
def timeline_pages(env: Env) -> str:
    """20.4: 205 messages of a large group come in pages of 200 and 5 (limit 0), or of the
    limit, chained by position / has_more, every seq in the same place whatever the page
    size; after_seq at or above done -> an empty page at done."""
    n = threshold(env)
    reader = new_user()
    owner = env.login()
    g = Group(owner, n, n + 1, [reader])
    acks = send_many(owner, g.gid, PAGES_SENT, kind=GROUP)
    sent = [a.msg_id for a in acks]
    r = large_login(env, reader)
    total = g.timeline_events + PAGES_SENT
    wait_done(r, g.gid, total)
    msgs, pages = walk(r, g.gid)
    want_pages = [(min(TIMELINE_PAGE_DEFAULT, total - k), min(k + TIMELINE_PAGE_DEFAULT, total))
                  for k in range(0, total, TIMELINE_PAGE_DEFAULT)]  # fmt: skip
    got_pages = [(len(p.messages), p.position) for p in pages]
    assert got_pages == want_pages, (
        f"(messages, position) of the pages {got_pages}, want {want_pages}"
    )
    assert [p.has_more for p in pages] == [1] * (len(pages) - 1) + [0]
    assert sorted(non_events(msgs)) == sorted(sent), "the timeline does not hold what was sent"
    order = [m.msg_id for m in msgs]
    small, _ = walk(r, g.gid, 0, 7)
    assert [m.msg_id for m in small] == order, "pages of 7 give another seq order than pages of 200"
    for after in (0, 100, total - 3):
        page = tpull(r, g.gid, after, 3)
        assert [m.msg_id for m in page.messages] == order[after : after + 3], (
            f"after_seq {after}, limit 3: not seqs {after + 1}..{after + 3} of the full pages"
        )
        assert page.position == after + 3 and page.has_more == (after + 3 < total)
    for after in (total, total + 1000, U64_MAX):
        tpull(r, g.gid, after)  # empty, position done (checked by tpull)
    inversions = sum(1 for a, b in zip(sent, non_events(msgs), strict=True) if a != b)
    return f"{total} seqs; {inversions} places where seq order differs from send order"


@check("large.late_joiner_window")
def late_joiner_window(env: Env) -> None:
    """20.2: a member added to a large group reads its messages from its join on: the older
    seqs are covered without messages; its read_seq starts at the seqs before its join."""
    n = threshold(env, 3)
    early_id, late_id = new_user(), new_user()
    owner = env.login()
    g = Group(owner, n, n + 1, [early_id])
    before = [g.send(owner, b"before %d" % i) for i in range(3)]
    ahead = g.timeline_events + len(before)
    g.add([late_id])  # still large: the 'added' event is in the timeline
    after = [g.send(owner, b"after %d" % i) for i in range(2)]
    total = g.timeline_events + len(before) + len(after)
    late = large_login(env, late_id)
    h = wait_done(late, g.gid, total)
    assert ahead <= h.read_seq <= total, (
        f"late joiner's read_seq {h.read_seq}: want at least the {ahead} seqs before its join "
        f"(20.2), at most done {total}"
    )
    for limit in (0, 1):
        msgs, pages = walk(late, g.gid, 0, limit)
        assert pages[-1].position == total, f"limit {limit}: the pages end at {pages[-1].position}"
        assert non_events(msgs) == after, (
            f"late joiner, limit {limit}: messages {non_events(msgs)}, want only those after its "
            f"join {after} (not {before})"
        )
    from_read, _ = walk(late, g.gid, h.read_seq)
    assert non_events(from_read) == after, f"from read_seq: {non_events(from_read)}"
    early = large_login(env, early_id)
    msgs, _ = walk(early, g.gid)
    assert non_events(msgs) == before + after, f"an initial member's timeline {non_events(msgs)}"
    assert "added" in events(msgs), "the 'added' event of a large group is not in its timeline"


@check("large.read_mark_heads")
def read_mark_heads(env: Env) -> None:
    """20.2/18.4: a READ_MARK in a large group on one device moves read_seq and unread of the
    group's head on the user's other device; it never moves back."""
    n = threshold(env)
    u = new_user()
    d1 = large_login(env, u, CONVERSATIONS)
    d2 = large_login(env, u, CONVERSATIONS)
    owner = env.login()
    g = Group(owner, n, n + 1, [u])
    sent = [g.send(owner, b"read %d" % i) for i in range(3)]
    done = g.timeline_events + len(sent)
    h = wait_done(d2, g.gid, done)
    assert (h.read_seq, h.unread) == (0, done), f"before any mark: {h}"

    def read_is(seq: int) -> None:
        got = head_of(d2, g.gid)
        assert got is not None and (got.read_seq, got.unread) == (seq, done - seq), (
            f"after the mark: head {got}, want read_seq {seq}, unread {done - seq}"
        )

    for msg_id, seq in ((sent[1], done - 1), (sent[0], done - 1), (sent[2], done)):
        mark(d1, (GROUP, g.gid), msg_id)
        eventually(functools.partial(read_is, seq), MARK_WAIT_S)


@check("large.crossing_to_large")
def crossing_to_large(env: Env) -> None:
    """20.8: at exactly the threshold a group is small (its messages in the inboxes, no
    head); the GROUP_ADD of one more makes it large: the next message is in the timeline
    (seq 1) and pushed, not in the inboxes; the earlier one stays in the inboxes only."""
    n = threshold(env)
    off_id = new_user()
    owner = env.login()
    owner2 = large_login(env, owner.user_id)  # the owner's other device: gets the pushes
    g = Group(owner, n, n, [off_id])
    assert not g.large
    m0 = g.send(owner, b"while small")
    eventually(lambda: _in_inbox(env, off_id, g.gid, {m0}), STORED_WAIT_S)
    assert head_of(owner2, g.gid) is None, "a group at the threshold has a head (not large)"
    g.add([new_user()])
    assert g.large
    m1 = g.send(owner, b"while large")
    owner2.push_for(m1, STORED_WAIT_S)
    owner2.send(PushAck(m1))
    h = wait_done(owner2, g.gid, 1)
    assert h.last_msg_id == m1, f"seq 1's msg_id {h.last_msg_id}, want {m1}"
    msgs, _ = walk(owner2, g.gid)
    assert [m.msg_id for m in msgs] == [m1], f"timeline {[m.msg_id for m in msgs]}, want [{m1}]"
    inbox = inbox_of(env, off_id, g.gid)
    assert non_events(inbox) == [m0], (
        f"inbox after the crossing: {non_events(inbox)}, want only the small group's [{m0}]"
    )
    assert "added" in events(inbox), "the event of the change that made it large not in inbox"


@check("large.crossing_to_small")
def crossing_to_small(env: Env) -> str:
    """20.8: a large group stays large down to more than 90% of the threshold; the removal
    that leaves threshold*9//10 members makes it small: new messages go to the inboxes, the
    timeline keeps what it has (done frozen, head still listed); a removed user gets the
    'removed' event in its inbox, FORBIDDEN on TIMELINE_PULL and no head."""
    n = threshold(env)
    small_at = n * 9 // 10
    lg_id, off_id = new_user(), new_user()
    owner = env.login()
    lg = large_login(env, lg_id)
    g = Group(owner, n, n + 1, [lg_id, off_id])
    if len(g.fillers) < 1 + n - small_at:
        raise Skip(f"not run: threshold {n} too small to cross back with removals")
    gone, first, rest = g.fillers[0], g.fillers[1], g.fillers[2 : 2 + n - small_at - 1]
    m1 = g.send(owner, b"large 1")
    g.remove([first])  # n members: still large
    assert g.large
    m2 = g.send(owner, b"large 2")
    g.remove([gone, *rest])
    assert not g.large and g.count == small_at, (g.count, small_at)
    m3 = g.send(owner, b"small again")
    done = g.timeline_events + 2
    h = wait_done(lg, g.gid, done)
    lg.push_for(m3, STORED_WAIT_S)
    eventually(lambda: _in_inbox(env, off_id, g.gid, {m3}), STORED_WAIT_S)
    g.add([new_user()])  # small_at + 1 <= n: stays small
    m4 = g.send(owner, b"still small")
    inbox = eventually(lambda: _in_inbox(env, off_id, g.gid, {m4}), STORED_WAIT_S)
    assert non_events(inbox) == [m3, m4], (
        f"inbox {non_events(inbox)}: want only the messages after the crossing {[m3, m4]}"
    )
    again = head_of(lg, g.gid)
    assert again is not None and again.done == h.done == done, (
        f"the head after the crossing back: {again}, want done frozen at {done} (20.8)"
    )
    msgs, _ = walk(lg, g.gid)
    assert non_events(msgs) == [m1, m2], f"timeline {non_events(msgs)}, want {[m1, m2]}"
    assert events(msgs).count("removed") == 2, f"timeline events {events(msgs)}"

    def removed_event() -> None:
        assert "removed" in events(inbox_of(env, gone, g.gid)), (
            "the removed user's inbox lacks the 'removed' event (20.1)"
        )

    eventually(removed_event, STORED_WAIT_S)
    removed = env.login(gone)
    if LARGE in negotiate(removed, [LARGE]):
        removed.expect_error(TimelinePull(g.gid, 0, 0), ErrorCode.FORBIDDEN)
        assert head_of(removed, g.gid) is None, "a removed user has the group's head (20.5)"
    return f"large at {n + 1} members, still at {n}, small at {small_at}; done stays {done}"


def pull_held(c: Conn, gid: int, after: int, limit: int, held: Sequence[int]) -> TimelinePage:
    """TIMELINE_PULL with `held` msg_ids (sent strictly ascending)."""
    page = c.call(TimelinePull(gid, after, limit, held=tuple(sorted(held))), TimelinePage)
    assert page.group_id == gid and page.position <= page.done
    assert page.has_more == (page.position < page.done), f"has_more {page.has_more}: {page}"
    return page


@check("large.timeline_held")
def timeline_held(env: Env) -> None:
    """20.4: TIMELINE_PULL with `held` msg_ids: the page omits those messages but its
    position covers their seqs, as if sent; ids not in the page are ignored; held ids not
    strictly ascending, or more than 1000 of them -> INVALID_FIELD."""
    n = threshold(env)
    reader = new_user()
    owner = env.login()
    g = Group(owner, n, n + 1, [reader])
    sent = [g.send(owner, b"held %d" % i) for i in range(6)]
    total = g.timeline_events + len(sent)
    r = large_login(env, reader)
    wait_done(r, g.gid, total)
    full, _ = walk(r, g.gid)
    order = [m.msg_id for m in full]
    elsewhere = owner.send_msg(owner.user_id, b"not in the group").msg_id
    held = [order[-5], order[-3], order[-1], huge_id(), elsewhere]
    page = pull_held(r, g.gid, 0, 0, held)
    got = [m.msg_id for m in page.messages]
    assert got == [i for i in order if i not in held], (
        f"held {held[:3]} (and two ids not in the timeline): page {got}, want {order} without "
        "the held ones (20.4)"
    )
    assert (page.position, page.has_more) == (total, 0), (
        f"position {page.position}, has_more {page.has_more}: the last (held) seq {total} "
        "must be covered"
    )
    first = pull_held(r, g.gid, total - 5, 2, order[-5:-3])
    assert (first.messages, first.position, first.has_more) == ((), total - 3, 1), (
        f"a page of 2 held seqs: {len(first.messages)} messages, position {first.position}, "
        f"has_more {first.has_more}; want none, {total - 3}, 1"
    )
    every = pull_held(r, g.gid, 0, 0, order)
    assert (every.messages, every.position) == ((), total), "everything held: not all covered"
    fields = struct.pack(">QQH", g.gid, 0, 0)
    refused = (
        sorted(order[:2], reverse=True),  # not ascending
        [order[0], order[0]],  # a repeat
        list(range(1, TIMELINE_HELD_MAX + 2)),  # 1001 ids
    )
    for i, ids in enumerate(refused):
        rid = 3900 + i
        frame = raw_frame(FrameType.TIMELINE_PULL, fields + ids16(ids), rid=rid)
        r.expect_error(frame, ErrorCode.INVALID_FIELD, rid=rid)
    r.ping()
