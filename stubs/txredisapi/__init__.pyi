"""The part of txredisapi 1.6 that improto uses (connection pools with raw replies)."""

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import ITransport
from twisted.internet.protocol import Factory, Protocol

class RedisError(Exception): ...
class ConnectionError(RedisError): ...
class ResponseError(RedisError): ...
class TimeoutError(ConnectionError): ...

class BaseRedisProtocol(Protocol):
    charset: str | None
    transport: ITransport | None
    def __init__(
        self,
        charset: str | None = "utf-8",
        errors: str = "strict",
        replyTimeout: float | None = None,
        password: str | None = None,
        dbid: int | None = None,
        convertNumbers: bool = True,
        username: str | None = None,
    ) -> None: ...
    def connectionMade(self) -> Any: ...
    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]: ...

class RedisProtocol(BaseRedisProtocol): ...

class RedisFactory(Factory):
    protocol: type[BaseRedisProtocol]
    charset: str | None
    def disconnect(self) -> Deferred[None]: ...

class ConnectionHandler:
    """A connection or pool: every Redis command is an attribute (`execute_command` here)."""

    _factory: RedisFactory
    def disconnect(self) -> Deferred[None]: ...
    def execute_command(self, *args: Any, **kwargs: Any) -> Deferred[Any]: ...

def lazyConnectionPool(
    host: str = "localhost",
    port: int = 6379,
    dbid: int | None = None,
    poolsize: int = 10,
    reconnect: bool = True,
    charset: str | None = "utf-8",
    password: str | None = None,
    ssl_context_factory: Any = False,
    connectTimeout: float | None = None,
    replyTimeout: float | None = None,
    convertNumbers: bool = True,
    username: str | None = None,
) -> ConnectionHandler: ...
