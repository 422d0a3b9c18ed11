"""The one retry policy: infrastructure errors are retried with backoff until the call works; others are raised."""
from __future__ import annotations

import threading

import pytest

from connectors.retry import Stopping, backoff_delay, until_done


class Flaky:
    def __init__(self, failures: int, error: type[BaseException] = ConnectionError):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error("down")
        return "done"


def is_outage(exc: BaseException) -> bool:
    return isinstance(exc, ConnectionError)


def test_a_call_that_works_is_called_once_and_reports_nothing():
    retries: list[int] = []
    assert until_done(Flaky(0), is_infrastructure=is_outage, on_retry=lambda e, n: retries.append(n)) == "done"
    assert retries == []


def test_an_outage_is_retried_until_it_ends_with_each_retry_reported_in_order(monkeypatch):
    monkeypatch.setattr("connectors.retry.backoff_delay", lambda attempt: 0.0)
    flaky, retries = Flaky(3), []
    assert until_done(flaky, is_infrastructure=is_outage, on_retry=lambda e, n: retries.append(n)) == "done"
    assert flaky.calls == 4 and retries == [1, 2, 3]


def test_an_error_of_the_call_itself_is_raised_at_once():
    flaky = Flaky(1, ValueError)
    with pytest.raises(ValueError):
        until_done(flaky, is_infrastructure=is_outage, on_retry=lambda e, n: None)
    assert flaky.calls == 1


def test_a_deadline_ends_the_retries_with_the_last_error(monkeypatch):
    monkeypatch.setattr("connectors.retry.backoff_delay", lambda attempt: 0.01)
    flaky = Flaky(10**9)
    with pytest.raises(ConnectionError):
        until_done(flaky, is_infrastructure=is_outage, on_retry=lambda e, n: None, within_s=0.1)
    assert 2 <= flaky.calls < 50


def test_stopping_while_waiting_raises_stopping():
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopping):
        until_done(Flaky(10**9), is_infrastructure=is_outage, on_retry=lambda e, n: None, stop=stop)


def test_backoff_grows_and_is_capped():
    assert backoff_delay(1) < backoff_delay(4) <= 30.0 + 0.2
    assert backoff_delay(50) <= 30.0 + 0.2
