"""The HTTP API's Redis calls (asyncio): values by key, set-if-absent, and bounded per-tenant sorted sets.

Every call raises StoreUnavailable when Redis does not answer; the caller decides what an outage means for its
request. After a failure Redis is left alone for a few seconds, so an outage costs one timeout, not one per call.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import redis
import redis.asyncio as aredis

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5.0


class StoreUnavailable(RuntimeError):
    """Redis did not answer (or was given up on a moment ago)."""


class ApiStore:
    def __init__(self, url: str, timeout_s: float = 0.25, client: aredis.Redis | None = None):
        self._client = client if client is not None else aredis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)
        self._down_until = 0.0
        self.failures = 0

    def _check(self) -> None:
        if time.monotonic() < self._down_until:
            raise StoreUnavailable("Redis did not answer a moment ago")

    def _failed(self, exc: Exception) -> StoreUnavailable:
        self.failures += 1
        self._down_until = time.monotonic() + RETRY_AFTER_S
        log.warning("Redis unavailable (%s); not asking again for %.0fs", exc, RETRY_AFTER_S)
        return StoreUnavailable(str(exc))

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []
        self._check()
        try:
            found = await self._client.mget(list(keys))
            return [v.encode() if isinstance(v, str) else v for v in found]
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from exc

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        if not items:
            return
        self._check()
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, px=max(1, int(ttl_s * 1000)))
                await pipe.execute()
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from exc

    async def set_if_absent(self, key: str, value: bytes, ttl_s: float) -> bool:
        """True when `key` was set now, False when it held a value already."""
        self._check()
        try:
            return bool(await self._client.set(key, value, px=max(1, int(ttl_s * 1000)), nx=True))
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from exc

    async def index_page(self, key: str, before: float | None, limit: int,
                         before_member: str | None = None) -> list[tuple[str, float]]:
        """Up to `limit` members, highest score first (members of one score in reverse byte order, as Redis orders
        them): all of them when `before` is None; else those below the cursor (`before`, `before_member`): a lower
        score, or the same score and a lower member. Without `before_member`, those of a lower score only."""
        self._check()
        try:
            if before is None or before_member is None:
                top = f"({before!r}" if before is not None else "+inf"
                found = await self._client.zrevrangebyscore(key, top, "-inf", start=0, num=limit, withscores=True)
            else:  # members of the cursor's own score come first: skip those at or above its member
                ties = await self._client.zcount(key, before, before)
                found = await self._client.zrevrangebyscore(key, before, "-inf", start=0, num=limit + ties,
                                                            withscores=True)
        except (redis.RedisError, OSError) as exc:
            raise self._failed(exc) from exc
        pairs: list[Any] = list(found)  # withscores=True: (member, score) pairs
        page = [(m.decode() if isinstance(m, bytes) else str(m), float(score)) for m, score in pairs]
        if before is not None and before_member is not None:
            cursor = before_member.encode()
            page = [(m, score) for m, score in page if score < before or m.encode() < cursor]
        return page[:limit]

    async def close(self) -> None:
        await self._client.aclose()
