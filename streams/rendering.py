"""The render stage of a worker: one thread drives the renderer; a small pool encodes and stores beside it.

The render thread never waits on PNG encoding, uploads or Kafka: it hands each finished batch to the pool
(bounded, so memory stays flat when storage is slow) and asks the scheduler for the next batch at once.

Faults, by whose they are (processors/fault_isolation.py):
- a request that fails when rendered alone while others succeed: RequestFailed(render_error) plus a dead letter;
- a device that fails every render and a probe too: retried with backoff, never dead-lettered; after
  `device_fault_exit_s` the worker exits (DeviceFault) so that the group hands its partitions to another;
- storage that fails: retried with backoff until it works; the pool fills, the render thread waits, the buffers
  fill and intake pauses (backpressure), and no offset of the held requests is committed;
- a batch that runs far beyond its expected time ends the process (streams/liveness.py).

Identical requests (one cache key) are rendered once: the first leads, the copies wait for its outcome and are
answered with its images or its failure (processors/inflight.py). A request cancelled while queued is failed
(`cancelled`) instead of rendered: the batch claims each request against its cancellation first.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from connectors.kafka import OutRecord
from connectors.retry import Stopping, backoff_delay, until_done
from connectors.storage import ObjectStore, UnsafeKey
from processors.admission import lineage_source
from processors.batching import Batch, Pending
from processors.events import image_rendered
from processors.fault_isolation import render_isolating_faults
from processors.imaging import encode_png, object_key, sha256_hex
from processors.inflight import Answered, Failed, InFlight, Lead, Rendered
from processors.quality import Quality, QualityPolicy, QualityReport, next_attempt, rerender_seed, score_requests
from processors.render_settings import BatchRenderer, RenderCost, RenderItem, RenderSettings, UnsupportedSettings
from processors.renderer import render_splitting_on_oom
from processors.requests import MAX_SEED, image_seeds, settings_of
from streams import metrics
from streams.crash_journal import RENDER_STEP, CrashJournal, Deliberate
from streams.failures import Origin
from streams.liveness import Deadlines, Heartbeat

log = logging.getLogger(__name__)


class DeviceFault(Deliberate):
    """Every render fails, a probe too, for longer than the worker waits: the device, not the requests."""


class OutputTooLarge(ValueError):
    """The ImageRendered of a request would exceed its topic's max.message.bytes."""


@dataclass(frozen=True)
class Admitted:
    """What the worker keeps of a consumed request until its outputs are committed."""

    request: dict[str, Any]
    origin: Origin
    epoch: int
    consumed_ms: int


# Called with (pending, records to produce, status for metrics).
OnDone = Callable[[Pending, list[OutRecord], str], None]
# Called with (pending, code, reason): the worker turns it into RequestFailed + dead letter.
OnFail = Callable[[Pending, str, str], None]
# Called with a batch's requests when it starts: the indexes of those cancelled while they were queued.
Cancelled = Callable[[list[dict[str, Any]]], set[int]]


@dataclass(frozen=True)
class StageLimits:
    device_fault_exit_s: float = 300.0  # 0: never exit for a device fault
    batch_timeout_factor: float = 10.0  # a batch may run this many times its expected time ...
    batch_timeout_floor_s: float = 120.0  # ... and never less than this before the process is ended
    render_attempts: int = 2  # tries of a request alone after its batch failed
    max_rerenders: int = 2  # renders with new seeds of a request that gave none, while its quality fails
    post_threads: int = 1  # see ZIMAGE_POST_THREADS
    max_inflight_batches: int = 4
    rendering_note_after_s: float = 0.05  # how long a batch renders before its requests are marked `rendering`


class RenderStage:
    def __init__(self, *, renderer: BatchRenderer, store: ObjectStore, encode_rendered: Callable[[dict], bytes],
                 rendered_topic: str, max_rendered_bytes: int, worker_id: str,
                 take_batch: Callable[[float], Batch | None], on_done: OnDone, on_fail: OnFail,
                 journal: CrashJournal, deadlines: Deadlines, heartbeat: Heartbeat, limits: StageLimits,
                 quality: QualityPolicy | None = None, cancelled: Cancelled = lambda requests: set(),
                 on_start: Callable[[list[dict[str, Any]]], None] = lambda requests: None):
        self._renderer = renderer
        self._store = store
        self._encode = encode_rendered
        self._topic = rendered_topic
        self._max_bytes = max_rendered_bytes
        self._worker_id = worker_id
        self._take = take_batch
        self._on_done = on_done
        self._on_fail = on_fail
        self._journal = journal
        self._deadlines = deadlines
        self._heartbeat = heartbeat
        self._limits = limits
        self._quality = quality or QualityPolicy()
        self._cancelled = cancelled
        self._on_start = on_start  # told which requests a batch starts rendering (their `rendering` status)
        self._inflight: InFlight[Pending] = InFlight()
        self._pool = ThreadPoolExecutor(limits.post_threads, thread_name_prefix="zimage-post")
        self._notes = ThreadPoolExecutor(1, thread_name_prefix="zimage-notes")  # waits, so apart from the pool
        self._handoff = threading.BoundedSemaphore(limits.max_inflight_batches)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="zimage-render", daemon=True)
        self._cost = RenderCost(limits.batch_timeout_factor, limits.batch_timeout_floor_s)
        self.busy = metrics.BusyMeter()
        self.failure: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Finishes the batch in hand and the stores in flight (a store that keeps failing is given up)."""
        self._stop.set()
        self._thread.join(timeout_s)
        self._pool.shutdown(wait=True)
        self._notes.shutdown(wait=True)

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self._heartbeat.beat("render")
                batch = self._take(0.1)
                if batch is not None:
                    self._render(batch)
        except Stopping:
            pass
        except BaseException as exc:  # the worker checks `failure` and stops loudly
            log.exception("render thread stopped")
            self.failure = exc

    # ------------------------------------------------------------------ rendering

    def _leaders(self, batch: Batch) -> list[Pending]:
        """What of the batch must be rendered: not the cancelled, nor copies of a request already in flight."""
        cancelled = self._cancelled([p.payload.request for p in batch.items])
        leaders = []
        for index, pending in enumerate(batch.items):
            if index in cancelled:
                self._on_fail(pending, "cancelled", "cancelled while queued, before rendering started")
                continue
            claim = self._inflight.claim(_cache_key(pending), pending)
            if isinstance(claim, Lead):
                leaders.append(pending)
            elif isinstance(claim, Answered):
                self._answer(pending, claim.outcome)
        return leaders  # followers are answered when their leader's outcome is known

    def _render(self, batch: Batch) -> None:
        leaders = self._leaders(batch)
        if not leaders:
            return
        requests = [p.payload.request for p in leaders]
        rendered = threading.Event()
        self._notes.submit(self._notify_start, requests, rendered)  # off the device's path
        try:
            self._render_leaders(batch, leaders, requests)
        finally:
            rendered.set()

    def _render_leaders(self, batch: Batch, leaders: list[Pending], requests: list[dict[str, Any]]) -> None:
        seeds = [image_seeds(r) for r in requests]
        settings = settings_of(requests[0])  # the batch's compatibility key makes them all equal

        def render(indexes: Sequence[int]) -> list[list[np.ndarray]]:
            items = [RenderItem(requests[i]["prompt"], requests[i].get("negative_prompt"), s)
                     for i in indexes for s in seeds[i]]
            start = time.monotonic()
            with self._deadlines.guard(RENDER_STEP, self._cost.limit_s(items, settings)):
                images = render_splitting_on_oom(self._renderer.render, items, settings)
            self._measured(start, time.monotonic(), items, settings)
            out, at = [], 0
            for i in indexes:
                out.append(list(images[at:at + len(seeds[i])]))
                at += len(seeds[i])
            return out

        started = time.monotonic()
        with self._journal.holding("render", [p.source for p in leaders]):
            isolated = self._render_until_the_device_works(render, len(leaders))
            unseeded = [i for i in sorted(isolated.results) if requests[i].get("seed") is None]  # scored here
            reports = self._reports([isolated.results[i] for i in unseeded], [settings] * len(unseeded))
            first = dict(zip(unseeded, reports, strict=True))
            done = [self._until_good_enough(i, requests[i], seeds, isolated.results[i], first.get(i), render, settings)
                    for i in sorted(isolated.results)]
        render_ms = (time.monotonic() - started) * 1000
        for index, exc in sorted(isolated.errors.items()):
            metrics.ERRORS.labels("render").inc()
            self._fail(leaders[index], "render_error", f"{type(exc).__name__}: {exc}")
        if not done:
            return
        self._handoff.acquire()  # bounded hand-off: back-pressure when storage falls behind
        fut = self._pool.submit(self._store_batch, batch, [(leaders[i], seeds[i], images, quality)
                                                           for i, images, quality in done], render_ms)
        fut.add_done_callback(self._stored)

    def _notify_start(self, requests: list[dict[str, Any]], rendered: threading.Event) -> None:
        # Only for a batch still rendering after a moment: a quicker one's `rendered` status follows at once.
        if self._limits.rendering_note_after_s > 0 and rendered.wait(self._limits.rendering_note_after_s):
            return
        try:
            self._on_start(requests)
        except Exception as exc:  # noqa: BLE001 - best effort: the final status follows anyway
            log.warning("rendering notes not sent: %r", exc)

    def _until_good_enough(self, index: int, request: dict[str, Any], seeds: list[list[int]],
                           images: list[np.ndarray], report: QualityReport | None, render: Callable,
                           settings: RenderSettings) -> tuple[int, list[np.ndarray], Quality | None]:
        """Given its images' `report`, a request that gave no seed is rendered again with new derived seeds while it
        fails, a bounded number of times; what still fails goes out with its scores (`passed` 0). One that gave its
        seed (no report) is never rendered again: it is scored in the post threads, off the device's path."""
        if report is None:
            return index, images, None
        attempt = 0
        while True:
            if report.passed or next_attempt(False, attempt, self._limits.max_rerenders) == "review":
                return index, images, _counted(report, attempt)
            base = rerender_seed(request["request_id"], attempt + 1)
            previous = seeds[index]
            seeds[index] = [(base + k) & MAX_SEED for k in range(len(previous))]
            try:
                images = render([index])[0]
            except Exception as exc:  # noqa: BLE001 - the images in hand stand, with their scores, for review
                log.warning("re-rendering %s failed (%r); it goes on with the images it has", request["request_id"],
                            exc)
                seeds[index] = previous
                metrics.QUALITY.labels("failed").inc()
                return index, images, Quality({**report.scores, "passed": 0.0}, attempt)
            attempt += 1
            metrics.QUALITY.labels("rerendered").inc()
            report = self._reports([images], [settings])[0]

    def _render_until_the_device_works(self, render: Callable, count: int):
        fault_since: float | None = None
        attempt = 0
        while True:
            isolated = render_isolating_faults(render, count, attempts=self._limits.render_attempts,
                                               permanent=lambda exc: isinstance(exc, UnsupportedSettings))
            if not isolated.all_failed or self._device_works():
                return isolated
            metrics.ERRORS.labels("device").inc()
            fault_since = fault_since or time.monotonic()
            down_s = time.monotonic() - fault_since
            exit_after = self._limits.device_fault_exit_s
            if exit_after and down_s > exit_after:
                raise DeviceFault(f"every render has failed for {down_s:.0f}s, a probe too; last: "
                                  f"{next(iter(isolated.errors.values()))!r}")
            attempt += 1
            delay = backoff_delay(attempt)
            log.warning("the device fails every render and the probe (%.0fs so far); retrying the batch in %.1fs",
                        down_s, delay)
            if self._stop.wait(delay):
                raise Stopping("stopping during a device fault")

    def _device_works(self) -> bool:
        try:
            with self._deadlines.guard("a device probe", self._limits.batch_timeout_floor_s):
                self._renderer.warmup()
            return True
        except Exception as exc:  # noqa: BLE001 - a failed probe is the answer
            log.warning("device probe failed: %r", exc)
            return False

    def _measured(self, start: float, end: float, items: Sequence[RenderItem], settings: RenderSettings) -> None:
        self.busy.add(start, end)
        metrics.INFERENCE_LATENCY.observe(end - start)
        metrics.BATCH_SIZE.observe(len(items))
        self._cost.measured(end - start, items, settings)

    # ------------------------------------------------------------------ storing

    def _stored(self, fut: Future) -> None:
        self._handoff.release()
        exc = fut.exception()
        if exc is not None and not isinstance(exc, Stopping):
            log.error("storing a batch failed: %r", exc)  # the worker stops loudly rather than stall a partition
            self.failure = exc

    def _store_batch(self, batch: Batch, done: list[tuple[Pending, list[int], list[np.ndarray], Quality | None]],
                     render_ms: float) -> None:
        seeded = [k for k, (_, _, _, quality) in enumerate(done) if quality is None]  # they gave their seed
        try:  # scored here, all together; should that fail, _store_request scores each alone (a fault its own)
            asked = [settings_of(done[k][0].payload.request) for k in seeded]
            reports = self._reports([done[k][2] for k in seeded], asked)
            scored = {k: _counted(report, 0) for k, report in zip(seeded, reports, strict=True)}
        except Exception:  # noqa: BLE001 - the fault is met again in _store_request, where it is that request's
            scored = {}
        for k, (pending, seeds, images, quality) in enumerate(done):
            try:
                record, outcome = self._store_request(batch, pending, seeds, images, scored.get(k, quality), render_ms)
            except OutputTooLarge as exc:
                self._fail(pending, "output_too_large", str(exc))
                continue
            except (Stopping, KeyboardInterrupt):
                raise
            except Exception as exc:  # noqa: BLE001 - not an outage (those are retried inside): this request's
                metrics.ERRORS.labels("internal").inc()
                self._fail(pending, "internal_error", f"{type(exc).__name__}: {exc}")
                continue
            self._on_done(pending, [record], "rendered")
            for follower in self._inflight.finish(_cache_key(pending), outcome):
                self._answer(follower, outcome)

    # ------------------------------------------------------------------ copies of a request in flight

    def _fail(self, pending: Pending, code: str, reason: str) -> None:
        """A leader's failure is its followers' too: they asked for exactly the same render."""
        self._on_fail(pending, code, reason)
        for follower in self._inflight.finish(_cache_key(pending), Failed(code, reason)):
            self._on_fail(follower, code, reason)

    def _answer(self, pending: Pending, outcome: Rendered) -> None:
        """A copy of a rendered request: its own ImageRendered, with the leader's images and no GPU time."""
        request = pending.payload.request
        try:
            event = image_rendered(
                request=request, images=outcome.images, model_id=outcome.model_id,
                model_version=outcome.model_version,
                timings_ms={"queue": (time.monotonic() - pending.enqueued_at) * 1000, "render": 0.0},
                batch_id=outcome.batch_id, batch_size=0, worker_id=self._worker_id,
                source=lineage_source(request, pending.source), now_ms=int(time.time() * 1000),
                quality=outcome.quality, attempt=outcome.attempt)
            record = self._checked_record(request, self._encode(event))
        except OutputTooLarge as exc:
            self._on_fail(pending, "output_too_large", str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - this copy's own fault, never its leader's or the process's
            metrics.ERRORS.labels("internal").inc()
            self._on_fail(pending, "internal_error", f"{type(exc).__name__}: {exc}")
            return
        self._on_done(pending, [record], "deduplicated")

    def _reports(self, images: list[list[np.ndarray]], asked: list[RenderSettings]) -> list[QualityReport]:
        """The quality report of each request from its images, against the size it asked for; the images of all
        of them are scored in one call (processors/quality.py scores those of one shape together)."""
        return score_requests(images, [(a.width, a.height) for a in asked], self._quality)

    def _store_request(self, batch: Batch, pending: Pending, seeds: list[int], images: list[np.ndarray],
                       quality: Quality | None, render_ms: float) -> tuple[OutRecord, Rendered]:
        request = pending.payload.request
        if quality is None:  # a request with its own seed, if scoring those of its batch together failed
            quality = _counted(self._reports([images], [settings_of(request)])[0], 0)
        t0 = time.monotonic()
        encoded = [encode_png(img) for img in images]
        t1 = time.monotonic()
        stored = []
        for index, (data, seed) in enumerate(zip(encoded, seeds, strict=True)):
            digest = sha256_hex(data)
            uri = self._put(object_key(request["tenant"], digest), data)
            stored.append({"index": index, "uri": uri, "sha256": digest, "seed": seed, "size_bytes": len(data)})
        t2 = time.monotonic()
        event = image_rendered(
            request=request, images=stored, model_id=self._renderer.model_id,
            model_version=self._renderer.model_version,
            timings_ms={"queue": (batch.formed_at - pending.enqueued_at) * 1000, "render": render_ms,
                        "encode": (t1 - t0) * 1000, "store": (t2 - t1) * 1000},
            batch_id=batch.id, batch_size=len(batch.items), worker_id=self._worker_id,
            source=lineage_source(request, pending.source), now_ms=int(time.time() * 1000),
            quality=quality.scores, attempt=quality.attempt)
        outcome = Rendered(tuple(stored), self._renderer.model_id, self._renderer.model_version,
                           dict(quality.scores), quality.attempt, batch.id)
        return self._checked_record(request, self._encode(event)), outcome

    def _checked_record(self, request: dict[str, Any], value: bytes) -> OutRecord:
        if len(value) > self._max_bytes:
            raise OutputTooLarge(f"ImageRendered would be {len(value)} bytes; {self._topic} takes at most "
                                 f"{self._max_bytes}")
        return OutRecord(self._topic, value, request["request_id"].encode())

    def _put(self, key: str, data: bytes) -> str:
        def retrying(exc: BaseException, attempt: int) -> None:
            metrics.ERRORS.labels("storage").inc()
            log.warning("storing %s failed (attempt %d), retrying: %r", key, attempt, exc)

        return until_done(lambda: self._store.put(key, data, "image/png"), stop=self._stop,
                          is_infrastructure=lambda exc: not isinstance(exc, (UnsafeKey, TypeError)),
                          on_retry=retrying)


def _counted(report: QualityReport, attempt: int) -> Quality:
    metrics.QUALITY.labels("passed" if report.passed else "failed").inc()
    return Quality({**report.scores, "passed": float(report.passed)}, attempt)


def _cache_key(pending: Pending) -> str | None:
    return (pending.payload.request.get("admission") or {}).get("cache_key")
