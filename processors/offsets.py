"""Which results may be published, and which offsets committed, when work completes out of order.

Every consumed record is tracked; its work completes in any order (batches mix partitions and priorities).
`release` hands out, per partition, the results of the longest prefix of tracked offsets whose work is finished,
in offset order, together with the offset to commit (last released + 1). The caller produces exactly those
results and commits exactly those offsets in one transaction, so an output exists if and only if its input is
committed. A result behind an unfinished earlier offset is held back until that offset finishes.

The prefix is over tracked offsets, not integers: transactional topics (control records) and compacted topics
leave gaps, and a gap is not a missing record.

On a failed transaction the transactional step aborts and rewinds the consumer to the committed offsets; the
caller then forgets every assigned partition with `revoke()`. Results already released are not put back.
"""
from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

TopicPartition = tuple[str, int]

_UNFINISHED = object()


class _PartitionLog:
    def __init__(self) -> None:
        self.entries: OrderedDict[int, object] = OrderedDict()  # offset -> result, or _UNFINISHED
        self.unfinished = 0
        self.last_tracked: int | None = None


class OffsetTracker:
    """Tracks consumed offsets and completed results per partition; not thread-safe (the caller holds a lock)."""

    def __init__(self) -> None:
        self._logs: dict[TopicPartition, _PartitionLog] = {}
        self._advanced: set[TopicPartition] = set()  # partitions that may release something

    def track(self, topic: str, partition: int, offset: int) -> None:
        """Records that `offset` was consumed; offsets of one partition must be tracked in increasing order."""
        log = self._logs.setdefault((topic, partition), _PartitionLog())
        if log.last_tracked is not None and offset <= log.last_tracked:
            raise ValueError(f"offset {offset} of {topic}[{partition}] tracked after {log.last_tracked}: "
                             "offsets of a partition must increase (clear() or revoke() after a rewind)")
        log.entries[offset] = _UNFINISHED
        log.unfinished += 1
        log.last_tracked = offset

    def complete(self, topic: str, partition: int, offset: int, result: object) -> bool:
        """Holds `result` for a tracked offset. False, and nothing held, when the offset is not tracked (its
        partition was revoked, the tracker cleared, or it was released) or was already completed."""
        log = self._logs.get((topic, partition))
        if log is None or log.entries.get(offset, None) is not _UNFINISHED:
            return False
        log.entries[offset] = result
        log.unfinished -= 1
        self._advanced.add((topic, partition))
        return True

    def release(self) -> tuple[list[Any], dict[TopicPartition, int]]:
        """Pops the finished prefix of every partition: (results in offset order per partition, partitions in
        (topic, partition) order; {partition: next offset to read} for the partitions that advanced)."""
        results: list[Any] = []  # whatever the caller completed them with
        commits: dict[TopicPartition, int] = {}
        for tp in sorted(self._advanced):
            log = self._logs.get(tp)
            if log is None:
                continue
            last = None
            while log.entries:
                offset = next(iter(log.entries))
                if log.entries[offset] is _UNFINISHED:
                    break
                results.append(log.entries.pop(offset))
                last = offset
            if last is not None:
                commits[tp] = last + 1
        self._advanced.clear()
        return results, commits

    def revoke(self, partitions: Iterable[TopicPartition]) -> int:
        """Forgets revoked partitions, held results included (a new owner redoes them); returns the number of
        offsets forgotten."""
        forgotten = 0
        for tp in partitions:
            log = self._logs.pop(tp, None)
            if log is not None:
                forgotten += len(log.entries)
            self._advanced.discard(tp)
        return forgotten

    def clear(self) -> None:
        """Forgets everything (after an aborted transaction, before the consumer is rewound)."""
        self._logs.clear()
        self._advanced.clear()

    def pending_count(self) -> int:
        """Tracked offsets whose work has not finished."""
        return sum(log.unfinished for log in self._logs.values())

    def held_count(self) -> int:
        """Finished results not yet released (waiting for `release` or behind an unfinished offset)."""
        return sum(len(log.entries) - log.unfinished for log in self._logs.values())

    def lag_by_partition(self) -> dict[TopicPartition, int]:
        """Tracked offsets not yet released, per partition with any."""
        return {tp: len(log.entries) for tp, log in self._logs.items() if log.entries}

    def partitions(self) -> list[TopicPartition]:
        """Partitions the tracker knows (tracked since the last revoke or clear)."""
        return sorted(self._logs)
