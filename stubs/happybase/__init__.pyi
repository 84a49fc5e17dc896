"""The part of happybase 1.3 that improto uses (Thrift1 connections, tables, batches)."""

from collections.abc import Generator, Iterable
from contextlib import AbstractContextManager
from typing import Any

DEFAULT_HOST: str
DEFAULT_PORT: int

# a row's cells: column ("family:qualifier") -> value
Row = dict[bytes, bytes]

class Connection:
    def __init__(
        self,
        host: str = ...,
        port: int = ...,
        timeout: int | None = None,
        autoconnect: bool = True,
        table_prefix: str | None = None,
        table_prefix_separator: bytes = b"_",
        compat: str = ...,
        transport: str = ...,
        protocol: str = ...,
    ) -> None: ...
    def open(self) -> None: ...
    def close(self) -> None: ...
    def table(self, name: str | bytes, use_prefix: bool = True) -> Table: ...
    def tables(self) -> list[bytes]: ...
    def create_table(self, name: str | bytes, families: dict[str, dict[str, Any]]) -> None: ...
    def delete_table(self, name: str | bytes, disable: bool = False) -> None: ...

class Table:
    name: bytes
    connection: Connection
    def __init__(self, name: bytes, connection: Connection) -> None: ...
    def put(
        self, row: bytes, data: Row, timestamp: int | None = None, wal: bool = True
    ) -> None: ...
    def batch(
        self,
        timestamp: int | None = None,
        batch_size: int | None = None,
        transaction: bool = False,
        wal: bool = True,
    ) -> Batch: ...
    def row(
        self,
        row: bytes,
        columns: Iterable[bytes] | None = None,
        timestamp: int | None = None,
        include_timestamp: bool = False,
    ) -> Row: ...
    def rows(
        self,
        rows: Iterable[bytes],
        columns: Iterable[bytes] | None = None,
        timestamp: int | None = None,
        include_timestamp: bool = False,
    ) -> list[tuple[bytes, Row]]: ...
    def scan(
        self,
        row_start: bytes | None = None,
        row_stop: bytes | None = None,
        row_prefix: bytes | None = None,
        columns: Iterable[bytes] | None = None,
        filter: bytes | str | None = None,
        timestamp: int | None = None,
        include_timestamp: bool = False,
        batch_size: int = 1000,
        scan_batching: int | None = None,
        limit: int | None = None,
        sorted_columns: bool = False,
        reverse: bool = False,
    ) -> Generator[tuple[bytes, Row]]: ...

class Batch:
    def put(self, row: bytes, data: Row, wal: bool | None = None) -> None: ...
    def send(self) -> None: ...

class NoConnectionsAvailable(RuntimeError): ...

class ConnectionPool:
    def __init__(
        self,
        size: int,
        *,
        host: str = ...,
        port: int = ...,
        timeout: int | None = None,
        autoconnect: bool = True,
        table_prefix: str | None = None,
    ) -> None: ...
    def connection(self, timeout: float | None = None) -> AbstractContextManager[Connection]: ...
