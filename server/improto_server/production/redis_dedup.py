"""The dedup keys of the persist queue in Redis: one accept per (sender, client_msg_id).

One hash per key, TTL `ttl_ms` from the first accept:

    P:dedup:{s<sender>}:<client_msg_id hex>   (the {s<sender>} hash tag keeps a sender's keys
                                               in one Redis Cluster slot)
        state   pending | failed | confirmed
        msg_id  server_time   the ids of the message accepted for this key (decimal)
        job     PersistJob.to_bytes() of that message (dropped once confirmed)
        owner   unique token of the accept that is publishing it (while pending)
        at      when the current owner claimed it, ms (while pending/failed)

    accept:  CLAIM (one Lua script) -> publish -> wait for the broker confirm -> CONFIRM
    CLAIM    no key:      create it pending, owned by this accept, and publish our job;
             confirmed:   a duplicate: return the stored ids, publish nothing;
             failed, or pending for `stale_ms` (its publisher died or hangs):
                          take it over and re-publish the STORED job (same msg_id), then
                          return the stored ids with duplicate=True;
             pending and younger: poll until it is confirmed, failed, stale or gone.
    failure  never handed to the broker: delete the key if it is still pending and ours, so
             the retry is a fresh accept; handed over but not confirmed (nack, return,
             connection lost, confirm timeout): the outcome is unknown, so mark it failed (if
             still pending and ours) and keep the job: the retry re-publishes the same message
             instead of accepting a second msg_id.

"Pending" timestamps come from the Redis server clock (TIME in the script), one clock for
every gateway, unless the accept passes its own (tests).

What a gateway crash at each step leaves behind (the client did not get its ack unless the
last step completed, and retries with the same client_msg_id):

    before CLAIM                  nothing; the retry is a fresh accept.
    after CLAIM, before publish   a pending key, nothing queued. The retry waits until the key
                                  is stale, re-publishes the stored job, returns its ids.
    after publish, before confirm maybe queued. The retry re-publishes the same job: at worst
                                  two copies of one msg_id are queued.
    after confirm, before CONFIRM queued; key pending. As above (a second copy at worst).
    after CONFIRM, before the ack the retry gets the stored ids, duplicate=True.

So no acknowledged message is lost (the ack waits for the broker confirm), and receivers see
no duplicate: every copy of a message carries the same msg_id and the persister's writes are
idempotent per msg_id (inbox per (user, msg_id), history per msg_id). A client that never
retries after a failed accept was never acknowledged, and the pending key expires with the TTL.
What Redis does not persist (a crash without AOF) loses dedup keys: run it with appendonly
yes, appendfsync always.

Group commit: claims go out as one script call per batch, adaptive (a claim with no call
running and none started in the last CLAIM_SPACING_S goes at the end of its turn; under load
the claims gathered meanwhile go together, at most one call per spacing), and the confirms of
one reactor turn as another, split by slot when `cluster` (docs/BENCHMARKS.md,
"Optimisations").
"""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import Logger

from improto_server.config import DAY_MS
from improto_server.deferreds import as_deferred
from improto_server.production.redis_connection import LuaScript, RedisClient, gather, text
from improto_server.production.redis_slots import slot_groups
from improto_server.reactor_types import IServerReactor
from improto_server.turn_batcher import TurnBatcher

_log = Logger()

DEDUP_TTL_MS = 7 * DAY_MS
STALE_PENDING_MS = 10_000  # a pending dedup key this old: its publisher is presumed dead
CLAIM_SPACING_S = 0.001  # under load, claim calls start at most this often
SCRIPT_BATCH = 256  # dedup keys one claim or confirm script call handles at most
SERVER_CLOCK = -1  # a claim's `now` that means: the Redis server's clock

# KEYS: dedup keys. ARGV: stale_ms, ttl_ms, then per key: token, now_ms (< 0: Redis TIME),
# msg_id, server_time, job. One reply per key, in order. Ids stay strings: u64 do not fit Lua's
# doubles. Keys are handled one after the other, so the same key twice behaves as two calls.
_CLAIM = LuaScript(
    """
local stale, ttl = tonumber(ARGV[1]), ARGV[2]
local clock = nil
local out = {}
for i = 1, #KEYS do
  local a = 2 + 5 * (i - 1)
  local key, token, now = KEYS[i], ARGV[a + 1], tonumber(ARGV[a + 2])
  if now < 0 then
    if not clock then
      local t = redis.call('TIME')
      clock = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
    end
    now = clock
  end
  local cur = redis.call('HMGET', key, 'state', 'at', 'msg_id', 'time', 'job')
  if not cur[1] then
    redis.call('HSET', key, 'state', 'pending', 'owner', token, 'at', now,
               'msg_id', ARGV[a + 3], 'time', ARGV[a + 4], 'job', ARGV[a + 5])
    redis.call('PEXPIRE', key, ttl)
    out[i] = {'new'}
  elseif cur[1] == 'confirmed' then
    out[i] = {'confirmed', cur[3], cur[4]}
  elseif cur[1] == 'failed' or now - tonumber(cur[2] or '0') >= stale then
    redis.call('HSET', key, 'state', 'pending', 'owner', token, 'at', now)
    out[i] = {'takeover', cur[3], cur[4], cur[5]}
  else
    out[i] = {'wait', cur[3], cur[4]}
  end
end
return out
"""
)

# KEYS[1] dedup key. ARGV: token, "delete" | "fail". Only while pending and ours.
_RELEASE = LuaScript(
    """
if redis.call('HGET', KEYS[1], 'owner') ~= ARGV[1] then return 0 end
if redis.call('HGET', KEYS[1], 'state') ~= 'pending' then return 0 end
if ARGV[2] == 'delete' then
  redis.call('DEL', KEYS[1])
else
  redis.call('HSET', KEYS[1], 'state', 'failed')
  redis.call('HDEL', KEYS[1], 'owner')
end
return 1
"""
)

# KEYS: dedup keys. ARGV: the msg_id of each. The broker confirmed a copy of these messages.
_CONFIRM = LuaScript(
    """
local out = {}
for i = 1, #KEYS do
  out[i] = 0
  if redis.call('HGET', KEYS[i], 'msg_id') == ARGV[i] then
    redis.call('HSET', KEYS[i], 'state', 'confirmed')
    redis.call('HDEL', KEYS[i], 'owner', 'at', 'job')
    out[i] = 1
  end
end
return out
"""
)

SCRIPTS = (_CLAIM, _RELEASE, _CONFIRM)

# (key, token, now, msg_id, server_time, job) and (key, msg_id): a script's key, then its ARGV
_ClaimArgs = tuple[str, str, int, int, int, bytes]
_ConfirmArgs = tuple[str, int]


@dataclass(frozen=True, slots=True)
class Claim:
    """What CLAIM found. `new`: the key is ours, publish our job. `confirmed`: a duplicate of
    msg_id. `takeover`: the key is ours, re-publish `job` (the stored one, of msg_id).
    `wait`: another accept is publishing msg_id."""

    kind: str
    msg_id: int = 0
    server_time: int = 0
    job: bytes = b""


def _claim_of(reply: list[Any]) -> Claim:
    kind = text(reply[0])
    if kind == "new":
        return Claim(kind)
    job = bytes(reply[3]) if kind == "takeover" else b""
    return Claim(kind, int(reply[1]), int(reply[2]), job)


class DedupKeys:
    """The dedup keys under `prefix`, with claims and confirms batched (group commit)."""

    def __init__(
        self,
        redis: RedisClient,
        prefix: str,
        reactor: IServerReactor,
        *,
        ttl_ms: int = DEDUP_TTL_MS,
        stale_ms: int = STALE_PENDING_MS,
        cluster: bool = False,
    ) -> None:
        self._redis = redis
        self._key_base = f"{prefix}:dedup:"
        self.stale_ms = stale_ms
        self._claim_head = [stale_ms, ttl_ms]  # the ARGV of CLAIM before the keys' own
        self._cluster = cluster
        self._claims: TurnBatcher[_ClaimArgs, Claim] = TurnBatcher(
            reactor, self._run_claims, SCRIPT_BATCH, CLAIM_SPACING_S, adaptive=True
        )
        self._confirms: TurnBatcher[_ConfirmArgs, Any] = TurnBatcher(
            reactor, self._run_confirms, SCRIPT_BATCH
        )
        # Claim owner tokens: unique per process (random base) and per accept (counter).
        self._token_base = uuid.uuid4().hex[:16] + "-"
        self._tokens = itertools.count()

    def key(self, sender_id: int, client_msg_id: bytes) -> str:
        return f"{self._key_base}{{s{sender_id}}}:{client_msg_id.hex()}"

    def token(self) -> str:
        """A new owner token: one per accept."""
        return f"{self._token_base}{next(self._tokens)}"

    @as_deferred
    async def load(self) -> None:
        """Load the scripts (which also proves Redis answers)."""
        for script in SCRIPTS:
            await script.load(self._redis)

    def claim(
        self, key: str, token: str, now: int, msg_id: int, server_time: int, job: bytes
    ) -> Deferred[Claim]:
        """CLAIM `key` for `token` with this message; `now` is SERVER_CLOCK or ms."""
        return self._claims.submit((key, token, now, msg_id, server_time, job))

    def confirm(self, key: str, msg_id: int) -> Deferred[Any]:
        """CONFIRM: the broker confirmed a copy of msg_id (no-op if the key holds another)."""
        return self._confirms.submit((key, msg_id))

    @as_deferred
    async def release(self, key: str, token: str, *, delete: bool) -> None:
        """Give a claim up: delete the key (nothing was published) or mark it failed (the
        outcome is unknown). Only while it is pending and ours; a failure is logged."""
        try:
            await _RELEASE(self._redis, [key], [token, "delete" if delete else "fail"])
        except Exception:
            _log.failure("releasing dedup key {key} failed", key=key)

    def _run_claims(self, items: list[_ClaimArgs]) -> Deferred[list[Claim]]:
        d = self._multi(_CLAIM, items, self._claim_head)
        return d.addCallback(lambda replies: [_claim_of(r) for r in replies])

    def _run_confirms(self, items: list[_ConfirmArgs]) -> Deferred[list[Any]]:
        return self._multi(_CONFIRM, items, [])

    @as_deferred
    async def _multi(
        self, script: LuaScript, items: Sequence[tuple[Any, ...]], head: list[Any]
    ) -> list[Any]:
        """Run `script` over items (key first, then its ARGV) with as few calls as the slots
        allow; one reply per item, in order."""
        indexed = list(enumerate(items))
        groups = slot_groups(indexed, lambda pair: pair[1][0], self._cluster)
        calls = [
            script(
                self._redis,
                [item[0] for _, item in group],
                head + [arg for _, item in group for arg in item[1:]],
            )
            for group in groups
        ]
        out: list[Any] = [None] * len(items)
        for group, replies in zip(groups, await gather(calls), strict=True):
            for (i, _), reply in zip(group, replies, strict=True):
                out[i] = reply
        return out
