"""In-flight dedupe: identical work (one cache key) is rendered once, and every copy gets that render's outcome.

The gate keys what it routes to a render topic by the request's cache key, so identical requests of one pool and
priority land on one partition, and so on one worker (copies at different priorities meet where their partitions
share a worker; elsewhere the later one is rendered, or answered by the gate's cache once the first is
published). The worker claims each request when a batch takes it:

- the first claim of a key leads: it is rendered;
- a claim while the leader is rendering or being stored follows: it waits for the leader's outcome, failures
  included, and spends no GPU time;
- a claim soon after the leader finished is answered with the leader's images at once (`remember_s`): that covers
  the time until publication fills the gate's Redis cache, which answers later repeats before they are routed.

A follower of higher priority than its leader is never held behind it: a request is claimed only when the
scheduler takes it into a batch, so the more urgent copy is taken first and leads. Pure and thread-safe; the
render stage (streams/rendering.py) owns one per worker.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Rendered:
    """A leader's success: what its followers are answered with."""

    images: tuple[dict[str, Any], ...]  # StoredImage records (uri, sha256, seed, ...)
    model_id: str
    model_version: str
    quality: dict[str, float]
    attempt: int
    batch_id: str


@dataclass(frozen=True)
class Failed:
    """A leader's failure, passed on to the followers that waited for it."""

    code: str
    reason: str


Outcome = Rendered | Failed


@dataclass(frozen=True)
class Lead:
    pass


@dataclass(frozen=True)
class Follow:
    pass


@dataclass(frozen=True)
class Answered:
    outcome: Rendered


Claim = Lead | Follow | Answered


class InFlight(Generic[T]):
    def __init__(self, remember_s: float = 120.0, remember_max: int = 4096,
                 clock: Callable[[], float] = time.monotonic):
        self._lock = threading.Lock()
        self._waiting: dict[str, list[T]] = {}  # leader's key -> followers
        self._recent: OrderedDict[str, tuple[float, Rendered]] = OrderedDict()
        self._remember_s = remember_s
        self._remember_max = remember_max
        self._clock = clock

    def claim(self, key: str | None, item: T) -> Claim:
        """Lead (render it), Follow (it waits for the leader's outcome) or Answered (the leader just finished).
        A request without a cache key always leads."""
        if key is None:
            return Lead()
        with self._lock:
            recent = self._recent.get(key)
            if recent is not None:
                if self._clock() - recent[0] <= self._remember_s:
                    return Answered(recent[1])
                del self._recent[key]
            followers = self._waiting.get(key)
            if followers is not None:
                followers.append(item)
                return Follow()
            self._waiting[key] = []
            return Lead()

    def finish(self, key: str | None, outcome: Outcome) -> list[T]:
        """The leader of `key` ended with `outcome`: the followers to answer with it. A success is remembered for a
        while; a failure is not (a later copy is rendered afresh)."""
        if key is None:
            return []
        with self._lock:
            followers = self._waiting.pop(key, [])
            if isinstance(outcome, Rendered):
                self._recent[key] = (self._clock(), outcome)
                self._recent.move_to_end(key)
                while len(self._recent) > self._remember_max:
                    self._recent.popitem(last=False)
            return followers

    @property
    def waiting(self) -> int:
        with self._lock:
            return sum(len(f) for f in self._waiting.values())
