"""Cancelling a request while it is queued, and knowing when it is too late.

One Redis key per request settles the race between a cancel and the start of its render: whoever sets it first
wins. The API sets it to `cancelled`; a worker sets it to `rendering` when a batch takes the request. So a
cancel either lands before the render starts (the gate or the worker fails the request with `cancelled`, no
dead letter) or is refused (409), never both. The gate only reads the key: a request cancelled before it was
routed never reaches a render topic.

Redis down: a cancel cannot be recorded (the API answers 503), and the workers render what they take, so a
request is never lost or failed for an outage.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from connectors.redis_store import RedisStore, cancel_entry_key

CANCELLED = b"cancelled"
RENDERING = b"rendering"
CLAIM_TTL_S = 7 * 24 * 3600.0  # longer than any request waits in a queue


class Cancellations:
    def __init__(self, store: RedisStore | None, topic_prefix: str, ttl_s: float = CLAIM_TTL_S):
        self._store = store
        self._prefix = topic_prefix
        self._ttl_s = ttl_s

    @property
    def store(self) -> RedisStore | None:
        return self._store

    def keys(self, requests: Sequence[dict[str, Any]]) -> list[str]:
        """Where each request's mark lives (the gate reads them with its cache entries, in one round trip)."""
        return [cancel_entry_key(self._prefix, r["tenant"], r["request_id"]) for r in requests]

    @staticmethod
    def cancelled_of(marks: Sequence[bytes | None]) -> set[int]:
        """Indexes of the marks that say cancelled."""
        return {i for i, value in enumerate(marks) if value == CANCELLED}

    def cancelled(self, requests: Sequence[dict[str, Any]]) -> set[int]:
        """The gate's check: indexes of the requests cancelled so far (none when Redis cannot be asked)."""
        if self._store is None or not requests:
            return set()
        return self.cancelled_of(self._store.get_many(self.keys(requests)) or [])

    def start_rendering(self, requests: Sequence[dict[str, Any]]) -> set[int]:
        """A worker's claim when a batch takes these requests: indexes of those cancelled first. The others are
        marked rendering, so a later cancel is refused."""
        if self._store is None or not requests:
            return set()
        found = self._store.claim_many(self.keys(requests), RENDERING, self._ttl_s)
        return set() if found is None else {i for i, value in enumerate(found) if value == CANCELLED}

    def cancel(self, tenant: str, request_id: str) -> Literal["cancelled", "too_late", "unavailable"]:
        """The API's side: `cancelled` when the mark was set before any render started (or was set already)."""
        if self._store is None:
            return "unavailable"
        key = cancel_entry_key(self._prefix, tenant, request_id)
        found = self._store.claim_many([key], CANCELLED, self._ttl_s)
        if found is None:
            return "unavailable"
        return "cancelled" if found[0] == CANCELLED else "too_late"
