"""Versioned, idempotent publication and the latest image per SKU: pure, rebuilt from the events alone."""
from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import fastavro
import pytest

from processors.events import image_ready
from processors.publication_state import (
    DAY_MS,
    Decision,
    MemoryRequests,
    PublicationState,
    SkuLatest,
    by_sku_key,
    by_sku_update,
    publication_key,
)
from schemas.serde import load_schema
from streams.state_store import DiskRequests, StateStore
from tests.test_events import rendered_event

T0 = 1_767_225_600_000
NewState = Callable[..., PublicationState]


@pytest.fixture(params=["memory", "disk"])
def new_state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[NewState]:
    """A PublicationState in the heap, or on disk as `ZIMAGE_STATE_STORE=disk` keeps it: each behaves the same."""
    if request.param == "memory":
        yield PublicationState
        return
    store = StateStore(str(tmp_path), cache_mb=1)
    partitions = iter(range(1000))
    yield lambda window_ms=30 * DAY_MS: PublicationState(window_ms, DiskRequests(store, next(partitions)))
    store.close()


def rendered(generation: str = "g1", shas: tuple[str, ...] = ("a" * 64,), request_id: str = "r-1",
             tenant: str = "acme") -> dict:
    event = rendered_event(images=len(shas))
    event.update(request_id=request_id, tenant=tenant, generation=generation)
    for image, sha in zip(sorted(event["images"], key=lambda i: i["index"]), shas, strict=True):
        image["sha256"] = sha
    return event


def publish(state: PublicationState, event: dict, now_ms: int) -> dict | None:
    """What the publication processor does: decide, build the ImageReady, apply it."""
    decision = state.decide(event, now_ms)
    if not decision.publish:
        return None
    ready = image_ready(event, now_ms, version=decision.version, supersedes=decision.supersedes)
    state.apply(ready)
    return ready


def test_the_key_is_tenant_request_generation_and_hashes_in_index_order() -> None:
    event = rendered(shas=("a" * 64, "b" * 64))
    event["images"].reverse()
    assert publication_key(event) == ("acme", "r-1", "g1", ("a" * 64, "b" * 64))
    del event["generation"]  # a v1 ImageRendered
    assert publication_key(event)[2] == ""


def test_a_repeat_publishes_nothing_and_names_the_published_version(new_state: NewState) -> None:
    state = new_state()
    first = publish(state, rendered(), T0)
    assert first is not None and (first["version"], first["supersedes"]) == (1, None)
    assert publish(state, rendered(), T0 + 5) is None
    assert state.decide(rendered(), T0 + 5) == Decision(publish=False, version=1, supersedes=None)


def test_a_new_generation_or_new_content_is_the_next_version_superseding_the_last(new_state: NewState) -> None:
    state = new_state()
    publish(state, rendered("g1"), T0)
    second = publish(state, rendered("g2"), T0 + 1)
    third = publish(state, rendered("g2", shas=("c" * 64,)), T0 + 2)
    assert second is not None and third is not None
    assert (second["version"], second["supersedes"]) == (2, 1)
    assert (third["version"], third["supersedes"]) == (3, 2)
    # an older generation replayed later still publishes nothing
    assert state.decide(rendered("g1"), T0 + 3) == Decision(False, 1, None)
    assert state.decide(rendered("g2"), T0 + 3) == Decision(False, 2, 1)


def test_requests_are_told_apart_by_tenant_and_request_id(new_state: NewState) -> None:
    state = new_state()
    publish(state, rendered(), T0)
    assert state.decide(rendered(tenant="other"), T0).publish
    assert state.decide(rendered(request_id="r-2"), T0).publish
    # a request id and tenant that would run together if joined naively stay apart
    publish(state, rendered(tenant="a", request_id="b:c"), T0)
    assert state.decide(rendered(tenant="a:b", request_id="c"), T0).publish
    publish(state, rendered(tenant="x'", request_id="y"), T0)  # quotes and separators inside the parts, too
    assert state.decide(rendered(tenant="x", request_id="'y"), T0).publish
    assert state.decide(rendered(tenant="x', 'y", request_id=""), T0).publish


def test_state_rebuilt_from_the_topic_in_any_order_decides_the_same(new_state: NewState) -> None:
    live = new_state()
    topic = [publish(live, rendered(generation, request_id=request_id), T0 + i)
             for i, (request_id, generation) in enumerate([("r-1", "g1"), ("r-2", "g1"), ("r-1", "g2"),
                                                            ("r-1", "g3"), ("r-2", "g2")])]
    events = [ready for ready in topic if ready is not None]
    for order in (events, list(reversed(events)), random.Random(3).sample(events, len(events))):
        restored = new_state()
        for ready in order + order:  # applying twice changes nothing
            restored.apply(ready)
        assert len(restored) == 2
        for request_id, generation in [("r-1", "g1"), ("r-1", "g3"), ("r-2", "g2"), ("r-1", "g4"), ("r-3", "g1")]:
            event = rendered(generation, request_id=request_id)
            assert restored.decide(event, T0 + 10) == live.decide(event, T0 + 10)
    assert live.decide(rendered("g4"), T0 + 10) == Decision(True, 4, 3)


def test_a_v1_image_ready_counts_as_version_one_of_the_empty_generation(new_state: NewState) -> None:
    state = new_state()
    ready = image_ready(rendered(), T0)
    for field in ("generation", "version", "supersedes"):
        del ready[field]
    state.apply(ready)
    assert state.decide(rendered(generation=""), T0) == Decision(False, 1, None)
    assert state.decide(rendered(generation="g2"), T0) == Decision(True, 2, 1)


def test_requests_older_than_the_window_are_evicted_whole(new_state: NewState) -> None:
    state = new_state(window_ms=30 * DAY_MS)
    publish(state, rendered("g1", request_id="old"), T0)
    publish(state, rendered("g1", request_id="kept"), T0)
    publish(state, rendered("g2", request_id="kept"), T0 + 20 * DAY_MS)  # keeps g1 of "kept" too
    assert state.evict(T0 + 30 * DAY_MS) == 0
    assert state.evict(T0 + 31 * DAY_MS) == 1 and len(state) == 1
    assert state.decide(rendered("g1", request_id="kept"), T0 + 31 * DAY_MS) == Decision(False, 1, None)
    assert state.decide(rendered("g1", request_id="old"), T0 + 31 * DAY_MS) == Decision(True, 1, None)
    assert state.evict(T0 + 51 * DAY_MS) == 1 and len(state) == 0


def test_an_entry_past_the_window_does_not_count_even_before_eviction(new_state: NewState) -> None:
    state = new_state(window_ms=DAY_MS)
    publish(state, rendered(), T0)
    assert state.decide(rendered(), T0 + DAY_MS).publish is False
    assert state.decide(rendered(), T0 + DAY_MS + 1) == Decision(True, 1, None)


def test_eviction_keeps_memory_bounded_under_a_steady_stream() -> None:
    requests = MemoryRequests()
    state = PublicationState(window_ms=1000, requests=requests)
    for i in range(5000):
        publish(state, rendered(request_id=f"r-{i}"), T0 + i)
        state.evict(T0 + i)
    assert len(state) <= 1001 and len(requests._expiry) <= 1001


def test_on_disk_eviction_keeps_the_rows_bounded_under_a_steady_stream(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path), cache_mb=1)
    state, neighbour = (PublicationState(1000, DiskRequests(store, partition)) for partition in (0, 1))
    publish(neighbour, rendered(request_id="elsewhere"), T0)
    for i in range(3000):
        publish(state, rendered(request_id=f"r-{i}"), T0 + i)
        state.evict(T0 + i)
    assert len(state) == 1001 and len(neighbour) == 1  # each partition's rows are its own
    assert os.listdir(tmp_path) == []  # the file is unlinked once open: a process killed leaves nothing behind
    DiskRequests(store, 0)  # a partition taken on again starts empty, to be restored
    assert len(state) == 0 and len(neighbour) == 1


def sku_ready(sku_version: int | None, published_at: int, view: str | None = "front", sku: str = "SKU-1",
              version: int = 1, request_id: str = "r-1") -> dict:
    ready = image_ready(rendered(request_id=request_id), published_at, version=version)
    ready.update(sku_id=sku, sku_version=sku_version, view=view)
    return ready


def test_the_latest_per_sku_is_the_highest_sku_version_then_the_newest_generation() -> None:
    state = SkuLatest()
    assert by_sku_update(state, sku_ready(2, T0))
    assert not by_sku_update(state, sku_ready(1, T0 + 100))  # arrives last, older SKU version
    assert not by_sku_update(state, sku_ready(2, T0))  # the same event again
    assert by_sku_update(state, sku_ready(2, T0 + 50))  # same SKU version, newer generation
    assert not by_sku_update(state, sku_ready(None, T0 + 500))  # no SKU version ranks lowest
    assert by_sku_update(state, sku_ready(3, T0 + 1))
    assert by_sku_update(state, sku_ready(1, T0, view="side"))  # each view has its own latest
    assert by_sku_update(state, sku_ready(1, T0, sku="SKU-2"))
    assert len(state) == 3


def test_the_latest_per_sku_does_not_depend_on_arrival_order() -> None:
    events = [sku_ready(v, T0 + t, request_id=f"r-{v}-{t}") for v in (1, 2, 3) for t in (0, 7, 3)]
    winners = set()
    for seed in range(5):
        state = SkuLatest()
        latest = None
        for ready in random.Random(seed).sample(events, len(events)):
            if by_sku_update(state, ready):
                latest = ready
        assert latest is not None
        winners.add((latest["sku_version"], latest["published_at"]))
    assert winners == {(3, T0 + 7)}


def test_events_without_a_sku_are_not_catalogue_images() -> None:
    ready = sku_ready(1, T0)
    ready["sku_id"] = None
    assert by_sku_key(ready) is None and not by_sku_update(SkuLatest(), ready)


def test_the_by_sku_key_is_unambiguous_and_a_missing_view_is_empty() -> None:
    assert json.loads(by_sku_key(sku_ready(1, T0, view=None)) or b"") == ["acme", "SKU-1", ""]
    assert by_sku_key(sku_ready(1, T0, sku="a\",\"b")) != by_sku_key(sku_ready(1, T0, sku="a", view="b"))


def test_versioned_ready_events_match_the_schema(new_state: NewState) -> None:
    state = new_state()
    publish(state, rendered("g1"), T0)
    ready = publish(state, rendered("g2"), T0 + 1)
    assert ready is not None and ready["generation"] == "g2"
    assert fastavro.validate(ready, fastavro.parse_schema(load_schema("ImageReady")))
