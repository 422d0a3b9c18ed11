"""The client SDK without a server (httpx.MockTransport): retries with backoff that honour Retry-After and keep one
Idempotency-Key, errors that are not retried, sync answers and polling, and batch_generate's concurrency limit."""
from __future__ import annotations

import asyncio
import threading
import time

import httpx
import pytest

from connectors.client import (
    BatchItem,
    GenerationFailed,
    Result,
    ZImageClient,
    ZImageError,
    _Backoff,
    _HttpTransport,
    as_results,
)

DONE = {"id": "r1", "tenant": "acme", "state": "completed", "status_url": "/v1/tasks/r1", "seed": 5,
        "images": [{"index": 0, "url": "https://cdn.example.com/a.png", "sha256": "ab", "seed": 5}]}


def client_with(handler, sleeps: list[float] | None = None, retries: int = 3) -> ZImageClient:
    slept = sleeps if sleeps is not None else []
    transport = _HttpTransport("http://api.test", "zk_key", timeout_s=5, retry=_Backoff(retries, 0.5, 30),
                               http_transport=httpx.MockTransport(handler), sleep=slept.append)
    return ZImageClient(transport=transport)


def test_429_and_5xx_are_retried_after_retry_after_with_the_same_idempotency_key():
    seen: list[httpx.Request] = []
    answers = [httpx.Response(429, headers={"Retry-After": "7"}, json={"detail": "slow down"}),
               httpx.Response(503, json={"detail": "kafka"}), httpx.Response(200, json=DONE)]

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return answers.pop(0)

    sleeps: list[float] = []
    result = client_with(handler, sleeps).generate("a lamp", width=32)
    assert result.ok and result.url == "https://cdn.example.com/a.png" and result.seed == 5
    assert sleeps[0] == 7.0 and 0 <= sleeps[1] <= 1.0  # Retry-After, then exponential backoff with jitter
    keys = {r.headers["Idempotency-Key"] for r in seen}
    assert len(seen) == 3 and len(keys) == 1
    assert all(r.headers["Authorization"] == "Bearer zk_key" for r in seen)


def test_a_client_error_is_not_retried_and_says_why():
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(422, json={"detail": "invalid_request: width=33: must be a multiple of 16"})

    with pytest.raises(ZImageError) as caught:
        client_with(handler).submit("a lamp", width=33)
    assert caught.value.status == 422 and "multiple of 16" in str(caught.value) and len(calls) == 1


def test_retries_end_after_the_last_one():
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503, json={"detail": "down"})

    sleeps: list[float] = []
    with pytest.raises(ZImageError) as caught:
        client_with(handler, sleeps, retries=2).submit("a lamp")
    assert caught.value.status == 503 and len(sleeps) == 2


def test_a_sync_answer_still_running_is_polled_and_a_failure_raises():
    polls = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"id": "r2", "state": "queued", "status_url": "/v1/tasks/r2"})
        polls.append(request.url.path)
        if len(polls) < 3:
            return httpx.Response(200, json={**DONE, "id": "r2", "state": "in_progress", "images": []})
        return httpx.Response(200, json={**DONE, "id": "r2", "state": "failed", "images": [],
                                         "error": {"code": "blocked", "message": "sexual"}})

    with pytest.raises(GenerationFailed) as caught:
        client_with(handler).generate("a lamp", timeout_s=30)
    assert "blocked" in str(caught.value) and polls == ["/v1/tasks/r2"] * 3
    handle = client_with(handler).submit("a lamp")
    assert handle.id == "r2" and handle.wait(5).state == "failed"


class FakeTransport:
    """Answers after a pause, counting how many submissions are in flight at once."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.in_flight = 0
        self.most = 0

    def submit(self, fields, idempotency_key, sync_timeout_s):
        with self.lock:
            self.in_flight += 1
            self.most = max(self.most, self.in_flight)
        time.sleep(0.05)
        with self.lock:
            self.in_flight -= 1
        if fields["prompt"] == "refused":
            raise ZImageError("HTTP 422: prompt", 422)
        state = "failed" if fields["prompt"] == "blocked" else "completed"
        return Result(id=idempotency_key, state=state, error="blocked: no" if state == "failed" else None)

    def poll(self, request_id):
        return None

    def wait(self, request_id, timeout_s):
        raise AssertionError("not reached")

    def cancel(self, request_id):
        pass


def test_batch_generate_keeps_to_its_concurrency_and_reports_each_item():
    fake = FakeTransport()
    prompts = ["a", "refused", "b", "blocked", "c", "d", "e", "f"]
    items = ZImageClient(transport=fake).batch_generate([{"prompt": p} for p in prompts], concurrency=3,
                                                        progress=False)
    assert fake.most == 3
    assert [i.index for i in items] == list(range(8)) and [i.request["prompt"] for i in items] == prompts
    assert [i.ok for i in items] == [True, False, True, False, True, True, True, True]
    assert isinstance(items[1].error, ZImageError) and items[1].result is None
    assert isinstance(items[3].error, GenerationFailed) and items[3].result.state == "failed"
    good, bad = as_results(items)
    assert len(good) == 6 and [b.index for b in bad] == [1, 3]
    assert isinstance(items[0], BatchItem)


def test_a_handle_can_be_awaited():
    def handler(request: httpx.Request) -> httpx.Response:
        if request.method == "POST":
            return httpx.Response(202, json={"id": "r1", "state": "queued", "status_url": "/v1/tasks/r1"})
        return httpx.Response(200, json=DONE)

    async def main() -> Result:
        return await client_with(handler).submit("a lamp")

    assert asyncio.run(main()).ok
