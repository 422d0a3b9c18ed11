"""The Avro serde against the Avro spec, plain fastavro, a mock Schema Registry, and schema evolution."""
from __future__ import annotations

import copy
import io
import json
import random
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import fastavro
import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient

from schemas.serde import (
    SCHEMA_DIR,
    AvroSerde,
    IncompatibleSchema,
    InvalidRecord,
    RegistryUnavailable,
    SerdeError,
    UndecodableRecord,
    UnknownSchema,
    load_schema,
    schema_names,
)
from tests.avro_spec import crc64_avro

# ---- the spec, written out independently of fastavro ---------------------------------------------

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def canonical_form(schema: Any, namespace: str | None = None, seen: set[str] | None = None) -> str:
    """Parsing Canonical Form per the spec: PRIMITIVES, FULLNAMES, STRIP, ORDER, STRINGS, WHITESPACE."""
    seen = set() if seen is None else seen

    def fullname(name: str, ns: str | None) -> str:
        return name if "." in name or not ns else f"{ns}.{name}"

    if isinstance(schema, str):
        return json.dumps(schema if schema in PRIMITIVES else fullname(schema, namespace))
    if isinstance(schema, list):
        return "[" + ",".join(canonical_form(branch, namespace, seen) for branch in schema) + "]"
    kind = schema["type"]
    if isinstance(kind, (dict, list)) or kind in PRIMITIVES:
        return canonical_form(kind, namespace, seen)
    if kind == "array":
        return '{"type":"array","items":%s}' % canonical_form(schema["items"], namespace, seen)
    if kind == "map":
        return '{"type":"map","values":%s}' % canonical_form(schema["values"], namespace, seen)
    name = fullname(schema["name"], schema.get("namespace", namespace))
    if name in seen:
        return json.dumps(name)
    seen.add(name)
    inner_ns = name.rsplit(".", 1)[0] if "." in name else None
    parts = [f'"name":{json.dumps(name)}', f'"type":"{kind}"']
    if kind == "record":
        fields = ",".join('{"name":%s,"type":%s}' % (json.dumps(f["name"]), canonical_form(f["type"], inner_ns, seen))
                          for f in schema["fields"])
        parts.append(f'"fields":[{fields}]')
    elif kind == "enum":
        parts.append('"symbols":' + json.dumps(schema["symbols"], separators=(",", ":")))
    elif kind == "fixed":
        parts.append(f'"size":{schema["size"]}')
    return "{" + ",".join(parts) + "}"


def avsc(name: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / f"{name}.avsc").read_text())


def spec_header(schema: dict[str, Any]) -> bytes:
    return b"\xc3\x01" + crc64_avro(canonical_form(schema).encode()).to_bytes(8, "little")


def plain_body(schema: dict[str, Any], value: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    fastavro.schemaless_writer(buffer, fastavro.parse_schema(schema, named_schemas={}), value)
    return buffer.getvalue()


# ---- one full value per schema: every field set, no field left to its default ------------------

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z in ms
SAMPLES: dict[str, dict[str, Any]] = {
    "GenerationRequest": {
        "request_id": "req-1", "tenant": "acme", "sku_id": "SKU-9", "prompt": "a red chair, studio light, 4k 🪑",
        "negative_prompt": "blurry", "model": "z-image-base", "width": 768, "height": 512, "steps": 28,
        "guidance": 3.5, "seed": -42, "num_images": 2, "priority": "HIGH", "callback_url": "https://h/cb",
        "deadline": T0 + 60_000, "submitted_at": T0, "metadata": {"campaign": "spring"},
        "sku_version": 12, "view": "front", "template_version": "chairs@3",
        "sku_event": {"topic": "zimage.sku.changes", "partition": 1, "offset": 77},
        "admission": {"source_topic": "zimage.requests.high", "source_partition": 2, "source_offset": 2**40,
                      "generation": "tiny-1+fp32-cpu", "cache_key": "ab" * 32, "pool": "turbo",
                      "replay_id": "replay-7", "admitted_at": T0 + 5},
    },
    "PoolAnnouncement": {
        "pool": "turbo", "model": "z-image-turbo", "model_id": "Tongyi-MAI/Z-Image-Turbo",
        "model_version": "Tongyi-MAI/Z-Image-Turbo@0123+bf16-cuda", "max_side": 2048, "size_multiple": 16,
        "worker_id": "w-1", "announced_at": T0,
    },
    "ReviewDecision": {
        "tenant": "acme", "request_id": "req-1", "decision": "reject", "reviewer": "ana", "reason": "blurry",
        "rendered": b"\xc3\x01rendered", "decided_at": T0,
    },
    "WebhookDelivery": {
        "delivery_id": "d" * 64, "request_id": "req-1", "tenant": "acme", "event_type": "image.ready",
        "url": "https://hooks.example.com/zimage", "attempt": 3, "outcome": "delivered", "http_status": 200,
        "error": "timeout after 10s", "at": T0,
    },
    "RequestStatus": {
        "tenant": "acme", "request_id": "req-1", "status": "admitted", "final": True, "detail": "routed to turbo",
        "generation": "tiny-1+fp32-cpu", "stage": "gate", "at": T0,
    },
    "ImageRendered": {
        "request_id": "req-1", "tenant": "acme", "sku_id": None, "prompt": "a red chair", "priority": "HIGH",
        "model_id": "tiny", "model_version": "abc123", "width": 64, "height": 64, "steps": 2, "guidance": 0.5,
        "images": [{"index": 0, "uri": "s3://b/k0.png", "sha256": "00" * 32, "seed": 7, "size_bytes": 1234}],
        "timings": {"render": 12.5, "store": 1.25}, "batch_id": "b-1", "batch_size": 4, "worker_id": "w-1",
        "source": {"topic": "zimage.requests.high", "partition": 3, "offset": 2**40},
        "callback_url": None, "submitted_at": T0, "rendered_at": T0 + 900, "metadata": {},
        "generation": "abc123", "cache_key": "c" * 64, "cached": True, "quality": {"sharpness": 321.5, "passed": 1.0},
        "attempt": 2, "replay_id": "backfill-7",
        "sku_version": 12, "view": "front",
    },
    "ImageReady": {
        "request_id": "req-1", "tenant": "acme", "sku_id": "SKU-9", "image_uri": "file:///tmp/k0.png",
        "sha256": "ff" * 32, "seed": 7, "width": 64, "height": 64,
        "images": [{"index": 0, "uri": "file:///tmp/k0.png", "sha256": "ff" * 32, "seed": 7},
                   {"index": 1, "uri": "file:///tmp/k1.png", "sha256": "ee" * 32, "seed": 8}],
        "model_id": "tiny", "model_version": "abc123", "timings": {"total": 1500.0},
        "lineage": {"source_topic": "zimage.requests.high", "source_partition": 3, "source_offset": 99,
                    "batch_id": "b-1", "worker_id": "w-1"},
        "submitted_at": T0, "published_at": T0 + 1500, "metadata": {"k": "v"},
        "generation": "abc123+tpl-3", "version": 2, "supersedes": 1, "cached": True,
        "safety": {"decision": "REVIEW", "scanned": True, "top_label": "violence", "top_score": 0.625},
        "quality": {"sharpness": 412.5, "contrast": 48.0}, "callback_url": "https://h/cb", "replay_id": "r-1",
        "sku_version": 12, "view": "front",
    },
    "RequestFailed": {
        "request_id": None, "tenant": None, "reason_code": "undecodable", "reason": "garbage", "stage": "worker",
        "retriable": True, "source": {"topic": "zimage.requests.low", "partition": 0, "offset": 5},
        "callback_url": "https://h/cb", "failed_at": T0,
    },
    "SkuChanged": {
        "sku_id": "SKU-9", "tenant": "acme", "version": 12, "title": "Red chair", "attributes": {"color": "red"},
        "template": "catalog", "priority": "LOW", "changed_at": T0, "change_kind": "bulk_import",
        "category": "chairs",
    },
}


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde()


def test_every_schema_has_a_sample_and_loads() -> None:
    assert sorted(SAMPLES) == schema_names()
    for name in schema_names():
        assert load_schema(name)["name"] == f"zimage.v1.{name}"


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_round_trip(serde: AvroSerde, name: str) -> None:
    assert serde.decode(name, serde.encode(name, SAMPLES[name])) == SAMPLES[name]


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_without_full_validation_the_bytes_are_the_same(serde: AvroSerde, name: str) -> None:
    assert serde.encode(name, SAMPLES[name], validate=False) == serde.encode(name, SAMPLES[name])


def test_optional_records_are_written_with_their_branch_named(serde: AvroSerde) -> None:
    """The writer is told the branch of each optional record (the bytes are the plain writer's: above and below)."""
    assert serde.catalog.current("GenerationRequest").record_branches == (
        ("sku_event", "zimage.v1.SkuEventRef"), ("admission", "zimage.v1.Admission"))
    assert serde.catalog.current("ImageReady").record_branches == (("safety", "zimage.v1.SafetyVerdict"),)
    incomplete = {**SAMPLES["GenerationRequest"], "admission": {"source_topic": "t"}}
    with pytest.raises(InvalidRecord, match="Admission"):
        serde.encode("GenerationRequest", incomplete, validate=False)


@pytest.mark.parametrize(("change", "validate"), [
    ({"request_id": None}, False), ({"priority": "URGENT"}, False), ({"metadata": {"k": 1}}, False),
    ({"shoe_size": 9}, False), ({"width": True}, True), ({"width": 1.5}, True), ({"width": 2**31}, True)])
def test_a_value_off_the_schema_is_refused_with_or_without_full_validation(
        serde: AvroSerde, change: dict[str, Any], validate: bool) -> None:
    with pytest.raises(InvalidRecord):
        serde.encode("GenerationRequest", {**SAMPLES["GenerationRequest"], **change}, validate=validate)


def test_missing_optional_fields_take_their_defaults(serde: AvroSerde) -> None:
    decoded = serde.decode("GenerationRequest",
                           serde.encode("GenerationRequest", {"request_id": "r", "prompt": "p", "submitted_at": T0}))
    assert decoded["width"] == 1024 and decoded["priority"] == "NORMAL"
    assert decoded["seed"] is None and decoded["metadata"] == {}


# ---- single-object encoding, byte for byte ---------------------------------------------------------

def test_crc64_of_this_test_matches_the_spec_vectors() -> None:
    mask = 2**64 - 1
    assert crc64_avro(b'"null"') == 7195948357588979594
    assert crc64_avro(b'"int"') == 8247732601305521295
    assert crc64_avro(b'"string"') == -8142146995180207161 & mask
    record = b'{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}'
    assert crc64_avro(record) == 7843277075252814651


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_single_object_header_is_marker_plus_little_endian_fingerprint(serde: AvroSerde, name: str) -> None:
    schema = avsc(name)
    assert canonical_form(schema) == fastavro.schema.to_parsing_canonical_form(schema)
    data = serde.encode(name, SAMPLES[name])
    assert data[:10] == spec_header(schema)
    assert data[10:] == plain_body(schema, SAMPLES[name])


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_decodes_what_plain_fastavro_writes_from_the_avsc(serde: AvroSerde, name: str) -> None:
    data = spec_header(avsc(name)) + plain_body(avsc(name), SAMPLES[name])
    assert serde.decode(name, data) == SAMPLES[name]


def test_timestamps_written_as_datetimes_elsewhere_decode_to_int_millis(serde: AvroSerde) -> None:
    value = dict(SAMPLES["SkuChanged"], changed_at=datetime(2026, 1, 1, tzinfo=UTC))
    decoded = serde.decode("SkuChanged", spec_header(avsc("SkuChanged")) + plain_body(avsc("SkuChanged"), value))
    assert decoded["changed_at"] == T0


def test_unknown_fingerprint_is_unknown_schema(serde: AvroSerde) -> None:
    data = serde.encode("GenerationRequest", SAMPLES["GenerationRequest"])
    forged = data[:2] + bytes(8 * [0x5A]) + data[10:]
    with pytest.raises(UnknownSchema, match=r"0x5a5a5a5a5a5a5a5a.*single-object.*GenerationRequest current"):
        serde.decode("GenerationRequest", forged)


def test_a_different_record_is_unknown_schema(serde: AvroSerde) -> None:
    data = serde.encode("SkuChanged", SAMPLES["SkuChanged"])
    with pytest.raises(UnknownSchema, match=r"SkuChanged.*expected zimage\.v1\.GenerationRequest"):
        serde.decode("GenerationRequest", data)


# ---- bare bodies (container files: tests/test_serde_containers.py) --------------------------------------

def test_bare_body_is_accepted_only_when_exact(serde: AvroSerde) -> None:
    body = plain_body(avsc("GenerationRequest"), SAMPLES["GenerationRequest"])
    assert serde.decode("GenerationRequest", body) == SAMPLES["GenerationRequest"]
    with pytest.raises(UndecodableRecord):
        serde.decode("GenerationRequest", body + b"\x00")
    with pytest.raises(UndecodableRecord):
        AvroSerde(allow_bare=False).decode("GenerationRequest", body)


def test_bare_body_that_decodes_only_by_chance_is_refused(serde: AvroSerde) -> None:
    value = dict(SAMPLES["RequestFailed"], request_id="req-1", reason="r", stage="s", retriable=True)
    body = plain_body(avsc("RequestFailed"), value)
    flag = body.index(b"\x02s") + 2  # the boolean right after `stage`
    assert body[flag] == 1
    corrupt = body[:flag] + b"\x07" + body[flag + 1:]  # fastavro reads any non-zero byte as true
    decoded: Any = fastavro.schemaless_reader(io.BytesIO(corrupt), fastavro.parse_schema(avsc("RequestFailed")))
    assert decoded["retriable"]
    with pytest.raises(UndecodableRecord):
        serde.decode("RequestFailed", corrupt)


# ---- what is refused, and how -----------------------------------------------------------------------

@pytest.mark.parametrize("data", [None, b"", "a string", b"\xc3", b"\xc3\x01\x12", b"not avro at all", b"Obj\x01xx"])
def test_garbage_is_undecodable(serde: AvroSerde, data: Any) -> None:
    with pytest.raises(UndecodableRecord):
        serde.decode("GenerationRequest", data)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_every_truncation_and_trailing_byte_is_undecodable(serde: AvroSerde, name: str) -> None:
    data = serde.encode(name, SAMPLES[name])
    for length in range(len(data)):
        with pytest.raises(UndecodableRecord):
            serde.decode(name, data[:length])
    with pytest.raises(UndecodableRecord, match="1 unexpected bytes"):
        serde.decode(name, data + b"\x00")


def test_random_bytes_raise_only_typed_errors(serde: AvroSerde) -> None:
    rng = random.Random(1234)
    for _ in range(500):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 80)))
        with pytest.raises((UndecodableRecord, UnknownSchema)):
            serde.decode(rng.choice(sorted(SAMPLES)), data)


@pytest.mark.parametrize("change, field", [
    ({"width": "1024"}, "GenerationRequest.width"),
    ({"width": 2**40}, "GenerationRequest.width"),  # fastavro's writer alone would write it
    ({"prompt": None}, "GenerationRequest.prompt"),
    ({"priority": "URGENT"}, "GenerationRequest.priority"),
    ({"submitted_at": datetime.now(UTC)}, "int milliseconds"),
    ({"metadata": {"k": 1}}, "GenerationRequest.metadata"),
    ({"promtp": "typo"}, "GenerationRequest.promtp: not a field"),
])
def test_invalid_values_name_the_field(serde: AvroSerde, change: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRecord) as raised:
        serde.encode("GenerationRequest", {**SAMPLES["GenerationRequest"], **change})
    assert field in str(raised.value)


def test_invalid_nested_value_names_the_nested_field(serde: AvroSerde) -> None:
    value = copy.deepcopy(SAMPLES["ImageReady"])
    value["lineage"]["source_offset"] = "99"
    with pytest.raises(InvalidRecord, match=r"Lineage\.source_offset"):
        serde.encode("ImageReady", value)


# ---- Confluent wire format --------------------------------------------------------------------------

@pytest.fixture
def registry() -> Any:
    # In confluent-kafka 2.16 only the new_client() factory maps mock:// to the in-memory registry.
    return SchemaRegistryClient.new_client({"url": f"mock://{random.random()}"})


def test_confluent_round_trip_registers_under_topic_subject(registry: Any) -> None:
    serde = AvroSerde(registry_client=registry)
    data = serde.encode("GenerationRequest", SAMPLES["GenerationRequest"], topic="zimage.requests.high")
    registered = registry.get_latest_version("zimage.requests.high-value")
    assert data[0] == 0 and int.from_bytes(data[1:5], "big") == registered.schema_id
    fields = {f["name"]: f for f in json.loads(registered.schema.schema_str)["fields"]}
    assert fields["submitted_at"]["type"]["logicalType"] == "timestamp-millis"  # the .avsc as written
    assert data[5:] == plain_body(avsc("GenerationRequest"), SAMPLES["GenerationRequest"])
    # A fresh serde has no cache: it must fetch the writer schema by id.
    assert AvroSerde(registry_client=registry).decode("GenerationRequest", data) == SAMPLES["GenerationRequest"]


def test_confluent_without_topic_uses_record_name_subject(registry: Any) -> None:
    serde = AvroSerde(registry_client=registry)
    data = serde.encode("SkuChanged", SAMPLES["SkuChanged"])
    assert registry.get_latest_version("zimage.v1.SkuChanged").schema_id == int.from_bytes(data[1:5], "big")
    assert serde.decode("SkuChanged", data) == SAMPLES["SkuChanged"]


def test_confluent_serde_still_reads_single_object_and_bare_bodies(registry: Any, serde: AvroSerde) -> None:
    confluent = AvroSerde(registry_client=registry)
    assert confluent.decode("SkuChanged", serde.encode("SkuChanged", SAMPLES["SkuChanged"])) == SAMPLES["SkuChanged"]
    bare = plain_body(avsc("RequestFailed"), SAMPLES["RequestFailed"])
    assert bare[0] == 0  # null request_id: the first byte is also Confluent's magic byte
    assert confluent.decode("RequestFailed", bare) == SAMPLES["RequestFailed"]


def test_confluent_unknown_id_is_unknown_schema(registry: Any) -> None:
    serde = AvroSerde(registry_client=registry)
    body = plain_body(avsc("SkuChanged"), SAMPLES["SkuChanged"])
    with pytest.raises(UnknownSchema, match="schema id 4242"):
        serde.decode("SkuChanged", b"\x00" + (4242).to_bytes(4, "big") + body)


def test_confluent_without_registry_is_unknown_schema(serde: AvroSerde, registry: Any) -> None:
    data = AvroSerde(registry_client=registry).encode("SkuChanged", SAMPLES["SkuChanged"])
    with pytest.raises(UnknownSchema, match="no Schema Registry"):
        serde.decode("SkuChanged", data)


def test_registry_outage_is_not_a_record_error() -> None:
    class DownRegistry:
        def get_schema(self, schema_id: int) -> Any:
            raise ConnectionError("connection refused")

    serde = AvroSerde(registry_client=DownRegistry())
    with pytest.raises(RegistryUnavailable) as raised:
        serde.decode("SkuChanged", b"\x00\x00\x00\x00\x01" + plain_body(avsc("SkuChanged"), SAMPLES["SkuChanged"]))
    assert not isinstance(raised.value, SerdeError)


@pytest.mark.parametrize("schema_str", [5, None, "[" * 100_000 + "]" * 100_000, "{not json"])
def test_a_registry_answer_that_is_no_schema_is_an_unknown_schema_not_a_crash(schema_str: Any) -> None:
    class OddRegistry:
        def get_schema(self, schema_id: int) -> Any:
            return type("Registered", (), {"schema_type": "AVRO", "schema_str": schema_str})()

    serde = AvroSerde(registry_client=OddRegistry())
    with pytest.raises(UnknownSchema):
        serde.decode("SkuChanged", b"\x00\x00\x00\x00\x01" + plain_body(avsc("SkuChanged"), SAMPLES["SkuChanged"]))


@pytest.mark.parametrize("schema_id", [2**40, -1, "7", True])
def test_a_registered_id_no_record_can_carry_is_an_outage_and_not_kept(schema_id: Any) -> None:
    class OddRegistry:
        calls = 0

        def register_schema(self, subject: str, schema: Any) -> Any:
            OddRegistry.calls += 1
            return schema_id

    serde = AvroSerde(registry_client=OddRegistry())
    for _ in range(2):
        with pytest.raises(RegistryUnavailable):
            serde.encode("SkuChanged", SAMPLES["SkuChanged"], topic="t")
    assert OddRegistry.calls == 2  # asked again, not cached


# ---- evolution ---------------------------------------------------------------------------------------

def generation_request_v2() -> dict[str, Any]:
    v2 = avsc("GenerationRequest")
    v2["fields"].append({"name": "style", "type": "string", "default": "studio"})
    return v2


@pytest.fixture
def v2_schema_dir(tmp_path: Path) -> Path:
    """A deployment whose current GenerationRequest is v2 and which keeps v1 in its history folder."""
    for path in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(path, tmp_path / path.name)
    (tmp_path / "GenerationRequest.avsc").write_text(json.dumps(generation_request_v2()))
    (tmp_path / "history").mkdir()
    shutil.copy(SCHEMA_DIR / "GenerationRequest.avsc", tmp_path / "history" / "GenerationRequest.v1.avsc")
    return tmp_path


def test_old_reader_reads_data_written_with_v2() -> None:
    v2 = generation_request_v2()
    written = dict(SAMPLES["GenerationRequest"], style="watercolor")
    data = spec_header(v2) + plain_body(v2, written)
    old_reader = AvroSerde()
    with pytest.raises(UnknownSchema):
        old_reader.decode("GenerationRequest", data)
    old_reader.register_writer_schema(v2, "v2")
    assert old_reader.decode("GenerationRequest", data) == SAMPLES["GenerationRequest"]


def test_new_reader_reads_data_written_with_v1(serde: AvroSerde, v2_schema_dir: Path) -> None:
    data = serde.encode("GenerationRequest", SAMPLES["GenerationRequest"])
    new_reader = AvroSerde(schema_dir=v2_schema_dir)
    assert new_reader.decode("GenerationRequest", data) == dict(SAMPLES["GenerationRequest"], style="studio")
    assert new_reader.encode("GenerationRequest", SAMPLES["GenerationRequest"])[:10] == spec_header(
        generation_request_v2())


def test_new_reader_without_history_does_not_know_v1(serde: AvroSerde, v2_schema_dir: Path) -> None:
    shutil.rmtree(v2_schema_dir / "history")
    with pytest.raises(UnknownSchema, match="GenerationRequest current"):
        AvroSerde(schema_dir=v2_schema_dir).decode(
            "GenerationRequest", serde.encode("GenerationRequest", SAMPLES["GenerationRequest"]))


def test_required_field_without_default_is_incompatible(serde: AvroSerde, v2_schema_dir: Path) -> None:
    v3 = generation_request_v2()
    v3["fields"][-1] = {"name": "style", "type": "string"}
    (v2_schema_dir / "GenerationRequest.avsc").write_text(json.dumps(v3))
    with pytest.raises(IncompatibleSchema, match="style"):
        AvroSerde(schema_dir=v2_schema_dir).decode(
            "GenerationRequest", serde.encode("GenerationRequest", SAMPLES["GenerationRequest"]))


def test_registry_writer_of_another_version_is_resolved(registry: Any) -> None:
    v2 = generation_request_v2()
    schema_id = registry.register_schema("zimage.requests.normal-value", Schema(json.dumps(v2), "AVRO"))
    data = b"\x00" + schema_id.to_bytes(4, "big") + plain_body(v2, dict(SAMPLES["GenerationRequest"], style="ink"))
    assert AvroSerde(registry_client=registry).decode("GenerationRequest", data) == SAMPLES["GenerationRequest"]


# ---- ImageRendered and ImageReady v2: v1 stays readable, and v2 data is readable by a v1 reader ------------

V1_ONLY = {"ImageRendered": ("generation", "cache_key", "cached", "quality", "attempt", "replay_id", "sku_version",
                              "view"),
           "ImageReady": ("generation", "version", "supersedes", "cached", "safety", "quality", "callback_url",
                          "replay_id", "sku_version", "view")}
V2_DEFAULTS: dict[str, dict[str, Any]] = {
    "ImageRendered": {"generation": "", "cache_key": None, "cached": False, "quality": {}, "attempt": 0,
                      "replay_id": None,
                      "sku_version": None, "view": None},
    "ImageReady": {"generation": "", "version": 1, "supersedes": None, "cached": False, "safety": None,
                   "quality": {}, "callback_url": None, "replay_id": None, "sku_version": None, "view": None}}


def history_avsc(name: str, label: str) -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / "history" / f"{name}.{label}.avsc").read_text())


@pytest.mark.parametrize("name", sorted(V1_ONLY))
def test_data_written_with_v1_reads_into_v2_with_the_defaults(serde: AvroSerde, name: str) -> None:
    v1 = history_avsc(name, "v1")
    written = {key: value for key, value in SAMPLES[name].items() if key not in V1_ONLY[name]}
    decoded = serde.decode(name, spec_header(v1) + plain_body(v1, written))
    assert decoded == dict(written, **V2_DEFAULTS[name])


@pytest.mark.parametrize("name", sorted(V1_ONLY))
def test_data_written_with_v2_reads_into_a_v1_reader(serde: AvroSerde, name: str, tmp_path: Path) -> None:
    for path in SCHEMA_DIR.glob("*.avsc"):
        shutil.copy(path, tmp_path / path.name)
    shutil.copy(SCHEMA_DIR / "history" / f"{name}.v1.avsc", tmp_path / f"{name}.avsc")
    v1_reader = AvroSerde(schema_dir=tmp_path)
    data = serde.encode(name, SAMPLES[name])
    v1_reader.register_writer_schema(avsc(name), "v2")
    assert v1_reader.decode(name, data) == {k: v for k, v in SAMPLES[name].items() if k not in V1_ONLY[name]}


@pytest.mark.parametrize("name", sorted(V1_ONLY))
def test_v2_only_adds_fields_with_defaults_to_v1(name: str) -> None:
    v1_fields = {field["name"]: field for field in history_avsc(name, "v1")["fields"]}
    v2_fields = {field["name"]: field for field in avsc(name)["fields"]}
    assert {k: v2_fields[k] for k in v1_fields} == v1_fields
    added = set(v2_fields) - set(v1_fields)
    assert added == set(V1_ONLY[name]) and all("default" in v2_fields[k] for k in added)
