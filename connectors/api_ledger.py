"""The API's Redis steps around producing a request, each one script call for every request that reaches it in the
same turn of the event loop:

- `admit`: take one token from the tenant's bucket and one from its daily quota (on Redis's clock, so API hosts
  whose clocks differ agree), and, when both allow it, claim the request id with the body's fingerprint
  (`SET NX`), answering the claim that was there before, if any;
- `mark_produced`: after Kafka acknowledged the request, mark its claim produced and add it to the tenant's task
  index (a sorted set trimmed to its newest entries).

Batching matters because the Redis client's Python side, not Redis, is what each call costs: one call for 30
requests costs about as much as one call for one. A batch's outcome is each request's own; nothing is taken from
a budget unless both of its buckets allow it.

Redis down is not the caller's fault: `admit` then answers allowed and unchecked (`unavailable`), `mark_produced`
raises StoreUnavailable, and Redis is left alone for a few seconds, so an outage costs one timeout, not one per
request. Multi-key scripts need every key on one Redis node: this is a single-node (or replicated) Redis.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import redis
import redis.asyncio as aredis

from connectors.api_store import StoreUnavailable
from connectors.redis_store import key_part

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0
MAX_BATCH = 256  # requests per script call: bounds how long Redis runs one script

# KEYS: per request, its tenant's limit hash {tokens, ts, day, used} and its claim key ('' claims nothing).
# ARGV: per request, rate per second, burst, daily quota, cost, claim value, claim TTL in ms.
# Returns per request {allowed (1/0), wait in ms, reason, the claim held before ('' when none)}.
ADMIT_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / 86400000)
local day_left = 86400000 - (now % 86400000)
local out = {}
for i = 1, #KEYS / 2 do
  local bucket, claim = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 6 * (i - 1)
  local rate, burst = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local quota, cost = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local state = redis.call('HMGET', bucket, 'tokens', 'ts', 'day', 'used')
  local tokens = tonumber(state[1]) or burst
  local ts = tonumber(state[2]) or now
  local used = tonumber(state[4]) or 0
  if tonumber(state[3]) ~= day then used = 0 end
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if used + cost > quota then
    out[i] = {0, day_left, 'quota', ''}
  elseif tokens < cost then
    out[i] = {0, math.ceil((cost - tokens) * 1000 / rate), 'rate', ''}
  else
    redis.call('HSET', bucket, 'tokens', tostring(tokens - cost), 'ts', now, 'day', day, 'used', used + cost)
    redis.call('PEXPIRE', bucket, day_left + 60000)
    local before = ''
    if claim ~= '' then
      before = redis.call('GET', claim) or ''
      if before == '' then redis.call('SET', claim, ARGV[a + 5], 'PX', ARGV[a + 6]) end
    end
    out[i] = {1, 0, 'ok', before}
  end
end
return out
"""

# KEYS: per request, its claim key and its tenant's index. ARGV: per request, the claim's value and TTL in ms,
# the index member and score, how many index entries to keep, the index's TTL in ms. An existing member keeps its
# first score.
MARK_LUA = """
for i = 1, #KEYS / 2 do
  local claim, index = KEYS[2 * i - 1], KEYS[2 * i]
  local a = 6 * (i - 1)
  redis.call('SET', claim, ARGV[a + 1], 'PX', ARGV[a + 2])
  redis.call('ZADD', index, 'NX', ARGV[a + 4], ARGV[a + 3])
  redis.call('ZREMRANGEBYRANK', index, 0, -tonumber(ARGV[a + 5]) - 1)
  redis.call('PEXPIRE', index, ARGV[a + 6])
end
return #KEYS / 2
"""


def limiter_key(topic_prefix: str, tenant: str) -> str:
    return f"zimage:{topic_prefix}:api:limit:{key_part(tenant)}"  # encoded as every key of a tenant


@dataclass(frozen=True)
class Decision:
    allowed: bool
    wait_ms: int = 0
    reason: str = "ok"  # ok, rate, quota, or unavailable (Redis did not answer: allowed)
    previous_claim: bytes | None = None  # the claim the request id held before this one tried to claim it

    @property
    def unavailable(self) -> bool:
        return self.reason == "unavailable"


@dataclass(frozen=True)
class Admission:
    tenant: str
    rate_per_s: float
    burst: int
    daily_quota: int
    claim_key: str = ""  # '' takes from the budget only
    claim_value: bytes = b""
    claim_ttl_s: float = 0.0
    cost: int = 1


@dataclass(frozen=True)
class ProducedMark:
    claim_key: str
    claim_value: bytes
    claim_ttl_s: float
    index_key: str
    member: str
    score: float
    keep: int
    index_ttl_s: float


T = TypeVar("T")
R = TypeVar("R")


class Coalesced(Generic[T, R]):
    """Hands every item given in one turn of the event loop to one call of `send`, which answers them in order.
    An exception from `send` is every waiting caller's."""

    def __init__(self, send: Callable[[list[T]], Awaitable[Sequence[R]]], max_items: int = MAX_BATCH):
        self._send = send
        self._max = max_items
        self._pending: list[tuple[T, asyncio.Future[R]]] = []
        self._tasks: set[asyncio.Task[None]] = set()  # held, so a running batch is never garbage-collected
        self.calls = 0

    async def __call__(self, item: T) -> R:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        elif len(self._pending) >= self._max:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if batch:
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[T, asyncio.Future[R]]]) -> None:
        self.calls += 1
        failure: BaseException = RuntimeError("the batch call gave no answer for this item")
        try:
            answers = await self._send([item for item, _ in batch])
            for (_, future), answer in zip(batch, answers, strict=True):
                if not future.done():
                    future.set_result(answer)
        except Exception as exc:  # noqa: BLE001 - each caller decides what the failure means for it
            failure = exc
        finally:  # whatever happened (a cancellation too), nobody waits forever
            for _, future in batch:
                if not future.done():
                    future.set_exception(failure)


class SubmissionLedger:
    def __init__(self, url: str, topic_prefix: str, timeout_s: float = 0.25, client: aredis.Redis | None = None):
        self._client = client if client is not None else aredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._admit_script = self._client.register_script(ADMIT_LUA)
        self._mark_script = self._client.register_script(MARK_LUA)
        self._prefix = topic_prefix
        self._down_until = 0.0
        self.admit = Coalesced(self._admit_many)  # (Admission) -> Decision
        self.mark_produced = Coalesced(self._mark_many)  # (ProducedMark) -> None, or StoreUnavailable

    def _failed(self, exc: Exception) -> None:
        self._down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("API ledger: Redis unavailable (%s); not asking again for %.0fs", exc, RETRY_AFTER_S)

    async def _admit_many(self, batch: list[Admission]) -> list[Decision]:
        unchecked = [Decision(True, reason="unavailable")] * len(batch)
        if time.monotonic() < self._down_until:
            return unchecked
        keys: list[str] = []
        args: list[Any] = []
        for a in batch:
            keys += [limiter_key(self._prefix, a.tenant), a.claim_key]
            args += [repr(float(a.rate_per_s)), a.burst, a.daily_quota, a.cost, a.claim_value,
                     max(1, int(a.claim_ttl_s * 1000))]
        try:
            found = await self._admit_script(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            return unchecked
        return [Decision(bool(allowed), int(wait_ms), _text(reason), _bytes(before) or None)
                for allowed, wait_ms, reason, before in found]

    async def _mark_many(self, batch: list[ProducedMark]) -> list[None]:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("Redis did not answer a moment ago")
        keys: list[str] = []
        args: list[Any] = []
        for m in batch:
            keys += [m.claim_key, m.index_key]
            args += [m.claim_value, max(1, int(m.claim_ttl_s * 1000)), m.member, repr(float(m.score)), m.keep,
                     max(1, int(m.index_ttl_s * 1000))]
        try:
            await self._mark_script(keys=keys, args=args)
        except (redis.RedisError, OSError) as exc:
            self._failed(exc)
            raise StoreUnavailable(str(exc)) from exc
        return [None] * len(batch)

    async def close(self) -> None:
        await self._client.aclose()


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _bytes(value: bytes | str) -> bytes:
    return value if isinstance(value, bytes) else value.encode()
