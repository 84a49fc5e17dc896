"""Sessions over in-memory transports: a `Peer` talking to a SessionFactory's Session on a
StringTransport, the factory and the fake reactor clock (session, prelogin and flow-control
tests)."""

from __future__ import annotations

from typing import Any

from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport

from improto.codec import FrameReader, decode_payload, encode
from improto.frames import Frame, Hello, HelloOk
from improto.tokens import mint
from improto_server.config import Config
from improto_server.hub import Hub
from improto_server.session import Session, SessionFactory
from tests.support.waiting import eventually, sleep

NOW = 1_800_000_000.0  # the clock's start (seconds), and the tokens' issue time


def fake_clock(now: float = NOW) -> Clock:
    c = Clock()
    c.advance(now)
    return c


def session_factory(
    config: Config, clock: Clock, secret: str, service: Any = None
) -> SessionFactory:
    """A factory with its own Hub; `service` None when the test never reaches storage."""
    return SessionFactory(config, service, Hub(), clock, secret)


class Peer:
    """One connection from `host`: a Session on a StringTransport, with helpers to talk to it
    (tokens minted with the factory's secret at NOW)."""

    def __init__(self, factory: SessionFactory, host: str = "192.0.2.1") -> None:
        self.session: Session = factory.buildProtocol(None)
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", host, 40000))
        self.session.makeConnection(self.transport)
        self.reader = FrameReader()
        self.secret = factory.secret

    def send(self, *data: Frame | bytes) -> None:
        """Frames (or raw bytes) written in one read."""
        self.session.dataReceived(b"".join(d if isinstance(d, bytes) else encode(d) for d in data))

    def frames(self) -> list[Frame]:
        """Every frame written to the peer since the last call."""
        data = self.transport.value()
        self.transport.clear()
        return [decode_payload(p) for p in self.reader.feed(data)]

    def hello(self, user: int = 7, device: str = "phone", ttl: float = 3600) -> list[Frame]:
        """A HELLO with a valid token (request_id 1), and the frames it got back."""
        token = mint(self.secret, user, device, ttl_s=ttl, now=NOW)
        self.send(Hello(1, 1, device, token, request_id=1))
        return self.frames()

    def login(self, user: int = 7, device: str = "phone", ttl: float = 3600) -> HelloOk:
        (ok,) = self.hello(user, device, ttl)
        assert isinstance(ok, HelloOk), ok
        return ok

    @property
    def closed(self) -> bool:
        return bool(self.transport.disconnecting)

    @property
    def reading(self) -> bool:
        return self.transport.producerState == "producing"


def logged_in(
    factory: SessionFactory, user: int = 7, device: str = "phone", ttl: float = 3600
) -> Peer:
    """A new Peer past HELLO_OK."""
    peer = Peer(factory)
    peer.login(user, device, ttl)
    return peer


async def replies(peer: Peer, n: int = 1) -> list[Frame]:
    """The next `n` frames (or more, if they came together) the peer gets, waiting on the
    reactor for them (sessions whose storage answers there)."""
    got: list[Frame] = []

    def arrived() -> bool:
        got.extend(peer.frames())
        return len(got) >= n

    await eventually(arrived)
    return got


async def advance(clock: Clock, seconds: float, steps: int = 1) -> None:
    """The fake clock moves on in `steps`; the storage reads its timers start finish on the
    reactor after each."""
    for _ in range(steps):
        clock.advance(seconds / steps)
        await sleep(0.02)
