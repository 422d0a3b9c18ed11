"""What a replay re-drives, as pure rules: ranges per partition, time bounds, headers, labels, pace."""
from __future__ import annotations

import pytest

from processors.admission import GENERATION_HEADER, REPLAY_ID_HEADER
from processors.replay_plan import (
    Bounds,
    InvalidReplay,
    Pace,
    PartitionRange,
    check_label,
    parse_sku_file,
    parse_time,
    partition_range,
    redriven_headers,
)


def test_the_whole_partition_by_default_and_offsets_clip_to_what_exists():
    assert partition_range(Bounds(), 10, 50) == PartitionRange(10, 50)
    assert partition_range(Bounds(from_offset=20, to_offset=29), 10, 50) == PartitionRange(20, 30)
    assert partition_range(Bounds(from_offset=0, to_offset=10**9), 10, 50) == PartitionRange(10, 50)
    assert partition_range(Bounds(from_offset=70), 10, 50).size == 0  # past the end: nothing, never negative


def test_time_bounds_use_the_offsets_kafka_gives_for_them():
    bounds = Bounds(since_ms=1_000, until_ms=2_000)
    assert partition_range(bounds, 0, 100, since_offset=40, until_offset=60) == PartitionRange(40, 60)
    # no record at or after `since`: nothing; no record at or after `until`: up to the end
    assert partition_range(bounds, 0, 100, since_offset=-1, until_offset=-1).size == 0
    assert partition_range(bounds, 0, 100, since_offset=40, until_offset=-1) == PartitionRange(40, 100)


@pytest.mark.parametrize("bounds", [dict(from_offset=-1), dict(from_offset=9, to_offset=3),
                                    dict(since_ms=5, until_ms=5)])
def test_bounds_that_select_nothing_sensible_are_refused(bounds):
    with pytest.raises(InvalidReplay):
        Bounds(**bounds)


def test_times_are_iso_8601_utc_by_default_or_epoch_ms():
    assert parse_time("1970-01-01T00:00:01") == 1000
    assert parse_time("1970-01-01T01:00:00+01:00") == 0
    assert parse_time("2026-11-28T00:00:00Z") == 1795824000000
    assert parse_time("1234") == 1234
    with pytest.raises(InvalidReplay):
        parse_time("yesterday")


def test_headers_keep_the_records_own_and_tag_it_once_with_this_replay():
    original = [("trace", b"t-1"), (REPLAY_ID_HEADER, b"old-replay"), (GENERATION_HEADER, b"old")]
    assert redriven_headers(original, "r2", None) == [("trace", b"t-1"), (REPLAY_ID_HEADER, b"r2")]
    assert redriven_headers(None, "r2", "template.chairs@4") == [(REPLAY_ID_HEADER, b"r2"),
                                                                  (GENERATION_HEADER, b"template.chairs@4")]


@pytest.mark.parametrize("value", ["", "a b", "x" * 200, "r\x1b[0m", "ünïcode", "b2\n"])
def test_labels_that_the_gate_would_not_trust_are_refused_up_front(value):
    with pytest.raises(InvalidReplay):
        check_label("--replay-id", value)


def test_a_sku_file_is_one_id_per_line():
    assert parse_sku_file(["SKU-1", "", "  SKU-2  ", "# a comment", "SKU-1"]) == frozenset({"SKU-1", "SKU-2"})


def test_the_pace_sleeps_just_enough_to_keep_the_rate():
    now, slept = [0.0], []

    def sleep(s):
        slept.append(s)
        now[0] += s

    pace = Pace(100.0, clock=lambda: now[0], sleep=sleep)
    pace.sent(50)  # half a second's worth, sent at once
    assert slept == [pytest.approx(0.5)]
    now[0] += 2.0  # slower than the rate: no sleep
    pace.sent(10)
    assert len(slept) == 1
    Pace(None).sent(10**6)  # no rate: never sleeps
    with pytest.raises(InvalidReplay):
        Pace(0)
