"""Quality scoring of a rendered image, and the re-render rule for an image that fails it.

Scores are computed with numpy alone on the image's luminance (ITU-R BT.601 weights, 0-255 scale, as
OpenCV's grayscale conversion): sharpness is the variance of its 3x3 Laplacian (the kernel of OpenCV's
`Laplacian` with ksize=1, over the interior pixels), exposure its mean, contrast its standard deviation.

A batch of images is scored together (`score_images`, `score_requests`): the images of one shape and dtype are
stacked and each score is computed for all of them at once, along the image axes; one image alone is a stack of
one, with the same figures to the bit (tests/test_quality_batch.py checks it). On small images the cost is numpy's
per-call overhead, which a stack pays once instead of once per image."""
from __future__ import annotations

import hashlib
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np
from PIL import Image

from processors.requests import MAX_SEED, derived_seed

LUMA_WEIGHTS = np.array([0.299, 0.587, 0.114])
DEFAULT_MAX_RERENDERS = 2
# Images scored together in one stack (score_images): enough for a batch of small ones, not so many that
# the float64 copies of a stack (8 bytes a channel) leave the caches.
STACK_MAX_PIXELS = 32 * 1024
# A PNG from our own workers is at most Limits.max_width x max_height; this only stops a decompression bomb.
DECODE_MAX_PIXELS = 64 * 1024 * 1024


@dataclass(frozen=True)
class QualityPolicy:
    """What an image must reach to be published without review.

    `sharpness_min` is a Laplacian variance (100 is the usual blur cut-off on 8-bit images). The minimum size is
    off by default (a catalogue policy sets e.g. 512x512). Exposure bounds the mean luminance, so an image that is
    nearly all black or all white fails; a packshot on white sits well below the upper bound."""

    sharpness_min: float = 100.0
    min_width: int | None = None
    min_height: int | None = None
    luminance_min: float = 15.0
    luminance_max: float = 245.0
    contrast_min: float = 8.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.luminance_min <= self.luminance_max <= 255.0:
            raise ValueError(f"expected 0 <= luminance_min <= luminance_max <= 255, got "
                             f"{self.luminance_min}, {self.luminance_max}")
        for name in ("sharpness_min", "contrast_min"):
            if not getattr(self, name) >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass(frozen=True)
class QualityReport:
    passed: bool
    scores: dict[str, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)  # codes: blurry, wrong_size, too_small, dark, bright, flat


class Quality(NamedTuple):
    """What a worker keeps of a rendered request's quality: the scores its ImageRendered carries (`passed` among
    them) and the render that they are of."""

    scores: dict[str, float]
    attempt: int  # 0: the first render passed (or nothing more was tried); n: the n-th re-render


def luminance(pixels: np.ndarray) -> np.ndarray:
    """HxW float64 luminance of an HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA: alpha ignored) uint8 image."""
    return _luminances(pixels[np.newaxis])[0]


def laplacian_variance(luma: np.ndarray) -> float:
    """Variance of the 4-neighbour Laplacian of an HxW luminance over the interior pixels; 0 under 3x3."""
    return _laplacian_variances(luma[np.newaxis])[0]


def score_image(pixels: np.ndarray, requested: tuple[int, int], policy: QualityPolicy) -> QualityReport:
    """Scores of one image against `policy`. `requested` is (width, height) as the request asked.

    Scores: sharpness, width, height, size_match (1 or 0), mean_luminance, contrast."""
    return score_images([pixels], [requested], policy)[0]


def score_images(images: Sequence[np.ndarray], requested: Sequence[tuple[int, int]],
                 policy: QualityPolicy) -> list[QualityReport]:
    """`score_image` of each image, in input order (`requested[i]` is the width and height image i's request
    asked for). Images of one shape and dtype are scored together, stacked, up to STACK_MAX_PIXELS pixels at a
    time (beyond that numpy's per-call overhead is small beside the work, and a large stack only spills the
    caches)."""
    if len(images) != len(requested):
        raise ValueError(f"{len(images)} images but {len(requested)} requested sizes")
    groups: dict[tuple[tuple[int, ...], np.dtype], list[int]] = {}
    for index, pixels in enumerate(images):
        groups.setdefault((pixels.shape, pixels.dtype), []).append(index)
    reports: dict[int, QualityReport] = {}
    for (shape, _), indexes in groups.items():
        per_stack = max(1, STACK_MAX_PIXELS // max(1, math.prod(shape[:2])))
        for at in range(0, len(indexes), per_stack):
            chunk = indexes[at:at + per_stack]
            stacked = _stack_scores(np.stack([images[i] for i in chunk]))
            for index, (sharpness, mean, variance) in zip(chunk, stacked, strict=True):
                reports[index] = _judged(shape[1], shape[0], requested[index], sharpness, mean, variance, policy)
    return [reports[index] for index in range(len(images))]


def _luminances(stack: np.ndarray) -> np.ndarray:
    """NxHxW float64 luminances of N stacked images (NxHxW gray, NxHxWx3 RGB or NxHxWx4 RGBA, alpha ignored)."""
    # In C order whatever the layout (a renderer's pixels are often planar): each pixel's weighted sum is then the
    # same BLAS call, with the same rounding, for an image alone or in a stack.
    if stack.ndim == 3:
        return stack.astype(np.float64, order="C")
    if stack.ndim == 4 and stack.shape[3] in (3, 4):
        return stack[..., :3].astype(np.float64, order="C") @ LUMA_WEIGHTS
    raise ValueError(f"expected an HxW, HxWx3 or HxWx4 image, got shape {stack.shape[1:]}")


def _laplacian_variances(luma: np.ndarray) -> list[float]:
    """The variance of each NxHxW luminance's 4-neighbour Laplacian over its interior pixels; 0 under 3x3."""
    count, height, width = luma.shape
    if height < 3 or width < 3:
        return [0.0] * count
    laplacian = luma[:, :-2, 1:-1] + luma[:, 2:, 1:-1]
    laplacian += luma[:, 1:-1, :-2]
    laplacian += luma[:, 1:-1, 2:]
    laplacian -= 4.0 * luma[:, 1:-1, 1:-1]
    return _means_and_variances(laplacian.reshape(count, -1))[1]


def _stack_scores(stack: np.ndarray) -> list[tuple[float, float, float]]:
    """(sharpness, mean, variance) of the luminance of each of N stacked images."""
    luma = _luminances(stack)
    count = luma.shape[0]
    if not luma.size:
        return [(0.0, 0.0, 0.0)] * count
    means, variances = _means_and_variances(luma.reshape(count, -1))
    return list(zip(_laplacian_variances(luma), means, variances, strict=True))


def _means_and_variances(rows: np.ndarray) -> tuple[list[float], list[float]]:
    """The mean and (population) variance of each row of a non-empty NxM float array, in two passes as numpy's
    var does, with each row's squares summed by one product: a few numpy calls for the whole stack, where numpy's
    own mean and var cost a dozen per image, which is what scoring small images cost."""
    size = rows.shape[1]
    means = rows.sum(axis=1) / size
    deviations = rows - means[:, np.newaxis]
    squares = np.matmul(deviations[:, np.newaxis, :], deviations[:, :, np.newaxis]).ravel()
    return means.tolist(), (squares / size).tolist()


def _judged(width: int, height: int, requested: tuple[int, int], sharpness: float, mean: float, variance: float,
            policy: QualityPolicy) -> QualityReport:
    """The report of an image of `width` x `height` from its luminance's scores."""
    scores = {
        "sharpness": sharpness,
        "width": float(width),
        "height": float(height),
        "size_match": 1.0 if (width, height) == tuple(requested) else 0.0,
        "mean_luminance": mean,
        "contrast": math.sqrt(variance),
    }
    failures = []
    if scores["sharpness"] < policy.sharpness_min:
        failures.append("blurry")
    if not scores["size_match"]:
        failures.append("wrong_size")
    if width < (policy.min_width or 0) or height < (policy.min_height or 0):
        failures.append("too_small")
    if scores["mean_luminance"] < policy.luminance_min:
        failures.append("dark")
    if scores["mean_luminance"] > policy.luminance_max:
        failures.append("bright")
    if scores["contrast"] < policy.contrast_min:
        failures.append("flat")
    return QualityReport(passed=not failures, scores=scores, failures=failures)


def score_requests(images: Sequence[Sequence[np.ndarray]], requested: Sequence[tuple[int, int]],
                   policy: QualityPolicy) -> list[QualityReport]:
    """The `request_report` of each request from its images (`images[r]`, in index order) against the width and
    height it asked for (`requested[r]`), the images of all the requests scored by one `score_images`."""
    if len(images) != len(requested):
        raise ValueError(f"images of {len(images)} requests but {len(requested)} requested sizes")
    reports = score_images([image for own in images for image in own],
                           [size for own, size in zip(images, requested, strict=True) for _ in own], policy)
    out, at = [], 0
    for own in images:
        out.append(request_report(reports[at:at + len(own)]))
        at += len(own)
    return out


def request_report(reports: Iterable[QualityReport]) -> QualityReport:
    """The report of a request from those of its images, in index order: it passes when every image passes; its
    scores (what the event carries) are those of the first failing image, else of the least sharp one, plus
    `images_failed`."""
    listed = list(reports)
    if not listed:
        raise ValueError("a request has at least one image report")
    failing = [r for r in listed if not r.passed]
    shown = failing[0] if failing else min(listed, key=lambda r: r.scores.get("sharpness", math.inf))
    failures = sorted({code for r in failing for code in r.failures})
    return QualityReport(passed=not failing, scores={**shown.scores, "images_failed": float(len(failing))},
                         failures=failures)


def decode_png(data: bytes, max_pixels: int = DECODE_MAX_PIXELS) -> np.ndarray:
    """HxWx3 uint8 RGB pixels of a PNG (or any image Pillow reads); ValueError for bytes that are not one or
    that declare more than `max_pixels` pixels (checked before the pixels are decoded)."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.width * image.height > max_pixels:
                raise ValueError(f"image of {image.width}x{image.height} exceeds {max_pixels} pixels")
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, Image.DecompressionBombError, SyntaxError) as exc:
        raise ValueError(f"not a decodable image: {exc}") from exc


def next_attempt(request_seed_given: bool, attempt: int,
                 max_rerenders: int = DEFAULT_MAX_RERENDERS) -> Literal["rerender", "review"]:
    """What follows a quality failure of render `attempt` (0 for the first render). A request that gave its own
    seed goes to review at once: its bytes are what the caller asked for. Otherwise it is re-rendered until
    `max_rerenders` re-renders have failed too."""
    if request_seed_given or attempt >= max_rerenders:
        return "review"
    return "rerender"


def rerender_seed(request_id: str, attempt: int) -> int:
    """The base seed of render `attempt` of a request that gave no seed: attempt 0 is the request's own
    derived seed, each later attempt a new one, stable across replays and workers."""
    if attempt < 0:
        raise ValueError(f"attempt must be >= 0, got {attempt}")
    if attempt == 0:
        return derived_seed(request_id)
    digest = hashlib.sha256(f"{request_id}\x00rerender\x00{attempt}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & MAX_SEED
