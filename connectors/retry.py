"""The one retry policy for infrastructure faults (Kafka coordinators, storage, Schema Registry, device): capped
exponential backoff with jitter, until it works, the process stops or a deadline passes. Never a dead letter:
the request is not at fault.

Built on tenacity; botocore's own per-call retries (standard mode) sit below it for storage.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    stop_never,
    wait_exponential_jitter,
)

T = TypeVar("T")

BACKOFF = wait_exponential_jitter(multiplier=0.2, max=30.0, exp_base=2, jitter=0.2)


class Stopping(Exception):
    """The process is stopping: the work in hand is dropped unfinished (its offsets stay uncommitted)."""


def backoff_delay(attempt: int) -> float:
    """Seconds to wait before retry number `attempt` (1 for the first retry)."""
    state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]  # the wait reads only attempt_number
    state.attempt_number = attempt
    return BACKOFF(state)


def until_done(call: Callable[[], T], *, is_infrastructure: Callable[[BaseException], bool],
               on_retry: Callable[[BaseException, int], None], stop: threading.Event | None = None,
               within_s: float | None = None) -> T:
    """`call()` until it returns; infrastructure errors are retried with BACKOFF, any other error is raised.
    Raises Stopping when `stop` is set while waiting; the last error once `within_s` seconds have passed."""
    started = time.monotonic()
    try:  # the common case, without building a retry loop: this runs for every object stored
        return call()
    except BaseException as exc:  # tenacity would judge any exception too
        if not is_infrastructure(exc) or (within_s is not None and within_s <= 0):
            raise
        first = exc

    def sleep(seconds: float) -> None:
        if stop is None:
            time.sleep(seconds)
        elif stop.wait(seconds):
            raise Stopping("stopping while waiting to retry")

    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        if exc is not None:
            on_retry(exc, state.attempt_number + 1)  # the first attempt was made above

    on_retry(first, 1)
    sleep(backoff_delay(1))
    left = None if within_s is None else within_s - (time.monotonic() - started)
    if left is not None and left <= 0:
        raise first
    retrying = Retrying(stop=stop_never if left is None else stop_before_delay(left),
                        wait=lambda state: backoff_delay(state.attempt_number + 1), sleep=sleep, reraise=True,
                        before_sleep=before_sleep, retry=retry_if_exception(is_infrastructure))
    return retrying(call)
