"""State on local disk (ZIMAGE_STATE_STORE=disk): the gate's admitted keys as rows of a scratch database, restored,
forgotten and evicted as the heap's tables are. Publication's rows are covered with its state's own tests
(tests/test_publication_state.py runs each of them on both)."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from streams.changelog_table import RestoreFailed
from streams.gate_state import DAY_MS, AdmittedKeys
from streams.state_store import DiskMapping, StateStore, StateUnavailable

NOW = int(time.time() * 1000)
Entries = dict[int, list[tuple[bytes, bytes | None]]]


def reading(entries: Entries, fail_after: int | None = None) -> Callable:
    """A changelog read: feeds each partition's (key, value) entries, raising part-way when fail_after is set."""
    def read(_base: dict, _topic: str, partitions: list[int], apply: Callable) -> None:
        for partition in partitions:
            for n, (key, value) in enumerate(entries.get(partition, [])):
                if fail_after is not None and n == fail_after:
                    raise RestoreFailed("broker went away")
                apply(key, value)
    return read


def at(ms: int) -> bytes:
    return json.dumps({"at": ms}).encode()


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    return StateStore(str(tmp_path / "state"), cache_mb=1)


def test_a_disk_mapping_behaves_as_a_dict_per_partition(store: StateStore) -> None:
    left, right = DiskMapping(store, "t", 0, int, int), DiskMapping(store, "t", 1, int, int)
    odd = "tenant:\udcff/é"  # a lone surrogate, as a key decoded with "replace" never has, still round-trips
    left["a"], left[odd], right["a"] = 1, 2, 3
    assert (left["a"], left.get(odd), right["a"], left.get("missing")) == (1, 2, 3, None)
    assert sorted(left) == sorted(["a", odd]) and len(left) == 2 and len(right) == 1
    del left["a"]
    with pytest.raises(KeyError):
        del left["a"]
    assert left.pop("missing", None) is None and dict(left) == {odd: 2}
    left.clear()
    assert len(left) == 0 and dict(right) == {"a": 3}
    assert DiskMapping(store, "other", 1, int, int).get("a") is None  # tables are apart too


@pytest.mark.parametrize("on_disk", [False, True], ids=["memory", "disk"])
def test_admitted_keys_restore_skip_the_stale_and_are_evicted_while_running(store: StateStore, on_disk: bool) -> None:
    entries: Entries = {0: [(b"fresh", at(NOW - DAY_MS)), (b"stale", at(NOW - 3 * DAY_MS)), (b"gone", at(NOW)),
                            (b"gone", None), (b"junk", b"{not json")]}
    keys = AdmittedKeys({}, "gate.changelog", window_days=2, store=store if on_disk else None, read=reading(entries))
    assert [k for k in ("fresh", "stale", "gone", "junk") if keys.seen(0, k, NOW)] == ["fresh"]
    assert keys.get(0, "stale") is None  # not even kept
    keys.admit(0, "new", NOW)
    assert keys.evict(NOW + DAY_MS) == 1  # "fresh" is past the window a day later, "new" is not
    assert not keys.seen(0, "fresh", NOW + DAY_MS) and keys.seen(0, "new", NOW + DAY_MS)
    keys.forget([0])
    assert keys.seen(0, "fresh", NOW) and not keys.seen(0, "new", NOW)  # read again: what committed, not what was put
    if on_disk:
        assert store.table("admitted").count(0) == 1


def test_a_restore_that_failed_part_way_leaves_no_rows_behind(store: StateStore) -> None:
    entries: Entries = {3: [(f"k{n}".encode(), at(NOW)) for n in range(1000)]}
    failing = AdmittedKeys({}, "gate.changelog", store=store, read=reading(entries, fail_after=600))
    with pytest.raises(RestoreFailed):
        failing.seen(3, "k1", NOW)
    assert store.table("admitted").count(3) == 0  # what it had written before the broker went away is dropped
    entries[3] = entries[3][:2]  # compacted since, say: only two remain
    keys = AdmittedKeys({}, "gate.changelog", store=store, read=reading(entries))
    assert keys.seen(3, "k1", NOW) and not keys.seen(3, "k4", NOW) and not keys.seen(3, "k599", NOW)
    assert store.table("admitted").count(3) == 2


def test_buffered_writes_are_found_after_the_recent_entries_are_forgotten(store: StateStore) -> None:
    table = DiskMapping(store, "t", 0, int, int, recent=8, write_every=5)
    for n in range(20):  # the recent entries are cleared twice, the writes go in groups of five
        table[f"k{n}"] = n
    assert [table.get(f"k{n}") for n in range(20)] == list(range(20)) and len(table) == 20
    assert table.evict_before(10) == 10 and sorted(table, key=lambda k: int(k[1:])) == [f"k{n}" for n in range(10, 20)]


def test_an_admitted_time_out_of_range_is_skipped_as_unreadable(store: StateStore) -> None:
    entries: Entries = {0: [(b"huge", at(10 ** 30)), (b"fine", at(NOW))]}
    keys = AdmittedKeys({}, "gate.changelog", store=store, read=reading(entries))
    assert keys.seen(0, "fine", NOW) and keys.get(0, "huge") is None


def test_a_failing_database_is_an_outage_of_the_state_not_a_request_fault(tmp_path: Path) -> None:
    broken = StateStore(str(tmp_path), cache_mb=1)
    table = DiskMapping(broken, "t", 0, int, int, write_every=2)
    table["a"] = 1
    broken.close()  # as a full disk or an I/O error would, every statement now fails
    with pytest.raises(StateUnavailable) as raised:
        table["b"] = 2
    assert isinstance(raised.value, RestoreFailed)  # what the gate and publication already treat as an outage


def test_the_database_file_is_gone_from_the_folder_while_it_is_in_use(tmp_path: Path) -> None:
    store = StateStore(str(tmp_path), cache_mb=1)
    store.table("t").put(0, b"k", 1, b"v")
    assert os.listdir(tmp_path) == [] and store.table("t").get(0, b"k") == (1, b"v")
