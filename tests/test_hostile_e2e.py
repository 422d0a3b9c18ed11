"""Hostile records on the real broker: each ends as a RequestFailed plus a dead letter that keeps the original key
and bytes, the worker stays alive, and the good request sent after them is published."""
from __future__ import annotations

import hashlib
import json
import struct

import pytest

from tests.test_pipeline_e2e import (
    AVSC,
    _dlq_reader,
    _drain,
    plain_request,
    single_object,
)
from tests.test_serde_containers import (
    deflate_bomb,
    null_array_bomb,
    recursive_record_50k_deep,
)

pytestmark = pytest.mark.stack


def near_one_mib_metadata() -> dict[str, str]:
    """A metadata map that keeps the request just under the request topic's 1 MiB limit."""
    return {f"k{i:04d}": "x" * 1000 for i in range(1000)}


def test_hostile_records_are_dead_lettered_with_their_keys_and_the_worker_goes_on(pipeline):
    schema = json.loads(AVSC.read_text())
    topic = f"{pipeline.prefix}.requests.normal"
    valid = single_object(schema, plain_request())
    requests = {
        "callback-bracket": plain_request(callback_url="http://[::1"),
        "callback-metadata-ip": plain_request(callback_url="http://169.254.169.254/latest/meta-data/"),
        "metadata-near-1mib": plain_request(metadata=near_one_mib_metadata()),
        "request-id-newline": plain_request(request_id="evil\nid"),
        "headers-near-1mib": plain_request(),  # valid, but its headers would not fit on any record it leads to
    }
    bulky = [(f"h{i}", b"x" * 100_000) for i in range(10)]
    undecodable = {
        "container-recursive": recursive_record_50k_deep(),
        "container-null-array-bomb": null_array_bomb(),
        "container-deflate-bomb": deflate_bomb(),
        "empty": b"",
        "random": bytes(range(256)) * 3,
        "json": b'{"request_id": "r1", "prompt": "a chair"}',
        "truncated": valid[:-5],
        "unknown-fingerprint": b"\xc3\x01" + struct.pack("<Q", 0x0123_4567_89AB_CDEF) + valid[10:],
        "confluent-unknown-id": b"\x00\x00\x00\x03\xe7" + valid[10:],
        "trailing-garbage": valid + b"\x00garbage",
    }
    records = {name: single_object(schema, r) for name, r in requests.items()} | undecodable
    # Just under the request topic's limit with its key and headers: a copy of it with anything added (an
    # admission, a forwarded-from header) may not fit its topic, and a gate that copied such headers on stalled
    # there, aborting its transaction forever. It is refused for its headers instead.
    room = 1_048_234 - len(records["headers-near-1mib"]) - len(b"hostile-headers-near-1mib") - len(
        b"trace" + b"headers-near-1mib") - sum(len(k) + len(v) for k, v in bulky) - len(b"pad")
    bulky.append(("pad", b"y" * room))
    assert len(records["metadata-near-1mib"]) < 1_048_576
    good = plain_request()
    follower = pipeline.follower(from_beginning=True)
    dlq = _dlq_reader(pipeline)
    prod = pipeline.producer(**{"message.max.bytes": 2_000_000})
    for name, value in records.items():
        sent = [("trace", name.encode()), *(bulky if name == "headers-near-1mib" else [])]
        prod.produce(topic, value, f"hostile-{name}".encode(), headers=sent)
    prod.produce(topic, single_object(schema, good), good["request_id"].encode())
    assert prod.flush(30) == 0

    ids = [good["request_id"]] + [r["request_id"] for name, r in requests.items() if "\n" not in r["request_id"]]
    seen = pipeline.collect(ids, timeout_s=180, follower=follower)  # fails if the worker or processors died
    follower.close()
    assert [n for n, _ in seen[good["request_id"]]] == ["ImageReady"]
    for name, r in requests.items():
        if r["request_id"] in seen:
            [(kind, failed)] = seen[r["request_id"]]
            assert kind == "RequestFailed" and failed["reason_code"] == "invalid_request", (name, failed)
            assert failed["callback_url"] is None  # a refused URL is never echoed for a callback

    letters = {}
    for key, value, headers in _drain(dlq, expected=len(records), timeout_s=120):
        letters[key] = (value, dict(headers))
    assert set(letters) == {f"hostile-{name}".encode() for name in records}
    for name, value in records.items():
        kept, headers = letters[f"hostile-{name}".encode()]
        assert kept == value, name  # the original bytes, untouched
        assert headers["trace"] == name.encode()  # the original headers too
        assert headers["zimage.reason_code"] in (b"invalid_request", b"undecodable", b"unknown_schema"), name
    for name in ("container-recursive", "container-null-array-bomb", "container-deflate-bomb"):
        assert b"container" in letters[f"hostile-{name}".encode()][1]["zimage.reason"], name
    pipeline.check_alive()


def test_records_whose_key_or_headers_no_output_could_carry_fail_alone_at_every_stage(fresh_pipeline):
    """A compressed batch carries a record of many megabytes that no topic takes uncompressed: its failure must
    not carry its key or headers whole, or the broker refuses the failure, every transaction with it aborts and
    the stage stops for good (a crash loop at the gate, the worker and publication alike)."""
    from streams.submit import Submitter, build_request

    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False)
    p.start("worker", "worker")
    prod = p.producer(**{"compression.type": "zstd", "message.max.bytes": 20_000_000})
    huge_key, huge_header = b"K" * (8 * 1024 * 1024), [("h", b"H" * (4 * 1024 * 1024))]
    topics = [p.topology.request_topic("normal"), p.topology.render_topic("turbo", "normal"), p.topology.rendered]
    for topic in topics:
        prod.produce(topic, b"\xde\xad", huge_key)
        prod.produce(topic, b"\xbe\xef", b"hostile-headers", headers=huge_header)
    assert prod.flush(60) == 0
    good = build_request({"prompt": "a lamp", "seed": 3, "width": 32, "height": 32, "steps": 2})
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    sub.submit([good])
    sub.flush()
    seen = p.collect([good["request_id"]], timeout_s=120)  # fails if a stage died
    assert [n for n, _ in seen[good["request_id"]]] == ["ImageReady"]
    letters = _drain(_dlq_reader(p), expected=2 * len(topics), timeout_s=60)
    digest = b"sha256:" + hashlib.sha256(huge_key).hexdigest().encode()
    assert sorted(key for key, _v, _h in letters) == sorted([digest, b"hostile-headers"] * len(topics))
    for key, _value, headers in letters:
        names = dict(headers)
        assert ("zimage.key_truncated_from" in names) == (key == digest)
        assert ("zimage.headers_dropped" in names) == (key == b"hostile-headers")
    for name in ("processors", "worker"):
        assert "restarting" not in p.log(name), p.log(name)[-3000:]
    p.check_alive()
