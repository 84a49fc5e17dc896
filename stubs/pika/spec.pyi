"""AMQP 0-9-1 methods and properties: only the fields improto reads."""

from typing import Any

from pika.delivery_mode import DeliveryMode

class BasicProperties:
    content_type: str | None
    delivery_mode: int | None
    message_id: str | None
    type: str | None
    headers: dict[str, Any] | None
    def __init__(
        self,
        content_type: str | None = None,
        content_encoding: str | None = None,
        headers: dict[str, Any] | None = None,
        delivery_mode: DeliveryMode | int | None = None,
        priority: int | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
        expiration: str | None = None,
        message_id: str | None = None,
        timestamp: int | None = None,
        type: str | None = None,
        user_id: str | None = None,
        app_id: str | None = None,
        cluster_id: str | None = None,
    ) -> None: ...

class Basic:
    class Deliver:
        consumer_tag: str
        delivery_tag: int
        redelivered: bool
        exchange: str
        routing_key: str

    class CancelOk:
        consumer_tag: str

class Queue:
    class DeclareOk:
        queue: str
        message_count: int
        consumer_count: int
