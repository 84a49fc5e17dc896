"""Coroutines behind Deferred-returning methods.

The storage ports return Deferreds (callers on the hot path chain them without a coroutine
frame of their own); implementations that are easier to write as coroutines are decorated with
`as_deferred` instead of a public `x()` wrapping a private `async def _x()`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from twisted.internet.defer import Deferred

_P = ParamSpec("_P")
_T = TypeVar("_T")


def as_deferred(fn: Callable[_P, Coroutine[Any, Any, _T]]) -> Callable[_P, Deferred[_T]]:
    """`fn`, returning a Deferred of its coroutine's result (started at once)."""

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> Deferred[_T]:
        return Deferred.fromCoroutine(fn(*args, **kwargs))

    return wrapper
