"""What every image of one batch shares: size, steps and guidance. Pure, so intake can build it without torch."""
from __future__ import annotations

import math
from dataclasses import dataclass


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
