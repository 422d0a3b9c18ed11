"""The render stage of a worker: one thread drives the renderer; a small pool encodes and stores beside it.

The render thread never waits on PNG encoding, uploads or Kafka: it hands each finished batch to the pool
(bounded, so memory stays flat when storage is slow) and asks the scheduler for the next batch at once.
"""
from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from connectors.kafka import OutRecord
from connectors.storage import ObjectStore
from processors.batching import Batch, Pending
from processors.events import image_rendered
from processors.imaging import encode_png, object_key, sha256_hex
from processors.renderer import (RenderItem, RenderSettings, UnsupportedSettings, is_out_of_memory,
                                 render_splitting_on_oom)
from processors.requests import image_seeds, settings_of
from streams import metrics

log = logging.getLogger(__name__)


class BatchRenderer(Protocol):
    model_id: str
    model_version: str

    def render(self, items: Sequence[RenderItem], settings: RenderSettings) -> list[np.ndarray]: ...

    def check_settings(self, settings: RenderSettings) -> None: ...


@dataclass(frozen=True)
class Admitted:
    """What the worker keeps of a consumed request until its outputs are committed."""

    request: dict[str, Any]
    raw: bytes
    epoch: int
    consumed_ms: int


# Called with (pending, records to produce, status for metrics, reason or "").
OnDone = Callable[[Pending, list[OutRecord], str, str], None]
# Called with (pending, code, reason, retriable): the worker turns it into RequestFailed + dead letter.
OnFail = Callable[[Pending, str, str, bool], None]


class RenderStage:
    def __init__(self, *, renderer: BatchRenderer, store: ObjectStore, encode_rendered: Callable[[dict], bytes],
                 rendered_topic: str, worker_id: str, take_batch: Callable[[float], Batch | None],
                 on_done: OnDone, on_fail: OnFail, post_threads: int = 2, max_inflight_batches: int = 4,
                 render_retries: int = 2, store_retries: int = 5, backoff_s: float = 0.2):
        self._renderer = renderer
        self._store = store
        self._encode = encode_rendered
        self._topic = rendered_topic
        self._worker_id = worker_id
        self._take = take_batch
        self._on_done = on_done
        self._on_fail = on_fail
        self._pool = ThreadPoolExecutor(post_threads, thread_name_prefix="zimage-post")
        self._inflight = threading.BoundedSemaphore(max_inflight_batches)
        self._render_retries = render_retries
        self._store_retries = store_retries
        self._backoff = backoff_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zimage-render", daemon=True)
        self.busy = metrics.BusyMeter()
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finishes the batch in hand and the stores in flight, then returns."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._pool.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._take(0.1)
                if batch is not None:
                    self._render(batch)
        except BaseException as exc:  # the worker checks `failure` and stops loudly
            log.exception("render thread died")
            self.failure = exc

    def _render(self, batch: Batch) -> None:
        requests = [p.payload.request for p in batch.items]
        seeds = [image_seeds(r) for r in requests]
        items = [RenderItem(r["prompt"], r.get("negative_prompt"), s) for r, ss in zip(requests, seeds) for s in ss]
        settings = settings_of(requests[0])  # the batch's compatibility key makes them all equal
        rendered = self._render_with_retries(batch, items, settings)
        if rendered is None:
            return
        images, render_s = rendered
        self._inflight.acquire()  # bounded hand-off: back-pressure only if storage falls far behind
        fut = self._pool.submit(self._store_batch, batch, seeds, images, render_s * 1000)
        fut.add_done_callback(self._stored)

    def _stored(self, fut: Future) -> None:
        self._inflight.release()
        exc = fut.exception()
        if exc is not None:  # a request of that batch has no outcome: stop loudly rather than stall its partition
            log.error("storing a batch failed: %r", exc)
            self.failure = exc

    def _render_with_retries(self, batch: Batch, items: list[RenderItem],
                             settings: RenderSettings) -> tuple[list[np.ndarray], float] | None:
        for attempt in range(self._render_retries + 1):
            start = time.monotonic()
            try:
                images = render_splitting_on_oom(self._renderer.render, items, settings)
            except Exception as exc:  # noqa: BLE001 - any renderer failure is counted and handled here
                kind = "oom" if is_out_of_memory(exc) else "render"
                metrics.ERRORS.labels(kind).inc()
                log.warning("batch %s (%d images) failed, attempt %d: %r", batch.id, len(items), attempt + 1, exc)
                permanent = kind == "oom" or isinstance(exc, UnsupportedSettings)
                if permanent or attempt == self._render_retries:
                    for p in batch.items:
                        self._on_fail(p, "render_error", f"{type(exc).__name__}: {exc}", False)
                    return None
                time.sleep(self._backoff * 2**attempt)
                continue
            end = time.monotonic()
            self.busy.add(start, end)
            metrics.INFERENCE_LATENCY.observe(end - start)
            metrics.BATCH_SIZE.observe(len(items))
            return images, end - start
        return None

    def _store_batch(self, batch: Batch, seeds: list[list[int]], images: list[np.ndarray], render_ms: float) -> None:
        at = 0
        for pending, request_seeds in zip(batch.items, seeds):
            mine = images[at:at + len(request_seeds)]
            at += len(request_seeds)
            try:
                record = self._store_request(batch, pending, request_seeds, mine, render_ms)
            except Exception as exc:  # noqa: BLE001 - storage gave up after its retries
                metrics.ERRORS.labels("storage").inc()
                self._on_fail(pending, "storage_error", f"{type(exc).__name__}: {exc}", True)
                continue
            self._on_done(pending, [record], "rendered", "")

    def _store_request(self, batch: Batch, pending: Pending, seeds: list[int], images: list[np.ndarray],
                       render_ms: float) -> OutRecord:
        request = pending.payload.request
        t0 = time.monotonic()
        encoded = [encode_png(img) for img in images]
        t1 = time.monotonic()
        stored = []
        for index, (data, seed) in enumerate(zip(encoded, seeds)):
            key = object_key(request["request_id"], index, self._renderer.model_version)
            uri = self._put_with_retries(key, data)
            stored.append({"index": index, "uri": uri, "sha256": sha256_hex(data), "seed": seed,
                           "size_bytes": len(data)})
        t2 = time.monotonic()
        now_ms = int(time.time() * 1000)
        event = image_rendered(
            request=request, images=stored, model_id=self._renderer.model_id,
            model_version=self._renderer.model_version,
            timings_ms={"queue": (batch.formed_at - pending.enqueued_at) * 1000, "render": render_ms,
                        "encode": (t1 - t0) * 1000, "store": (t2 - t1) * 1000},
            batch_id=batch.id, batch_size=len(batch.items), worker_id=self._worker_id,
            source=pending.source, now_ms=now_ms)
        return OutRecord(self._topic, self._encode(event), request["request_id"].encode())

    def _put_with_retries(self, key: str, data: bytes) -> str:
        for attempt in range(self._store_retries):
            try:
                return self._store.put(key, data, "image/png")
            except Exception as exc:  # noqa: BLE001 - storage errors are transient until proven otherwise
                if attempt == self._store_retries - 1:
                    raise
                log.warning("store %s failed (attempt %d): %r", key, attempt + 1, exc)
                time.sleep(self._backoff * 2**attempt)
        raise AssertionError("unreachable")
