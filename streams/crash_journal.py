"""Which records a worker held when it died, so that a record that kills the process is dead-lettered.

Before a record is decoded, and before a batch is rendered, the worker writes its coordinates to a small file
(one per activity); it clears the file when the step ends, normally or by a handled exception. A file that still
names records when the next process opens the journal means the last one died uncleanly in that step (a signal,
a segfault in a C extension, a deadline that ended it, an uncaught exception). Each such record gets a strike.
A death by a step's deadline blames that step's records only: once a step is past its deadline, the deadline
monitor names it here (`overdue`) in the second before the timer ends the process. A commit stuck through a broker
outage then blames no record, where it used to blame the batch that happened to be rendering.

A record with one strike is rendered alone (an innocent batch mate is not blamed twice); a record with
`max_strikes` is dead-lettered on sight without being decoded or rendered again. A deliberate exit (bad
settings, a device outage) clears the file first, so it never counts. The files live in page cache: a SIGKILL
does not lose them (only a machine crash, which blames nobody). They are written through a shared memory map:
a write is a copy in memory, with no system call, so the intake loop (a write before and after every record)
never hands the interpreter's lock to the render thread and waits to get it back.
"""
from __future__ import annotations

import json
import logging
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType

from connectors.retry import Stopping

log = logging.getLogger(__name__)

Source = tuple[str, int, int]  # topic, partition, offset
ACTIVITIES = ("intake", "render")
# The guarded steps (streams/liveness.py) whose records are in hand: when one's deadline ends the process, they
# are to blame. Any other step (a commit, a device probe) hangs on an outage, which is no record's fault.
INTAKE_STEP, RENDER_STEP = "intake", "a render batch"
STEP_ACTIVITIES = {INTAKE_STEP: ("intake",), RENDER_STEP: ("render",)}
MAP_BYTES = 64 * 1024  # a batch's coordinates fit many times over; a larger write grows the file
QUOTED_TOPICS_MAX = 1024  # topic names kept JSON-quoted; a worker reads a handful


class Deliberate(Exception):
    """Base of exceptions that end a step on purpose: the records held are not to blame."""


class CrashJournal:
    def __init__(self, folder: str | Path, name: str, max_strikes: int = 2):
        self._folder = Path(folder)
        self._folder.mkdir(parents=True, exist_ok=True)
        self._name = name
        self.max_strikes = max_strikes
        self._lock = threading.Lock()
        self._fds = {a: os.open(self._path(a), os.O_RDWR | os.O_CREAT, 0o644) for a in ACTIVITIES}
        self._quoted: dict[str, str] = {}
        self._strikes: dict[Source, int] = self._load_strikes()
        blamed = self._read_overdue()
        if blamed is not None:
            log.warning("the last process was past the deadline of a step; a death then blames the records of %s "
                        "only", " and ".join(blamed) or "no activity (an outage is no record's fault)")
        died_holding = [src for a in ACTIVITIES if blamed is None or a in blamed for src in self._read(a)]
        for src in died_holding:
            self._strikes[src] = self._strikes.get(src, 0) + 1
        if died_holding:
            log.error("the last process died holding %d record(s); strikes now %s", len(died_holding),
                      {f"{t}[{p}]@{o}": n for (t, p, o), n in self._strikes.items()})
        self.overdue(None)
        self._save_strikes()
        self._maps: dict[str, mmap.mmap] = {}
        self._written: dict[str, int] = {}
        for activity in ACTIVITIES:
            self._map(activity, MAP_BYTES)
            self._written[activity] = MAP_BYTES  # blank whatever the last process left
            self._write(activity, [])

    def strikes(self, source: Source) -> int:
        return self._strikes.get(source, 0)

    def holding(self, activity: str, sources: Iterable[Source]) -> Holding:
        """Names `sources` as in hand for the duration of the step (`with journal.holding(...):`). Cleared when the
        step ends normally or by a `Deliberate` exception; left in place when anything else escapes it, since that
        ends the process."""
        return Holding(self, activity, list(sources))

    def overdue(self, step: str | None) -> None:
        """Notes whose records a death would blame now: while `step` is past its deadline (the deadline is then what
        ends the process), those of its activity only, and none for a step that holds no record (a commit stuck in
        an outage); every activity's again once `step` is None. Rare (a step late by seconds), so a plain file."""
        path = self._path("overdue")
        if step is None:
            path.unlink(missing_ok=True)
            return
        tmp = path.with_name(f"{path.name}.tmp")
        tmp.write_text(json.dumps(list(STEP_ACTIVITIES.get(step, ()))))
        os.replace(tmp, path)

    def committed(self, offsets: dict[tuple[str, int], int]) -> None:
        """Forgets the strikes of records whose offsets are now committed (their outcome is final)."""
        with self._lock:
            done = [s for s in self._strikes if (s[0], s[1]) in offsets and s[2] < offsets[(s[0], s[1])]]
            for src in done:
                del self._strikes[src]
        if done:
            self._save_strikes()

    def _path(self, what: str) -> Path:
        return self._folder / f"{self._name}.{what}"

    def _map(self, activity: str, size: int) -> None:
        fd = self._fds[activity]
        if os.fstat(fd).st_size < size:
            os.ftruncate(fd, size)
        old = self._maps.get(activity)
        if old is not None:
            old.close()
        self._maps[activity] = mmap.mmap(fd, size)

    def _write(self, activity: str, sources: list[Source]) -> None:
        """The JSON of `sources`, then spaces over what is left of the previous, longer write."""
        data = self._json(sources)
        if len(data) > len(self._maps[activity]):
            self._map(activity, 2 * len(data))
        m, before = self._maps[activity], self._written[activity]
        m[:len(data)] = data
        if before > len(data):
            m[len(data):before] = b" " * (before - len(data))
        self._written[activity] = len(data)

    def _json(self, sources: list[Source]) -> bytes:
        """`json.dumps(sources)`, with each topic name quoted once: the intake writes twice a record, and the
        encoder's own overhead was most of that cost."""
        rows = []
        for topic, partition, offset in sources:
            quoted = self._quoted.get(topic)
            if quoted is None:
                if len(self._quoted) >= QUOTED_TOPICS_MAX:
                    self._quoted.clear()
                quoted = self._quoted[topic] = json.dumps(topic)
            rows.append(f"[{quoted}, {int(partition)}, {int(offset)}]")
        return f"[{', '.join(rows)}]".encode()

    def _read(self, activity: str) -> list[Source]:
        try:
            raw = self._path(activity).read_bytes().rstrip(b"\0 ") or b"[]"
            return [(str(t), int(p), int(o)) for t, p, o in json.loads(raw)]
        except (ValueError, TypeError) as exc:
            log.warning("crash journal %s unreadable (%s); ignored", self._path(activity), exc)
            return []

    def _read_overdue(self) -> list[str] | None:
        """The activities the last process blamed when it died past a step's deadline; None: every activity."""
        try:
            blamed = json.loads(self._path("overdue").read_text())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            log.warning("crash journal %s unreadable (%s); every record held is blamed", self._path("overdue"), exc)
            return None
        if not isinstance(blamed, list) or not all(isinstance(a, str) for a in blamed):
            log.warning("crash journal %s holds %r; every record held is blamed", self._path("overdue"), blamed)
            return None
        return blamed

    def _load_strikes(self) -> dict[Source, int]:
        path = self._path("strikes")
        try:
            return {(str(t), int(p), int(o)): int(n) for t, p, o, n in json.loads(path.read_text() or "[]")}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError) as exc:
            log.warning("crash journal %s unreadable (%s); ignored", path, exc)
            return {}

    def _save_strikes(self) -> None:
        with self._lock:
            rows = [[t, p, o, n] for (t, p, o), n in self._strikes.items()]
        path = self._path("strikes")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, path)

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        for fd in self._fds.values():
            os.close(fd)


class Holding:
    """The context of `CrashJournal.holding`: a plain class, since the intake enters one per record (a generator
    context manager cost about as much as the write itself)."""

    __slots__ = ("_activity", "_journal", "_sources")

    def __init__(self, journal: CrashJournal, activity: str, sources: list[Source]) -> None:
        self._journal, self._activity, self._sources = journal, activity, sources

    def __enter__(self) -> None:
        self._journal._write(self._activity, self._sources)

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if kind is None or issubclass(kind, (Deliberate, Stopping)):
            self._journal._write(self._activity, [])
