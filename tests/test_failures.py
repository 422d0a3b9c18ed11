"""A failure's records fit their topics whatever the refused record carried (no broker call: sizes only)."""
from __future__ import annotations

import hashlib

from schemas.serde import AvroSerde
from streams.failures import FailureRecords, Origin
from streams.topology import BROKER_DEFAULT_MAX_BYTES, Topology


def test_the_failure_of_a_record_of_many_megabytes_fits_its_topics():
    topology = Topology(prefix="tf")
    key = b"K" * (8 * 1024 * 1024)
    origin = Origin("tf.requests.normal", 0, 7, b"V" * (8 * 1024 * 1024), key,
                    [("small", b"s"), ("huge", b"H" * (4 * 1024 * 1024)), ("after", b"a")])
    records = FailureRecords(topology, AvroSerde(), stage="gate")("undecodable", "not Avro", origin, None)
    limits = {t.name: int(t.config.get("max.message.bytes", BROKER_DEFAULT_MAX_BYTES)) for t in topology.topics()}
    for record in records:
        header_bytes = sum(len(k) + len(v or b"") for k, v in record.headers)
        size = len(record.key or b"") + len(record.value or b"") + header_bytes
        assert size < limits[record.topic], (record.topic, size)
    failed, letter = records
    digest = b"sha256:" + hashlib.sha256(key).hexdigest().encode()
    assert failed.key == letter.key == digest  # the same name on both, for an operator to match
    headers = dict(letter.headers)
    assert headers["small"] == b"s" and "huge" not in headers and "after" not in headers
    assert headers["zimage.headers_dropped"] == b"2" and headers["zimage.key_truncated_from"] == str(len(key)).encode()
    assert headers["zimage.truncated_from"] == str(len(origin.value)).encode()


def test_a_record_of_ordinary_size_keeps_its_key_and_headers_whole():
    origin = Origin("tf.requests.normal", 0, 7, b"value", b"r-1", [("trace", b"t")])
    failed, letter = FailureRecords(Topology(prefix="tf"), AvroSerde(), stage="gate")("undecodable", "x", origin, None)
    assert failed.key == letter.key == b"r-1" and letter.value == b"value"
    assert [h for h in letter.headers if not h[0].startswith("zimage.")] == [("trace", b"t")]
