"""Output topics hold the largest output a valid request can give, and the dead-letter topic a whole request."""
from __future__ import annotations

import pytest

from processors.events import (
    REASON_MAX_CHARS,
    dead_letter_headers,
    image_ready,
    image_rendered,
    request_failed,
)
from processors.requests import MAX_TIMESTAMP_MS, Limits, validate
from schemas.serde import AvroSerde
from streams.topology import (
    DEAD_LETTER_HEADER_BYTES,
    IMAGE_URI_MAX_BYTES,
    OWN_TEXT_MAX_BYTES,
    REQUEST_MAX_BYTES,
    Topology,
    largest_output_bytes,
)

WIDE = "🪑"  # four bytes in UTF-8, the most a character takes


def request_at_every_cap(limits: Limits) -> dict:
    entries = limits.max_metadata_entries
    value_chars = (limits.max_metadata_bytes // entries - 8) // len(WIDE.encode())
    metadata = {f"key-{i:03}": WIDE * value_chars for i in range(entries)}
    assert limits.max_metadata_bytes - 1024 < sum(len(k) + len(v.encode()) for k, v in metadata.items())
    request = {
        "request_id": "r" * limits.max_request_id_chars, "tenant": WIDE * limits.max_tenant_chars,
        "sku_id": WIDE * limits.max_sku_id_chars, "prompt": WIDE * limits.max_prompt_chars,
        "negative_prompt": WIDE * limits.max_prompt_chars, "model": "z-image-turbo",
        "width": limits.max_width, "height": limits.max_height, "steps": limits.max_steps,
        "guidance": limits.max_guidance, "seed": 2**63 - 1 - limits.max_images, "num_images": limits.max_images,
        "priority": "HIGH", "deadline": MAX_TIMESTAMP_MS, "submitted_at": MAX_TIMESTAMP_MS, "metadata": metadata,
        "callback_url": "https://hooks.example.com/" + WIDE * (limits.max_callback_url_chars - 26),
    }
    validate(request, limits, ("z-image-turbo",))
    return request


def largest_outputs(limits: Limits) -> dict[str, dict]:
    request = request_at_every_cap(limits)
    own = "w" * OWN_TEXT_MAX_BYTES
    images = [{"index": i, "uri": "s" * IMAGE_URI_MAX_BYTES, "sha256": "f" * 64, "seed": 2**63 - 1,
               "size_bytes": 2**62} for i in range(limits.max_images)]
    rendered = image_rendered(request=request, images=images, model_id=own, model_version=own,
                              timings_ms={f"{n:032}": 1e300 for n in range(12)}, batch_id=own, batch_size=2**30,
                              worker_id=own, source=(own[:249], 2**30, 2**62), now_ms=2**62)
    failed = request_failed(code=own, reason=WIDE * REASON_MAX_CHARS * 2, stage=own,
                            source=(own[:249], 2**30, 2**62), now_ms=2**62, request=request, retriable=True)
    return {"ImageRendered": rendered, "ImageReady": image_ready(rendered, now_ms=2**62), "RequestFailed": failed}


@pytest.mark.parametrize("limits", [Limits(), Limits(max_prompt_chars=40_000, max_metadata_bytes=160_000)])
def test_the_largest_outputs_of_a_valid_request_fit_the_bound_and_their_topics(limits: Limits) -> None:
    serde, topology = AvroSerde(), Topology()
    topics = {"ImageRendered": topology.rendered, "ImageReady": topology.images_ready,
              "RequestFailed": topology.failed}
    bound = largest_output_bytes(limits)
    for name, value in largest_outputs(limits).items():
        encoded = serde.encode(name, value)
        assert len(encoded) <= bound, name
        assert bound <= topology.max_bytes(topics[name]), name


def test_default_limits_leave_the_output_topics_ten_times_the_room_they_need() -> None:
    topology = Topology()
    largest = largest_output_bytes(Limits())
    for topic in (topology.rendered, topology.images_ready, topology.failed):
        assert 10 * largest < topology.max_bytes(topic)


def test_a_dead_letter_holds_a_whole_request_and_its_reason_headers() -> None:
    topology = Topology()
    headers = dead_letter_headers(code="w" * OWN_TEXT_MAX_BYTES, reason=WIDE * 10_000, stage="w" * OWN_TEXT_MAX_BYTES,
                                  source=("t" * 249, 2**31, 2**63), now_ms=2**63)
    assert sum(len(key) + len(value) + 10 for key, value in headers) <= DEAD_LETTER_HEADER_BYTES
    assert topology.max_bytes(topology.dlq) >= REQUEST_MAX_BYTES + DEAD_LETTER_HEADER_BYTES


def test_every_topic_states_its_size_limit_and_max_bytes_leaves_room_for_key_and_headers() -> None:
    topology = Topology()
    for spec in topology.topics():
        if spec.name in (topology.rendered, topology.images_ready, topology.failed, topology.dlq,
                         *topology.request_topics):
            assert "max.message.bytes" in spec.config, spec.name
        assert 0 < topology.max_bytes(spec.name) < int(spec.config.get("max.message.bytes", 1_048_588))
    with pytest.raises(ValueError, match="unknown topic"):
        topology.max_bytes("zimage.nope")
