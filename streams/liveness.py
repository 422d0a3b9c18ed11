"""Liveness of a long-running process: deadlines that end it when a step hangs, and a heartbeat health file.

A hang is worse than a crash: the partitions stay assigned and every later offset waits behind the stuck one.
`Deadlines` ends the process (exit code 1, every thread's stack on stderr) when a guarded step outlives its
limit. It arms faulthandler's timer, which runs in a C thread: it fires even while a C extension spins with the
GIL held, where a Python watchdog thread would never get to run. The supervisor then starts a fresh process.

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
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


MONITOR_PERIOD_S = 0.25
MARGIN_S = 1.0  # the timer fires this long after the deadline: time for the monitor to move or cancel it


class Deadlines:
    """Ends the process when any guarded step outlives its limit (thread-safe; one per process).

    Arming faulthandler's timer starts a thread, too costly for every step of a busy loop. So a step that starts
    arms it only when nothing earlier is armed, a step that ends arms nothing, and a monitor thread moves the
    timer to the earliest active deadline (or cancels it) a few times a second. The timer is set MARGIN_S after
    that deadline, so the monitor always has time to move it once its step has ended in time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active: dict[int, tuple[float, str]] = {}
        self._ids = itertools.count()
        self._armed_until: float | None = None
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

    def _monitor(self) -> None:
        while True:
            time.sleep(MONITOR_PERIOD_S)
            with self._lock:
                if self._active:
                    self._arm(min(self._active.values())[0])
                elif self._armed_until is not None:
                    faulthandler.cancel_dump_traceback_later()
                    self._armed_until = None

    def _arm(self, deadline: float) -> None:
        """(lock held)"""
        self._armed_until = deadline + MARGIN_S
        faulthandler.dump_traceback_later(max(0.001, self._armed_until - time.monotonic()), exit=True,
                                          file=sys.stderr)


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
