"""When a render worker commits its transaction: pure, the caller passes the time and what its last poll held."""
from __future__ import annotations

BUSY_COMMIT_S = 0.005  # under load, the shortest time between two commits


def commit_due(now: float, last_commit: float, polled: int, consume_batch: int, interval_s: float,
               all_finished: bool) -> bool:
    """True when the worker should commit now.

    - Every `interval_s` at the latest, whatever is unfinished (what is finished commits, the rest waits).
    - At once when everything read is finished and the last poll was quiet (at most one record): at light load
      a request's outputs become visible without waiting for the interval.
    - Under load (a poll brought more than one record, but not a full batch) when everything read is finished,
      no more often than every BUSY_COMMIT_S: a transaction's fixed cost (round trips to the coordinators,
      markers on every partition it wrote) is then shared by more records. A full poll means a backlog, which
      the interval batches anyway.
    """
    if now - last_commit >= interval_s:
        return True
    if polled >= consume_batch or not all_finished:
        return False
    return polled <= 1 or now - last_commit >= BUSY_COMMIT_S
