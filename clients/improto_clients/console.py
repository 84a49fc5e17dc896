"""imclient: the reference console client of improto.

    imclient --user 1001 --jwt-secret SECRET [--server tcp:host=127.0.0.1:port=5555]
             [--device console] [--state FILE] [--script]
    imclient --token JWT [...]

Interactive mode prints incoming messages as they arrive (local time, conversation, sender);
a line that does not start with "/" is sent as text to the current conversation ("//text"
sends "/text"). Lines run one at a time, in the order typed. Commands:

    /to user ID                 talk to user ID (1:1; your own id is notes-to-self)
    /to group ID                talk in group ID
    /sync                       run the offline sync: new messages, unread counts
    /history [N]                N (default 1) older pages of the current conversation,
                                continuing from where the last /history of it stopped
    /convs                      your conversations, newest first, with unread badges
    /hide [user ID | group ID]  take a conversation (default: the current one) off the
                                list until a new message arrives; its history stays
    /push PLATFORM TOKEN [preview]
                                have this device notified (e.g. /push fcm TOKEN) while it
                                is not connected; "preview": with the message text
    /push off                   no more notifications to this device
    /heads                      your large groups' timelines: how far each goes, what you
                                have read, unread
    /timeline [GID]             pull a large group's timeline (default: the current group)
                                from this device's position (at first: from what you read)
    /group create NAME [ID...]  create a group with these other members
    /group add GID ID...        add members
    /group remove GID ID...     remove members (your own id: leave the group)
    /group members GID          owner, name and members of a group
    /groups                     the groups you are in
    /ping                       round trip to the server
    /help                       this list
    /quit                       leave (end of input does the same)

Viewing a conversation (/to, /history, or a message arriving in the current one) marks it
read up to its newest message, on every device. Your own 1:1 messages show ✓✓ once the peer
has read them. (Conversations, /push, /heads and /timeline need a server with the post-v1
features, PROTOCOL.md sections 18 to 20; with large groups /sync pulls their timelines too.)

With --script, the same lines are read from stdin without prompts, and stdout gets one JSON
object per event and nothing else (u64 ids as decimal strings, times in ms since the epoch):

    {"event": "connected", "user": "1001", "device": "console", ...}
    {"event": "message", "msg_id": "...", "conv": "user:1002", "sender": "1002",
     "time": 1764230400000, "content_type": 1, "text": "hi", "source": "push"}
    {"event": "ack", "conv": "user:1002", "msg_id": "...", "client_msg_id": "<hex>", ...}
    {"event": "sync", "messages": 2, "pages": 1, "unread": {"user:1002": 2}, "gap": false}
    {"event": "history", "conv": "user:1002", "messages": [...oldest first], "has_more": true}
    {"event": "group", "op": "create"|"add"|"remove"|"members"|"list", ...}
    {"event": "convs", "total_unread": 3, "version": "17", "convs": [{"conv": "user:1002",
     "unread": 2, "read_id": "...", "peer_read_id": "...", "last": {...a message}}, ...]}
    {"event": "marked", "conv": "user:1002", "msg_id": "...", "total_unread": 1}
    {"event": "read", "conv": "user:1002", "reader": "1002", "msg_id": "...",
     "receipt": true, "mine": ["...own msg_ids now read"], "total_unread": 1}
    {"event": "hidden", "conv": "user:1002"}
    {"event": "push", "registered": true, "platform": "fcm", "preview": false}
    {"event": "push", "registered": false}
    {"event": "heads", "heads": [{"conv": "group:7", "done": "1042", "read_seq": "1040",
     "unread": 2, "last_msg_id": "...", "position": "1040"}, ...]}
    {"event": "timeline", "conv": "group:7", "messages": [...oldest first], "position": "1042",
     "done": "1042", "has_more": false}
    {"event": "conv", "conv": "group:7"}    {"event": "pong", "server_time": ..., "rtt_ms": ...}
    {"event": "error", "code": 300, "name": "FORBIDDEN", "text": "...", "command": "..."}
    {"event": "closed", "reason": "REPLACED", "code": 1, "text": "..."}

The script ends at end of input once its commands have finished (exit status 0), or when the
server closes the connection (exit status 1). Without --state the client keeps nothing between
runs and syncs from the position the server stored for the device ("resume").
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

from twisted.internet import defer, stdio
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHalfCloseableProtocol, IReactorFDSet
from twisted.logger import (
    FilteringLogObserver,
    LogLevel,
    LogLevelFilterPredicate,
    globalLogBeginner,
    textFileLogObserver,
)
from twisted.protocols import basic
from twisted.python.failure import Failure
from zope.interface import implementer

from improto.enums import ClientKind, ContentType, ConvKind, Feature
from improto.errors import ProtocolError
from improto.frames import HelloOk, HistoryPage, Message, ReadUpdate, Send, SendAck, TimelineHead
from improto.limits import CURSOR_RESUME
from improto.tokens import mint
from improto_clients.client import (
    ClientState,
    IMClient,
    NotConnected,
    ServerError,
    SessionClosed,
    SyncResult,
    conv_key,
    parse_conv_key,
)
from improto_clients.console_convs import READ_MARK, convs_event, render_convs, render_read
from improto_clients.errors import FeatureUnavailable
from improto_clients.reactor_types import IClientReactor

DEFAULT_SERVER = "tcp:host=127.0.0.1:port=5555"
HELP = (__doc__ or "").partition("Commands:\n\n")[2].partition("\n\nWith --script")[0]

Event = dict[str, Any]  # a JSON object


class IConsoleReactor(IClientReactor, IReactorFDSet):
    """The client's reactor that also reads stdin and writes stdout (`stdio.StandardIO`)."""


# ----------------------------------------------------------------------------- events


def _local_time(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _group_event_text(obj: dict[str, Any], sender: str) -> str:
    """Section 12.3 bodies in words; unknown keys and events are tolerated."""
    members = ", ".join(str(m) for m in obj.get("members", []))
    kind = obj.get("event")
    if kind == "created":
        return f"{sender} created group {obj.get('name', '')!r} with {members}"
    if kind == "added":
        return f"{sender} added {members}"
    if kind == "removed":
        return f"{sender} left" if members == sender else f"{sender} removed {members}"
    return f"group event {kind!r}"


def message_event(conv: str, m: Message, source: str) -> Event:
    ev: Event = {
        "event": "message",
        "msg_id": str(m.msg_id),
        "conv": conv,
        "sender": str(m.sender_id),
        "device": m.sender_device,
        "time": m.server_time,
        "content_type": m.content_type,
        "source": source,
    }
    if m.content_type == ContentType.TEXT:
        ev["text"] = m.body.decode("utf-8", "replace")
    elif m.content_type == ContentType.GROUP_EVENT:
        try:
            obj = json.loads(m.body)
            ev["group_event"] = obj
            ev["text"] = _group_event_text(obj, ev["sender"])
        except (ValueError, AttributeError):
            ev["text"] = "[unreadable group event]"
    else:  # application-defined: opaque bytes, shown as a placeholder (section 6)
        ev["text"] = f"[content type {m.content_type}, {len(m.body)} bytes]"
        ev["body_hex"] = m.body.hex()
    return ev


def error_event(e: BaseException, command: str | None = None) -> Event:
    ev: Event
    if isinstance(e, ServerError):
        ev = {"event": "error", "code": e.code, "name": e.name, "text": e.text}
    elif isinstance(e, ProtocolError):  # refused locally before sending
        ev = {"event": "error", "code": int(e.code), "name": e.code.name, "text": e.message}
    elif isinstance(e, defer.TimeoutError):
        ev = {"event": "error", "code": None, "name": "TIMEOUT", "text": "no answer in time"}
    elif isinstance(e, NotConnected | SessionClosed):
        ev = {"event": "error", "code": None, "name": "NOT_CONNECTED", "text": str(e)}
    elif isinstance(e, UsageError):
        ev = {"event": "error", "code": None, "name": "USAGE", "text": str(e)}
    elif isinstance(e, FeatureUnavailable):
        ev = {"event": "error", "code": None, "name": "UNSUPPORTED", "text": str(e)}
    else:
        ev = {"event": "error", "code": None, "name": type(e).__name__, "text": str(e)}
    if command is not None:
        ev["command"] = command
    return ev


def ack_event(send: Send, ack: SendAck, resent: bool = False) -> Event:
    return {
        "event": "ack",
        "conv": conv_key(send.conv_kind, send.conv_id),
        "client_msg_id": send.client_msg_id.hex(),
        "msg_id": str(ack.msg_id),
        "time": ack.server_time,
        "duplicate": bool(ack.duplicate),
        "resent": resent,
    }


def render(ev: Event, me: str | None) -> str:
    """An event as a line (or a few) for a human."""
    kind = ev["event"]
    if kind == "message":
        who = "me" if ev["sender"] == me else ev["sender"]
        read = f" {READ_MARK}" if ev.get("read") else ""
        return f"[{_local_time(ev['time'])}] {ev['conv']} <{who}> {ev['text']}{read}"
    if kind == "convs":
        return render_convs(ev, me, _local_time)
    if kind in ("marked", "read"):
        return render_read(ev)
    if kind == "hidden":
        return f"-- {ev['conv']} hidden (until a new message arrives)"
    if kind == "push":
        if not ev["registered"]:
            return "-- no notifications to this device any more"
        text = "with" if ev["preview"] else "without"
        return f"-- this device is notified through {ev['platform']} ({text} message text)"
    if kind == "ack":
        dup = " (already sent before)" if ev["duplicate"] else ""
        again = "resent " if ev["resent"] else ""
        return f"  {again}-> {ev['conv']}: msg {ev['msg_id']} at {_local_time(ev['time'])}{dup}"
    if kind == "sync":
        unread = ", ".join(f"{c} {n}" for c, n in ev["unread"].items()) or "none"
        gap = "\n  (some messages expired while away: use /history)" if ev["gap"] else ""
        return f"-- sync: {ev['messages']} new message(s), unread: {unread}{gap}"
    if kind == "history":
        lines = [render(m, me) for m in ev["messages"]]
        end = "more: /history" if ev["has_more"] else "beginning of the conversation"
        return "\n".join([f"-- history of {ev['conv']}", *lines, f"-- ({end})"])
    if kind == "heads":
        heads = [f"{h['conv']} {h['unread']} unread (at {h['position'] or '-'} of {h['done']})"
                 for h in ev["heads"]]  # fmt: skip
        return "-- large groups: " + (", ".join(heads) or "none")
    if kind == "timeline":
        lines = [render(m, me) for m in ev["messages"]]
        more = ", more: /timeline" if ev["has_more"] else ""
        at = f"-- (timeline of {ev['conv']} at {ev['position']} of {ev['done']}{more})"
        return "\n".join([*lines, at])
    if kind == "group":
        return "-- " + _render_group(ev)
    if kind == "error":
        code = f" {ev['code']}" if ev["code"] is not None else ""
        return f"!! {ev['name']}{code}: {ev['text']}"
    if kind == "closed":
        why = f": {ev['reason']} {ev['text']}".rstrip() if ev["reason"] else ""
        return f"-- connection closed{why}"
    if kind == "connected":
        return f"-- connected as user {ev['user']} (device {ev['device']}); /help for commands"
    if kind == "reconnecting":
        return "-- reconnecting (what you send meanwhile goes out once connected)"
    if kind == "conv":
        return f"-- talking in {ev['conv']}"
    if kind == "pong":
        return f"-- pong: server time {_local_time(ev['server_time'])}, {ev['rtt_ms']:.1f} ms"
    if kind == "help":
        return str(ev["text"])
    return json.dumps(ev)


def _render_group(ev: Event) -> str:
    op = ev["op"]
    if op == "create":
        return f"created group {ev['group_id']} ({ev['name']}): /to group {ev['group_id']}"
    if op in ("add", "remove"):
        return f"group {ev['group_id']}: {ev['count']} member(s) {op}ed"
    if op == "members":
        return f"group {ev['group_id']} {ev['name']!r}, owner {ev['owner']}: " + " ".join(
            ev["members"]
        )
    groups = ev["groups"]
    return "your groups: " + (", ".join(f"{g['group_id']} {g['name']!r}" for g in groups) or "none")


# ---------------------------------------------------------------------------- console


class UsageError(Exception):
    """A command line the console cannot run."""


def _ids(words: list[str], at_least: int) -> list[int]:
    if len(words) < at_least:
        raise UsageError("missing id")
    try:
        ids = [int(w) for w in words]
    except ValueError:
        raise UsageError(f"not an id: {' '.join(words)}") from None
    if any(not 1 <= i < 2**64 for i in ids):
        raise UsageError("ids are 1..2^64-1")
    return ids


class Console:
    """Runs command lines against an IMClient and emits events."""

    def __init__(self, client: IMClient, write: Callable[[str], None], script: bool) -> None:
        self.client = client
        self.write = write
        self.script = script
        self.current: tuple[int, int] | None = None
        self.history_before: dict[str, int | None] = {}  # None: the beginning was reached
        self.finished: Deferred[int] = Deferred()
        self._ready = False
        self._backlog: list[str] = []
        # Commands run one after the other, in input order, in both modes: "hello" then
        # "/history" shows the message just sent.
        self._tail: Deferred[None] = defer.succeed(None)
        self._quitting = False
        self._quit_command = False  # /quit: lines queued after it do not run
        self._input_ended = False
        client.on_login = self._on_login
        client.on_message = self._on_message
        client.on_sync = self._emit_sync
        client.on_resend = self._on_resend
        client.on_close = self._on_close
        client.on_error = lambda e: self.emit(error_event(e))
        client.on_read_update = self._on_read_update
        self._receipts_shown: dict[str, int] = {}  # conv -> peer read position reported
        self._marking = self._mark_again = False

    def emit(self, ev: Event) -> None:
        if self.script:
            self.write(json.dumps(ev, ensure_ascii=False) + "\n")
        else:
            me = None if self.client.user_id is None else str(self.client.user_id)
            self.write(render(ev, me) + "\n")

    # --- input

    def ready(self) -> None:
        """Logged in: run what was typed meanwhile."""
        self._ready = True
        backlog, self._backlog = self._backlog, []
        for line in backlog:
            self.submit(line)
        if self._input_ended:
            self.quit(0)

    def submit(self, line: str) -> None:
        line = line.strip()
        if not line or self._quitting:
            return
        if not self._ready:
            self._backlog.append(line)
            return
        done: Deferred[None] = Deferred()
        self._tail.addCallback(lambda _: self._run(line).chainDeferred(done))
        self._tail = done

    def _run(self, line: str) -> Deferred[None]:
        async def run() -> None:
            if self._quit_command:
                return
            try:
                await self.execute(line)
            except Exception as e:
                self.emit(error_event(e, line))

        return Deferred.fromCoroutine(run())

    def end_of_input(self) -> None:
        self._input_ended = True
        if self._ready:  # otherwise ready() quits once the backlog is queued
            self.quit(0)

    def quit(self, code: int) -> None:
        if self._quitting:
            return
        self._quitting = True

        async def wind_down() -> None:
            commands_done: Deferred[None] = Deferred()  # pending commands first
            self._tail.addBoth(lambda _: commands_done.callback(None))
            await commands_done
            await self.client.drain()
            await self.client.close()
            if not self.finished.called:
                self.finished.callback(code)

        Deferred.fromCoroutine(wind_down())

    # --- commands

    async def execute(self, line: str) -> None:
        if not line.startswith("/") or line.startswith("//"):
            await self.say(line[1:] if line.startswith("//") else line)
            return
        cmd, *args = line.split()
        handler = self.COMMANDS.get(cmd)
        if handler is None:
            raise UsageError(f"unknown command {cmd}; /help lists them")
        await handler(self, args)

    async def say(self, text: str) -> None:
        if self.current is None:
            raise UsageError("no conversation: /to user ID or /to group ID first")
        kind, cid = self.current
        ack = await self.client.send_text(kind, cid, text)  # sending reads what came before
        send = Send(ack.client_msg_id, kind, cid, ContentType.TEXT, text.encode())
        self.emit(ack_event(send, ack))

    async def cmd_to(self, args: list[str]) -> None:
        kinds = {"user": ConvKind.USER, "group": ConvKind.GROUP}
        if len(args) != 2 or args[0] not in kinds:
            raise UsageError("/to user ID | /to group ID")
        (cid,) = _ids(args[1:], 1)
        self.current = (kinds[args[0]], cid)
        self.emit({"event": "conv", "conv": conv_key(*self.current)})
        await self.mark_viewed()

    async def cmd_sync(self, args: list[str]) -> None:
        self._emit_sync(await self.client.sync())

    def _emit_sync(self, result: SyncResult) -> None:
        for m in result.messages:
            self.emit(message_event(self.client.conv_of(m), m, "sync"))
        self.emit(
            {
                "event": "sync",
                "messages": len(result.messages),
                "pages": result.pages,
                "unread": result.unread,
                "gap": result.gap,
                "cursor": str(result.cursor),
            }
        )

    async def cmd_history(self, args: list[str]) -> None:
        if self.current is None:
            raise UsageError("no conversation: /to user ID or /to group ID first")
        try:
            pages = int(args[0]) if args else 1
        except ValueError:
            raise UsageError("/history [N]") from None
        kind, cid = self.current
        conv = conv_key(kind, cid)
        for _ in range(max(pages, 1)):
            before = self.history_before.get(conv, 0)
            if before is None:  # already at the beginning
                self.emit({"event": "history", "conv": conv, "messages": [], "has_more": False})
                return
            page: HistoryPage = await self.client.history(kind, cid, before_id=before)
            more = bool(page.has_more and page.messages)
            self.history_before[conv] = page.messages[-1].msg_id if more else None
            shown = [self._message_event(conv, m, "history") for m in page.messages[::-1]]
            self.emit({"event": "history", "conv": conv, "messages": shown, "has_more": more})
            if not more:
                break
        await self.mark_viewed()

    async def cmd_group(self, args: list[str]) -> None:
        op, rest = (args[0], args[1:]) if args else ("", [])
        c = self.client
        if op == "create" and rest:
            members = _ids(rest[1:], 0)
            gid = await c.create_group(rest[0], members)
            self.emit(
                {
                    "event": "group",
                    "op": "create",
                    "group_id": str(gid),
                    "name": rest[0],
                    "members": [str(m) for m in members],
                }
            )
        elif op in ("add", "remove"):
            gid, *members = _ids(rest, 2)
            fn = c.add_members if op == "add" else c.remove_members
            count = await fn(gid, members)
            self.emit({"event": "group", "op": op, "group_id": str(gid), "count": count})
        elif op == "members":
            (gid,) = _ids(rest[:1], 1)
            info = await c.group_members(gid)
            self.emit(
                {
                    "event": "group",
                    "op": "members",
                    "group_id": str(gid),
                    "name": info.name,
                    "owner": str(info.owner_id),
                    "members": [str(m) for m in info.members],
                }
            )
        else:
            raise UsageError(
                "/group create NAME [ID...] | add GID ID... | remove GID ID... | members GID"
            )

    async def cmd_groups(self, args: list[str]) -> None:
        groups = await self.client.my_groups()
        listed = [{"group_id": str(g.group_id), "name": g.name} for g in groups]
        self.emit({"event": "group", "op": "list", "groups": listed})

    async def cmd_convs(self, args: list[str]) -> None:
        c = self.client
        if c.state.convs.version == 0:
            await c.conversations()  # the first time: the whole list
        else:
            await c.conversation_changes()
        assert c.user_id is not None
        self.emit(convs_event(c.state.convs, c.user_id, message_event))

    async def cmd_hide(self, args: list[str]) -> None:
        kind: int
        if args:
            kinds = {"user": ConvKind.USER, "group": ConvKind.GROUP}
            if len(args) != 2 or args[0] not in kinds:
                raise UsageError("/hide [user ID | group ID]")
            (cid,) = _ids(args[1:], 1)
            kind = kinds[args[0]]
        elif self.current is not None:
            kind, cid = self.current
        else:
            raise UsageError("/hide user ID | /hide group ID (or /to one first)")
        await self.client.hide(kind, cid)
        self.emit({"event": "hidden", "conv": conv_key(kind, cid)})

    async def cmd_push(self, args: list[str]) -> None:
        if args == ["off"]:
            await self.client.unregister_push()
            self.emit({"event": "push", "registered": False})
            return
        if len(args) not in (2, 3) or args[2:] not in ([], ["preview"]):
            raise UsageError("/push PLATFORM TOKEN [preview] | /push off")
        platform, token, preview = args[0], args[1], len(args) == 3
        await self.client.register_push(platform, token, preview)
        self.emit({"event": "push", "registered": True, "platform": platform,
                   "preview": preview})  # fmt: skip

    async def cmd_heads(self, args: list[str]) -> None:
        if args:
            raise UsageError("/heads")
        page = await self.client.timeline_heads()
        self.emit({"event": "heads", "heads": [self._head(h) for h in page.heads]})

    def _head(self, h: TimelineHead) -> Event:
        position = self.client.timeline_positions.get(h.group_id)
        return {
            "conv": conv_key(ConvKind.GROUP, h.group_id),
            "done": str(h.done),
            "read_seq": str(h.read_seq),
            "unread": h.unread,
            "last_msg_id": str(h.last_msg_id),
            "position": None if position is None else str(position),  # this device's
        }

    async def cmd_timeline(self, args: list[str]) -> None:
        c = self.client
        if args:
            if len(args) != 1:
                raise UsageError("/timeline [GID]")
            (gid,) = _ids(args, 1)
        elif self.current is not None and self.current[0] == ConvKind.GROUP:
            gid = self.current[1]
        else:
            raise UsageError("/timeline GID (or /to group ID first)")
        conv = conv_key(ConvKind.GROUP, gid)
        head = None
        if gid not in c.timeline_positions:  # never pulled here: from what the user has read
            heads = await c.timeline_heads()
            head = next((h for h in heads.heads if h.group_id == gid), None)
        while True:
            position = c.timeline_positions.get(gid, head.read_seq if head else 0)
            # the messages held here (pushed) are left out: they were shown when they came
            page = await c.timeline_next(gid, head=head)
            moved = page.position != position
            shown = [self._message_event(conv, m, "timeline") for m in page.messages]
            self.emit({"event": "timeline", "conv": conv, "messages": shown,
                       "position": str(page.position), "done": str(page.done),
                       "has_more": bool(page.has_more and moved)})  # fmt: skip
            if not page.has_more or not moved:
                break
        if self.current == (ConvKind.GROUP, gid):
            await self.mark_viewed()

    # --- read state

    async def mark_viewed(self) -> None:
        """The current conversation is on screen: read up to its newest message."""
        c = self.client
        if self.current is None or not c.has_feature(Feature.CONVERSATIONS):
            return
        kind, cid = self.current
        key = conv_key(kind, cid)
        newest = c.newest_id(kind, cid)
        row = c.state.convs.get(key)
        if newest == 0 or (row is not None and row.read_id >= newest and not row.unread):
            return
        msg_id = await c.mark_read(kind, cid, newest)
        self.emit({"event": "marked", "conv": key, "msg_id": str(msg_id),
                   "total_unread": c.total_unread})  # fmt: skip

    def _on_message(self, conv: str, m: Message) -> None:
        self.emit(message_event(conv, m, "push"))
        if self.current is not None and conv == conv_key(*self.current):
            self._mark_live()  # on screen as it arrives: read

    def _mark_live(self) -> None:
        """One READ_MARK in flight at a time; a burst of messages marks the newest once."""
        if self._marking:
            self._mark_again = True
            return
        self._marking = True

        async def run() -> None:
            try:
                await self.mark_viewed()
            except Exception as e:
                self.emit(error_event(e, "mark read"))
            self._marking = False
            if self._mark_again:
                self._mark_again = False
                self._mark_live()

        Deferred.fromCoroutine(run())

    def _message_event(self, conv: str, m: Message, source: str) -> Event:
        ev = message_event(conv, m, source)
        if m.sender_id == self.client.user_id and parse_conv_key(conv)[0] == ConvKind.USER:
            ev["read"] = self.client.state.convs.read_by_peer(conv, m.msg_id)
        return ev

    def _on_read_update(self, conv: str, u: ReadUpdate) -> None:
        c = self.client
        receipt = u.reader_id != c.user_id
        mine: list[str] = []
        if receipt:  # which of my messages the peer has read since the last receipt shown
            since = self._receipts_shown.get(conv, 0)
            self._receipts_shown[conv] = max(since, u.msg_id)
            mine = [str(m.msg_id) for m in c.state.messages(conv)
                    if m.sender_id == c.user_id and since < m.msg_id <= u.msg_id]  # fmt: skip
        self.emit(
            {
                "event": "read",
                "conv": conv,
                "reader": str(u.reader_id),
                "msg_id": str(u.msg_id),
                "receipt": receipt,
                "mine": mine,
                "total_unread": c.total_unread,
            }
        )

    async def cmd_ping(self, args: list[str]) -> None:
        start = time.monotonic()
        pong = await self.client.ping()
        rtt = (time.monotonic() - start) * 1000
        self.emit({"event": "pong", "server_time": pong.server_time, "rtt_ms": round(rtt, 3)})

    async def cmd_help(self, args: list[str]) -> None:
        self.emit({"event": "help", "text": HELP})

    async def cmd_quit(self, args: list[str]) -> None:
        self._quit_command = True
        self.quit(0)

    COMMANDS: ClassVar[dict[str, Callable[[Console, list[str]], Awaitable[None]]]] = {
        "/to": cmd_to,
        "/sync": cmd_sync,
        "/history": cmd_history,
        "/convs": cmd_convs,
        "/hide": cmd_hide,
        "/push": cmd_push,
        "/heads": cmd_heads,
        "/timeline": cmd_timeline,
        "/group": cmd_group,
        "/groups": cmd_groups,
        "/ping": cmd_ping,
        "/help": cmd_help,
        "/quit": cmd_quit,
    }

    # --- client events

    def _on_login(self, ok: HelloOk) -> None:
        self.emit(
            {
                "event": "connected",
                "user": str(ok.user_id),
                "device": self.client.device_id,
                "heartbeat_s": ok.heartbeat_s,
                "features": sorted(Feature(f).name for f in self.client.features),
            }
        )

    def _on_resend(self, send: Send, outcome: SendAck | BaseException) -> None:
        if isinstance(outcome, SendAck):
            self.emit(ack_event(send, outcome, resent=True))
        else:
            self.emit(error_event(outcome, f"resend {send.client_msg_id.hex()}"))

    def _on_close(self, exc: SessionClosed) -> None:
        self.emit(
            {"event": "closed", "reason": exc.reason_name, "code": exc.reason, "text": exc.text}
        )
        if self._quitting:
            return
        if self.client.reconnecting:
            self.emit({"event": "reconnecting"})
            return
        self._quitting = True  # nothing more can run: end now, with a failure status
        if not self.finished.called:
            self.finished.callback(1)


@implementer(IHalfCloseableProtocol)
class CommandReader(basic.LineReceiver):
    """stdin lines to the console; stdout stays open after stdin ends (half-close)."""

    delimiter = b"\n"
    MAX_LENGTH = 1 << 20

    def __init__(self, console: Console) -> None:
        self.console = console
        self.closed: Deferred[None] = Deferred()

    def lineLengthExceeded(self, line: bytes) -> None:
        self.console.emit(error_event(UsageError(f"line longer than {self.MAX_LENGTH} bytes")))

    def lineReceived(self, line: bytes) -> None:
        self.console.submit(line.decode("utf-8", "replace").rstrip("\r"))

    def readConnectionLost(self) -> None:
        self.console.end_of_input()

    def writeConnectionLost(self) -> None:
        pass  # nobody reads stdout any more; keep going until the input ends

    def connectionLost(self, reason: Failure | None = None) -> None:
        if not self.closed.called:
            self.closed.callback(None)


# ------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="imclient",
        description=(__doc__ or "").partition("\n\nInteractive mode")[0],
        epilog="Interactive mode" + (__doc__ or "").partition("\n\nInteractive mode")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--server",
        default=DEFAULT_SERVER,
        help=f"Twisted client endpoint string (default {DEFAULT_SERVER})",
    )
    p.add_argument("--token", help="login token (JWT)")
    p.add_argument("--user", type=int, help="user id, to mint a development token")
    p.add_argument(
        "--jwt-secret",
        help="the server's JWT secret, to mint a development token (default: read "
        "<data-dir>/jwt-secret, the file a local imserver creates)",
    )
    p.add_argument("--data-dir", default="./var", help="a local server's data dir (default ./var)")
    p.add_argument("--device", default="console", help="device id (default: console)")
    p.add_argument(
        "--state", metavar="FILE", help="keep the cursor, messages and outbox in FILE between runs"
    )
    p.add_argument(
        "--script",
        action="store_true",
        help="read commands from stdin, write one JSON object per event",
    )
    args = p.parse_args(argv)
    if args.token is None and args.user is not None and args.jwt_secret is None:
        secret_file = Path(args.data_dir) / "jwt-secret"
        if secret_file.exists():
            args.jwt_secret = secret_file.read_text().strip()
    if args.token is None and (args.user is None or args.jwt_secret is None):
        p.error("give --token, or --user and --jwt-secret (or a --data-dir with jwt-secret)")
    return args


def _start_logging() -> None:
    # Warnings to stderr; stdout is for events only. stdio stays as it is (no redirect).
    observer = FilteringLogObserver(
        textFileLogObserver(sys.stderr), [LogLevelFilterPredicate(LogLevel.warn)]
    )
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


async def run(reactor: IConsoleReactor, args: argparse.Namespace) -> None:
    _start_logging()
    if args.token is not None:
        token: str | Callable[[], str] = args.token
    else:
        user, secret, device = args.user, args.jwt_secret, args.device
        token = lambda: mint(secret, user, device)  # noqa: E731 - fresh per (re)login
    # Without a local store, "resume" syncs from the position the server keeps per device.
    state = ClientState.load(args.state) if args.state else ClientState(cursor=CURSOR_RESUME)
    client = IMClient(
        args.server,
        token,
        args.device,
        state=state,
        reactor=reactor,
        client_kind=ClientKind.DESKTOP,
        reconnect=not args.script,
    )

    console = Console(client, lambda s: None, args.script)
    reader = CommandReader(console)
    io = stdio.StandardIO(reader, reactor=reactor)
    console.write = lambda s: io.write(s.encode("utf-8"))  # non-blocking, via the reactor
    try:
        await client.connect()
    except Exception as e:
        console.emit(error_event(e, "connect"))
        code = 1
    else:
        console.ready()
        code = await console.finished
    io.loseConnection()  # flushes stdout first
    await reader.closed
    if code:
        raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of `imclient` (setup.cfg: imclient = improto_clients.console:main)."""
    from twisted.internet import task

    args = parse_args(argv)
    task.react(run, (args,))


if __name__ == "__main__":
    main()
