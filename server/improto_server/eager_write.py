"""Write to a TCP socket at once when nothing is queued, instead of on the next reactor turn.

Twisted's `transport.write` only queues: it registers the socket for writability
(`epoll_ctl`), and a later reactor turn sends and unregisters it again. For a server that
writes one small frame to each of many connections (a PUSH to 500 group members, a SEND_ACK
and a PUSH per 1:1 message) that costs two extra system calls and one reactor dispatch per
frame. When the transport has nothing queued, sending right away keeps the byte order and
skips all three; whatever the kernel does not take is queued the usual way.

Only plain TCP transports qualify (TLS has its own buffering); anything else gets its own
`write`. The check reads `tcp.Connection` attributes Twisted has kept since 2.x
(`dataBuffer`, `_tempDataBuffer`, `socket`); if they ever change, `eagerly_writable` says
no and the transport's own `write` is used.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

from twisted.internet import tcp
from twisted.internet.interfaces import ITransport


def eagerly_writable(transport: object) -> bool:
    """Whether `write_eagerly` may be used on `transport` (plain TCP with the expected state)."""
    return isinstance(transport, tcp.Connection) and all(
        hasattr(transport, a) for a in ("dataBuffer", "_tempDataBuffer", "socket")
    )


def write_eagerly(t: Any, data: bytes) -> None:  # Any: tcp.Connection's private state
    """Send `data` on an `eagerly_writable` transport now if nothing is queued, else queue it.

    A module function, not a closure per connection: an idle connection costs no extra objects.
    """
    if t.dataBuffer or t._tempDataBuffer or not t.connected or t.disconnecting:
        t.write(data)  # keep order behind queued bytes; closing: Twisted drops it
        return
    try:
        sent = t.socket.send(data)
    except BlockingIOError:
        sent = 0
    except OSError:
        t.write(data)  # let Twisted meet the error on its write and close the connection
        return
    if sent < len(data):
        t.write(data[sent:])


def eager_writer(transport: ITransport) -> Callable[[bytes], None]:
    """A `write(data)` for `transport`: immediate when possible, else `transport.write`."""
    if not eagerly_writable(transport):
        return transport.write
    return partial(write_eagerly, transport)
