"""Which priority class the renderer serves next, and when a batch is ready to go.

Pure logic: no threads, no I/O; the caller passes `now` (monotonic seconds) to every time-dependent call.

Choosing the class (`Scheduler.next_batch`), among the classes that hold requests:

1. Minimum share. Over a sliding window of the last `share_window` served images (sum of `cost`), a non-empty
   class `c` with `min_share[c] > 0` is *owed* when its share of the window is below `min_share[c]`. If any
   class is owed, the one furthest below its share (smallest share / min_share; the more urgent class on a tie)
   is served. An empty window owes nothing. Only `normal` and `low` may have a minimum share: `high` never
   needs one. So with a steady `high` load that alone saturates the renderer, `low` still receives about
   `min_share["low"]` of the rendered images; with no lower load, `high` gets everything.
2. Otherwise, priority with aging. The head (oldest request) of each class has an effective level: its class
   level (high 0, normal 1, low 2) minus one for every full `aging_s` it has waited, never below 0. The class
   whose head has the lowest effective level is served; on a tie the originally more urgent class wins. Aging
   can thus lift a waiting `low` request past fresh `normal` ones, but never past a `high` request: a `high`
   request arriving behind any backlog is served in the very next batch, or in the one after when that next
   batch is owed to a lower class by rule 1.

When to send (a Triton-like maximum queue delay): the batch of the chosen class is cut (see
`processors.batching`) and returned only when it is full (the size is reached, or a same-key request was left
over), or its head has waited at least `max_wait_s`, or the caller flushes. Otherwise `next_batch` returns None
and does not fall back to another class: the renderer stays idle at most `max_wait_s` rather than start a
lower-priority batch while a more urgent one is filling. `time_until_ready` tells the render thread how long it
may sleep.

Deadlines are not considered when choosing: call `expire(now)` before `next_batch` and fail what it returns.
"""
from __future__ import annotations

import heapq
import math
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

from processors.batching import PRIORITIES, PRIORITY_LEVEL, Batch, BatchBuffer, BatchPlan, Pending


def _default_min_share() -> dict[str, float]:
    return {"normal": 0.2, "low": 0.1}


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 4  # in images (sum of Pending.cost)
    max_wait_s: float = 0.05  # longest a batch head waits for the batch to fill
    capacity_per_priority: int | Mapping[str, int] = 1000  # buffered requests per class
    min_share: Mapping[str, float] = field(default_factory=_default_min_share)
    aging_s: float | None = None  # None: no aging
    share_window: int = 256  # images over which min_share is measured

    def __post_init__(self) -> None:
        if not _is_int(self.max_batch_size) or self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an int >= 1, got {self.max_batch_size!r}")
        if not _is_real(self.max_wait_s) or self.max_wait_s < 0:
            raise ValueError(f"max_wait_s must be a finite number >= 0, got {self.max_wait_s!r}")
        if isinstance(self.capacity_per_priority, Mapping):
            if set(self.capacity_per_priority) != set(PRIORITIES):
                raise ValueError(f"capacity_per_priority must name exactly {PRIORITIES}, "
                                 f"got {sorted(self.capacity_per_priority)}")
            capacities = list(self.capacity_per_priority.values())
        else:
            capacities = [self.capacity_per_priority]
        if any(not _is_int(c) or c < 1 for c in capacities):
            raise ValueError(f"capacity_per_priority must be ints >= 1, got {self.capacity_per_priority!r}")
        for priority, share in self.min_share.items():
            if priority not in ("normal", "low"):
                raise ValueError(f"min_share applies to 'normal' and 'low' only, got {priority!r}")
            if not _is_real(share) or not 0 <= share < 1:
                raise ValueError(f"min_share[{priority!r}] must be in [0, 1), got {share!r}")
        if sum(self.min_share.values()) >= 1:
            raise ValueError(f"min_share must sum to less than 1, got {dict(self.min_share)}")
        if self.aging_s is not None and (not _is_real(self.aging_s) or self.aging_s <= 0):
            raise ValueError(f"aging_s must be None or a finite number > 0, got {self.aging_s!r}")
        if not _is_int(self.share_window) or self.share_window < 1:
            raise ValueError(f"share_window must be an int >= 1, got {self.share_window!r}")

    def capacity(self, priority: str) -> int:
        if isinstance(self.capacity_per_priority, Mapping):
            return self.capacity_per_priority[priority]
        return self.capacity_per_priority


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ShareWindow:
    """Images served per class over the last `size` images."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: deque[tuple[str, int]] = deque()
        self._units = {p: 0 for p in PRIORITIES}
        self._total = 0

    def record(self, priority: str, units: int) -> None:
        self._entries.append((priority, units))
        self._units[priority] += units
        self._total += units
        while self._total > self._size and len(self._entries) > 1:
            old_priority, old_units = self._entries.popleft()
            self._units[old_priority] -= old_units
            self._total -= old_units

    def shares(self) -> dict[str, float]:
        if self._total == 0:
            return {p: 0.0 for p in PRIORITIES}
        return {p: units / self._total for p, units in self._units.items()}

    @property
    def empty(self) -> bool:
        return self._total == 0


class Scheduler:
    """Buffers requests per priority and hands out batches; not thread-safe (the caller holds a lock)."""

    def __init__(self, config: SchedulerConfig, new_batch_id: Callable[[], str] | None = None) -> None:
        self.config = config
        self._new_batch_id = new_batch_id or (lambda: uuid.uuid4().hex)
        self._buffer = BatchBuffer()
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, seq); stale entries skipped
        self._window = ShareWindow(config.share_window)
        self._served = {p: 0 for p in PRIORITIES}

    # ---- buffer -----------------------------------------------------------------------------------------

    def offer(self, item: Pending) -> bool:
        """Buffers `item`; False (and nothing buffered) when its class is at capacity."""
        if not self.has_room(item.priority):
            return False
        seq = self._buffer.add(item)
        if item.deadline is not None:
            heapq.heappush(self._deadlines, (item.deadline, seq))
        return True

    def has_room(self, priority: str) -> bool:
        if priority not in PRIORITY_LEVEL:
            raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
        return self._buffer.count(priority) < self.config.capacity(priority)

    def queue_lengths(self) -> dict[str, int]:
        return {p: self._buffer.count(p) for p in PRIORITIES}

    def __len__(self) -> int:
        return len(self._buffer)

    def expire(self, now: float) -> list[Pending]:
        """Removes and returns the requests whose deadline < now, earliest deadline first."""
        expired: list[Pending] = []
        while self._deadlines and self._deadlines[0][0] < now:
            _, seq = heapq.heappop(self._deadlines)
            if seq in self._buffer:
                expired.append(self._buffer.remove(seq))
        return expired

    def drop_partitions(self, partitions: Iterable[tuple[str, int]]) -> list[Pending]:
        """Removes and returns the requests read from revoked partitions, in arrival order."""
        revoked = set(partitions)
        dropped = self._buffer.remove_where(lambda item: item.partition in revoked)
        self._compact_deadlines()
        return dropped

    def clear(self) -> list[Pending]:
        """Removes and returns every buffered request (the consumer is being rewound)."""
        self._deadlines.clear()
        return self._buffer.remove_where(lambda item: True)

    # ---- serving ----------------------------------------------------------------------------------------

    def next_batch(self, now: float, flush: bool = False) -> Batch | None:
        """The next batch to render, or None when nothing is buffered or the chosen batch should still wait."""
        plan = self._plan(now)
        if plan is None:
            return None
        if plan.full:
            reason = "full"
        elif now - plan.head.enqueued_at >= self.config.max_wait_s:
            reason = "timeout"
        elif flush:
            reason = "flush"
        else:
            return None
        items = self._buffer.take(plan)
        self._compact_deadlines()
        served_units = {p: 0 for p in PRIORITIES}
        for item in items:
            served_units[item.priority] += item.cost
            self._served[item.priority] += 1
        for priority, units in served_units.items():
            if units:
                self._window.record(priority, units)
        return Batch(id=self._new_batch_id(), key=plan.key, items=items, formed_at=now, reason=reason)

    def time_until_ready(self, now: float) -> float | None:
        """Seconds until `next_batch` may return a batch: 0 if now, None if nothing is buffered.

        May be earlier than needed (an aging step that changes nothing), never later, unless requests arrive.
        """
        plan = self._plan(now)
        if plan is None:
            return None
        if plan.full:
            return 0.0
        wait = max(0.0, self.config.max_wait_s - (now - plan.head.enqueued_at))
        if wait == 0.0 or self.config.aging_s is None:
            return wait
        # A head stepping up a level can change the chosen class.
        for priority in PRIORITIES:
            head = self._buffer.head(priority)
            if head is not None and priority != plan.head.priority and self._level(head, now) > 0:
                waited = max(0.0, now - head.enqueued_at)
                wait = min(wait, self.config.aging_s - math.fmod(waited, self.config.aging_s))
        return wait

    def served_counts(self) -> dict[str, int]:
        """Requests served per class since start (all time, not the share window)."""
        return dict(self._served)

    def window_shares(self) -> dict[str, float]:
        """Share of the images served per class over the share window (what min_share is checked against)."""
        return self._window.shares()

    def choose_class(self, now: float) -> str | None:
        """The class that the next batch will be headed by (module docstring); None if nothing is buffered."""
        non_empty = [p for p in PRIORITIES if self._buffer.count(p)]
        if not non_empty:
            return None
        owed = self._owed(non_empty)
        if owed is not None:
            return owed
        return min(non_empty, key=lambda p: (self._level(self._buffer.head(p), now), PRIORITY_LEVEL[p]))

    def _owed(self, non_empty: list[str]) -> str | None:
        if self._window.empty:
            return None
        shares = self._window.shares()
        owed = [(shares[p] / self.config.min_share[p], PRIORITY_LEVEL[p], p)
                for p in non_empty
                if self.config.min_share.get(p, 0) > 0 and shares[p] < self.config.min_share[p]]
        return min(owed)[2] if owed else None

    def _level(self, head: Pending | None, now: float) -> int:
        assert head is not None
        level = PRIORITY_LEVEL[head.priority]
        if self.config.aging_s is None:
            return level
        steps = int(max(0.0, now - head.enqueued_at) // self.config.aging_s)
        return max(0, level - steps)

    def _compact_deadlines(self) -> None:
        # Entries of requests that left by a batch or a revocation stay until their deadline passes; with long
        # deadlines they would pile up, so rebuild the heap once they outnumber the buffered requests.
        if len(self._deadlines) > 2 * len(self._buffer) + 64:
            self._deadlines = [entry for entry in self._deadlines if entry[1] in self._buffer]
            heapq.heapify(self._deadlines)

    def _plan(self, now: float) -> BatchPlan | None:
        priority = self.choose_class(now)
        if priority is None:
            return None
        return self._buffer.plan(priority, self.config.max_batch_size)
