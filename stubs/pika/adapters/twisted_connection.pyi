"""pika's Twisted adapter: Deferred-returning channel methods, deliveries in a queue."""

from typing import Any, NamedTuple

from pika import spec
from pika.connection import Parameters
from pika.frame import Method

from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure

class ReceivedMessage(NamedTuple):
    channel: TwistedChannel
    method: spec.Basic.Deliver
    properties: spec.BasicProperties
    body: bytes

class ClosableDeferredQueue(DeferredQueue[ReceivedMessage]):
    """A consumer's deliveries; closed (every get() fails) when the consumer ends."""

    closed: Exception | None
    def get(self) -> Deferred[ReceivedMessage]: ...
    def close(self, reason: Exception | None) -> None: ...

class TwistedChannel:
    on_closed: Deferred[Any]
    @property
    def channel_number(self) -> int: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def is_closed(self) -> bool: ...
    @property
    def is_closing(self) -> bool: ...
    def basic_ack(self, delivery_tag: int = 0, multiple: bool = False) -> None: ...
    def basic_nack(
        self, delivery_tag: int = 0, multiple: bool = False, requeue: bool = True
    ) -> None: ...
    def basic_cancel(self, consumer_tag: str = "") -> Deferred[Any]: ...
    def basic_consume(
        self,
        queue: str,
        auto_ack: bool = False,
        exclusive: bool = False,
        consumer_tag: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Deferred[tuple[ClosableDeferredQueue, str]]: ...
    def basic_publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        properties: spec.BasicProperties | None = None,
        mandatory: bool = False,
    ) -> Deferred[Any]:
        """In confirm mode, fires on the broker's Basic.Ack (errback: nack or return)."""
    def basic_qos(
        self, prefetch_size: int = 0, prefetch_count: int = 0, global_qos: bool = False
    ) -> Deferred[Any]: ...
    def close(self, reply_code: int = 0, reply_text: str = "Normal shutdown") -> None: ...
    def confirm_delivery(self) -> Deferred[Any]: ...
    def exchange_declare(
        self,
        exchange: str,
        exchange_type: str = "direct",
        passive: bool = False,
        durable: bool = False,
        auto_delete: bool = False,
        internal: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Deferred[Any]: ...
    def queue_bind(
        self,
        queue: str,
        exchange: str,
        routing_key: str | None = None,
        arguments: dict[str, Any] | None = None,
    ) -> Deferred[Any]: ...
    def queue_declare(
        self,
        queue: str,
        passive: bool = False,
        durable: bool = False,
        exclusive: bool = False,
        auto_delete: bool = False,
        arguments: dict[str, Any] | None = None,
    ) -> Deferred[Method[spec.Queue.DeclareOk]]: ...
    def queue_delete(
        self, queue: str, if_unused: bool = False, if_empty: bool = False
    ) -> Deferred[Any]: ...

class TwistedProtocolConnection(Protocol):
    # fires once the AMQP handshake is done (then becomes None); errbacks if it fails
    ready: Deferred[Any] | None
    closed: Deferred[Any] | None
    def __init__(
        self, parameters: Parameters | None = None, custom_reactor: Any = None
    ) -> None: ...
    def channel(self, channel_number: int | None = None) -> Deferred[TwistedChannel]: ...
    @property
    def is_open(self) -> bool: ...
    @property
    def is_closed(self) -> bool: ...
    def close(
        self, reply_code: int = 200, reply_text: str = "Normal shutdown"
    ) -> Deferred[Any] | None: ...
    def connectionLost(self, reason: Failure = ...) -> None: ...
