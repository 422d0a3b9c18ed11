"""The client SDK: submit image requests to zimage-stream over its HTTP API, or straight to Kafka.

    from connectors.client import ZImageClient

    client = ZImageClient("http://127.0.0.1:8080", api_key="zk_...")
    result = client.generate("a teapot, studio photo", width=512, height=512, seed=42)   # waits
    handle = client.submit("a lamp")                                                   # returns at once
    result = handle.wait(timeout_s=120)              # or: result = await handle
    results = client.batch_generate([{"prompt": p} for p in prompts], concurrency=4)   # progress bar

HTTP calls are retried with exponential backoff (with jitter) on 429, 5xx and connection errors, honouring the
server's Retry-After. A submission is retried under the same Idempotency-Key, so a retry never renders twice.
`ZImageClient.over_kafka(...)` submits GenerationRequest records directly to the request topics and waits on
`images.ready` / `requests.failed` instead (no API, no keys: for services inside the cluster).
"""
from __future__ import annotations

import asyncio
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
FINAL_STATES = frozenset({"completed", "failed", "cancelled"})


class ZImageError(RuntimeError):
    """A call that failed for good: `status` is the HTTP status (None for Kafka or a timeout)."""

    def __init__(self, message: str, status: int | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.code = code


class GenerationFailed(ZImageError):
    """The pipeline ended the request without an image (refused, blocked, failed, cancelled)."""


@dataclass(frozen=True)
class Image:
    index: int
    url: str | None  # an HTTPS (presigned or CDN) URL over HTTP; the object URI (s3://, file://) over Kafka
    sha256: str
    seed: int


@dataclass(frozen=True)
class Result:
    """A finished request: its state, images when completed, the error otherwise."""

    id: str
    state: str
    images: tuple[Image, ...] = ()
    error: str | None = None
    raw: Mapping[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.state == "completed"

    @property
    def url(self) -> str | None:
        return self.images[0].url if self.images else None

    @property
    def seed(self) -> int | None:
        return self.images[0].seed if self.images else None


@dataclass(frozen=True)
class BatchItem:
    """One entry of batch_generate: `result` when the request finished, else `error` (never both None)."""

    index: int
    request: Mapping[str, Any]
    result: Result | None = None
    error: Exception | None = None

    @property
    def ok(self) -> bool:
        return self.result is not None and self.result.ok


class _Transport(Protocol):
    def submit(self, fields: Mapping[str, Any], idempotency_key: str, sync_timeout_s: float | None) -> Result | str:
        """The finished Result (sync), or the request id to wait for."""
        ...

    def poll(self, request_id: str) -> Result | None: ...

    def wait(self, request_id: str, timeout_s: float) -> Result: ...

    def cancel(self, request_id: str) -> None: ...


class TaskHandle:
    """A submitted request: poll it, wait for it, cancel it, or `await` it."""

    def __init__(self, transport: _Transport, request_id: str):
        self._transport = transport
        self.id = request_id

    def poll(self) -> Result | None:
        """The result once final, else None."""
        return self._transport.poll(self.id)

    def wait(self, timeout_s: float = 300.0) -> Result:
        """The final result; raises ZImageError on timeout."""
        return self._transport.wait(self.id, timeout_s)

    def cancel(self) -> None:
        """Cancel while still queued; raises ZImageError (409) once rendering has started."""
        self._transport.cancel(self.id)

    def __await__(self):
        return asyncio.to_thread(self.wait).__await__()


class ZImageClient:
    def __init__(self, base_url: str = "http://127.0.0.1:8080", api_key: str | None = None, *,
                 timeout_s: float = 30.0, max_retries: int = 5, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0, transport: _Transport | None = None,
                 http_transport: httpx.BaseTransport | None = None):
        self._transport: _Transport = transport or _HttpTransport(
            base_url, api_key, timeout_s=timeout_s, retry=_Backoff(max_retries, backoff_base_s, backoff_max_s),
            http_transport=http_transport)

    @classmethod
    def over_kafka(cls, bootstrap_servers: str, *, tenant: str, topic_prefix: str = "zimage",
                   kafka_config: Mapping[str, str] | None = None) -> ZImageClient:
        """A client that produces GenerationRequest records itself and reads the outcome topics."""
        from connectors.api_client_kafka import KafkaTransport

        conf = {"bootstrap.servers": bootstrap_servers, **(kafka_config or {})}
        return cls(transport=KafkaTransport(conf, tenant=tenant, topic_prefix=topic_prefix))

    def submit(self, prompt: str | None = None, *, idempotency_key: str | None = None, **fields: Any) -> TaskHandle:
        """Queue a request and return at once. Fields are those of POST /v1/images/generations."""
        request = _fields(prompt, fields)
        answer = self._transport.submit(request, idempotency_key or uuid.uuid4().hex, None)
        return TaskHandle(self._transport, answer.id if isinstance(answer, Result) else answer)

    def generate(self, prompt: str | None = None, *, timeout_s: float = 300.0, idempotency_key: str | None = None,
                 raise_on_failure: bool = True, **fields: Any) -> Result:
        """Queue a request and wait for its outcome (sync mode, then polling past the server's wait)."""
        request = _fields(prompt, fields)
        started = time.monotonic()
        answer = self._transport.submit(request, idempotency_key or uuid.uuid4().hex, timeout_s)
        result = answer if isinstance(answer, Result) and answer.state in FINAL_STATES else None
        if result is None:
            request_id = answer.id if isinstance(answer, Result) else answer
            result = self._transport.wait(request_id, max(0.0, timeout_s - (time.monotonic() - started)))
        if raise_on_failure and not result.ok:
            raise GenerationFailed(f"request {result.id} {result.state}: {result.error}", code=result.error)
        return result

    def batch_generate(self, requests: Iterable[Mapping[str, Any]], *, concurrency: int = 4,
                       timeout_s: float = 300.0, progress: bool = True) -> list[BatchItem]:
        """Generates every request with at most `concurrency` in flight (a semaphore), showing a tqdm progress bar;
        returns one BatchItem per request, in order, with its result or its error. Nothing is raised for one item."""
        items = list(requests)
        gate = threading.Semaphore(max(1, concurrency))
        out: list[BatchItem | None] = [None] * len(items)

        def one(index: int, request: Mapping[str, Any]) -> BatchItem:
            with gate:
                try:
                    result = self.generate(timeout_s=timeout_s, raise_on_failure=False, **dict(request))
                    error = None if result.ok else GenerationFailed(f"{result.state}: {result.error}",
                                                                     code=result.error)
                    return BatchItem(index, request, result, error)
                except Exception as exc:  # noqa: BLE001 - one item's error is reported in its BatchItem
                    return BatchItem(index, request, None, exc)

        from tqdm import tqdm

        with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool, \
                tqdm(total=len(items), disable=not progress, desc="zimage", unit="img") as bar:
            futures = [pool.submit(one, i, r) for i, r in enumerate(items)]
            for future in futures:
                item = future.result()
                out[item.index] = item
                bar.update(1)
                bar.set_postfix(failed=sum(1 for x in out if x is not None and not x.ok))
        return [item for item in out if item is not None]

    def task(self, request_id: str) -> Result | None:
        """The result of a request once final, else None."""
        return self._transport.poll(request_id)


def _fields(prompt: str | None, fields: Mapping[str, Any]) -> dict[str, Any]:
    request = dict(fields)
    if prompt is not None:
        request["prompt"] = prompt
    if "prompt" not in request:
        raise ValueError("a request needs a prompt")
    return request


@dataclass(frozen=True)
class _Backoff:
    max_retries: int
    base_s: float
    max_s: float

    def delay(self, attempt: int, retry_after: str | None) -> float:
        """The wait before retry `attempt` (1, 2, ...): Retry-After when the server gave one, else exponential
        with full jitter."""
        if retry_after is not None:
            try:
                return min(self.max_s, max(0.0, float(retry_after)))
            except ValueError:
                pass
        return random.uniform(0, min(self.max_s, self.base_s * 2 ** (attempt - 1)))


class _HttpTransport:
    def __init__(self, base_url: str, api_key: str | None, *, timeout_s: float, retry: _Backoff,
                 http_transport: httpx.BaseTransport | None, sleep: Callable[[float], None] = time.sleep):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=timeout_s,
                                  transport=http_transport)
        self._timeout_s = timeout_s
        self._retry = retry
        self._sleep = sleep

    def _call(self, method: str, path: str, *, read_timeout_s: float | None = None, **kwargs: Any) -> httpx.Response:
        attempt = 0
        while True:
            attempt += 1
            try:
                timeout = httpx.Timeout(self._timeout_s, read=read_timeout_s or self._timeout_s)
                response = self._http.request(method, path, timeout=timeout, **kwargs)
            except httpx.TransportError as exc:
                if attempt > self._retry.max_retries:
                    raise ZImageError(f"{method} {path}: {exc}") from exc
                self._sleep(self._retry.delay(attempt, None))
                continue
            if response.status_code in RETRIED_STATUSES and attempt <= self._retry.max_retries:
                self._sleep(self._retry.delay(attempt, response.headers.get("Retry-After")))
                continue
            if response.status_code >= 400:
                try:
                    detail = response.json().get("detail")
                except ValueError:
                    detail = response.text[:500]
                raise ZImageError(f"{method} {path}: HTTP {response.status_code}: {detail}", response.status_code)
            return response

    def submit(self, fields: Mapping[str, Any], idempotency_key: str, sync_timeout_s: float | None) -> Result | str:
        body = dict(fields)
        read_timeout = None
        if sync_timeout_s is not None:
            body.update(mode="sync", timeout_s=max(0.1, sync_timeout_s))
            read_timeout = sync_timeout_s + self._timeout_s
        answer = self._call("POST", "/v1/images/generations", json=body, read_timeout_s=read_timeout,
                            headers={"Idempotency-Key": idempotency_key})
        data = answer.json()
        return _result(data) if answer.status_code == 200 else str(data["id"])

    def poll(self, request_id: str) -> Result | None:
        data = self._call("GET", f"/v1/tasks/{request_id}").json()
        return _result(data) if data["state"] in FINAL_STATES else None

    def wait(self, request_id: str, timeout_s: float) -> Result:
        deadline = time.monotonic() + timeout_s
        pause = 0.2
        while True:
            result = self.poll(request_id)
            if result is not None:
                return result
            if time.monotonic() >= deadline:
                raise ZImageError(f"request {request_id} not finished within {timeout_s:.0f}s")
            self._sleep(min(pause, max(0.0, deadline - time.monotonic())))
            pause = min(pause * 1.5, 2.0)

    def cancel(self, request_id: str) -> None:
        self._call("DELETE", f"/v1/tasks/{request_id}")


def _result(task: Mapping[str, Any]) -> Result:
    images = tuple(Image(i["index"], i.get("url"), i["sha256"], i["seed"]) for i in task.get("images") or ())
    error = task.get("error")
    return Result(id=task["id"], state=task["state"], images=images,
                  error=f"{error['code']}: {error['message']}" if error else None, raw=task)


def as_results(items: Sequence[BatchItem]) -> tuple[list[Result], list[BatchItem]]:
    """The successes' results, and the items that failed."""
    return [i.result for i in items if i.ok and i.result is not None], [i for i in items if not i.ok]
