"""The minimum shares of the scheduler's rule 1 (processors/scheduler.py): a deficit counter per class, over its
periods of contention, as in deficit round robin. Pure: the caller passes `now`."""
from __future__ import annotations

from collections.abc import Iterable, Mapping

from processors.batching import PRIORITY_LEVEL

# Counters are sums of float products (0.1 * 4 ...): a residue this small is rounding, not an image owed.
_DEFICIT_EPSILON = 1e-9


class ShareLedger:
    """Deficit counters of the classes with a minimum share, over their periods of contention (rule 1)."""

    def __init__(self, min_share: Mapping[str, float], floor: float, patience_s: float) -> None:
        self._share = {p: s for p, s in min_share.items() if s > 0}
        self._floor = floor
        self._patience_s = patience_s
        self._deficit = {p: 0.0 for p in self._share}
        self._since: dict[str, float] = {}  # class -> when its current period of contention began

    def record_cut(self, buffered: set[str], served_units: Mapping[str, int], now: float) -> None:
        """Accounts for a batch of `served_units` images per class, cut while `buffered` classes held requests."""
        total = sum(served_units.values())
        for priority, share in self._share.items():
            if priority not in buffered or len(buffered) == 1:
                self.end(priority)
                continue
            self._since.setdefault(priority, now)
            self._deficit[priority] = max(self._floor,
                                          self._deficit[priority] + share * total - served_units.get(priority, 0))

    def end(self, priority: str) -> None:
        """Ends the class's period of contention (its buffer emptied, or it was alone)."""
        if priority in self._share:
            self._deficit[priority] = 0.0
            self._since.pop(priority, None)

    def owed(self, buffered: Iterable[str], now: float) -> str | None:
        """The buffered class owed its share the most, or None."""
        owed = [(-self._deficit[p] / self._share[p], PRIORITY_LEVEL[p], p)
                for p in buffered if p in self._share and self._is_owed(p, now)]
        return min(owed)[2] if owed else None

    def next_owed_at(self, now: float) -> float | None:
        """The earliest time after `now` at which a class below its share becomes owed by patience alone."""
        times = [self._since[p] + self._patience_s for p in self._since
                 if self._deficit[p] > _DEFICIT_EPSILON and self._since[p] + self._patience_s > now]
        return min(times, default=None)

    def deficits(self) -> dict[str, float]:
        return dict(self._deficit)

    def _is_owed(self, priority: str, now: float) -> bool:
        since = self._since.get(priority)
        return (since is not None and self._deficit[priority] > _DEFICIT_EPSILON
                and now - since >= self._patience_s)
