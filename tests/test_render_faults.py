"""Whose fault a failed render or store is: one request's (dead-lettered alone) or the infrastructure's (retried)."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from bench.simulated import MemoryStore
from processors.batching import Batch, CompatKey, Pending
from processors.fault_isolation import render_isolating_faults
from processors.quality import rerender_seed
from processors.render_settings import UnsupportedSettings
from processors.requests import derived_seed
from streams.crash_journal import CrashJournal
from streams.failures import Origin
from streams.liveness import Deadlines, Heartbeat
from streams.rendering import Admitted, DeviceFault, RenderStage, StageLimits
from streams.submit import build_request

# ---------------------------------------------------------------- the pure rule


def test_a_request_that_fails_alone_is_the_only_one_blamed():
    calls = []

    def render(indexes):
        calls.append(list(indexes))
        if 1 in indexes:
            raise RuntimeError("bad prompt")
        return [f"image {i}" for i in indexes]

    out = render_isolating_faults(render, 3, attempts=2)
    assert out.results == {0: "image 0", 2: "image 2"}
    assert list(out.errors) == [1] and not out.all_failed
    assert calls == [[0, 1, 2], [0], [1], [1], [2]]  # the batch, then each alone; the failing one twice


def test_every_request_failing_alone_blames_nobody_yet():
    out = render_isolating_faults(lambda idx: (_ for _ in ()).throw(OSError("device lost")), 2)
    assert out.all_failed and set(out.errors) == {0, 1}


def test_a_permanent_error_is_not_retried():
    calls = []

    def render(indexes):
        calls.append(list(indexes))
        raise UnsupportedSettings("too large")

    out = render_isolating_faults(render, 1, attempts=3, permanent=lambda e: isinstance(e, UnsupportedSettings))
    assert calls == [[0]] and isinstance(out.errors[0], UnsupportedSettings)


# ---------------------------------------------------------------- the stage


class Renderer:
    model_id, model_version = "fake", "fake-1"
    max_side, size_multiple = 1024, 16

    def __init__(self, device_failures: int = 0):
        self.device_failures = device_failures
        self.calls = 0

    def render(self, items, settings):
        self.calls += 1
        if self.device_failures:
            self.device_failures -= 1
            raise RuntimeError("CUDA error: an illegal memory access")
        if any("poison" in item.prompt for item in items):
            raise ValueError("the tokenizer chokes on this prompt")
        return [np.full((8, 8, 3), item.seed % 256, np.uint8) for item in items]

    def check_settings(self, settings):
        pass

    def warmup(self):
        if self.device_failures:
            self.device_failures -= 1
            raise RuntimeError("CUDA error: an illegal memory access")


class FlakyStore(MemoryStore):
    def __init__(self, failures: int):
        super().__init__()
        self.failures = failures

    def put(self, key, data, content_type):
        if self.failures:
            self.failures -= 1
            raise ConnectionError("S3 endpoint down")
        return super().put(key, data, content_type)


def pending(i: int, prompt: str) -> Pending:
    request = build_request({"prompt": prompt, "seed": i, "width": 16, "height": 16, "steps": 1})
    origin = Origin("t.requests.normal", 0, i, b"raw", b"key")
    return Pending(request["request_id"], "normal", CompatKey("m", "v", 16, 16, 1, 0.0), origin.source, 0.0, None,
                   Admitted(request, origin, 0, 0))


class Harness:
    def __init__(self, tmp_path, renderer, store, prompts, **limits):
        self.batch = Batch("b1", CompatKey("m", "v", 16, 16, 1, 0.0),
                           tuple(pending(i, p) for i, p in enumerate(prompts)), 0.0, "full")
        self.done: list[str] = []
        self.failed: list[tuple[str, str]] = []
        self.finished = threading.Event()
        self._given = False
        self.stage = RenderStage(
            renderer=renderer, store=store, encode_rendered=lambda v: b"x" * 10, rendered_topic="t.rendered",
            max_rendered_bytes=1000, worker_id="w", take_batch=self._take, on_done=self._done,
            on_fail=self._fail, journal=CrashJournal(tmp_path, "j"), deadlines=Deadlines(),
            heartbeat=Heartbeat(None, "w"), limits=StageLimits(**limits))

    def _take(self, timeout):
        if self._given:
            time.sleep(timeout)
            return None
        self._given = True
        return self.batch

    def _done(self, p, records, status):
        self.done.append(p.request_id)
        self._check()

    def _fail(self, p, code, reason):
        self.failed.append((p.request_id, code))
        self._check()

    def _check(self):
        if len(self.done) + len(self.failed) == len(self.batch.items):
            self.finished.set()

    def run(self, timeout=20.0):
        self.stage.start()
        self.finished.wait(timeout)
        self.stage.stop()
        return self


def test_one_poisoned_prompt_fails_alone_and_its_batch_mates_are_stored(tmp_path):
    h = Harness(tmp_path, Renderer(), MemoryStore(), ["a chair", "poison pill", "a lamp"]).run()
    ids = [p.request_id for p in h.batch.items]
    assert h.failed == [(ids[1], "render_error")]
    assert sorted(h.done) == sorted([ids[0], ids[2]])


def test_a_device_fault_is_retried_and_nobody_is_dead_lettered(tmp_path):
    renderer = Renderer(device_failures=8)  # the batch, each request alone, the probe: all fail for a while
    h = Harness(tmp_path, renderer, MemoryStore(), ["a chair", "a lamp"]).run()
    assert h.failed == []
    assert sorted(h.done) == sorted(p.request_id for p in h.batch.items)
    assert renderer.device_failures == 0


def test_a_lasting_device_fault_ends_the_worker_after_its_limit(tmp_path):
    h = Harness(tmp_path, Renderer(device_failures=10**9), MemoryStore(), ["a chair"], device_fault_exit_s=0.5)
    h.stage.start()
    deadline = time.monotonic() + 20
    while h.stage.failure is None and time.monotonic() < deadline:
        time.sleep(0.05)
    h.stage.stop()
    assert isinstance(h.stage.failure, DeviceFault)
    assert h.failed == [] and h.done == []


def test_a_storage_outage_is_waited_out_without_dead_letters(tmp_path):
    store = FlakyStore(failures=3)
    h = Harness(tmp_path, Renderer(), store, ["a chair", "a lamp"]).run()
    assert h.failed == []
    assert len(h.done) == 2 and store.failures == 0


def test_stopping_during_a_storage_outage_leaves_the_requests_unfinished(tmp_path):
    h = Harness(tmp_path, Renderer(), FlakyStore(failures=10**9), ["a chair"])
    h.stage.start()
    time.sleep(0.5)
    h.stage.stop()
    assert h.failed == [] and h.done == [] and h.stage.failure is None


def test_an_output_too_large_for_its_topic_fails_that_request(tmp_path):
    h = Harness(tmp_path, Renderer(), MemoryStore(), ["a chair"])
    h.stage._max_bytes = 5
    h.run()
    assert [code for _, code in h.failed] == ["output_too_large"]


@pytest.mark.parametrize("tenant", ["acme", "globex"])
def test_objects_are_keyed_by_tenant_and_content(tmp_path, tenant):
    store = MemoryStore()
    h = Harness(tmp_path, Renderer(), store, ["a chair"])
    h.batch.items[0].payload.request["tenant"] = tenant
    h.run()
    (key,) = store._data
    assert key.startswith(f"images/{tenant}-") and key.endswith(".png")


class FlatFirstRenderer(Renderer):
    """Draws a flat (blurry) image for a request's own derived seed, a detailed one for any other seed."""

    def __init__(self, flat_seeds):
        super().__init__()
        self.flat_seeds = set(flat_seeds)
        self.seeds_seen: list[int] = []

    def render(self, items, settings):
        self.seeds_seen += [item.seed for item in items]
        shape = (settings.height, settings.width, 3)
        noise = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
        return [np.full(shape, 128, np.uint8) if item.seed in self.flat_seeds else noise for item in items]


def seedless(i: int, prompt: str) -> Pending:
    p = pending(i, prompt)
    p.payload.request["seed"] = None
    return p


def test_a_blurry_image_of_a_request_without_a_seed_is_rendered_again_with_another_seed(tmp_path):
    h = Harness(tmp_path, Renderer(), MemoryStore(), ["a chair"])
    h.batch = Batch("b1", h.batch.key, (seedless(0, "a chair"),), 0.0, "full")
    request = h.batch.items[0].payload.request
    renderer = FlatFirstRenderer({derived_seed(request["request_id"])})
    h.stage._renderer = renderer
    h.run()
    assert renderer.seeds_seen == [derived_seed(request["request_id"]), rerender_seed(request["request_id"], 1)]
    assert h.failed == [] and len(h.done) == 1


def test_an_explicit_seed_is_kept_even_when_its_image_is_blurry(tmp_path):
    h = Harness(tmp_path, Renderer(), MemoryStore(), ["a chair"])
    renderer = FlatFirstRenderer({0})
    h.stage._renderer = renderer
    h.run()
    assert renderer.seeds_seen == [0]  # what the caller asked for: no re-render
    assert len(h.done) == 1
