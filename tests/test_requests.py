"""Request checks and derived values: pure, no broker."""
from __future__ import annotations

import math

import pytest

from processors.requests import InvalidRequest, Limits, derived_seed, image_seeds, priority_of, validate
from streams.submit import build_request

MODELS = ("z-image-turbo",)


def ok(**fields):
    return build_request({"prompt": "a lamp", "width": 64, "height": 64, "steps": 4, **fields})


def test_a_complete_request_passes():
    validate(ok(), Limits(), MODELS)


@pytest.mark.parametrize("fields, words", [
    ({"width": 0}, "width"),
    ({"height": 100}, "multiple of 16"),
    ({"width": 4096}, "width"),
    ({"steps": -1}, "steps"),
    ({"steps": 0}, "steps"),
    ({"guidance": math.nan}, "guidance"),
    ({"guidance": -1.0}, "guidance"),
    ({"num_images": 0}, "num_images"),
    ({"num_images": 99}, "num_images"),
    ({"prompt": "   "}, "prompt is empty"),
    ({"prompt": "x" * 1_000_000}, "prompt is 1000000 characters"),
    ({"negative_prompt": "y" * 5000}, "negative_prompt"),
    ({"prompt": "a\x00b"}, "NUL"),
    ({"request_id": ""}, "request_id"),
    ({"seed": -5}, "seed"),
    ({"callback_url": "ftp://example.org/x"}, "callback_url"),
    ({"callback_url": "not a url"}, "callback_url"),
])
def test_invalid_requests_are_refused_with_the_reason(fields, words):
    with pytest.raises(InvalidRequest) as err:
        validate(ok(**fields), Limits(), MODELS)
    assert err.value.code == "invalid_request"
    assert words in err.value.reason


def test_an_unknown_model_has_its_own_code():
    with pytest.raises(InvalidRequest) as err:
        validate(ok(model="sdxl"), Limits(), MODELS)
    assert err.value.code == "unknown_model" and "z-image-turbo" in err.value.reason


def test_seed_is_derived_from_the_request_id_when_missing():
    a, b = ok(request_id="r-1", seed=None), ok(request_id="r-2", seed=None)
    assert image_seeds(a) == image_seeds(dict(a)) == [derived_seed("r-1")]
    assert image_seeds(a) != image_seeds(b)
    assert image_seeds(ok(seed=10, num_images=3)) == [10, 11, 12]


def test_priority_names():
    assert priority_of(ok(priority="high")) == "high"
    assert priority_of(ok(priority="LOW")) == "low"
    with pytest.raises(ValueError):
        build_request({"prompt": "p", "priority": "urgent"})
