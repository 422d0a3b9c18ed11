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

log = logging.getLogger("zimage.supervise")

CONFIG_ERROR = 78  # EX_CONFIG from sysexits.h
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """The child gets SIGKILL when the supervisor dies, however it dies (no orphaned workers)."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def supervise(argv: list[str], name: str, *, max_backoff_s: float = 30.0, stable_after_s: float = 60.0) -> int:
    child: subprocess.Popen | None = None
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        if child is not None and child.poll() is None:
            child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    # Every incarnation keeps the same worker id, hence the same transactional.id: the new producer fences the
    # dead one and aborts its open transaction at once instead of after transaction.timeout.ms.
    env = {**os.environ}
    env.setdefault("ZIMAGE_WORKER_ID", f"{socket.gethostname()}-{os.getpid()}")
    backoff = 1.0
    while True:
        started = time.monotonic()
        child = subprocess.Popen(argv, preexec_fn=_die_with_parent, env=env)
        code = child.wait()
        if stopping or code in (0, CONFIG_ERROR):
            return code
        if time.monotonic() - started > stable_after_s:
            backoff = 1.0
        log.error("%s exited with code %s; starting a new one in %.0fs", name, code, backoff)
        print(f"zimage: {name} exited with code {code}; restarting in {backoff:.0f}s", file=sys.stderr, flush=True)
        deadline = time.monotonic() + backoff
        while time.monotonic() < deadline and not stopping:
            time.sleep(0.1)
        if stopping:
            return code
        backoff = min(max_backoff_s, backoff * 2)
