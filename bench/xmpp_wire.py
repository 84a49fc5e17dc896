"""XMPP (RFC 6120) over plain TCP for the load generators: ready-made bytes for the client side
of a session, an incremental splitter of the server's stream into top-level elements, and a
small blocking client, and the offline-drain scenario (bench/run.py's sync, beside
bench/sync_pull.py's improto and Mosquitto):

    python bench/xmpp_wire.py --config archive|routing [--quick]

A session: stream header -> features -> SASL PLAIN -> success -> stream restart -> features ->
bind + session + stream management (XEP-0198 `<enable/>`) + initial presence. After `<enable/>`
both sides count the *stanzas* (message, presence, iq) they handled; `<r/>` asks the peer for
its count, `<a h='n'/>` answers it. The generator's sender puts `<r/>` after every message,
and the server's `<a h/>` is its acknowledgement (like improto's SEND_ACK and MQTT's PUBACK);
receivers answer the server's `<r/>` with their count, as a client must (ejabberd closes a
session whose unacknowledged queue grows past its limit).

The splitter is not a full XML parser: it tracks tag depth below the stream root with one
regular expression per tag (quote-aware: `>` may appear in a quoted attribute value) and
hands out each top-level element as the raw bytes the server sent, so the generator finds
its payload marker with `bytes.find` instead of building a tree.
"""

from __future__ import annotations

import base64
import itertools
import re
import socket
import time
from typing import Any

DOMAIN = "localhost"
NS_SM = "urn:xmpp:sm:3"
STANZAS = frozenset((b"message", b"presence", b"iq"))

# One tag or other markup from `<` to its `>`: attribute values may hold `>` (XML allows it).
_MARKUP = re.compile(rb"<(?:[^>'\"]|'[^']*'|\"[^\"]*\")*>")
_NAME = re.compile(rb"[^\s/>]+")
_ATTR = re.compile(rb"""\s([^\s=/>]+)\s*=\s*(?:'([^']*)'|"([^"]*)")""")
_STREAM_ROOT = b"stream:stream"

# --------------------------------------------------------------------------- names


def jid_user(user_id: int) -> str:
    """The account name of generator user `user_id` (registered before the server starts)."""
    return f"u{user_id}"


def password(user_id: int) -> str:
    return f"pw{user_id}"


def escape(text: str) -> str:
    """Character data / attribute value escaping (the five predefined entities)."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("'", "&apos;")
        .replace('"', "&quot;")
    )


# --------------------------------------------------------------------------- client bytes


def stream_open(domain: str = DOMAIN) -> bytes:
    return (
        f"<?xml version='1.0'?><stream:stream to='{escape(domain)}' xmlns='jabber:client' "
        "xmlns:stream='http://etherx.jabber.org/streams' version='1.0'>"
    ).encode()


def stream_close() -> bytes:
    return b"</stream:stream>"


def auth_plain(user: str, pw: str) -> bytes:
    """SASL PLAIN (RFC 4616): base64 of authzid NUL authcid NUL password, authzid empty."""
    blob = base64.b64encode(b"\0" + user.encode() + b"\0" + pw.encode()).decode()
    return (
        f"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>{blob}</auth>"
    ).encode()


def session_setup(resource: str, presence: bool = True) -> bytes:
    """After the post-auth features: bind, the (optional, RFC 3921) session, enable stream
    management, and initial presence (without it a message to the bare JID finds no
    available resource and goes to offline storage; with it, offline messages are sent)."""
    out = (
        "<iq type='set' id='bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>"
        f"<resource>{escape(resource)}</resource></bind></iq>"
        "<iq type='set' id='sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>"
        f"<enable xmlns='{NS_SM}'/>"
    )
    if presence:
        out += "<presence/>"
    return out.encode()


def message(to: str, body: bytes, msg_id: str) -> bytes:
    """A 1:1 chat message to a bare JID; `body` must already be XML-safe text (ours is)."""
    head = f"<message to='{escape(to)}' type='chat' id='{escape(msg_id)}'><body>".encode()
    return head + body + b"</body></message>"


R = f"<r xmlns='{NS_SM}'/>".encode()


def ack(h: int) -> bytes:
    """XEP-0198 `<a/>`: the number of stanzas handled since `<enable/>`, mod 2^32."""
    return f"<a xmlns='{NS_SM}' h='{h % (1 << 32)}'/>".encode()


# --------------------------------------------------------------------------- parsing


def name(element: bytes) -> bytes:
    """The qualified tag name of an element (or `/stream:stream` for the stream's end)."""
    m = _NAME.match(element, 1)
    return m.group() if m else b""


def attr(element: bytes, key: bytes) -> bytes | None:
    """An attribute of the element's first tag (raw, not unescaped: our values need none)."""
    m = _MARKUP.match(element)
    if m is None:
        return None
    for a in _ATTR.finditer(m.group()):
        if a.group(1) == key:
            return a.group(2) if a.group(2) is not None else a.group(3)
    return None


class Splitter:
    """Incremental: feed(bytes) -> the top-level items completed so far, each as raw bytes.

    Items: the stream header `<stream:stream ...>` (the root stays open: its children are
    depth 1), each complete child of the root (a stanza or a nonza such as `<r/>`), and
    `</stream:stream>`. The XML declaration and whitespace between items are dropped.
    A new Splitter is needed after a stream restart (SASL success)."""

    def __init__(self) -> None:
        self.buf = b""
        self.pos = 0  # where scanning resumes
        self.start = -1  # start of the open top-level element, -1 if none
        self.depth = 0  # open tags below the stream root

    def feed(self, data: bytes) -> list[bytes]:
        buf = self.buf + data if self.buf else data
        pos, start, depth = self.pos, self.start, self.depth
        out: list[bytes] = []
        find, match = buf.find, _MARKUP.match
        while True:
            lt = find(b"<", pos)
            if lt < 0:
                pos = len(buf)
                break
            m = match(buf, lt)
            if m is None:  # the tag is not complete yet
                pos = lt
                break
            gt = m.end()
            c = buf[lt + 1]
            if c == 0x3F or c == 0x21:  # <?xml ...?>, <!...>: XMPP forbids the latter
                if c == 0x21:
                    raise ValueError("comments, DTDs and CDATA are not allowed in XMPP")
            elif c == 0x2F:  # </...>
                if depth == 0:
                    out.append(buf[lt:gt])  # </stream:stream>
                else:
                    depth -= 1
                    if depth == 0:
                        out.append(buf[start:gt])
                        start = -1
            elif buf[gt - 2] == 0x2F:  # <x .../>
                if depth == 0:
                    out.append(buf[lt:gt])
            elif depth == 0 and buf.startswith(_STREAM_ROOT, lt + 1):
                out.append(buf[lt:gt])
            else:
                if depth == 0:
                    start = lt
                depth += 1
            pos = gt
        keep = start if start >= 0 else pos
        self.buf = buf[keep:]
        self.pos = pos - keep
        self.start = 0 if start >= 0 else -1
        self.depth = depth
        return out


# --------------------------------------------------------------------------- blocking client


class XmppError(RuntimeError):
    pass


class BlockingClient:
    """One logged-in session on a blocking socket (bench/sync_pull.py's offline drain)."""

    def __init__(self, host: str, port: int, user_id: int, resource: str,
                 timeout: float = 30.0, presence: bool = True) -> None:  # fmt: skip
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.split = Splitter()
        self.queue: list[bytes] = []  # items read and counted, not yet handed out
        self.h_in = 0  # stanzas received since <enabled/>
        self.sm = False
        user = jid_user(user_id)
        self.sock.sendall(stream_open())
        self.expect(b"stream:features")
        self.sock.sendall(auth_plain(user, password(user_id)))
        got = self.expect(b"success", b"failure")
        if name(got) != b"success":
            raise XmppError(f"SASL PLAIN refused for {user}: {got[:200]!r}")
        self.split = Splitter()  # the stream restarts after SASL success
        self.sock.sendall(stream_open())
        self.expect(b"stream:features")
        self.sock.sendall(session_setup(resource, presence))
        self.expect(b"enabled")
        self.sm = True

    def items(self) -> list[bytes]:
        """The next items from the server; `<r/>` is answered and stanzas are counted once,
        when read."""
        if self.queue:
            out, self.queue = self.queue, []
            return out
        out: list[bytes] = []
        while not out:
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise ConnectionError("the XMPP server closed the connection")
            out = self.split.feed(chunk)
        answer = False
        for it in out:
            n = name(it)
            if n in STANZAS:
                if self.sm:
                    self.h_in += 1
            elif n == b"enabled":  # the server counts from here: so does the client
                self.sm = True
            elif n == b"r":
                answer = True
            elif n in (b"stream:error", b"/stream:stream"):
                raise XmppError(f"stream closed by the server: {it[:300]!r}")
        if answer:  # the count at the end of this batch covers every stanza before the <r/>
            self.sock.sendall(ack(self.h_in))
        return out

    def expect(self, *names: bytes) -> bytes:
        """The first item named one of `names` (others before it are dropped)."""
        while True:
            got = self.items()
            for i, it in enumerate(got):
                if name(it) in names:
                    self.queue = got[i + 1 :]
                    return it

    def close(self) -> None:
        """Acknowledge every stanza read (the server would store the unacknowledged ones
        offline again), then close the stream."""
        try:
            self.sock.sendall((ack(self.h_in) if self.sm else b"") + stream_close())
        except OSError:
            pass
        self.sock.close()


# --------------------------------------------------------------------------- offline drain


def _body_of(stanza: bytes) -> bytes | None:
    i = stanza.find(b"<body>")
    if i < 0:
        return None
    j = stanza.find(b"</body>", i)
    return stanza[i + 6 : j] if j >= 0 else None


def prefill(h: Any, sender: int, receiver: int, bodies: list[bytes], window: int) -> float:
    """Send `bodies` from `sender` to the offline `receiver`, each with `<r/>` after it, at
    most `window` unacknowledged (`<a h/>`); seconds taken."""
    t0 = time.perf_counter()
    to = f"{jid_user(receiver)}@{DOMAIN}"
    frames = [message(to, b, f"p{i}") + R for i, b in enumerate(bodies)]
    c = BlockingClient(h.host, h.port, sender, f"pre{sender}")
    n, sent, acked = len(frames), 0, 0
    try:
        while acked < n:
            if sent < n and sent - acked <= window // 2:
                top = min(n, acked + window)
                c.sock.sendall(b"".join(frames[sent:top]))
                sent = top
            for it in c.items():
                if name(it) == b"a":
                    got = attr(it, b"h")
                    if got is not None:  # its count includes our initial presence
                        acked = max(acked, int(got) - 1)
    finally:
        c.close()
    return round(time.perf_counter() - t0, 3)


def drain_once(h: Any, sender: int, receiver: int, n: int, window: int,
               chunk: int) -> dict[str, Any]:  # fmt: skip
    """`n` messages stored for `receiver` while it has never been online, then timed: its
    login (SASL PLAIN, bind, `<enable/>`, initial presence: ejabberd then sends what
    mod_offline holds) until the n-th message arrived, with the time of each `chunk`."""
    from relay import wait_idle
    from sync_pull import body, percentiles

    bodies = [body(i) for i in range(n)]
    prefill_s = prefill(h, sender, receiver, bodies, window)
    # what the last acknowledged sends started is done (the SQL writes, or mnesia's)
    idle_s = wait_idle(h, 60.0)
    got: list[bytes] = []
    t0 = time.perf_counter()
    c = BlockingClient(h.host, h.port, receiver, f"drain{receiver}")
    t_login = time.perf_counter()
    marks = [t_login]
    try:
        while len(got) < n:
            for it in c.items():
                if name(it) == b"message":
                    b = _body_of(it)
                    if b is not None:
                        got.append(b)
                        if len(got) % chunk == 0:
                            marks.append(time.perf_counter())
        t_end = time.perf_counter()
    finally:
        c.close()
    errors = []
    if got != bodies:
        lost = len(set(bodies) - set(got))
        errors.append(f"{len(got)} received, {lost} lost, in order: {got == bodies}")
    chunks = [b - a for a, b in itertools.pairwise(marks)]
    return {"total_s": round(t_end - t0, 4), "login_s": round(t_login - t0, 4),
            "chunks": len(chunks), "chunk": percentiles(chunks), "messages": len(got),
            "prefill_s": prefill_s, "idle_wait_s": idle_s, "ok": not errors,
            "errors": errors}  # fmt: skip


def offline_drain(config: str, n: int, window: int, runs: int) -> dict[str, Any]:
    """ejabberd in `config` (bench/ejabberd/<config>.yml): `runs` drains of n messages, each
    to a receiver that was never online (so no earlier run's leftovers reach it)."""
    import servers
    from sync_pull import PAGE_LIMIT

    base = 4000  # above the relay's and the closed loop's users
    h = servers.start_ejabberd(config, range(1, base + 2 * runs + 1))
    try:
        cpu0 = h.cpu_s()
        out = [drain_once(h, base + 2 * i + 1, base + 2 * i + 2, n, window, PAGE_LIMIT)
               for i in range(runs)]  # fmt: skip
        cpu = round(h.cpu_s() - cpu0, 2)
        rss = h.rss_kib()
    finally:
        h.stop()
    best = min(out, key=lambda r: r["total_s"])
    return {"messages": n, "chunk": PAGE_LIMIT, "runs": out, "best": best,
            "ok": all(r["ok"] for r in out), "server_cpu_s": cpu,
            "server_rss_kib": rss}  # fmt: skip


def run(config: str, quick: bool) -> dict[str, Any]:
    """bench/sync_pull.py's result shape (`offline_drain`, `history` None: MAM queries are
    not measured), for bench/run.py's sync scenario."""
    from sync_pull import DRAIN_RUNS, sizes

    z = sizes(quick)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"target": "ejabberd", "config": config, "quick": quick}
    out["offline_drain"] = offline_drain(config, z["drain"], z["drain_window"], DRAIN_RUNS)
    out["history"] = None
    out["elapsed_s"] = round(time.perf_counter() - t0, 2)
    return out


def main() -> None:
    import argparse
    import json
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    ap = argparse.ArgumentParser(description="ejabberd's offline drain (bench/run.py sync)")
    ap.add_argument("--config", choices=("archive", "routing"), default="routing")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    print(json.dumps(run(a.config, a.quick)))


if __name__ == "__main__":
    main()
