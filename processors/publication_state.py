"""Versioned, idempotent publication: what has been published, rebuilt from the ImageReady events themselves.

ImageReady is published at most once per (tenant, request_id, generation, image sha256s). A new generation or
new content for the same (tenant, request_id) is published as the next version, superseding the previous one.
The same events, read again from offset 0, rebuild the state: it holds nothing that is not on the topic.

The state is bounded by a window on published_at (30 days by default): a request whose latest publication is
older than the window is forgotten as a whole, so a replay older than the window publishes again."""
from __future__ import annotations

import hashlib
import heapq
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

DAY_MS = 24 * 3600 * 1000
DEFAULT_WINDOW_MS = 30 * DAY_MS


def _digest(*parts: str) -> bytes:
    """16 bytes that stand for the parts: the state keeps these rather than the strings, to stay small. The repr of
    a tuple of strings tells any two tuples apart (it escapes quotes, separators and unprintable characters), and
    costs a fraction of a JSON dump; the digests live only in memory, rebuilt from the topics on start."""
    return hashlib.blake2b(repr(parts).encode(), digest_size=16).digest()


def image_hashes(event: Mapping[str, Any]) -> tuple[str, ...]:
    """The sha256 of every image of an ImageRendered or ImageReady, in index order."""
    return tuple(image["sha256"] for image in sorted(event["images"], key=lambda image: image["index"]))


def publication_key(event: Mapping[str, Any]) -> tuple[str, str, str, tuple[str, ...]]:
    """(tenant, request_id, generation, image sha256s): what is published at most once."""
    return event["tenant"], event["request_id"], event.get("generation") or "", image_hashes(event)


@dataclass(frozen=True)
class Decision:
    publish: bool
    version: int
    supersedes: int | None


@dataclass(frozen=True)
class Published:
    """What was published of one (tenant, request_id): each content digest's (version, supersedes), the latest
    version and when the newest publication was (published_at, in ms)."""
    versions: tuple[tuple[bytes, int, int | None], ...]
    latest_version: int
    latest_at: int

    def of_content(self, content_key: bytes) -> tuple[int, int | None] | None:
        for key, version, supersedes in self.versions:  # one or a few: each new content is a new version
            if key == content_key:
                return version, supersedes
        return None


class RequestTable(Protocol):
    """Where a partition's publications are kept, by request digest: in memory (MemoryRequests), or on local disk
    (streams/state_store.py), so that a window of millions of requests stays out of the heap."""

    def get(self, request_key: bytes) -> Published | None: ...

    def put(self, request_key: bytes, entry: Published) -> None: ...

    def evict_before(self, cutoff_ms: int) -> int:
        """Forgets every request whose latest publication is older than cutoff_ms; returns how many."""
        ...

    def clear(self) -> None: ...

    def __len__(self) -> int: ...


class MemoryRequests:
    """A RequestTable in the heap: a dict, and a heap of (latest_at, request digest) for eviction (entries whose
    request has moved on since are skipped)."""

    def __init__(self) -> None:
        self._entries: dict[bytes, Published] = {}
        self._expiry: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, request_key: bytes) -> Published | None:
        return self._entries.get(request_key)

    def put(self, request_key: bytes, entry: Published) -> None:
        before = self._entries.get(request_key)
        self._entries[request_key] = entry
        if before is None or before.latest_at != entry.latest_at:
            heapq.heappush(self._expiry, (entry.latest_at, request_key))

    def clear(self) -> None:
        self._entries.clear()
        self._expiry.clear()

    def evict_before(self, cutoff_ms: int) -> int:
        evicted = 0
        while self._expiry and self._expiry[0][0] < cutoff_ms:
            latest_at, request_key = heapq.heappop(self._expiry)
            known = self._entries.get(request_key)
            if known is not None and known.latest_at == latest_at:
                del self._entries[request_key]
                evicted += 1
        return evicted


class PublicationState:
    """What has been published per (tenant, request_id), within a window on published_at."""

    def __init__(self, window_ms: int = DEFAULT_WINDOW_MS, requests: RequestTable | None = None) -> None:
        if window_ms <= 0:
            raise ValueError(f"window_ms must be > 0, got {window_ms}")
        self.window_ms = window_ms
        self._requests: RequestTable = requests if requests is not None else MemoryRequests()

    def __len__(self) -> int:
        """How many requests the state remembers."""
        return len(self._requests)

    @staticmethod
    def _keys(event: Mapping[str, Any]) -> tuple[bytes, bytes]:
        tenant, request_id, generation, hashes = publication_key(event)
        return _digest(tenant, request_id), _digest(generation, *hashes)

    def decide(self, rendered_like: Mapping[str, Any], now_ms: int) -> Decision:
        """Whether an ImageRendered (or anything with tenant, request_id, generation and images) is to be
        published, and as which version. A repeat of a published key publishes nothing and names the version
        already published. Entries older than the window as of `now_ms` do not count."""
        request_key, content_key = self._keys(rendered_like)
        known = self._requests.get(request_key)
        if known is not None and known.latest_at < now_ms - self.window_ms:
            known = None
        if known is None:
            return Decision(publish=True, version=1, supersedes=None)
        published = known.of_content(content_key)
        if published is not None:
            return Decision(publish=False, version=published[0], supersedes=published[1])
        return Decision(publish=True, version=known.latest_version + 1, supersedes=known.latest_version)

    def apply(self, ready: Mapping[str, Any]) -> None:
        """Take in a published ImageReady: after producing it, and for every record when restoring from the topic.
        Applying the same event again changes nothing. A v1 event (no version) counts as version 1."""
        request_key, content_key = self._keys(ready)
        version = int(ready.get("version") or 1)
        supersedes = ready.get("supersedes")
        published_at = int(ready["published_at"])
        known = self._requests.get(request_key) or Published((), 0, published_at)
        versions = known.versions
        if known.of_content(content_key) is None:
            versions += ((content_key, version, None if supersedes is None else int(supersedes)),)
        entry = Published(versions, max(known.latest_version, version), max(known.latest_at, published_at))
        if entry != known:
            self._requests.put(request_key, entry)

    def evict(self, now_ms: int) -> int:
        """Forget every request whose latest publication is older than the window; returns how many."""
        return self._requests.evict_before(now_ms - self.window_ms)

    def clear(self) -> None:
        """Forget everything: the partition is read again from its topic when it is next used."""
        self._requests.clear()


# ---- the latest image per (tenant, SKU, view) -----------------------------------------------------------------

SkuOrder = tuple[int, int, int, str]


def sku_order(ready: Mapping[str, Any]) -> SkuOrder:
    """How two ImageReady of one (tenant, SKU, view) compare: the higher SKU version wins (none counts lowest),
    then the newer generation, taken as the later published_at (a generation string has no order of its own), then
    the higher request version, then the request_id, so every instance and every replay agrees."""
    sku_version = ready.get("sku_version")
    return (-1 if sku_version is None else int(sku_version), int(ready["published_at"]),
            int(ready.get("version") or 1), str(ready["request_id"]))


def by_sku_key(ready: Mapping[str, Any]) -> bytes | None:
    """The record key on the by-SKU topic: (tenant, sku_id, view) as a JSON array, or None when the event is
    not of a SKU. A missing view is the empty string."""
    if ready.get("sku_id") is None:
        return None
    return json.dumps([ready["tenant"], ready["sku_id"], ready.get("view") or ""], ensure_ascii=False).encode()


class SkuLatest:
    """The order of the latest ImageReady per (tenant, SKU, view); one entry per catalogue image, so it is bounded
    by the catalogue. It is rebuilt by feeding every record of the by-SKU topic (or of images.ready) to
    by_sku_update."""

    def __init__(self) -> None:
        self._latest: dict[bytes, SkuOrder] = {}

    def __len__(self) -> int:
        return len(self._latest)

    def latest(self, key: bytes) -> SkuOrder | None:
        return self._latest.get(key)

    def offer(self, ready: Mapping[str, Any]) -> bool:
        """See by_sku_update."""
        key = by_sku_key(ready)
        if key is None:
            return False
        order = sku_order(ready)
        current = self._latest.get(key)
        if current is not None and order <= current:
            return False
        self._latest[key] = order
        return True


def by_sku_update(state: SkuLatest, ready: Mapping[str, Any]) -> bool:
    """Whether `ready` becomes the latest image of its (tenant, SKU, view), recording it when it does. An event
    that is not of a SKU, older than the latest, or the latest itself again, returns False."""
    return state.offer(ready)
