"""Write to a TCP socket at once when nothing is queued, instead of on the next reactor turn.

Twisted's `transport.write` only queues: it registers the socket for writability
(`epoll_ctl`), and a later reactor turn sends and unregisters it again. For a server that
writes one small frame to each of many connections (a PUSH to 500 group members, a SEND_ACK
and a PUSH per 1:1 message) that costs two extra system calls and one reactor dispatch per
frame. When the transport has nothing queued, sending right away keeps the byte order and
skips all three; whatever the kernel does not take is queued the usual way.

Only plain TCP transports qualify (TLS has its own buffering); anything else gets its own
`write`. The check reads `tcp.Connection` attributes Twisted has kept since 2.x
(`dataBuffer`, `_tempDataBuffer`, `socket`); if they ever change, `eager_writer` falls back.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import tcp


def eager_writer(transport: Any) -> Callable[[bytes], None]:
    """A `write(data)` for `transport`: immediate when possible, else `transport.write`."""
    if not isinstance(transport, tcp.Connection) or not all(
        hasattr(transport, a) for a in ("dataBuffer", "_tempDataBuffer", "socket")
    ):
        return transport.write  # type: ignore[no-any-return]
    sock = transport.socket
    queue = transport.write

    def write(data: bytes) -> None:
        t = transport
        if t.dataBuffer or t._tempDataBuffer or not t.connected or t.disconnecting:
            queue(data)  # keep order behind queued bytes; closing: Twisted drops it
            return
        try:
            sent = sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError:
            queue(data)  # let Twisted meet the error on its write and close the connection
            return
        if sent < len(data):
            queue(data[sent:])

    return write
