"""Prometheus metrics of the render worker (prometheus-client, served on ZIMAGE_METRICS_PORT)."""
from __future__ import annotations

import threading
import time
from collections import deque

from prometheus_client import Counter, Gauge, Histogram, start_http_server

REQUESTS = Counter("zimage_requests_total", "Requests finished by the render worker", ["priority", "status"])
INFERENCE_LATENCY = Histogram(
    "zimage_inference_latency_seconds", "Wall time of one renderer call (one batch)",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64))
BATCH_SIZE = Histogram("zimage_batch_size", "Images per renderer call", buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32))
QUEUE_LENGTH = Gauge("zimage_queue_length",
                     "Lag of this worker's assigned partitions, by priority (from committed offsets)", ["priority"])
GPU_UTILIZATION = Gauge("zimage_gpu_utilization", "Fraction of the last minute the renderer was busy")
QUALITY = Counter("zimage_quality_total", "Rendered requests by quality outcome (re-renders counted apiece)",
                  ["outcome"])
SAFETY = Counter("zimage_safety_total", "Published requests by image safety verdict (unscanned: no detector)",
                 ["verdict"])
GATE = Counter("zimage_gate_requests_total", "Requests decided by the gate, by outcome", ["outcome"])
ERRORS = Counter("zimage_errors_total", "Errors by type", ["type"])
READY = Gauge("zimage_worker_ready", "1 once the model is loaded and warmed up")


def serve(port: int) -> None:
    if port:
        start_http_server(port, addr="0.0.0.0")


class BusyMeter:
    """Busy fraction of the renderer over a sliding window (thread-safe)."""

    def __init__(self, window_s: float = 60.0, clock=time.monotonic):
        self._window = window_s
        self._clock = clock
        self._spans: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()
        self._started = clock()

    def add(self, start: float, end: float) -> None:
        with self._lock:
            self._spans.append((start, end))
            self._trim(end)

    def fraction(self) -> float:
        now = self._clock()
        with self._lock:
            self._trim(now)
            lo = max(now - self._window, self._started)
            if now <= lo:
                return 0.0
            busy = sum(min(e, now) - max(s, lo) for s, e in self._spans if e > lo)
            return max(0.0, min(1.0, busy / (now - lo)))

    def _trim(self, now: float) -> None:
        while self._spans and self._spans[0][1] < now - self._window:
            self._spans.popleft()
