"""Restart-on-crash for long-running commands, as an orchestrator would (k8s restartPolicy, compose restart).

A worker or processor that hits what it cannot handle (a stuck transaction, a client that gives up after a broker
restart) stops loudly; the supervisor logs the exit and starts a fresh process with backoff. Configuration
errors (exit code CONFIG_ERROR) are not retried: a new process would fail the same way.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

log = logging.getLogger("zimage.supervise")

CONFIG_ERROR = 78  # EX_CONFIG from sysexits.h
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """The child gets SIGKILL when the supervisor dies, however it dies (no orphaned workers)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


@dataclass
class _Child:
    argv: list[str]
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff: float = 1.0
    restart_at: float | None = None


def supervise(argv: list[str], name: str) -> int:
    """Runs one command, restarted when it crashes (see supervise_all)."""
    return supervise_all({name: argv})


def supervise_all(commands: dict[str, list[str]], *, restart: bool = True, max_backoff_s: float = 30.0,
                  stable_after_s: float = 60.0) -> int:
    """Runs each command in a child process and starts a new one, with backoff, whenever one crashes (or, without
    `restart`, ends them all). SIGTERM and SIGINT go to every child. A child that exits with CONFIG_ERROR ends
    them all: nothing would start again. Returns CONFIG_ERROR, a crashed child's code without `restart`, or 0
    once every child has stopped after a signal."""
    children = {name: _Child(argv) for name, argv in commands.items()}
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children.values():
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # Every incarnation keeps the same worker id, hence the same transactional.id: the new producer fences the
    # dead one and aborts its open transaction at once instead of after transaction.timeout.ms.
    env = {**os.environ}
    env.setdefault("ZIMAGE_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}")

    def start(child: _Child) -> None:
        child.started, child.restart_at = time.monotonic(), None
        child.proc = subprocess.Popen(child.argv, preexec_fn=_die_with_parent, env=env)

    for child in children.values():
        start(child)
    while True:
        now = time.monotonic()
        for name, child in children.items():
            if child.restart_at is not None and now >= child.restart_at and not stopping:
                start(child)
            code = child.proc.poll() if child.proc is not None and child.restart_at is None else None
            if code is None:
                continue  # running, or waiting to be started again
            if code == CONFIG_ERROR or (not restart and not stopping):
                forward(signal.SIGTERM, None)
                _wait_all(children)
                return code
            if stopping:
                continue
            if now - child.started > stable_after_s:
                child.backoff = 1.0
            log.error("%s exited with code %s; starting a new one in %.0fs", name, code, child.backoff)
            print(f"zimage: {name} exited with code {code}; restarting in {child.backoff:.0f}s", file=sys.stderr,
                  flush=True)
            child.restart_at = now + child.backoff
            child.backoff = min(max_backoff_s, child.backoff * 2)
        if stopping and all(c.proc is None or c.proc.poll() is not None for c in children.values()):
            return 0
        time.sleep(0.1)


def _wait_all(children: dict[str, _Child]) -> None:
    for child in children.values():
        if child.proc is not None:
            child.proc.wait()
