"""The "physical limit" relay: length-prefixed frames routed by a 9-byte header, nothing else.

    python bench/bare_relay.py --port P [--host 127.0.0.1] [--nodelay]

Frames are u32 big-endian length + payload in both directions. The first frame of a connection
is LOGIN: u64 user_id + u64 group_id (0: none); a later login of the same user replaces the
registration. Every later frame is u8 kind + u64 target + anything: kind 1 goes to user
`target`, kind 2 to every connection of group `target` but the sender, kind 0 (heartbeat) is
ignored; unknown targets are dropped. Received frame bytes are written through unchanged (no
re-encoding, no acks, no storage). Payloads over 131072 bytes close the connection.
"""

from __future__ import annotations

import argparse
import contextlib
import resource
import struct

from twisted.internet import protocol

MAX_PAYLOAD = 131072
LOGIN_SIZE = 16
HEADER_SIZE = 9  # u8 kind + u64 target
KIND_HEARTBEAT, KIND_USER, KIND_GROUP = 0, 1, 2
_LEN = struct.Struct(">I")
_LOGIN = struct.Struct(">QQ")
_TARGET = struct.Struct(">Q")


class Relay(protocol.Protocol):
    """One connection. Whole frames are cut from each read without copying the read; only a
    trailing partial frame is kept, in a bytearray that grows until the frame is complete."""

    def __init__(self, users: dict[int, Relay], groups: dict[int, set[Relay]], nodelay: bool):
        self.users = users
        self.groups = groups
        self.nodelay = nodelay
        self.user_id = 0  # 0: not logged in yet
        self.group_id = 0
        self._buf = bytearray()
        self._need = 0  # bytes the partial frame in _buf needs before it can be cut

    def connectionMade(self) -> None:
        if self.nodelay:
            self.transport.setTcpNoDelay(True)

    def dataReceived(self, data: bytes) -> None:
        buf = self._buf
        if buf:
            buf += data
            if len(buf) < self._need:
                return
            data = bytes(buf)
            buf.clear()
        size = len(data)
        pos = 0
        while size - pos >= 4:
            length = _LEN.unpack_from(data, pos)[0]
            if length > MAX_PAYLOAD:
                self.transport.loseConnection()
                return
            end = pos + 4 + length
            if end > size:
                self._need = end - pos
                break
            if not self._frame(data if pos == 0 and end == size else data[pos:end], length):
                self.transport.loseConnection()
                return
            pos = end
        else:
            self._need = 4
        if pos < size:
            buf += memoryview(data)[pos:]

    def _frame(self, frame: bytes, length: int) -> bool:
        """Route one frame (prefix included); False: malformed, close."""
        if not self.user_id:
            return length >= LOGIN_SIZE and self._login(frame)
        if length < HEADER_SIZE:
            return False
        kind = frame[4]
        if kind == KIND_USER:
            peer = self.users.get(_TARGET.unpack_from(frame, 5)[0])
            if peer is not None:
                peer.transport.write(frame)
        elif kind == KIND_GROUP:
            members = self.groups.get(_TARGET.unpack_from(frame, 5)[0])
            if members:
                for peer in members:
                    if peer is not self:
                        peer.transport.write(frame)
        return True

    def _login(self, frame: bytes) -> bool:
        user_id, group_id = _LOGIN.unpack_from(frame, 4)
        if not user_id:
            return False
        self.user_id, self.group_id = user_id, group_id
        old = self.users.get(user_id)
        if old is not None and old is not self:
            old._leave_group()
            old.user_id = -1  # logged in but unregistered: its frames still route
        self.users[user_id] = self
        if group_id:
            self.groups.setdefault(group_id, set()).add(self)
        return True

    def _leave_group(self) -> None:
        members = self.groups.get(self.group_id)
        if members is not None:
            members.discard(self)
            if not members:
                del self.groups[self.group_id]
        self.group_id = 0

    def connectionLost(self, reason: object = None) -> None:
        if self.user_id and self.users.get(self.user_id) is self:
            del self.users[self.user_id]
        self._leave_group()


class RelayFactory(protocol.Factory):
    def __init__(self, nodelay: bool = False) -> None:
        self.users: dict[int, Relay] = {}
        self.groups: dict[int, set[Relay]] = {}
        self.nodelay = nodelay

    def buildProtocol(self, addr: object) -> Relay:
        return Relay(self.users, self.groups, self.nodelay)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--nodelay", action="store_true", help="TCP_NODELAY on connections")
    args = parser.parse_args(argv)
    from twisted.internet import epollreactor

    epollreactor.install()  # before the first reactor import; tests import this module without
    from twisted.internet import reactor

    with contextlib.suppress(ValueError, OSError):
        hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    reactor.listenTCP(args.port, RelayFactory(args.nodelay), backlog=4096, interface=args.host)
    print(f"bare relay listening on {args.host}:{args.port}", flush=True)
    reactor.run()


if __name__ == "__main__":
    main()
