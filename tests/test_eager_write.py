"""eager_writer: bytes arrive complete and in order over real loopback TCP, whether the
kernel takes them at once, in part, or not at all; other transports keep their write."""

from __future__ import annotations

import pytest_twisted

from twisted.internet import defer, protocol, reactor
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport

from improto_server.eager_write import eager_writer


class _Collect(protocol.Protocol):
    def __init__(self, want: int) -> None:
        self.want, self.got = want, bytearray()
        self.done: defer.Deferred[bytes] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.got += data
        if len(self.got) >= self.want and not self.done.called:
            self.done.callback(bytes(self.got))


class _Writer(protocol.Protocol):
    def __init__(self, chunks: list[bytes]) -> None:
        self.chunks = chunks
        self.immediate: list[bool] = []

    def connectionMade(self) -> None:
        write = eager_writer(self.transport)
        assert write != self.transport.write  # a TCP transport gets the eager path
        for chunk in self.chunks:
            write(chunk)
            self.immediate.append(
                not self.transport.dataBuffer and not self.transport._tempDataBuffer
            )


@pytest_twisted.ensureDeferred
async def test_order_and_completeness_over_tcp() -> None:
    # small frames, then 8 MiB the socket buffer cannot take at once, then small ones again:
    # the tail must queue behind the unsent part of the big write, never jump ahead of it.
    chunks = [b"a%05d" % i for i in range(100)] + [bytes(range(256)) * 32768]
    chunks += [b"z%05d" % i for i in range(100)]
    expected = b"".join(chunks)
    collect = _Collect(len(expected))
    listening = reactor.listenTCP(0, protocol.Factory.forProtocol(lambda: collect),
                                  interface="127.0.0.1")  # fmt: skip
    writer = _Writer(chunks)
    try:
        port = listening.getHost().port
        await protocol.ClientCreator(reactor, lambda: writer).connectTCP("127.0.0.1", port)
        got = await collect.done
    finally:
        await listening.stopListening()
        if writer.transport is not None:
            writer.transport.loseConnection()
        await deferLater(reactor, 0, lambda: None)
    assert got == expected
    assert all(writer.immediate[:100])  # the small leading frames went out at once
    assert not writer.immediate[100]  # the big one did not fit: its rest was queued


def test_other_transports_keep_their_write() -> None:
    t = StringTransport()
    write = eager_writer(t)
    write(b"abc")
    assert t.value() == b"abc"
    assert write == t.write
