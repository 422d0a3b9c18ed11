"""A per-tenant token bucket and daily quota, checked and taken in one Lua script in Redis (atomic across every API
process), on Redis's own clock so API hosts whose clocks differ agree.

Redis down is not the caller's fault: `take` then answers allowed with `unavailable` set, and Redis is left alone
for a few seconds so an outage costs one timeout, not one per request.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import redis
import redis.asyncio as aredis

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0

# KEYS[1]: the tenant's hash {tokens, ts, day, used}. ARGV: rate per second, burst, daily quota, cost.
# Returns {allowed (1/0), wait in ms, reason}. Nothing is taken from either budget unless both allow it.
TOKEN_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local quota = tonumber(ARGV[3])
local cost = tonumber(ARGV[4])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local day = math.floor(now / 86400000)
local day_left = 86400000 - (now % 86400000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts', 'day', 'used')
local tokens = tonumber(state[1]) or burst
local ts = tonumber(state[2]) or now
local used = tonumber(state[4]) or 0
if tonumber(state[3]) ~= day then used = 0 end
tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
if used + cost > quota then
  return {0, day_left, 'quota'}
end
if tokens < cost then
  return {0, math.ceil((cost - tokens) * 1000 / rate), 'rate'}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - cost), 'ts', now, 'day', day, 'used', used + cost)
redis.call('PEXPIRE', KEYS[1], day_left + 60000)
return {1, 0, 'ok'}
"""


def limiter_key(topic_prefix: str, tenant: str) -> str:
    return f"zimage:{topic_prefix}:api:limit:{tenant}"


@dataclass(frozen=True)
class Decision:
    allowed: bool
    wait_ms: int = 0
    reason: str = "ok"  # ok, rate, quota, or unavailable (Redis did not answer: allowed)

    @property
    def unavailable(self) -> bool:
        return self.reason == "unavailable"


class RedisLimiter:
    def __init__(self, url: str, topic_prefix: str, timeout_s: float = 0.25, client: aredis.Redis | None = None):
        self._client = client if client is not None else aredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._script = self._client.register_script(TOKEN_BUCKET_LUA)
        self._prefix = topic_prefix
        self._down_until = 0.0

    async def take(self, tenant: str, rate_per_s: float, burst: int, daily_quota: int, cost: int = 1) -> Decision:
        if time.monotonic() < self._down_until:
            return Decision(True, reason="unavailable")
        try:
            allowed, wait_ms, reason = await self._script(keys=[limiter_key(self._prefix, tenant)],
                                                          args=[repr(float(rate_per_s)), burst, daily_quota, cost])
        except (redis.RedisError, OSError) as exc:
            self._down_until = time.monotonic() + RETRY_AFTER_S
            log.warning("rate limiter: Redis unavailable (%s); admitting without limits for %.0fs", exc,
                        RETRY_AFTER_S)
            return Decision(True, reason="unavailable")
        return Decision(bool(allowed), int(wait_ms), reason.decode() if isinstance(reason, bytes) else str(reason))

    async def close(self) -> None:
        await self._client.aclose()
