"""Which records a worker held when it died, so that a record that kills the process is dead-lettered.

Before a record is decoded, and before a batch is rendered, the worker writes its coordinates to a small file
(one per activity); it clears the file when the step ends, normally or by a handled exception. A file that still
names records when the next process opens the journal means the last one died in that step.

Not every death is a record's doing, and the journal weighs the evidence. A death is *by a fault* when the process
ended itself: a fatal signal of its own (a segfault in a C extension: faulthandler writes its traceback to the
journal's fault file), a step's deadline (the deadline monitor notes the step, `overdue`, in the second before the
timer ends the process; the timer's traceback goes to the fault file too), or an exception that escaped a step
(its entry says so). Each record held then gets a strike. A death without such evidence (a SIGKILL from outside:
a deploy past its grace period, an operator, the OOM killer) blames no record for sure: the records held become
suspects, and a record held alone counts an unexplained death.

A suspect is rendered alone, so that the next death names one record. A record is dead-lettered on sight,
without being decoded or rendered again, after `max_strikes` deaths by a fault, or `max_deaths` deaths of any
kind: a record that always gets its process killed from outside (memory) must not stall its partition for good,
but a few outside kills of a busy worker must not fail healthy requests. A death by a step's deadline blames that
step's records only, and a commit stuck through a broker outage blames none. A deliberate exit (bad settings, a
device outage) clears the files first, so it never counts. The files live in page cache: a SIGKILL does not lose
them (only a machine crash, which blames nobody). They are written through a shared memory map: a write is a copy
in memory, with no system call, so the intake loop (a write before and after every record) never hands the
interpreter's lock to the render thread and waits to get it back.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import mmap
import os
import sys
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TextIO

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
FAULT_LOG_CHARS = 4000  # of the last process's fault traceback, logged by the next one


@dataclass(frozen=True, slots=True)
class Deaths:
    """The deaths of worker processes while they held one record (a record with an entry is a suspect)."""

    by_fault: int = 0  # the process ended itself (a fatal signal, a deadline, an escaped exception)
    unexplained: int = 0  # no evidence either way (a SIGKILL from outside), with the record held alone

    @property
    def total(self) -> int:
        return self.by_fault + self.unexplained


class Deliberate(Exception):
    """Base of exceptions that end a step on purpose: the records held are not to blame."""


class CrashJournal:
    def __init__(self, folder: str | Path, name: str, max_strikes: int = 2, max_deaths: int = 5):
        self._folder = Path(folder)
        self._folder.mkdir(parents=True, exist_ok=True)
        self._name = name
        self.max_strikes = max_strikes
        self.max_deaths = max_deaths
        self._lock = threading.Lock()
        self._fds = {a: os.open(self._path(a), os.O_RDWR | os.O_CREAT, 0o644) for a in ACTIVITIES}
        self._quoted: dict[str, str] = {}
        self._deaths: dict[Source, Deaths] = self._load_deaths()
        self._weigh_last_death()
        self.overdue(None)
        self._save_deaths()
        self._faults_before = faulthandler.is_enabled()
        # Opened after the last process's faults were read: a fatal signal of this one writes its traceback here.
        self.fault_file: TextIO = open(self._path("fault"), "w", encoding="utf-8")  # noqa: SIM115 - kept open
        faulthandler.enable(file=self.fault_file, all_threads=True)
        self._maps: dict[str, mmap.mmap] = {}
        self._written: dict[str, int] = {}
        for activity in ACTIVITIES:
            self._map(activity, MAP_BYTES)
            self._written[activity] = MAP_BYTES  # blank whatever the last process left
            self._write(activity, [])

    def deaths(self, source: Source) -> Deaths | None:
        """None for a record no process died holding (nearly all of them)."""
        return self._deaths.get(source)

    def is_poison(self, deaths: Deaths) -> bool:
        return deaths.by_fault >= self.max_strikes or deaths.total >= self.max_deaths

    def _weigh_last_death(self) -> None:
        fault = self._read_fault()
        if fault:
            log.error("the last process ended by a fault:\n%s", fault[-FAULT_LOG_CHARS:])
        blamed = self._read_overdue()
        if blamed is not None:
            log.warning("the last process was past the deadline of a step; a death then blames the records of %s "
                        "only", " and ".join(blamed) or "no activity (an outage is no record's fault)")
        touched = []
        for activity in ACTIVITIES:
            held, raised = self._read(activity)
            if not held or (blamed is not None and activity not in blamed):
                continue
            if raised:
                log.error("the last process ended by %s escaping the %s of %s", raised, activity, held)
            by_fault = bool(fault) or blamed is not None or raised is not None
            for src in held:
                was = self._deaths.get(src, Deaths())
                if by_fault:
                    self._deaths[src] = Deaths(was.by_fault + 1, was.unexplained)
                elif len(held) == 1:
                    self._deaths[src] = Deaths(was.by_fault, was.unexplained + 1)
                else:  # killed from outside with a batch in hand: each record renders alone next, unblamed yet
                    self._deaths[src] = was
            touched += held
        if touched:
            log.error("the last process died holding %d record(s); deaths now %s", len(touched),
                      {f"{t}[{p}]@{o}": (d.by_fault, d.unexplained) for (t, p, o), d in self._deaths.items()})

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
        """Forgets the deaths of records whose offsets are now committed (their outcome is final)."""
        with self._lock:
            done = [s for s in self._deaths if (s[0], s[1]) in offsets and s[2] < offsets[(s[0], s[1])]]
            for src in done:
                del self._deaths[src]
        if done:
            self._save_deaths()

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

    def _write(self, activity: str, sources: list[Source], raised: str | None = None) -> None:
        """The JSON of `sources` (of an object naming the exception that escaped, when one did), then spaces over
        what is left of the previous, longer write."""
        data = self._json(sources)
        if raised is not None:
            data = b'{"raised": %s, "held": %s}' % (json.dumps(raised).encode(), data)
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

    def _read(self, activity: str) -> tuple[list[Source], str | None]:
        """The records the last process held in `activity`, and the exception that escaped it, if one did."""
        try:
            entry = json.loads(self._path(activity).read_bytes().rstrip(b"\0 ") or b"[]")
            raised = None
            if isinstance(entry, dict):
                raised, entry = str(entry["raised"]), entry["held"]
            return [(str(t), int(p), int(o)) for t, p, o in entry], raised
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("crash journal %s unreadable (%s); ignored", self._path(activity), exc)
            return [], None

    def _read_fault(self) -> str:
        try:
            return self._path("fault").read_text(encoding="utf-8", errors="replace").strip()
        except FileNotFoundError:
            return ""

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

    def _load_deaths(self) -> dict[Source, Deaths]:
        """Rows of [topic, partition, offset, by_fault, unexplained]; an older journal's rows have one count, of
        deaths of any kind, which are taken as by a fault (as they were then)."""
        path = self._path("strikes")
        try:
            rows = json.loads(path.read_text() or "[]")
            return {(str(t), int(p), int(o)): Deaths(int(n), int(rest[0]) if rest else 0) for t, p, o, n, *rest in rows}
        except FileNotFoundError:
            return {}
        except (ValueError, TypeError) as exc:
            log.warning("crash journal %s unreadable (%s); ignored", path, exc)
            return {}

    def _save_deaths(self) -> None:
        with self._lock:
            rows = [[t, p, o, d.by_fault, d.unexplained] for (t, p, o), d in self._deaths.items()]
        path = self._path("strikes")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(rows))
        os.replace(tmp, path)

    def close(self) -> None:
        faulthandler.disable()
        if self._faults_before and sys.__stderr__ is not None:  # a test runner's was in place: one back on stderr
            faulthandler.enable(file=sys.__stderr__, all_threads=True)
        self.fault_file.close()
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
        else:  # it ends the process: the next one blames the records held, as by a fault
            self._journal._write(self._activity, self._sources, raised=kind.__name__)
