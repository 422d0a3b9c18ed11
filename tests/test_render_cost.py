"""How long a batch may render: the floor until a render was measured, then factor x its expected time, from the
slowest recent cost per pixel-step-image, which a lucky fast batch lowers only slowly."""
from __future__ import annotations

import pytest

from processors.render_settings import RenderCost, RenderItem, RenderSettings

SMALL = RenderSettings(width=64, height=64, steps=2)
ITEMS = [RenderItem("a teapot", None, seed) for seed in range(4)]


def test_the_floor_holds_until_a_render_was_measured_then_the_limit_scales_with_the_batch():
    cost = RenderCost(factor=10.0, floor_s=1.0)
    assert cost.limit_s(ITEMS, SMALL) == 1.0
    cost.measured(2.0, ITEMS, SMALL)  # 2 s for four 64x64 images of 2 steps
    assert cost.limit_s(ITEMS, SMALL) == pytest.approx(20.0)
    assert cost.limit_s(ITEMS * 2, SMALL) == pytest.approx(40.0)
    assert cost.limit_s(ITEMS[:1], SMALL) == pytest.approx(5.0)


def test_a_fast_batch_lowers_the_expectation_only_by_a_tenth_of_the_gap():
    cost = RenderCost(factor=1.0, floor_s=0.0)
    cost.measured(2.0, ITEMS, SMALL)
    cost.measured(0.2, ITEMS, SMALL)
    assert cost.limit_s(ITEMS, SMALL) == pytest.approx(0.9 * 2.0 + 0.1 * 0.2)
    cost.measured(3.0, ITEMS, SMALL)  # a slower one counts at once
    assert cost.limit_s(ITEMS, SMALL) == pytest.approx(3.0)
