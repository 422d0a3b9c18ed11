"""When a render worker commits: at once at light load, at most every BUSY_COMMIT_S under load, and every interval
whatever is unfinished."""
from __future__ import annotations

import pytest

from processors.commit_policy import BUSY_COMMIT_S, commit_due

INTERVAL = 0.05


def due(since_last: float, polled: int, finished: bool = True, batch: int = 500) -> bool:
    return commit_due(since_last, 0.0, polled, batch, INTERVAL, finished)


@pytest.mark.parametrize("polled", [0, 1])
def test_at_light_load_finished_work_commits_at_once(polled):
    assert due(0.0001, polled)
    assert not due(0.0001, polled, finished=False)


def test_under_load_finished_work_commits_at_most_every_busy_interval():
    assert not due(BUSY_COMMIT_S / 2, polled=12)
    assert due(BUSY_COMMIT_S, polled=12)
    assert not due(BUSY_COMMIT_S, polled=12, finished=False)


def test_a_full_poll_waits_for_the_interval_which_commits_whatever_is_unfinished():
    assert not due(INTERVAL / 2, polled=500)
    assert due(INTERVAL, polled=500)
    assert due(INTERVAL, polled=3, finished=False)
