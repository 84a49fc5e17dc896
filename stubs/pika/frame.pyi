from typing import Generic, TypeVar

_M = TypeVar("_M")

class Method(Generic[_M]):
    channel_number: int
    method: _M
