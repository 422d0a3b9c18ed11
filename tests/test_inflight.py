"""In-flight dedupe: identical requests render once; each copy gets the leader's outcome, failures included."""
from __future__ import annotations

import json
import threading
import time
from typing import cast

import numpy as np

from bench.simulated import MemoryStore
from connectors.storage import ObjectStore
from processors.admission import admission
from processors.batching import Batch, CompatKey, Pending
from processors.inflight import Answered, Failed, Follow, InFlight, Lead, Rendered
from streams.crash_journal import CrashJournal
from streams.failures import Origin
from streams.liveness import Deadlines, Heartbeat
from streams.rendering import Admitted, RenderStage, StageLimits
from streams.submit import build_request

OUTCOME = Rendered(({"index": 0, "uri": "s3://b/k", "sha256": "ab" * 32, "seed": 1, "size_bytes": 9},),
                   "m", "m@1", {"passed": 1.0}, 0, "batch-1")

# ---------------------------------------------------------------- the pure rule


def test_the_first_claim_leads_copies_follow_and_get_its_outcome():
    inflight: InFlight[str] = InFlight()
    assert inflight.claim("k", "a") == Lead()
    assert inflight.claim("k", "b") == Follow() and inflight.claim("k", "c") == Follow()
    assert inflight.claim("other", "d") == Lead()
    assert inflight.finish("k", OUTCOME) == ["b", "c"]
    assert inflight.waiting == 0


def test_a_copy_soon_after_a_success_is_answered_at_once_and_later_renders_again():
    now = [100.0]
    inflight: InFlight[str] = InFlight(remember_s=60, clock=lambda: now[0])
    inflight.claim("k", "a")
    inflight.finish("k", OUTCOME)
    assert inflight.claim("k", "b") == Answered(OUTCOME)
    now[0] += 61
    assert inflight.claim("k", "c") == Lead()


def test_a_failure_goes_to_the_waiting_copies_but_is_not_remembered():
    inflight: InFlight[str] = InFlight()
    inflight.claim("k", "a")
    inflight.claim("k", "b")
    assert inflight.finish("k", Failed("render_error", "boom")) == ["b"]
    assert inflight.claim("k", "c") == Lead()  # a later copy is rendered afresh


def test_requests_without_a_cache_key_always_lead_and_what_is_remembered_is_bounded():
    inflight: InFlight[str] = InFlight(remember_max=2)
    assert inflight.claim(None, "a") == Lead() and inflight.claim(None, "b") == Lead()
    for key in ("k1", "k2", "k3"):
        inflight.claim(key, key)
        inflight.finish(key, OUTCOME)
    assert inflight.claim("k1", "x") == Lead()  # the oldest was forgotten
    assert inflight.claim("k3", "y") == Answered(OUTCOME)


# ---------------------------------------------------------------- the render stage


class Renderer:
    model_id, model_version = "fake", "fake-1"
    max_side, size_multiple = 1024, 16

    def __init__(self, fail_on: str | None = None, slow_s: float = 0.0):
        self.rendered_prompts: list[str] = []
        self.fail_on = fail_on
        self.slow_s = slow_s

    def render(self, items, settings):
        time.sleep(self.slow_s)
        self.rendered_prompts += [item.prompt for item in items]
        if self.fail_on and any(self.fail_on in item.prompt for item in items):
            raise ValueError("the tokenizer chokes on this prompt")
        return [np.full((16, 16, 3), item.seed % 256, np.uint8) for item in items]

    def check_settings(self, settings):
        pass

    def warmup(self):
        pass


def pending(offset: int, prompt: str, cache_key: str | None, seed: int = 7) -> Pending:
    request = build_request({"prompt": prompt, "seed": seed, "width": 16, "height": 16, "steps": 1})
    request["admission"] = None if cache_key is None else admission(
        source=("t.requests.normal", 0, offset), generation="g", cache_key=cache_key, pool="turbo", now_ms=0)
    origin = Origin("t.render.turbo.normal", 0, offset, b"raw", b"key")
    return Pending(request["request_id"], "normal", CompatKey("m", "v", 16, 16, 1, 0.0), origin.source,
                   time.monotonic(), None, Admitted(request, origin, 0, 0))


class Stage:
    """A render stage fed the given batches in turn; records what it finished and how."""

    def __init__(self, tmp_path, renderer, batches, cancelled=lambda requests: set(), on_start=None):
        self.batches = list(batches)
        self.expected = sum(len(b) for b in self.batches)
        self.done: dict[str, tuple[str, list]] = {}
        self.failed: dict[str, str] = {}
        self.finished = threading.Event()
        self.stage = RenderStage(
            renderer=renderer, store=cast(ObjectStore, MemoryStore()), encode_rendered=lambda v: json.dumps(v).encode(),
            rendered_topic="t.rendered", max_rendered_bytes=100_000, worker_id="w", take_batch=self._take,
            on_done=self._done, on_fail=self._fail, journal=CrashJournal(tmp_path, "j"), deadlines=Deadlines(),
            heartbeat=Heartbeat(None, "w"), limits=StageLimits(), cancelled=cancelled,
            **({} if on_start is None else {"on_start": on_start}))

    def _take(self, timeout):
        if not self.batches:
            time.sleep(timeout)
            return None
        items = self.batches.pop(0)
        return Batch(f"b{len(self.batches)}", items[0].key, tuple(items), time.monotonic(), "full")

    def _done(self, p, records, status):
        self.done[p.request_id] = (status, records)
        self._check()

    def _fail(self, p, code, reason):
        self.failed[p.request_id] = code
        self._check()

    def _check(self):
        if len(self.done) + len(self.failed) == self.expected:
            self.finished.set()

    def run(self, timeout=20.0):
        self.stage.start()
        assert self.finished.wait(timeout)
        self.stage.stop()
        return self


def images_of(records) -> list:
    (record,) = records
    return json.loads(record.value)["images"]


def test_identical_requests_in_one_batch_render_once_and_each_gets_its_own_event(tmp_path):
    renderer = Renderer()
    leader, copy, other = pending(0, "a chair", "k"), pending(1, "a chair", "k"), pending(2, "a lamp", "k2")
    s = Stage(tmp_path, renderer, [[leader, copy, other]]).run()
    assert renderer.rendered_prompts == ["a chair", "a lamp"]
    assert s.done[leader.request_id][0] == "rendered" and s.done[copy.request_id][0] == "deduplicated"
    assert images_of(s.done[copy.request_id][1]) == images_of(s.done[leader.request_id][1])
    event = json.loads(s.done[copy.request_id][1][0].value)
    assert event["request_id"] == copy.request_id and event["timings"]["render"] == 0.0


def test_a_copy_taken_while_its_leader_renders_waits_for_it_and_spends_no_gpu(tmp_path):
    renderer = Renderer(slow_s=0.3)
    leader, copy = pending(0, "a chair", "k"), pending(1, "a chair", "k")
    s = Stage(tmp_path, renderer, [[leader], [copy]]).run()
    assert renderer.rendered_prompts == ["a chair"]
    assert s.done[copy.request_id][0] == "deduplicated"


def test_the_leaders_failure_is_its_copies_failure(tmp_path):
    renderer = Renderer(fail_on="poison")
    leader, copy = pending(0, "poison pill", "k"), pending(1, "poison pill", "k")
    s = Stage(tmp_path, renderer, [[leader, copy]]).run()
    assert s.failed == {leader.request_id: "render_error", copy.request_id: "render_error"}
    assert renderer.rendered_prompts.count("poison pill") >= 1 and not s.done


def test_requests_without_a_cache_key_are_each_rendered(tmp_path):
    renderer = Renderer()
    s = Stage(tmp_path, renderer, [[pending(0, "a chair", None), pending(1, "a chair", None)]]).run()
    assert renderer.rendered_prompts == ["a chair", "a chair"] and {v[0] for v in s.done.values()} == {"rendered"}


def test_a_request_cancelled_while_queued_is_failed_and_never_rendered(tmp_path):
    renderer = Renderer()
    keep, drop = pending(0, "a chair", "k1"), pending(1, "a lamp", "k2")
    asked: list[list[str]] = []

    def cancelled(requests):
        asked.append([r["request_id"] for r in requests])
        return {i for i, r in enumerate(requests) if r["request_id"] == drop.request_id}

    s = Stage(tmp_path, renderer, [[keep, drop]], cancelled=cancelled).run()
    assert asked == [[keep.request_id, drop.request_id]]
    assert s.failed == {drop.request_id: "cancelled"} and renderer.rendered_prompts == ["a chair"]


def test_only_a_batch_still_rendering_after_a_moment_is_marked_rendering(tmp_path):
    noted: list[list[str]] = []
    on_start = lambda requests: noted.append([r["prompt"] for r in requests])  # noqa: E731
    Stage(tmp_path, Renderer(), [[pending(0, "a quick chair", "k1")]], on_start=on_start).run()
    assert noted == []  # its `rendered` status follows at once: a note would only cost a record
    Stage(tmp_path, Renderer(slow_s=0.3), [[pending(1, "a slow lamp", "k2")]], on_start=on_start).run()
    assert noted == [["a slow lamp"]]
