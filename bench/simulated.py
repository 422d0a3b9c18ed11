"""Stand-ins for the GPU in benchmarks: a renderer whose batch costs a + b*n seconds, and an in-memory store.

They exercise everything around the model (Kafka, scheduling, batching, encoding, transactions) at known cost.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import numpy as np

from connectors.storage import ObjectNotFound, ObjectUris
from processors.admission import admission, cache_key
from processors.render_settings import RenderItem, RenderSettings


def routed(request: dict, pool: str = "turbo", source: tuple[str, int, int] = ("direct", 0, 0)) -> dict:
    """`request` as the gate routes it to a render topic of `pool`, with its admission: what a benchmark (or a test)
    that feeds a worker directly produces, since a worker refuses what the gate did not admit. `source` stands for
    where the request was produced."""
    generation = "direct"
    return {**request, "admission": admission(source=source, generation=generation,
                                              cache_key=cache_key(request, generation), pool=pool,
                                              now_ms=request["submitted_at"])}


class SimulatedRenderer:
    model_id = "simulated"
    model_version = "sim-1"
    max_side = 4096
    size_multiple = 16

    def __init__(self, a_s: float, b_s: float, on_batch=None):
        self.a, self.b = a_s, b_s
        self.on_batch = on_batch  # called with (start time, items) for measurements
        self._pixel = np.zeros((16, 16, 3), dtype=np.uint8)
        self._images: dict[tuple[int, int], np.ndarray] = {}

    def check_settings(self, settings: RenderSettings) -> None:
        """Any size goes: nothing is drawn."""

    def warmup(self) -> np.ndarray:
        """The device probe: nothing to warm, nothing that can fail."""
        return self._pixel

    def render(self, items: Sequence[RenderItem], settings: RenderSettings) -> list[np.ndarray]:
        start = time.monotonic()
        if self.on_batch is not None:
            self.on_batch(start, items)
        cost = self.a + self.b * len(items)
        if cost > 0:
            # sleep most of it, spin the last millisecond: time.sleep alone overshoots by ~0.1 ms per call
            end = start + cost
            if cost > 0.002:
                time.sleep(cost - 0.001)
            while time.monotonic() < end:
                pass
        return [self._image(settings) for _ in items]

    def _image(self, settings: RenderSettings) -> np.ndarray:
        """One fixed image of the asked size that passes the quality checks (sharp, mid-grey, contrasted)."""
        size = (settings.height, settings.width)
        if size not in self._images:
            self._images[size] = np.random.default_rng(0).integers(64, 192, (*size, 3), dtype=np.uint8)
        return self._images[size]


class MemoryStore:
    """Objects in memory. With `storage_url`, their URIs are those a store there would give (nothing is written
    there): publication announces only images of the configured store, and a benchmark's or test's publication
    reads the same settings as its worker."""

    def __init__(self, storage_url: str | None = None) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self._base = "mem://" if storage_url is None else ObjectUris.of(storage_url).base

    def put(self, key: str, data: bytes, content_type: str) -> str:
        with self._lock:
            self._data[key] = data
        return self._base + key

    def get(self, uri_or_key: str) -> bytes:
        try:
            return self._data[self.key_of(uri_or_key)]
        except KeyError:
            raise ObjectNotFound(uri_or_key) from None

    def exists(self, key: str) -> bool:
        return key in self._data

    def key_of(self, uri_or_key: str) -> str:
        return uri_or_key.removeprefix(self._base)

    def copy(self, src: str, dst: str) -> str:
        with self._lock:
            self._data[dst] = self._data[src]
        return self._base + dst

    def delete(self, key: str) -> None:
        with self._lock:
            self._data.pop(key, None)

    def move(self, src: str, dst: str) -> bool:
        with self._lock:
            if src not in self._data:
                if dst in self._data:
                    return False
                raise ObjectNotFound(src)
            self._data[dst] = self._data.pop(src)
            return True
