"""What one render is asked for: each image's prompt and seed, and what a batch shares (size, steps, guidance).

Pure, so intake can check requests without torch."""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class RenderSettings:
    width: int = 1024
    height: int = 1024
    steps: int = 8
    guidance: float = 0.0  # Z-Image-Turbo is distilled for 0 (no classifier-free guidance)

    def __post_init__(self) -> None:
        for name in ("width", "height", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not math.isfinite(self.guidance) or self.guidance < 0:
            raise ValueError(f"guidance must be a finite number >= 0, got {self.guidance!r}")


class UnsupportedSettings(ValueError):
    """Settings that this model cannot render at all (size beyond its position table, wrong multiple)."""


@dataclass(frozen=True)
class RenderItem:
    prompt: str
    negative_prompt: str | None
    seed: int

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str):
            raise TypeError(f"prompt must be a str, got {type(self.prompt).__name__}")
        if self.negative_prompt is not None and not isinstance(self.negative_prompt, str):
            raise TypeError(f"negative_prompt must be a str or None, got {type(self.negative_prompt).__name__}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**64:
            raise ValueError(f"seed must be an int in [0, 2**64), got {self.seed!r}")


class BatchRenderer(Protocol):
    """What the worker needs of a renderer: the model adapter (torch, diffusers) and the benchmarks' simulated one."""

    @property
    def model_id(self) -> str: ...

    @property
    def model_version(self) -> str: ...

    @property
    def max_side(self) -> int: ...  # largest width or height the model places

    @property
    def size_multiple(self) -> int: ...  # width and height must be multiples of this

    def render(self, items: Sequence[RenderItem], settings: RenderSettings) -> list[np.ndarray]: ...

    def check_settings(self, settings: RenderSettings) -> None: ...

    def warmup(self) -> object: ...  # the device probe: whether it raises is what counts


class RenderCost:
    """How long a batch may render before the process is deemed stuck: `factor` times its expected time, never
    under `floor_s`. The expectation is the slowest recent cost per pixel-step-image, decaying: a limit set from
    a lucky fast batch would end a normal slow one."""

    def __init__(self, factor: float, floor_s: float) -> None:
        self._factor = factor
        self._floor_s = floor_s
        self._seconds_per_unit: float | None = None

    def limit_s(self, items: Sequence[RenderItem], settings: RenderSettings) -> float:
        expected = 0.0 if self._seconds_per_unit is None else self._seconds_per_unit * _units(items, settings)
        return max(self._floor_s, self._factor * expected)

    def measured(self, seconds: float, items: Sequence[RenderItem], settings: RenderSettings) -> None:
        per_unit = seconds / _units(items, settings)
        previous = self._seconds_per_unit
        self._seconds_per_unit = per_unit if previous is None else max(per_unit, 0.9 * previous + 0.1 * per_unit)


def _units(items: Sequence[RenderItem], settings: RenderSettings) -> float:
    return max(1.0, len(items) * settings.width * settings.height * settings.steps)
