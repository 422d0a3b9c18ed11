"""Request checks and derived values: pure, no broker."""
from __future__ import annotations

import math
import random
from typing import Any

import pytest

from processors.render_settings import RenderSettings
from processors.requests import (
    InvalidRequest,
    Limits,
    derived_seed,
    image_seeds,
    priority_of,
    settings_of,
    validate,
)
from streams.submit import build_request

MODELS = ("z-image-turbo",)


def ok(**fields):
    return build_request({"prompt": "a lamp", "width": 64, "height": 64, "steps": 4, **fields})


def complete(**overrides):
    """Every optional field set to an ordinary value, then `overrides` set as given (no conversion)."""
    request = ok(request_id="order-17/img_3", tenant="acme", sku_id="SKU-9", negative_prompt="blurry\n\tgrainy",
                 seed=7, num_images=3, guidance=3.5, priority="high", callback_url="https://hooks.example.com/done?x=1",
                 metadata={"campaign": "spring", "locale": "de-DE"})
    return {**request, **overrides}


def test_a_complete_request_passes_and_keeps_its_values():
    request = complete()
    before = dict(request)
    validate(request, Limits(), MODELS)  # raises nothing
    assert request == before  # checked, never rewritten
    assert settings_of(request) == RenderSettings(width=64, height=64, steps=4, guidance=3.5)
    assert image_seeds(request) == [7, 8, 9]
    assert priority_of(request) == "high"


def test_every_field_at_its_cap_passes_and_one_past_it_is_refused():
    limits = Limits()
    at_caps: dict[str, Any] = {
        "request_id": "r" * limits.max_request_id_chars, "tenant": "t" * limits.max_tenant_chars,
        "sku_id": "s" * limits.max_sku_id_chars, "prompt": "p" * limits.max_prompt_chars,
        "negative_prompt": "n" * limits.max_prompt_chars,
        "metadata": {f"k{i:02}": "v" * (limits.max_metadata_bytes // limits.max_metadata_entries - 3)
                     for i in range(limits.max_metadata_entries)},
    }
    assert sum(len(k) + len(v) for k, v in at_caps["metadata"].items()) == limits.max_metadata_bytes
    validate(complete(**at_caps), limits, MODELS)
    past: dict[str, Any] = {field: value + "x" for field, value in at_caps.items() if isinstance(value, str)}
    past["metadata"] = dict(at_caps["metadata"], k00=at_caps["metadata"]["k00"] + "x")
    for field, value in past.items():
        with pytest.raises(InvalidRequest, match=field):
            validate(complete(**{**at_caps, field: value}), limits, MODELS)
    too_many = {f"k{i}": "" for i in range(limits.max_metadata_entries + 1)}
    with pytest.raises(InvalidRequest, match="entries"):
        validate(complete(metadata=too_many), limits, MODELS)


def test_metadata_bytes_count_utf8_not_characters():
    limits = Limits(max_metadata_bytes=10)
    validate(complete(metadata={"k": "é" * 4}), limits, MODELS)  # 1 + 8 bytes
    with pytest.raises(InvalidRequest, match="11 bytes"):
        validate(complete(metadata={"k": "é" * 5}), limits, MODELS)


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
    ({"request_id": "a b"}, "printable ASCII"),
    ({"request_id": "a\nb"}, "printable ASCII"),
    ({"request_id": "a\x7fb"}, "printable ASCII"),
    ({"request_id": "café"}, "printable ASCII"),
    ({"request_id": "r" * 257}, "request_id is 257 characters"),
    ({"request_id": 42}, "request_id must be a string"),
    ({"tenant": "a\x1bb"}, "tenant"),
    ({"tenant": "  "}, "tenant"),
    ({"sku_id": "S\x00"}, "sku_id contains control"),
    ({"sku_id": "S\x85"}, "sku_id contains control"),
    ({"metadata": {"k\n": "v"}}, "metadata key"),
    ({"metadata": {"k": 1}}, "metadata"),
    ({"metadata": ["k", "v"]}, "metadata must be a map"),
    ({"prompt": "a\x1b[31mred"}, "control character"),
    ({"negative_prompt": "a\x07"}, "control character"),
    ({"prompt": "lone \ud800 surrogate"}, "surrogate"),
    ({"width": True}, "width"),
    ({"steps": 4.0}, "steps"),
    ({"guidance": "1"}, "guidance"),
    ({"seed": "5"}, "seed"),
    ({"seed": 2**63}, "seed"),
    ({"priority": "URGENT"}, "priority"),
    ({"submitted_at": None}, "submitted_at"),
    ({"deadline": "soon"}, "deadline"),
    ({"deadline": 2**63}, "deadline"),
    ({"deadline": 2**63 - 1}, "year 10000"),  # a valid long, but no reader of timestamp-millis can date it
    ({"submitted_at": 253_402_300_800_000}, "year 10000"),
    ({"submitted_at": -1}, "submitted_at"),
    ({"seed": -5}, "seed"),
    ({"callback_url": "ftp://example.org/x"}, "callback_url"),
    ({"callback_url": "not a url"}, "callback_url"),
    ({"callback_url": "http://[::1"}, "does not parse"),
    ({"callback_url": "https://user:secret@example.com/cb"}, "credentials"),
    ({"callback_url": "http://127.0.0.1:8080/cb"}, "loopback"),
    ({"callback_url": "http://169.254.169.254/latest/meta-data"}, "link-local"),
    ({"callback_url": "http://10.1.2.3/cb"}, "private"),
    ({"callback_url": "http://2130706433/"}, "loopback"),
    ({"callback_url": "http://0x7f.1/"}, "loopback"),
    ({"callback_url": "http://[::ffff:127.0.0.1]/"}, "loopback"),
    ({"callback_url": "http://printer.local/"}, "local name"),
    ({"callback_url": "http://intranet/cb"}, "single-label"),
    ({"callback_url": "https://example.com/" + "x" * 3000}, "callback_url is"),
    ({"callback_url": 5}, "callback_url must be a string"),
])
def test_invalid_requests_are_refused_with_the_reason(fields, words):
    with pytest.raises(InvalidRequest) as err:
        validate(complete(**fields), Limits(), MODELS)
    assert err.value.code == "invalid_request"
    assert words in err.value.reason


def test_an_allow_listed_callback_host_passes():
    limits = Limits(callback_allowlist=("hooks.internal", "10.0.0.0/8"))
    validate(complete(callback_url="http://hooks.internal:9000/cb"), limits, MODELS)
    validate(complete(callback_url="http://10.4.5.6/cb"), limits, MODELS)
    with pytest.raises(InvalidRequest, match="private"):
        validate(complete(callback_url="http://192.168.1.1/cb"), limits, MODELS)


WEIRD_VALUES = [None, True, False, 0, -1, 2**70, -(2**70), 1.5, math.nan, math.inf, -0.0, "", " ", "x" * 5000,
                "\x00", "\ud800", "é", "http://[::1", "http://[::1]/", "https://u@h.com/", b"bytes", [], [1, "a"],
                {}, {"a": 1}, {1: "a"}, {"k": None}, object(), ("t",), 64, 16, 4, "HIGH", "z-image-turbo"]
FIELDS = ["request_id", "tenant", "sku_id", "prompt", "negative_prompt", "model", "width", "height", "steps",
          "guidance", "seed", "num_images", "priority", "callback_url", "deadline", "submitted_at", "metadata"]


def test_any_malformed_value_raises_only_invalid_request():
    rng = random.Random(7)
    limits, refused = Limits(), 0
    for _ in range(4000):
        request: Any  # any value at all: not even a mapping, some draws
        if rng.random() < 0.1:
            request = rng.choice([None, [], "request", 5, {}, {"request_id": "r"}])
        else:
            request = complete()
            for field in rng.sample(FIELDS, rng.randint(1, 3)):
                if rng.random() < 0.2:
                    request.pop(field, None)
                else:
                    request[field] = rng.choice(WEIRD_VALUES)
        try:
            validate(request, limits, MODELS)
        except InvalidRequest as exc:
            assert exc.code in ("invalid_request", "unknown_model") and exc.reason
            refused += 1
    assert refused > 3000  # nearly every draw breaks a rule; the rest are values the rules allow


def test_a_request_that_breaks_while_being_read_is_still_an_invalid_request():
    class Exploding(dict):
        def get(self, key, default=None):
            raise RuntimeError("broken mapping")

    with pytest.raises(InvalidRequest, match="malformed request: RuntimeError"):
        validate(Exploding(complete()), Limits(), MODELS)


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
