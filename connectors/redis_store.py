"""Redis as a best-effort store: the L1 cache of rendered images (references, never bytes).

Redis is never on the path that decides whether a request is rendered or published: every call answers None or
False when Redis fails, and the caller counts what it skipped. After a failure Redis is left alone for a few
seconds, so an outage costs one timeout, not one per request.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from urllib.parse import quote

import redis

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0


def cache_entry_key(topic_prefix: str, cache_key: str) -> str:
    """Where the L1 cache keeps one entry: per deployment (its topic prefix and object store), never shared."""
    return f"zimage:{topic_prefix}:cache:{cache_key}"


def key_part(text: str) -> str:
    """A tenant or request id inside a Redis key, percent-encoded (':', '/' and '%' among others): tenant `acme`
    with request `eu:r1` and tenant `acme:eu` with request `r1` must not meet on one key."""
    return quote(text, safe="")


def cancel_entry_key(topic_prefix: str, tenant: str, request_id: str) -> str:
    """Where a cancellation of a still-queued request waits for the gate or a worker to skip the request."""
    return f"zimage:{topic_prefix}:cancel:{key_part(tenant)}:{key_part(request_id)}"


# One script call for a whole batch: a pipeline of one command per key spent more time in the client's Python
# (packing and parsing each command) than Redis spent on the keys. ARGV[1] is the TTL in milliseconds.
SET_MANY_LUA = """
for i, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[i + 1], 'PX', ARGV[1])
end
return #KEYS
"""
# Each key set to ARGV[2] where absent; answers what each key holds afterwards.
CLAIM_MANY_LUA = """
local held = {}
for i, key in ipairs(KEYS) do
    redis.call('SET', key, ARGV[2], 'PX', ARGV[1], 'NX')
    held[i] = redis.call('GET', key)
end
return held
"""


class RedisStore:
    def __init__(self, url: str, timeout_s: float = 0.25, client: redis.Redis | None = None):
        self._client = client if client is not None else redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._set_many = self._client.register_script(SET_MANY_LUA)
        self._claim_many = self._client.register_script(CLAIM_MANY_LUA)
        self._down_until = 0.0
        self.failures = 0

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._down_until

    def get_many(self, keys: Sequence[str]) -> list[bytes | None] | None:
        """The values of `keys` in order (None where absent), or None when Redis cannot be asked."""
        if not keys or not self.available:
            return None if keys else []
        try:
            found = self._client.mget(list(keys))
            return [v.encode() if isinstance(v, str) else v for v in found]
        except redis.RedisError as exc:
            self._failed(exc)
            return None

    def set(self, key: str, value: bytes, ttl_s: float) -> bool:
        if not self.available:
            return False
        try:
            self._client.set(key, value, px=_ttl_ms(ttl_s))
            return True
        except redis.RedisError as exc:
            self._failed(exc)
            return False

    def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: float) -> bool:
        """Sets every (key, value) with one TTL, in one round trip."""
        if not items:
            return True
        if not self.available:
            return False
        try:
            self._set_many(keys=[key for key, _ in items],
                           args=[_ttl_ms(ttl_s), *(value for _, value in items)])
            return True
        except redis.RedisError as exc:
            self._failed(exc)
            return False

    def claim_many(self, keys: Sequence[str], value: bytes, ttl_s: float) -> list[bytes | None] | None:
        """Sets each key to `value` where it is absent, in one round trip, and returns what each key holds
        afterwards (`value` where this call set it or it held it already); None when Redis cannot be asked."""
        if not keys or not self.available:
            return None if keys else []
        try:
            held = self._claim_many(keys=list(keys), args=[_ttl_ms(ttl_s), value])
            return [v.encode() if isinstance(v, str) else v for v in held]
        except redis.RedisError as exc:
            self._failed(exc)
            return None

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("Redis unavailable (%s); going on without it for %.0fs", exc, RETRY_AFTER_S)


def _ttl_ms(ttl_s: float) -> int:
    return max(1, int(ttl_s * 1000))
