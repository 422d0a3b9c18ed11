"""Quality scores of rendered images and the re-render rule: pure, numpy and Pillow only."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from processors.quality import (
    QualityPolicy,
    decode_png,
    laplacian_variance,
    luminance,
    next_attempt,
    request_report,
    rerender_seed,
    score_image,
)
from processors.requests import derived_seed


def textured(width: int = 64, height: int = 48, seed: int = 1) -> np.ndarray:
    """Mid-grey noise: sharp, well exposed, contrasted."""
    rng = np.random.default_rng(seed)
    return rng.integers(40, 216, size=(height, width, 3), dtype=np.uint8)


def blurred_blocks(width: int = 64, height: int = 48) -> np.ndarray:
    """Large dark and light blocks, box-blurred: well exposed and contrasted, but soft."""
    rows, columns = np.indices((height, width))
    blocks = np.where((rows // 12 + columns // 12) % 2 == 1, 200, 60).astype(np.uint8)
    return box_blur(np.stack([blocks] * 3, axis=2), passes=8)


def box_blur(pixels: np.ndarray, passes: int) -> np.ndarray:
    out = pixels.astype(np.float64)
    for _ in range(passes):
        out = (out + np.roll(out, 1, 0) + np.roll(out, -1, 0) + np.roll(out, 1, 1) + np.roll(out, -1, 1)) / 5
    return out.round().astype(np.uint8)


def png_bytes(pixels: np.ndarray, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


def test_laplacian_variance_of_known_patterns() -> None:
    assert laplacian_variance(np.full((8, 8), 77.0)) == 0.0
    assert laplacian_variance(np.tile(np.arange(8.0), (8, 1))) == 0.0  # a linear ramp has no curvature
    checker = (np.indices((6, 6)).sum(axis=0) % 2) * 255.0
    # every interior Laplacian is +-4*255 (four neighbours opposite the centre), half of each sign
    assert laplacian_variance(checker) == pytest.approx((4 * 255.0) ** 2)
    impulse = np.zeros((5, 5))
    impulse[2, 2] = 1.0  # interior Laplacian: -4 at the centre, 1 at its four neighbours, 0 elsewhere (9 values)
    values = np.array([-4, 1, 1, 1, 1, 0, 0, 0, 0], dtype=float)
    assert laplacian_variance(impulse) == pytest.approx(values.var())
    assert laplacian_variance(np.ones((2, 9))) == 0.0


def test_luminance_uses_bt601_weights_and_ignores_alpha() -> None:
    pixel = np.array([[[255, 0, 0, 7], [0, 255, 0, 7], [0, 0, 255, 7]]], dtype=np.uint8)
    assert luminance(pixel) == pytest.approx(np.array([[0.299 * 255, 0.587 * 255, 0.114 * 255]]))
    assert luminance(np.full((2, 2), 9, dtype=np.uint8)).tolist() == [[9.0, 9.0], [9.0, 9.0]]
    with pytest.raises(ValueError, match="shape"):
        luminance(np.zeros((2, 2, 2), dtype=np.uint8))


def test_a_sharp_well_exposed_image_passes_with_every_score() -> None:
    report = score_image(textured(), (64, 48), QualityPolicy())
    assert report.passed and report.failures == []
    assert set(report.scores) == {"sharpness", "width", "height", "size_match", "mean_luminance", "contrast"}
    assert report.scores["sharpness"] > 1000 and report.scores["size_match"] == 1.0
    assert 100 < report.scores["mean_luminance"] < 150 and report.scores["contrast"] > 30


def test_blur_lowers_sharpness_below_the_default_threshold() -> None:
    rows, columns = np.indices((48, 64))
    blocks = np.where((rows // 12 + columns // 12) % 2 == 1, 200, 60).astype(np.uint8)
    sharp = score_image(np.stack([blocks] * 3, axis=2), (64, 48), QualityPolicy())
    blurred = score_image(blurred_blocks(), (64, 48), QualityPolicy())
    assert blurred.scores["sharpness"] < 100 < sharp.scores["sharpness"]
    assert blurred.failures == ["blurry"] and not blurred.passed
    assert blurred.scores["contrast"] > 40
    assert score_image(blurred_blocks(), (64, 48), QualityPolicy(sharpness_min=1.0)).passed


def test_size_is_checked_against_the_request_and_the_minimum_only_when_set() -> None:
    image = textured(64, 48)
    assert score_image(image, (48, 64), QualityPolicy()).failures == ["wrong_size"]
    assert score_image(image, (64, 48), QualityPolicy()).passed  # no minimum by default
    catalogue = QualityPolicy(min_width=512, min_height=512)
    assert score_image(image, (64, 48), catalogue).failures == ["too_small"]
    assert score_image(image, (64, 48), QualityPolicy(min_width=64, min_height=48)).passed


@pytest.mark.parametrize(("level", "code"), [(6, "dark"), (249, "bright")])
def test_exposure_bounds_fail_nearly_black_or_white_images(level: int, code: str) -> None:
    rng = np.random.default_rng(2)
    image = (level + 2 * rng.integers(-3, 4, size=(32, 32, 3))).astype(np.uint8)  # sharp, badly exposed
    report = score_image(image, (32, 32), QualityPolicy(contrast_min=0.0))
    assert report.failures == [code]


def test_a_flat_image_fails_for_contrast_and_sharpness() -> None:
    flat = np.full((32, 32, 3), 128, dtype=np.uint8)
    report = score_image(flat, (32, 32), QualityPolicy())
    assert report.failures == ["blurry", "flat"] and report.scores["contrast"] == 0.0


def test_policy_refuses_inverted_exposure_bounds() -> None:
    with pytest.raises(ValueError, match="luminance"):
        QualityPolicy(luminance_min=200, luminance_max=100)
    with pytest.raises(ValueError, match="sharpness_min"):
        QualityPolicy(sharpness_min=float("nan"))


def test_request_report_passes_only_when_every_image_does_and_shows_the_failing_one() -> None:
    policy = QualityPolicy()
    good = score_image(textured(seed=1), (64, 48), policy)
    also_good = score_image(textured(seed=3), (64, 48), policy)
    bad = score_image(blurred_blocks(), (64, 48), policy)
    combined = request_report([good, bad, also_good])
    assert not combined.passed and combined.failures == ["blurry"]
    assert combined.scores["sharpness"] == bad.scores["sharpness"] and combined.scores["images_failed"] == 1.0
    passing = request_report([good, also_good])
    least_sharp = min(good.scores["sharpness"], also_good.scores["sharpness"])
    assert passing.passed and passing.scores["sharpness"] == least_sharp
    with pytest.raises(ValueError):
        request_report([])


def test_decode_png_gives_rgb_pixels_and_refuses_garbage_and_bombs() -> None:
    image = textured(20, 10)
    assert np.array_equal(decode_png(png_bytes(image)), image)
    assert decode_png(png_bytes(image, "RGBA")).shape == (10, 20, 3)
    assert decode_png(png_bytes(image, "L")).shape == (10, 20, 3)
    with pytest.raises(ValueError, match="not a decodable image"):
        decode_png(b"\x89PNG not really")
    with pytest.raises(ValueError, match="exceeds"):
        decode_png(png_bytes(image), max_pixels=199)


def test_a_request_with_its_own_seed_goes_straight_to_review() -> None:
    assert next_attempt(True, 0) == "review"


def test_a_request_without_seed_is_rerendered_a_bounded_number_of_times() -> None:
    assert [next_attempt(False, attempt) for attempt in range(4)] == ["rerender", "rerender", "review", "review"]
    assert next_attempt(False, 0, max_rerenders=0) == "review"


def test_rerender_seeds_are_stable_new_and_start_from_the_request_seed() -> None:
    assert rerender_seed("r-1", 0) == derived_seed("r-1")
    seeds = [rerender_seed("r-1", attempt) for attempt in range(4)]
    assert len(set(seeds)) == 4 and seeds == [rerender_seed("r-1", attempt) for attempt in range(4)]
    assert rerender_seed("r-2", 1) != rerender_seed("r-1", 1)
    assert all(0 <= seed < 2**63 for seed in seeds)
    with pytest.raises(ValueError):
        rerender_seed("r-1", -1)


@pytest.mark.parametrize("shape", [(3, 3, 3), (16, 16, 3), (48, 64, 4), (200, 120, 3)])
def test_scores_equal_numpys_mean_std_and_laplacian_variance(shape) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    luma = pixels[:, :, :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    centre = luma[1:-1, 1:-1]
    laplacian = luma[:-2, 1:-1] + luma[2:, 1:-1] + luma[1:-1, :-2] + luma[1:-1, 2:] - 4.0 * centre
    scores = score_image(pixels, (shape[1], shape[0]), QualityPolicy()).scores
    assert scores["mean_luminance"] == pytest.approx(luma.mean(), rel=1e-12)
    assert scores["contrast"] == pytest.approx(luma.std(), rel=1e-12)
    assert scores["sharpness"] == pytest.approx(laplacian.var(), rel=1e-12)
