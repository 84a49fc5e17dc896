"""A transport's send buffer: how many bytes it holds that the kernel has not taken yet, and
closing it at once, dropping them.

The count reads state Twisted keeps private on `abstract.FileDescriptor` (`dataBuffer`,
`offset`, `_tempDataLen`, and a TLS transport's `_appSendBuffer`), unchanged since 2.x; a
transport without it, or should it ever change, gives None.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import abstract
from twisted.internet.interfaces import ITransport


def queued_bytes(transport: object) -> int | None:
    """Bytes written to `transport` that the kernel has not taken yet, where the transport
    tells (TCP or unix sockets, and TLS over them); None where it does not."""
    try:
        if isinstance(transport, abstract.FileDescriptor):
            t: Any = transport  # its buffer is private state, kept since Twisted 2.x
            return len(t.dataBuffer) - t.offset + t._tempDataLen
        inner: Any = getattr(transport, "transport", None)  # TLS: the socket under it
        if isinstance(inner, abstract.FileDescriptor):
            app = getattr(transport, "_appSendBuffer", ())  # written before the handshake
            return len(inner.dataBuffer) - inner.offset + inner._tempDataLen + sum(map(len, app))
    except (AttributeError, TypeError):
        pass
    return None


def abort_transport(transport: ITransport) -> None:
    """Close now, dropping what is queued (ITCPTransport.abortConnection where there is one)."""
    getattr(transport, "abortConnection", transport.loseConnection)()
