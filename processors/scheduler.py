"""Which priority class the renderer serves next, and when a batch is ready to go.

Pure logic: no threads, no I/O; the caller passes `now` (monotonic seconds) to every time-dependent call.

Choosing the class (`Scheduler.next_batch`), among the classes that hold requests:

1. Minimum share, owed only after sustained contention. Each class `c` with `min_share[c] > 0` (only `normal`
   and `low` may have one; `high` needs none) keeps a deficit counter, in images, over its current *period of
   contention*: the consecutive batch cuts at which `c` and at least one other class were both buffered. At
   each such cut the counter gains `min_share[c]` times the images of the batch and loses the images of `c`
   that the batch holds, as in deficit round robin; it never falls below `-max_batch_size`, so a surplus
   (from aging, or from riding in other classes' batches) counts for one batch's worth of images at most. The period,
   and the counter with it, ends when `c`'s buffer empties or a batch is cut while `c` is the only buffered class.
   A class is *owed* when its counter is positive (below its share over the period) and its period began at
   least `share_patience_s` ago. If any class is owed, the one with the largest counter / min_share is
   served (the more urgent class on a tie). So with a steady `high` load that alone saturates the renderer
   and a lasting `low` backlog, `low` receives `min_share["low"]` of the images in the long run (the counter
   stays bounded); with no lower load `high` gets everything; and a class whose requests arrive into its empty
   buffer together with or after more urgent ones is owed nothing for `share_patience_s`, whatever was served
   before.
2. Otherwise, priority with aging. The head (oldest request) of each class has an effective level: its class
   level (high 0, normal 1, low 2) minus one for every full `aging_s` it has waited, never below 0. The class
   whose head has the lowest effective level is served; on a tie the originally more urgent class wins. Aging
   can thus lift a waiting `low` request past fresh `normal` ones, but never past a `high` request.

Requests still in Kafka (`Scheduler.set_unfetched`): the caller reports, per class, whether records of it are
waiting unfetched (lag not yet read, or not yet known after an assignment). While a class `u` has been reported
waiting for less than `fetch_wait_s`, a batch headed by a less urgent class that a fresh `u` request would go
ahead of (its head's effective level is not below `u`'s level) does not start, unless that class is owed its
share by rule 1. The hold ends when `u` is reported no longer waiting, or `fetch_wait_s` after `u` was first
reported waiting: a slow or stuck partition cannot block the lower classes for good. Requests of `u` offered
meanwhile are chosen by rules 1 and 2 as usual. A batch headed by `u` or a more urgent class is never held.
It takes same-key requests of lower classes (see `processors.batching`), except a batch headed by `u` itself
during that wait: it fills with `u`'s own requests only (or goes at `max_wait_s`), so that the rest of `u`,
still on its way from Kafka, is not put behind lower riders.

When to send (a Triton-like maximum queue delay): the batch of the chosen class is cut (see
`processors.batching`) and returned only when it is full (the size is reached, or a same-key request was left
over), or its head has waited at least `max_wait_s`, or the caller flushes, or arrivals are sparse, and it is not
held for unfetched requests (neither a flush nor sparse arrivals override that hold). Arrivals are sparse when
`arrival_window_s` is set, no class is reported unfetched, and fewer than one more request is expected before the
head's wait would end, at the rate of the requests offered over about the last `arrival_window_s` (a decaying
count): waiting then would only delay the head, since nothing is likely to join it. At a steady 50 requests/s a
2 ms wait goes at once, a 50 ms one waits; the first request after a quiet spell never waits. Otherwise
`next_batch` returns None and does not fall back to another class: the renderer stays idle at most `max_wait_s`
rather than start a lower-priority batch while a more urgent one is filling. `time_until_ready` tells the render
thread how long it may sleep.

Deadlines are not considered when choosing: call `expire(now)` before `next_batch` and fail what it returns.
"""
from __future__ import annotations

import heapq
import math
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from processors.batching import (
    PRIORITIES,
    PRIORITY_LEVEL,
    Batch,
    BatchBuffer,
    BatchPlan,
    Pending,
)
from processors.share_ledger import ShareLedger


def _default_min_share() -> dict[str, float]:
    return {"normal": 0.2, "low": 0.1}


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 4  # in images (sum of Pending.cost)
    max_wait_s: float = 0.05  # longest a batch head waits for the batch to fill
    capacity_per_priority: int | Mapping[str, int] = 1000  # buffered requests per class
    min_share: Mapping[str, float] = field(default_factory=_default_min_share)
    aging_s: float | None = None  # None: no aging
    share_patience_s: float = 2.0  # contention a class must have lasted before its share is owed
    fetch_wait_s: float = 0.5  # longest a lower class is held for a more urgent class's unfetched records
    arrival_window_s: float | None = None  # None: a batch always waits max_wait_s to fill; else see above

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
        if not _is_real(self.share_patience_s) or self.share_patience_s < 0:
            raise ValueError(f"share_patience_s must be a finite number >= 0, got {self.share_patience_s!r}")
        if not _is_real(self.fetch_wait_s) or self.fetch_wait_s < 0:
            raise ValueError(f"fetch_wait_s must be a finite number >= 0, got {self.fetch_wait_s!r}")
        if self.arrival_window_s is not None and (not _is_real(self.arrival_window_s) or self.arrival_window_s <= 0):
            raise ValueError(f"arrival_window_s must be None or a finite number > 0, got {self.arrival_window_s!r}")

    def capacity(self, priority: str) -> int:
        if isinstance(self.capacity_per_priority, Mapping):
            return self.capacity_per_priority[priority]
        return self.capacity_per_priority


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class _Choice:
    priority: str
    plan: BatchPlan
    held_until: float | None  # while now < held_until the batch waits for a more urgent class's unfetched records


class Scheduler:
    """Buffers requests per priority and hands out batches; not thread-safe (the caller holds a lock)."""

    def __init__(self, config: SchedulerConfig, new_batch_id: Callable[[], str] | None = None) -> None:
        self.config = config
        self._new_batch_id = new_batch_id or (lambda: uuid.uuid4().hex)
        self._buffer = BatchBuffer()
        self._deadlines: list[tuple[float, int]] = []  # heap of (deadline, seq); stale entries skipped
        self._ledger = ShareLedger(config.min_share, floor=-config.max_batch_size,
                                   patience_s=config.share_patience_s)
        self._unfetched_since: dict[str, float] = {}  # class -> when its unfetched records were first reported
        self._served = {p: 0 for p in PRIORITIES}
        self._arrivals = 0.0  # requests offered, decayed with time constant arrival_window_s ...
        self._arrivals_at = -math.inf  # ... as of this time

    # ---- buffer -----------------------------------------------------------------------------------------

    def offer(self, item: Pending) -> bool:
        """Buffers `item`; False (and nothing buffered) when its class is at capacity."""
        if not self.has_room(item.priority):
            return False
        seq = self._buffer.add(item)
        window = self.config.arrival_window_s
        if window is not None:
            at = max(item.enqueued_at, self._arrivals_at)
            self._arrivals = self._arrivals * math.exp(-(at - self._arrivals_at) / window) + 1.0
            self._arrivals_at = at
        if item.deadline is not None:
            heapq.heappush(self._deadlines, (item.deadline, seq))
        return True

    def has_room(self, priority: str) -> bool:
        _check_priority(priority)
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
        self._end_emptied()
        return expired

    def drop_partitions(self, partitions: Iterable[tuple[str, int]]) -> list[Pending]:
        """Removes and returns the requests read from revoked partitions, in arrival order."""
        revoked = set(partitions)
        dropped = self._buffer.remove_where(lambda item: item.partition in revoked)
        self._compact_deadlines()
        self._end_emptied()
        return dropped

    def clear(self) -> list[Pending]:
        """Removes and returns every buffered request (the consumer is being rewound)."""
        self._deadlines.clear()
        cleared = self._buffer.remove_where(lambda item: True)
        self._end_emptied()
        return cleared

    def set_unfetched(self, priority: str, waiting: bool, now: float) -> None:
        """Whether records of `priority` wait in Kafka, not yet fetched (or not yet known, after an assignment).

        The hold this puts on less urgent classes lasts at most `fetch_wait_s` from the first report of a run
        of `waiting=True` reports; repeating `True` does not extend it, and `False` ends it.
        """
        _check_priority(priority)
        if not waiting:
            self._unfetched_since.pop(priority, None)
        else:
            self._unfetched_since.setdefault(priority, now)

    # ---- serving ----------------------------------------------------------------------------------------

    def next_batch(self, now: float, flush: bool = False) -> Batch | None:
        """The next batch to render, or None when nothing is buffered or the chosen batch should still wait."""
        choice = self._choose(now)
        if choice is None or choice.held_until is not None:
            return None
        plan = choice.plan
        if plan.full:
            reason = "full"
        elif now - plan.head.enqueued_at >= self.config.max_wait_s:
            reason = "timeout"
        elif flush:
            reason = "flush"
        elif self._sparse(now, plan.head):
            reason = "sparse"
        else:
            return None
        buffered = self._buffered()
        items = self._buffer.take(plan)
        self._compact_deadlines()
        served_units = {p: 0 for p in PRIORITIES}
        for item in items:
            served_units[item.priority] += item.cost
            self._served[item.priority] += 1
        self._ledger.record_cut(buffered, served_units, now)
        self._end_emptied()
        return Batch(id=self._new_batch_id(), key=plan.key, items=items, formed_at=now, reason=reason)

    def _sparse(self, now: float, head: Pending) -> bool:
        """Whether fewer than one more request is expected before `head`'s wait would end (see above)."""
        rate = self._arrival_rate(now)
        return rate is not None and rate * (self.config.max_wait_s - (now - head.enqueued_at)) < 1.0

    def _arrival_rate(self, now: float) -> float | None:
        """Requests per second offered lately; None when sparse arrivals may not send a batch."""
        window = self.config.arrival_window_s
        if window is None or self._unfetched_since:
            return None
        return self._arrivals * math.exp(-max(0.0, now - self._arrivals_at) / window) / window

    def time_until_ready(self, now: float) -> float | None:
        """Seconds until `next_batch` may return a batch: 0 if now, None if nothing is buffered.

        May be earlier than needed (an aging step or a share that changes nothing), never later, unless
        requests arrive or `set_unfetched` is called; the moment arrivals become sparse is judged at the rate of
        `now`, which only falls meanwhile, so that one may come a little sooner than said.
        """
        choice = self._choose(now)
        if choice is None:
            return None
        head = choice.plan.head
        wait = 0.0 if choice.plan.full or self._sparse(now, head) else \
            max(0.0, self.config.max_wait_s - (now - head.enqueued_at))
        rate = self._arrival_rate(now)
        if wait > 0.0 and rate:  # sparse once the wait left is under one expected gap (sooner, as the rate decays)
            wait = max(0.0, wait - 1.0 / rate)
        if choice.held_until is not None:
            wait = max(wait, choice.held_until - now)
        if wait == 0.0:
            return wait
        # A class becoming owed can change the chosen class.
        owed_at = self._ledger.next_owed_at(now)
        if owed_at is not None:
            wait = min(wait, owed_at - now)
        if self.config.aging_s is not None:
            # A head stepping up a level can change the chosen class, or lift the chosen one out of a hold.
            for priority in PRIORITIES:
                other = self._buffer.head(priority)
                if other is None or self._level(other, now) == 0:
                    continue
                if priority != choice.priority or choice.held_until is not None:
                    waited = max(0.0, now - other.enqueued_at)
                    wait = min(wait, self.config.aging_s - math.fmod(waited, self.config.aging_s))
        return wait

    def served_counts(self) -> dict[str, int]:
        """Requests served per class since start."""
        return dict(self._served)

    def share_deficits(self) -> dict[str, float]:
        """Images owed per class with a minimum share over its current period of contention (rule 1)."""
        return self._ledger.deficits()

    def choose_class(self, now: float) -> str | None:
        """The class whose batch goes next by rules 1 and 2 (the batch may still be held for unfetched
        requests, or wait to fill); None if nothing is buffered."""
        buffered = self._buffered()
        if not buffered:
            return None
        owed = self._ledger.owed(buffered, now)
        if owed is not None:
            return owed
        return min(buffered, key=lambda p: (self._level(self._buffer.head(p), now), PRIORITY_LEVEL[p]))

    def _choose(self, now: float) -> _Choice | None:
        priority = self.choose_class(now)
        if priority is None:
            return None
        # While more of this class waits in Kafka, its batch fills with its own requests, not lower riders.
        riders = not self._unfetched_since.get(priority, -math.inf) + self.config.fetch_wait_s > now
        plan = self._buffer.plan(priority, self.config.max_batch_size, riders)
        assert plan is not None
        held_until = None
        if self._ledger.owed([priority], now) is None:
            level = self._level(plan.head, now)
            holds = [since + self.config.fetch_wait_s for waiting, since in self._unfetched_since.items()
                     if PRIORITY_LEVEL[waiting] < PRIORITY_LEVEL[priority] and level >= PRIORITY_LEVEL[waiting]
                     and since + self.config.fetch_wait_s > now]
            held_until = max(holds, default=None)
        return _Choice(priority, plan, held_until)

    def _buffered(self) -> set[str]:
        return {p for p in PRIORITIES if self._buffer.count(p)}

    def _end_emptied(self) -> None:
        for priority in PRIORITIES:
            if not self._buffer.count(priority):
                self._ledger.end(priority)

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


def _check_priority(priority: str) -> None:
    if priority not in PRIORITY_LEVEL:
        raise ValueError(f"unknown priority {priority!r}; expected one of {PRIORITIES}")
