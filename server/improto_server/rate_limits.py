"""Per-user rate limits (PROTOCOL.md 9.4): token buckets in this gateway process's memory.

Each limit is a bucket per key holding at most `burst` tokens, refilled at `rate` per second;
a request costing `cost` is admitted when the bucket holds min(cost, burst) tokens, and then
takes all of `cost`. So one request dearer than the burst (a long message to a big group) is
still possible when the bucket is full: it leaves the bucket in debt, and the sender waits
for the refill.

A bucket is stored as the one time at which it will be full again (GCRA): a bucket that is
full is the same as no bucket, so only keys that used a limit within about burst/rate seconds
are held, and memory is bounded by `max_keys` per limit (the least recently used go first).
Forgetting a bucket only ever lets its key do more, never less.

The state is per gateway process: a user connected to N gateways gets up to N times the rates.
That is enough to stop one connection's flood, which is what the limits are for.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable

from twisted.internet.interfaces import IReactorTime

from improto_server.config import Config

DAY_S = 86_400.0
# Keys held per limit at most (each an OrderedDict entry and a float): past it the least
# recently used bucket is forgotten, which only ever errs towards admitting.
MAX_KEYS = 100_000
_PRUNE_STEP = 2  # least recently used entries looked at per take: drop them if full


class TokenBuckets:
    """One token bucket per key; rate <= 0 or burst <= 0 turns the limit off."""

    def __init__(
        self, rate: float, burst: float, clock: IReactorTime, *, max_keys: int = MAX_KEYS
    ) -> None:
        if rate < 0 or burst < 0 or not (math.isfinite(rate) and math.isfinite(burst)):
            raise ValueError(f"a rate limit needs rate >= 0 and burst >= 0, not {rate}/{burst}")
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self.rate = rate
        self.burst = burst
        self.enabled = rate > 0 and burst > 0
        self._clock = clock
        self._max_keys = max_keys
        # key -> the time (clock seconds) at which its bucket is full again; LRU order
        self._full_at: OrderedDict[Hashable, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._full_at)

    def level(self, key: Hashable) -> float:
        """The tokens `key`'s bucket holds now (negative: in debt)."""
        if not self.enabled:
            return self.burst
        full_at = self._full_at.get(key)
        if full_at is None:
            return self.burst
        return self.burst - max(0.0, full_at - self._clock.seconds()) * self.rate

    def wait(self, key: Hashable, cost: float) -> float:
        """Seconds until a request of `cost` would be admitted: 0.0 if it is now."""
        if not self.enabled:
            return 0.0
        missing = min(cost, self.burst) - self.level(key)
        return missing / self.rate if missing > 0 else 0.0

    def take(self, key: Hashable, cost: float) -> None:
        """Take `cost` tokens, admitted or not (the caller checked `wait`)."""
        if not self.enabled:
            return
        now = self._clock.seconds()
        full_at = max(now, self._full_at.pop(key, now)) + cost / self.rate
        if full_at > now:  # a full bucket is no bucket
            self._full_at[key] = full_at  # (re)inserted last: the most recently used
        self._prune(now)

    def try_take(self, key: Hashable, cost: float) -> float:
        """Take `cost` if admitted now and return 0.0; else take nothing and return the wait."""
        wait = self.wait(key, cost)
        if wait == 0.0:
            self.take(key, cost)
        return wait

    def give_back(self, key: Hashable, cost: float) -> None:
        """Undo a `take` of `cost` whose request did not happen after all."""
        if not self.enabled:
            return
        full_at = self._full_at.get(key)
        if full_at is None:
            return
        full_at -= cost / self.rate
        if full_at > self._clock.seconds():
            self._full_at[key] = full_at  # an existing key keeps its place in the LRU order
        else:
            del self._full_at[key]

    def _prune(self, now: float) -> None:
        items = self._full_at
        for _ in range(_PRUNE_STEP):  # the oldest buckets are the likeliest to be full
            if not items:
                break
            key, full_at = next(iter(items.items()))
            if full_at > now:
                break
            del items[key]
        while len(items) > self._max_keys:
            items.popitem(last=False)


class RateLimits:
    """The per-user limits the service enforces (config block "rates per user").

    Each check returns 0.0 when the request may go ahead (its tokens are taken then), or
    the seconds to wait before retrying (nothing taken)."""

    def __init__(self, config: Config, clock: IReactorTime, *, max_keys: int = MAX_KEYS) -> None:
        if config.added_by_others_per_day < 0:
            raise ValueError("added_by_others_per_day must be >= 0")
        self.sends = TokenBuckets(config.send_rate, config.send_burst, clock, max_keys=max_keys)
        self.send_bytes = TokenBuckets(
            config.send_bytes_rate, config.send_bytes_burst, clock, max_keys=max_keys
        )
        self.group_ops = TokenBuckets(
            config.group_op_rate, config.group_op_burst, clock, max_keys=max_keys
        )
        self.state_ops = TokenBuckets(
            config.state_op_rate, config.state_op_burst, clock, max_keys=max_keys
        )
        per_day = config.added_by_others_per_day
        self.added = TokenBuckets(per_day / DAY_S, per_day, clock, max_keys=max_keys)

    def send(self, user_id: int, group_members: int | None, receivers: int, size: int) -> float:
        """A SEND of `size` body bytes to `receivers` inboxes; `group_members` for a group
        SEND (it weighs 1 + members / 100), None for a user conversation (it weighs 1)."""
        weight = 1.0 if group_members is None else 1.0 + group_members / 100
        volume = float(size * receivers)
        wait = max(self.sends.wait(user_id, weight), self.send_bytes.wait(user_id, volume))
        if wait == 0.0:
            self.sends.take(user_id, weight)
            self.send_bytes.take(user_id, volume)
        return wait

    def group_op(self, user_id: int) -> float:
        """A GROUP_CREATE, GROUP_ADD or GROUP_REMOVE of others."""
        return self.group_ops.try_take(user_id, 1.0)

    def state_op(self, user_id: int) -> float:
        """A READ_MARK or CONV_HIDE (spec 18)."""
        return self.state_ops.try_take(user_id, 1.0)

    def add_others(self, users: Iterable[int]) -> int | None:
        """Count one more group that someone else adds each of `users` to: all of them, or
        (returning the first user whose daily allowance is spent) none of them."""
        todo = sorted(set(users))
        for user in todo:
            if self.added.wait(user, 1.0) > 0.0:
                return user
        for user in todo:
            self.added.take(user, 1.0)
        return None

    def not_added(self, users: Iterable[int]) -> None:
        """Give back `add_others` counts of users who were not added after all."""
        for user in set(users):
            self.added.give_back(user, 1.0)
