"""What a replay re-drives: per partition, a range of offsets; the headers it adds; the pace it keeps.

Pure: `streams/replay.py` asks Kafka for the watermarks and the offsets of the time bounds, and feeds them here.
A replay re-drives the records' bytes unchanged (key and value), so request ids and seeds stay what they were and
a replay of unchanged requests reproduces the same images. What it adds travels in headers: the replay id (on
every re-driven record and, through the gate's admission, in the lineage of what it publishes) and, for a
backfill, the generation it asks for (processors/admission.py GENERATION_HEADER), which the gate renders as a
new generation, past the cache.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

from processors.admission import GENERATION_HEADER, HEADER_VALUE_MAX_CHARS, REPLAY_ID_HEADER

TP = tuple[str, int]
_LABEL = re.compile(r"^[A-Za-z0-9._:@+-]{1,%d}$" % HEADER_VALUE_MAX_CHARS)


class InvalidReplay(ValueError):
    """A replay that cannot be run as asked: one line for the operator."""


@dataclass(frozen=True)
class Bounds:
    """What the operator asked for; None is open. Offsets apply to every partition; times are epoch ms."""

    from_offset: int | None = None
    to_offset: int | None = None  # inclusive
    since_ms: int | None = None
    until_ms: int | None = None  # exclusive

    def __post_init__(self) -> None:
        if any(offset is not None and offset < 0 for offset in (self.from_offset, self.to_offset)):
            raise InvalidReplay("offsets are never negative")
        if self.from_offset is not None and self.to_offset is not None and self.to_offset < self.from_offset:
            raise InvalidReplay(f"--to-offset {self.to_offset} is before --from-offset {self.from_offset}")
        if self.since_ms is not None and self.until_ms is not None and self.until_ms <= self.since_ms:
            raise InvalidReplay("--until must be after --since")


@dataclass(frozen=True)
class PartitionRange:
    start: int  # first offset to read
    end: int  # first offset not to read

    @property
    def size(self) -> int:
        """Offsets in the range (records, less any transaction markers or compacted-away records)."""
        return max(0, self.end - self.start)


def partition_range(bounds: Bounds, low: int, high: int, since_offset: int | None = None,
                    until_offset: int | None = None) -> PartitionRange:
    """The offsets of one partition to re-drive. `low`/`high` are its watermarks; `since_offset`/`until_offset`
    what Kafka's offsets_for_times gave for the time bounds (-1 or None: no record that late)."""
    start, end = low, high
    if bounds.from_offset is not None:
        start = max(start, bounds.from_offset)
    if bounds.to_offset is not None:
        end = min(end, bounds.to_offset + 1)
    if bounds.since_ms is not None:
        start = max(start, high if since_offset is None or since_offset < 0 else since_offset)
    if bounds.until_ms is not None and until_offset is not None and until_offset >= 0:
        end = min(end, until_offset)
    return PartitionRange(start, max(start, end))


def parse_time(text: str) -> int:
    """Epoch milliseconds from an ISO 8601 instant (UTC when it names no zone) or a number of ms."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        instant = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidReplay(f"{text!r} is neither an ISO 8601 time nor epoch milliseconds") from None
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=UTC)
    return int(instant.timestamp() * 1000)


def check_label(name: str, value: str) -> str:
    if not _LABEL.fullmatch(value):  # match() and `$` would let a trailing newline through
        raise InvalidReplay(f"{name} {value!r} must be 1-{HEADER_VALUE_MAX_CHARS} letters, digits or ._:@+-")
    return value


def new_replay_id(now: float | None = None) -> str:
    stamp = datetime.fromtimestamp(time.time() if now is None else now, UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"replay-{stamp}"


Headers = list[tuple[str, bytes]]


def redriven_headers(original: Iterable[tuple[str, bytes | None]] | None, replay_id: str,
                     generation: str | None) -> Headers:
    """The record's own headers, less any replay headers it carried (a replay of a replay is tagged once, by the
    newest), plus this replay's."""
    ours = {REPLAY_ID_HEADER, GENERATION_HEADER}
    kept = [(k, v or b"") for k, v in original or () if k not in ours]
    kept.append((REPLAY_ID_HEADER, replay_id.encode()))
    if generation:
        kept.append((GENERATION_HEADER, generation.encode()))
    return kept


def parse_sku_file(lines: Iterable[str]) -> frozenset[str]:
    """One SKU id per line; blank lines and lines starting with # are skipped."""
    return frozenset(s for s in (line.strip() for line in lines) if s and not s.startswith("#"))


class Pace:
    """At most `rate` records a second on average, measured from the start (None: as fast as Kafka takes them)."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        if rate is not None and rate <= 0:
            raise InvalidReplay("--rate must be a positive number of records a second")
        self._rate = rate
        self._clock = clock
        self._sleep = sleep
        self._start = clock()
        self._sent = 0

    def sent(self, count: int) -> None:
        self._sent += count
        if self._rate is None:
            return
        ahead = self._sent / self._rate - (self._clock() - self._start)
        if ahead > 0:
            self._sleep(ahead)
