"""imclient --script against a real server process: the README's two-terminal walkthrough."""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from improto.enums import Feature
from improto.errors import ErrorCode
from improto.frames import (
    Error,
    PushRegister,
    PushRegisterOk,
    PushUnregister,
    PushUnregisterOk,
    Send,
)
from improto_clients.console import Console, render
from tests.support.server import ServerHandle
from tests.test_client_features import ALL, Ext
from tests.test_client_unit import result

CLIENT = [sys.executable, "-m", "improto_clients.console"]


def run_script(server: ServerHandle, user: int, device: str, lines: list[str]) -> list[dict]:
    """Run imclient --script to completion; return its JSON events."""
    proc = subprocess.run(
        [*CLIENT, "--server", server.endpoint, "--user", str(user), "--device", device,
         "--jwt-secret", server.secret, "--script"],
        input="\n".join(lines) + "\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


class LiveClient:
    """An imclient --script kept running (stdin open) to watch pushes arrive."""

    def __init__(self, server: ServerHandle, user: int, device: str) -> None:
        self.proc = subprocess.Popen(
            [*CLIENT, "--server", server.endpoint, "--user", str(user), "--device", device,
             "--jwt-secret", server.secret, "--script"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert self.proc.stdout is not None
        os.set_blocking(self.proc.stdout.fileno(), False)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.proc.stdout, selectors.EVENT_READ)
        self.buf = b""

    def wait_for(self, pred: Callable[[dict[str, Any]], bool], timeout: float = 15) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\n" in self.buf:
                line, self.buf = self.buf.split(b"\n", 1)
                event = json.loads(line)
                if pred(event):
                    return event
            if self.sel.select(timeout=0.2):
                chunk = self.proc.stdout.read()  # type: ignore[union-attr]
                if not chunk:
                    break
                self.buf += chunk
        raise AssertionError("event did not arrive")

    def send(self, *lines: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("".join(f"{line}\n" for line in lines).encode())
        self.proc.stdin.flush()

    def quit(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(15)


def test_two_clients_chat_offline_and_history(server_process: Callable[..., ServerHandle]) -> None:
    server = server_process()
    bob = LiveClient(server, 2, "bob-phone")
    bob.wait_for(lambda e: e["event"] == "connected")

    # Alice talks to bob while he is online: he sees it as a push.
    events = run_script(server, 1, "alice-laptop", ["/to user 2", "hi bob, lunch?"])
    (ack,) = [e for e in events if e["event"] == "ack"]
    pushed = bob.wait_for(lambda e: e["event"] == "message")
    assert (pushed["text"], pushed["sender"], pushed["msg_id"]) == ("hi bob, lunch?", "1",
                                                                     ack["msg_id"])  # fmt: skip
    assert bob.quit() == 0

    # Bob is offline; alice sends three more; bob comes back and pulls them, oldest first.
    run_script(server, 1, "alice-laptop", ["/to user 2", "one", "two", "three"])
    events = run_script(server, 2, "bob-phone", ["/sync", "/to user 1", "/history 2"])
    texts = [e["text"] for e in events if e["event"] == "message"]
    assert texts[-3:] == ["one", "two", "three"]
    sync = [e for e in events if e["event"] == "sync"]
    assert sum(s["messages"] for s in sync) >= 3
    history = [e for e in events if e["event"] == "history"]
    shown = [m["text"] for h in history for m in h["messages"]]
    assert {"hi bob, lunch?", "one", "two", "three"} <= set(shown)


def test_group_commands_and_errors(server_process: Callable[..., ServerHandle]) -> None:
    server = server_process()
    events = run_script(server, 1, "a", ["/group create lunch 2 3", "/groups"])
    created = next(e for e in events if e["event"] == "group" and e["op"] == "create")
    listed = next(e for e in events if e["event"] == "group" and e["op"] == "list")
    assert created["group_id"] in [g["group_id"] for g in listed["groups"]]
    events = run_script(server, 4, "x", [f"/to group {created['group_id']}", "let me in"])
    (err,) = [e for e in events if e["event"] == "error"]
    assert (err["code"], err["name"]) == (300, "FORBIDDEN")


def test_conversations_read_markers_and_receipts(
    server_process: Callable[..., ServerHandle],
) -> None:
    server = server_process()
    alice = LiveClient(server, 1, "alice-laptop")
    hello = alice.wait_for(lambda e: e["event"] == "connected")
    # (and PUSH when the server has push notifications on)
    assert {"CONVERSATIONS", "READ_RECEIPTS", "WIRE_ONCE"} <= set(hello["features"])
    bob = LiveClient(server, 2, "bob-phone")
    bob.wait_for(lambda e: e["event"] == "connected")

    # Bob writes to alice twice; she is online but looking elsewhere: two unread.
    bob.send("/to user 1", "lunch?", "noon?")
    acks = [bob.wait_for(lambda e: e["event"] == "ack") for _ in range(2)]
    for ack in acks:
        alice.wait_for(lambda e, a=ack: e["event"] == "message" and e["msg_id"] == a["msg_id"])
    alice.send("/convs")
    convs = alice.wait_for(lambda e: e["event"] == "convs")
    assert convs["total_unread"] == 2
    (row,) = convs["convs"]
    assert (row["conv"], row["unread"], row["last"]["text"]) == ("user:2", 2, "noon?")

    # Viewing the conversation marks it read; bob sees the receipt on his two messages.
    alice.send("/to user 2")
    marked = alice.wait_for(lambda e: e["event"] == "marked")
    assert (marked["conv"], marked["msg_id"]) == ("user:2", acks[-1]["msg_id"])
    assert marked["total_unread"] == 0
    receipt = bob.wait_for(lambda e: e["event"] == "read")
    assert receipt["receipt"] and receipt["reader"] == "1" and receipt["conv"] == "user:1"
    assert receipt["mine"] == [a["msg_id"] for a in acks]
    bob.send("/convs")
    listed = bob.wait_for(lambda e: e["event"] == "convs")
    (row,) = listed["convs"]
    assert row["last"]["text"] == "noon?" and row["last"]["read"] is True
    assert listed["total_unread"] == 0  # his own messages are not unread for him

    # Hidden from alice's list, on the server too (a fresh device of hers agrees).
    alice.send("/hide")
    alice.wait_for(lambda e: e["event"] == "hidden")
    alice.send("/convs")
    assert alice.wait_for(lambda e: e["event"] == "convs")["convs"] == []
    assert alice.quit() == 0

    def fresh_list() -> list[dict]:
        events = run_script(server, 1, "alice-phone", ["/convs"])
        return next(e for e in events if e["event"] == "convs")["convs"]

    _until(lambda: fresh_list() == [])
    assert bob.quit() == 0


def test_an_online_console_downloads_nothing_again(
    server_process: Callable[..., ServerHandle],
) -> None:
    server = server_process()
    bob = LiveClient(server, 2, "bob-phone")
    bob.wait_for(lambda e: e["event"] == "connected")
    events = run_script(server, 1, "alice-laptop", ["/to user 2", "one", "two", "three"])
    assert len([e for e in events if e["event"] == "ack"]) == 3
    for text in ("one", "two", "three"):
        bob.wait_for(lambda e, t=text: e["event"] == "message" and e["text"] == t)
    time.sleep(0.5)  # the inbox notices follow the pushes within milliseconds
    assert bob.quit() == 0  # closing acknowledges the cursor the notices moved
    # Without --state it resumes from the position the server stored: nothing to download.
    events = run_script(server, 2, "bob-phone", ["/sync"])
    syncs = [e for e in events if e["event"] == "sync"]
    assert syncs and all(s["messages"] == 0 for s in syncs)
    assert not [e for e in events if e["event"] == "message"]


def _until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.2)


def _console(enabled: tuple[int, ...]) -> tuple[Ext, Console, list[dict[str, Any]]]:
    """A console in script mode on a client talking to scripted server frames."""
    h = Ext()
    h.login_ext(enabled=enabled)
    events: list[dict[str, Any]] = []
    console = Console(h.client, lambda line: events.append(json.loads(line)), script=True)
    return h, console, events


def test_push_command_registers_and_unregisters() -> None:
    h, console, events = _console((*ALL, Feature.PUSH))
    d = console._run("/push fcm tok-1 preview")
    (reg,) = h.sent()
    assert reg == PushRegister("fcm", "tok-1", PushRegister.PREVIEW, request_id=reg.request_id)
    h.reply(reg, PushRegisterOk)
    result(d)
    d = console._run("/push apns tok-2")
    (reg,) = h.sent()
    h.feed(Error(ErrorCode.INVALID_FIELD, "unknown platform apns", request_id=reg.request_id))
    result(d)
    d = console._run("/push off")
    (unreg,) = h.sent()
    assert isinstance(unreg, PushUnregister)
    h.reply(unreg, PushUnregisterOk)
    result(d)
    assert events == [
        {"event": "push", "registered": True, "platform": "fcm", "preview": True},
        {"event": "error", "code": 104, "name": "INVALID_FIELD", "text": "unknown platform apns",
         "command": "/push apns tok-2"},
        {"event": "push", "registered": False},
    ]  # fmt: skip


def test_push_command_usage_and_a_server_without_push() -> None:
    h, console, events = _console(ALL)
    for line in ("/push", "/push fcm", "/push fcm t later", "/push fcm t preview x",
                 "/push fcm t", "/push off"):  # fmt: skip
        result(console._run(line))
    assert h.sent() == []
    assert [e["name"] for e in events] == ["USAGE"] * 4 + ["UNSUPPORTED"] * 2


def test_a_send_still_rate_limited_after_the_retries_shows_the_error() -> None:
    h, console, events = _console(ALL)
    result(console._run("/to user 1002"))
    d = console._run("hello")
    for _ in range(4):  # the first try and 3 retries, each after the announced 1.5 s
        (s,) = h.sent()
        assert isinstance(s, Send)
        h.feed(Error(ErrorCode.RATE_LIMITED, "retry_after_ms=1500 sends", request_id=s.request_id))
        h.reactor.advance(1.5)
    result(d)
    err = {"event": "error", "code": 504, "name": "RATE_LIMITED",
           "text": "retry_after_ms=1500 sends", "command": "hello"}  # fmt: skip
    assert events[-1] == err
    assert render(err, None) == "!! RATE_LIMITED 504: retry_after_ms=1500 sends"
