"""Scoring images together (score_images, score_requests) gives exactly what scoring each alone does, and the render
stage scores a batch's images in one call where it scored each request alone."""
from __future__ import annotations

import threading

import numpy as np
import pytest

import processors.quality as quality
import streams.rendering as rendering
from bench.simulated import MemoryStore
from processors.batching import Batch
from processors.quality import (
    QualityPolicy,
    QualityReport,
    request_report,
    score_image,
    score_images,
    score_requests,
)
from processors.requests import derived_seed
from tests.test_render_faults import Harness, Renderer, pending, seedless

POLICY = QualityPolicy()


def noise(shape: tuple[int, ...], seed: int, low: int = 0, high: int = 256) -> np.ndarray:
    return np.random.default_rng(seed).integers(low, high, size=shape, dtype=np.uint8)


def mixed_batch() -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """Gray, RGB and RGBA images of many shapes, several of each, interleaved; random, flat, black and white; a few
    asked for at another size than they have."""
    images: list[np.ndarray] = []
    requested: list[tuple[int, int]] = []
    seed = 0
    for height, width in [(1, 1), (2, 5), (5, 2), (3, 3), (16, 16), (48, 64), (64, 48), (0, 4), (7, 129)]:
        for channels in (None, 3, 4):
            shape = (height, width) if channels is None else (height, width, channels)
            for kind in ("noise", "noise", "mid", "flat", "black", "white"):
                seed += 1
                if kind == "noise":
                    pixels = noise(shape, seed)
                elif kind == "mid":  # well exposed and contrasted
                    pixels = noise(shape, seed, 40, 216)
                else:
                    level = {"flat": 128, "black": 0, "white": 255}[kind]
                    pixels = np.full(shape, level, dtype=np.uint8)
                images.append(pixels)
                requested.append((width, height) if seed % 5 else (width + 16, height))  # every 5th: wrong size
    order = np.random.default_rng(7).permutation(len(images))  # groups interleaved, not in runs
    return [images[i] for i in order], [requested[i] for i in order]


def assert_same(got: QualityReport, expected: QualityReport) -> None:
    assert got.passed == expected.passed
    assert got.failures == expected.failures
    assert got.scores == expected.scores  # exactly: the same operations on the same values


def test_a_mixed_batch_scores_exactly_as_each_image_alone_in_input_order() -> None:
    images, requested = mixed_batch()
    reports = score_images(images, requested, POLICY)
    assert len(reports) == len(images)
    for pixels, size, report in zip(images, requested, reports, strict=True):
        assert_same(report, score_image(pixels, size, POLICY))
        assert report.scores["width"] == pixels.shape[1] and report.scores["height"] == pixels.shape[0]


def test_the_batch_covers_every_outcome() -> None:
    images, requested = mixed_batch()
    failures = {code for report in score_images(images, requested, POLICY) for code in report.failures}
    assert failures == {"blurry", "wrong_size", "dark", "bright", "flat"}
    assert any(report.passed for report in score_images(images, requested, POLICY))


@pytest.mark.parametrize("shape", [(1, 1, 3), (2, 5, 3), (3, 3, 4), (16, 16), (16, 16, 3), (64, 48, 3)])
def test_small_and_degenerate_images_keep_their_special_scores(shape) -> None:
    images = [noise(shape, seed) for seed in range(3)] + [np.full(shape, 128, np.uint8)]
    reports = score_images(images, [(shape[1], shape[0])] * 4, POLICY)
    for pixels, report in zip(images, reports, strict=True):
        assert_same(report, score_image(pixels, (shape[1], shape[0]), POLICY))
    if shape[0] < 3 or shape[1] < 3:
        assert all(report.scores["sharpness"] == 0.0 for report in reports)
    flat = reports[-1]  # (the BLAS call rounds a row's last pixels apart: some flat images have contrast 1e-14)
    assert flat.scores["contrast"] == pytest.approx(0.0, abs=1e-9) and {"flat", "blurry"} <= set(flat.failures)


def test_empty_images_score_zero_as_alone() -> None:
    images = [np.zeros((0, 4, 3), np.uint8), np.zeros((0, 4, 3), np.uint8), np.zeros((3, 0), np.uint8)]
    reports = score_images(images, [(4, 0), (4, 1), (0, 3)], POLICY)
    for pixels, size, report in zip(images, [(4, 0), (4, 1), (0, 3)], reports, strict=True):
        assert_same(report, score_image(pixels, size, POLICY))
        assert report.scores["mean_luminance"] == report.scores["contrast"] == report.scores["sharpness"] == 0.0


def test_an_empty_list_gives_an_empty_list() -> None:
    assert score_images([], [], POLICY) == []
    assert score_requests([], [], POLICY) == []


def test_planar_images_score_as_contiguous_ones() -> None:
    """A renderer's pixels are often a view of planar (CxHxW) memory: the same figures, alone or stacked."""
    planar = [noise((3, 24, 40), seed).transpose(1, 2, 0) for seed in range(4)]
    assert not planar[0].flags.c_contiguous
    contiguous = [np.ascontiguousarray(pixels) for pixels in planar]
    stacked = score_images(planar, [(40, 24)] * 4, POLICY)
    for pixels, same, report in zip(planar, contiguous, stacked, strict=True):
        assert_same(report, score_image(pixels, (40, 24), POLICY))
        assert_same(report, score_image(same, (40, 24), POLICY))


def test_a_flat_image_at_an_exposure_bound_fails_alike_alone_or_stacked() -> None:
    """Where a score sits on a bound, one rounding apart would flip the outcome."""
    policy = QualityPolicy(luminance_min=15.0, contrast_min=0.0, sharpness_min=0.0)
    images = [np.full((8, 8, 3), level, np.uint8) for level in (14, 15, 16)] * 2
    reports = score_images(images, [(8, 8)] * 6, policy)
    for pixels, report in zip(images, reports, strict=True):
        assert_same(report, score_image(pixels, (8, 8), policy))


def spy_on_stacks(monkeypatch) -> list[tuple[int, ...]]:
    """The shape of each stack that score_images scores together."""
    stacks: list[tuple[int, ...]] = []
    real = quality._stack_scores

    def spy(stack: np.ndarray) -> list[tuple[float, float, float]]:
        stacks.append(stack.shape)
        return real(stack)

    monkeypatch.setattr(quality, "_stack_scores", spy)
    return stacks


def test_a_batch_larger_than_one_stack_is_scored_in_several(monkeypatch) -> None:
    monkeypatch.setattr(quality, "STACK_MAX_PIXELS", 3 * 16 * 16)  # three 16x16 images a stack
    stacks = spy_on_stacks(monkeypatch)
    images = [noise((16, 16, 3), seed) for seed in range(7)] + [noise((64, 64, 3), 99)]
    reports = score_images(images, [(16, 16)] * 7 + [(64, 64)], POLICY)
    assert [shape[0] for shape in stacks] == [3, 3, 1, 1]  # the 7th, and the big one of another shape, alone
    for pixels, report in zip(images, reports, strict=True):
        assert_same(report, score_image(pixels, (pixels.shape[1], pixels.shape[0]), POLICY))


def test_one_shape_of_two_dtypes_is_two_groups() -> None:
    as_bytes = [noise((8, 8, 3), seed) for seed in range(3)]
    as_floats = [pixels.astype(np.float64) + 0.25 for pixels in as_bytes]
    images = [image for pair in zip(as_bytes, as_floats, strict=True) for image in pair]
    reports = score_images(images, [(8, 8)] * 6, POLICY)
    for pixels, report in zip(images, reports, strict=True):
        assert_same(report, score_image(pixels, (8, 8), POLICY))
    assert reports[0].scores["mean_luminance"] != reports[1].scores["mean_luminance"]


def test_a_batch_is_stacked_once_per_shape(monkeypatch) -> None:
    stacks = spy_on_stacks(monkeypatch)
    images = [noise((16, 16, 3), seed) for seed in range(16)] + [noise((16, 16), seed) for seed in range(2)]
    score_images(images, [(16, 16)] * 18, POLICY)
    assert sorted(stacks) == [(2, 16, 16), (16, 16, 16, 3)]


def test_bad_shapes_and_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match="shape"):
        score_images([np.zeros((4, 4, 2), np.uint8)] * 2, [(4, 4)] * 2, POLICY)
    with pytest.raises(ValueError, match="shape"):
        score_images([np.zeros((4, 4, 2), np.uint8)], [(4, 4)], POLICY)
    with pytest.raises(ValueError, match="requested"):
        score_images([np.zeros((4, 4), np.uint8)], [], POLICY)
    with pytest.raises(ValueError, match="requested"):
        score_requests([[np.zeros((4, 4), np.uint8)]], [(4, 4), (4, 4)], POLICY)


def test_score_requests_gives_each_requests_report_from_its_own_images_in_order() -> None:
    images, requested = mixed_batch()
    per_request = [images[0:1], images[1:4], images[4:6], images[6:30]]
    sizes = [(16, 16), (1, 1), requested[4], (64, 48)]
    reports = score_requests(per_request, sizes, POLICY)
    for own, size, report in zip(per_request, sizes, reports, strict=True):
        expected = request_report(score_image(pixels, size, POLICY) for pixels in own)
        assert_same(report, expected)


# ---------------------------------------------------------------- the render stage


class SeededRenderer(Renderer):
    """An image per seed: noise, or flat grey for the seeds in `flat_seeds`."""

    def __init__(self, flat_seeds=()):
        super().__init__()
        self.flat_seeds = set(flat_seeds)

    def render(self, items, settings):
        return [image_of(item.seed, (settings.height, settings.width, 3), self.flat_seeds) for item in items]


def image_of(seed: int, shape: tuple[int, ...], flat_seeds) -> np.ndarray:
    return np.full(shape, 128, np.uint8) if seed in flat_seeds else noise(shape, seed)


def expected_quality(event: dict, flat_seeds) -> dict[str, float]:
    """What the event's quality must be: its images, as the renderer drew them, scored one by one."""
    report = request_report(score_image(image_of(image["seed"], (16, 16, 3), flat_seeds), (16, 16), POLICY)
                            for image in event["images"])
    return {**report.scores, "passed": float(report.passed)}


def spy_on_scoring(monkeypatch) -> list[tuple[str, int]]:
    """(thread, number of requests) of each call the render stage makes to score images."""
    calls: list[tuple[str, int]] = []
    real = rendering.score_requests

    def spy(images, requested, policy):
        calls.append((threading.current_thread().name, len(images)))
        return real(images, requested, policy)

    monkeypatch.setattr(rendering, "score_requests", spy)
    return calls


def run_batch(tmp_path, monkeypatch, items, flat_seeds) -> tuple[Harness, dict[str, dict], list[tuple[str, int]]]:
    calls = spy_on_scoring(monkeypatch)
    events: dict[str, dict] = {}

    def encode(event):
        events[event["request_id"]] = event
        return b"x" * 10

    h = Harness(tmp_path, SeededRenderer(flat_seeds), MemoryStore(), ["unused"])
    h.batch = Batch("b1", h.batch.key, tuple(items), 0.0, "full")
    h.stage._encode = encode
    h.run()
    return h, events, calls


def test_a_batch_is_scored_in_one_call_per_thread_with_the_scores_of_each_image_alone(tmp_path, monkeypatch):
    seeded, two_images, unseeded, blurry_first = (pending(1, "a chair"), pending(7, "a lamp"),
                                                  seedless(2, "a table"), seedless(3, "a vase"))
    two_images.payload.request["num_images"] = 2
    flat_seeds = {8, derived_seed(blurry_first.request_id)}  # the second image of `two_images`, a first render
    items = [seeded, unseeded, two_images, blurry_first]
    h, events, calls = run_batch(tmp_path, monkeypatch, items, flat_seeds)
    assert h.failed == [] and sorted(h.done) == sorted(p.request_id for p in items)
    # the render thread: the first renders of those without a seed, then the re-render; the post thread: the rest
    assert [(name.startswith("zimage-post"), count) for name, count in calls] == [(False, 2), (False, 1), (True, 2)]
    for p in items:
        event = events[p.request_id]
        assert event["quality"] == expected_quality(event, flat_seeds)
    assert events[blurry_first.request_id]["attempt"] == 1 and events[blurry_first.request_id]["quality"]["passed"]
    kept = events[two_images.request_id]  # its own seed: never rendered again, goes out failing
    assert kept["attempt"] == 0 and kept["quality"]["passed"] == 0.0 and kept["quality"]["images_failed"] == 1.0
    assert [image["seed"] for image in kept["images"]] == [7, 8]


def test_an_image_that_cannot_be_scored_fails_its_own_request_only(tmp_path, monkeypatch):
    """Scoring a batch together fails as a whole; then each request is scored alone, as before."""

    class OneBadImage(SeededRenderer):
        def render(self, items, settings):
            return [np.zeros((16, 16, 2), np.uint8) if item.seed == 5 else image for item, image in
                    zip(items, super().render(items, settings), strict=True)]

    items = [pending(1, "a chair"), pending(5, "a broken lamp"), pending(9, "a table")]
    calls = spy_on_scoring(monkeypatch)
    h = Harness(tmp_path, OneBadImage(), MemoryStore(), ["unused"])
    h.batch = Batch("b1", h.batch.key, tuple(items), 0.0, "full")
    h.run()
    assert h.failed == [(items[1].request_id, "internal_error")]
    assert sorted(h.done) == sorted([items[0].request_id, items[2].request_id])
    assert [count for _, count in calls] == [0, 3, 1, 1, 1]  # none without a seed; the batch together; each alone
