"""Liveness of a long-running process: deadlines that end it when a step hangs, and a heartbeat health file.

A hang is worse than a crash: the partitions stay assigned and every later offset waits behind the stuck one.
`Deadlines` ends the process (exit code 1, every thread's stack on stderr or in `dump_to`) when a guarded step
outlives its limit. It arms faulthandler's timer, which runs in a C thread: it fires even while a C extension
spins with the GIL held, where a Python watchdog thread would never get to run. The supervisor then starts a fresh
process.

`Heartbeat` writes the health file: one JSON object with when each loop last went round, rewritten at most once a
second, so a probe can tell "started" from "making progress" (age of `main` and `render`).
"""
from __future__ import annotations

import faulthandler
import itertools
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TextIO

log = logging.getLogger(__name__)


MONITOR_PERIOD_S = 0.25
MARGIN_S = 1.0  # the timer fires this long after the deadline: time for the monitor to move or cancel it


class Deadlines:
    """Ends the process when any guarded step outlives its limit (thread-safe; one per process).

    Arming faulthandler's timer starts a thread, too costly for every step of a busy loop. So a step that starts
    arms it only when nothing earlier is armed, a step that ends arms nothing, and a monitor thread moves the
    timer to the earliest active deadline (or cancels it) a few times a second. The timer is set MARGIN_S after
    that deadline, so the monitor always has time to move it once its step has ended in time."""

    def __init__(self, on_overdue: Callable[[str | None], None] | None = None, *,
                 monitor_period_s: float = MONITOR_PERIOD_S, dump_to: TextIO | None = None) -> None:
        """`on_overdue` hears, from the monitor thread, the step whose deadline has passed and that will end the
        process (the earliest), and None once no step is overdue: in the MARGIN_S before the timer fires, the crash
        journal can note which step's records a death blames. A step that spins with the GIL held keeps the monitor
        from running, and then nothing is heard. `dump_to` takes the stacks instead of stderr (the worker's crash
        journal, whose next process logs them)."""
        self._dump_to = dump_to
        self._lock = threading.Lock()
        self._active: dict[int, tuple[float, str]] = {}
        self._ids = itertools.count()
        self._armed_until: float | None = None
        self._period = monitor_period_s
        self._on_overdue = on_overdue
        self._report_lock = threading.Lock()
        self._reported: int | None = None  # the token of the overdue step last reported
        threading.Thread(target=self._monitor, name="zimage-deadlines", daemon=True).start()

    @contextmanager
    def guard(self, what: str, limit_s: float) -> Iterator[None]:
        token = next(self._ids)
        deadline = time.monotonic() + limit_s
        with self._lock:
            self._active[token] = (deadline, what)
            if self._armed_until is None or deadline + MARGIN_S < self._armed_until:
                self._arm(deadline)  # before the step runs: it may never let the monitor run again
        try:
            yield
        finally:
            with self._lock:
                del self._active[token]
            if self._reported == token:  # it ended late, but it ended: a death now is not its doing
                self._report(None)

    def _monitor(self) -> None:
        while True:
            time.sleep(self._period)
            overdue = None
            with self._lock:
                if self._active:
                    token, (deadline, _) = min(self._active.items(), key=lambda item: item[1][0])
                    self._arm(deadline)
                    overdue = token if deadline < time.monotonic() else None
                elif self._armed_until is not None:
                    faulthandler.cancel_dump_traceback_later()
                    self._armed_until = None
            if overdue != self._reported:
                self._report(overdue)

    def _report(self, token: int | None) -> None:
        if self._on_overdue is None:
            return
        with self._report_lock:
            with self._lock:
                step = self._active.get(token) if token is not None else None
            if token is not None and step is None:
                return  # it ended meanwhile
            if token == self._reported:
                return
            self._reported = token
            try:
                self._on_overdue(None if step is None else step[1])
            except Exception:  # a note that could not be written costs a wider blame, nothing more
                log.exception("noting an overdue step failed")

    def _arm(self, deadline: float) -> None:
        """(lock held)"""
        self._armed_until = deadline + MARGIN_S
        faulthandler.dump_traceback_later(max(0.001, self._armed_until - time.monotonic()), exit=True,
                                          file=self._dump_to or sys.stderr)


class Heartbeat:
    """The health file: written when the process is ready, refreshed as its loops go round, removed at exit."""

    def __init__(self, path: str | None, worker_id: str, min_interval_s: float = 1.0):
        self._path = Path(path) if path else None
        self._worker_id = worker_id
        self._interval = min_interval_s
        self._beats: dict[str, float] = {}
        self._written = 0.0
        self._lock = threading.Lock()

    def beat(self, loop: str) -> None:
        """`loop` went round; cheap enough for every iteration (the file is written at most once a second)."""
        now = time.time()
        with self._lock:  # one writer at a time: the loops of several threads beat into one file
            self._beats[loop] = now
            if now - self._written < self._interval:
                return
            self._written = now
            self._write(dict(self._beats))

    def _write(self, beats: dict[str, float]) -> None:
        if self._path is None:
            return
        tmp = self._path.with_name(f".{self._path.name}.{os.getpid()}")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"worker_id": self._worker_id, "pid": os.getpid(), "beats": beats}) + "\n")
            os.replace(tmp, self._path)
        except OSError as exc:  # a probe goes stale; the work itself goes on
            log.warning("health file %s not written: %s", self._path, exc)

    def ready(self) -> None:
        with self._lock:
            self._written = 0.0
        self.beat("ready")

    def clear(self) -> None:
        with self._lock:
            self._written = float("inf")  # no beat after this writes the file again
            if self._path is not None:
                self._path.unlink(missing_ok=True)
