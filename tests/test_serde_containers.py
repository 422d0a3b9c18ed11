"""Avro container files in the serde: refused by default, accepted on request only with a known writer schema,
and hostile ones, each decoded in a child process under a time and memory limit, so that a crash, a spin or a
memory blow-up shows as a failed test instead of a dead or frozen test run."""
from __future__ import annotations

import functools
import io
import json
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import fastavro
import pytest

from schemas.catalog import (
    MAX_SCHEMA_NESTING,
    nesting_depth,
    recursive_records,
    zero_byte_collections,
)
from schemas.serde import (
    SCHEMA_DIR,
    AvroSerde,
    SerdeError,
    UndecodableRecord,
    UnknownSchema,
)

ROOT = Path(__file__).resolve().parents[1]
ADDRESS_SPACE_LIMIT = 1024 * 1024 * 1024
CHILD_SECONDS = 30
SYNC = bytes(range(16))
REQUEST: dict[str, Any] = {
    "request_id": "r-1", "tenant": "t", "sku_id": None, "prompt": "a lamp", "negative_prompt": None,
    "model": "z-image-turbo", "width": 64, "height": 64, "steps": 2, "guidance": 0.0, "seed": None,
    "num_images": 1, "priority": "NORMAL", "callback_url": None, "deadline": None, "submitted_at": 1,
    "metadata": {}, "sku_version": None, "view": None, "template_version": None, "sku_event": None,
    "admission": None}


def zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def avro_bytes(raw: bytes) -> bytes:
    return zigzag(len(raw)) + raw


def container(schema_json: str, body: bytes, codec: str = "null", records: int = 1) -> bytes:
    """A container file written by hand, so that the schema and the block can be anything."""
    header = zigzag(2) + avro_bytes(b"avro.schema") + avro_bytes(schema_json.encode())
    header += avro_bytes(b"avro.codec") + avro_bytes(codec.encode()) + zigzag(0)
    return b"Obj\x01" + header + SYNC + zigzag(records) + avro_bytes(body) + SYNC


def fastavro_container(schema: dict[str, Any], records: list[dict[str, Any]], codec: str = "null") -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema, named_schemas={}), records, codec=codec)
    return buffer.getvalue()


def request_schema() -> dict[str, Any]:
    return json.loads((SCHEMA_DIR / "GenerationRequest.avsc").read_text())


def request_body() -> bytes:
    return AvroSerde().encode("GenerationRequest", REQUEST)[10:]  # past the single-object header


def deep_record_schema(levels: int) -> str:
    """A record whose one field is `levels` arrays deep: about 50 KB of JSON for 2,000 levels."""
    nested = '{"type":"array","items":' * levels + '"null"' + "}" * levels
    return '{"type":"record","name":"GenerationRequest","namespace":"zimage.v1","fields":[{"name":"x","type":%s}]}' % (
        nested)


def recursive_record_50k_deep() -> bytes:
    """A record that holds itself, and 50 KB of data nesting it: a reader that recurses per level overflows its
    C stack (fastavro's compiled reader segfaults)."""
    schema = {"type": "record", "name": "GenerationRequest", "namespace": "zimage.v1",
              "fields": [{"name": "next", "type": ["null", "GenerationRequest"]}]}
    return container(json.dumps(schema), b"\x02" * 50_000 + b"\x00")


def null_array_bomb() -> bytes:
    """The request plus an array<null> field whose block says 2**62 items: a reader that trusts the schema spins."""
    schema = request_schema()
    schema["fields"].append({"name": "bomb", "type": {"type": "array", "items": "null"}, "default": []})
    return container(json.dumps(schema), request_body() + zigzag(2**62) + zigzag(0))


@functools.lru_cache(maxsize=2)
def deflate_bomb(inflated_bytes: int = 300 * 1024 * 1024) -> bytes:
    """A request's schema, and a deflate block of about 300 KB that inflates to `inflated_bytes` of zeros."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    block = b"".join(packer.compress(chunk) for _ in range(inflated_bytes // len(chunk))) + packer.flush()
    return container(json.dumps(request_schema()), block, codec="deflate")


def test_container_files_are_refused_by_default() -> None:
    data = fastavro_container(request_schema(), [REQUEST])
    with pytest.raises(UndecodableRecord, match="container files are not accepted"):
        AvroSerde().decode("GenerationRequest", data)


@pytest.mark.parametrize("codec", ["null", "deflate"])
def test_container_file_decodes_its_first_record_if_the_record_matches(codec: str) -> None:
    serde = AvroSerde(accept_container_files=True)
    data = fastavro_container(request_schema(), [REQUEST, dict(REQUEST, request_id="r-2")], codec)
    assert serde.decode("GenerationRequest", data) == REQUEST
    sku = {"sku_id": "S", "tenant": "t", "version": 1, "title": "x", "attributes": {}, "template": "c",
           "priority": "LOW", "changed_at": 1}
    other = fastavro_container(json.loads((SCHEMA_DIR / "SkuChanged.avsc").read_text()), [sku])
    with pytest.raises(UnknownSchema, match="SkuChanged"):
        serde.decode("GenerationRequest", other)


def test_container_file_with_a_foreign_version_of_the_record_is_unknown_schema() -> None:
    foreign = request_schema()
    foreign["fields"] = [*foreign["fields"], {"name": "extra", "type": "string", "default": ""}]
    data = fastavro_container(foreign, [dict(REQUEST, extra="x")])
    with pytest.raises(UnknownSchema, match="none of the known versions"):
        AvroSerde(accept_container_files=True).decode("GenerationRequest", data)


CHILD = textwrap.dedent("""
    import json, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, ({limit}, {limit}))
    from schemas.serde import AvroSerde
    data = open(sys.argv[1], "rb").read()
    serde = AvroSerde(accept_container_files=sys.argv[2] == "containers")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    try:
        serde.decode("GenerationRequest", data)
        outcome = "decoded"
    except Exception as exc:
        outcome = [k.__name__ for k in type(exc).__mro__]
    print(json.dumps({{"outcome": outcome, "seconds": time.monotonic() - started,
                       "grew_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before}}))
""").format(limit=ADDRESS_SPACE_LIMIT)


def decode_in_child(tmp_path: Path, data: bytes, mode: str) -> dict[str, Any]:
    path = tmp_path / "record.bin"
    path.write_bytes(data)
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(path), mode], cwd=ROOT, capture_output=True,
                              text=True, timeout=CHILD_SECONDS)
    except subprocess.TimeoutExpired:
        pytest.fail(f"decoding did not end within {CHILD_SECONDS} s")
    assert done.returncode == 0, f"child died with {done.returncode}: {done.stderr[-2000:]}"
    return json.loads(done.stdout.splitlines()[-1])


HOSTILE: dict[str, Callable[[], bytes]] = {
    "recursive record nested 50 KB deep": recursive_record_50k_deep,
    "schema nested 2,000 deep": lambda: container(deep_record_schema(2000), b"\x00"),
    "array<null> of 2**62 items": null_array_bomb,
    "deflate bomb": deflate_bomb,
}


@pytest.mark.parametrize("mode", ["containers", "default"])
@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_container_files_fail_fast_with_a_serde_error(tmp_path: Path, name: str, mode: str) -> None:
    result = decode_in_child(tmp_path, HOSTILE[name](), mode)
    assert SerdeError.__name__ in result["outcome"], result
    assert result["seconds"] < 2, result
    assert result["grew_kib"] < 64 * 1024, result


def test_the_hostile_records_are_what_they_claim() -> None:
    assert len(deep_record_schema(2000)) > 50_000
    assert len(deflate_bomb()) < 400 * 1024
    assert null_array_bomb()[:4] == b"Obj\x01"


def test_each_hostile_record_gets_the_reason_it_is_refused() -> None:
    serde = AvroSerde(accept_container_files=True)
    with pytest.raises(UnknownSchema, match="none of the known versions"):
        serde.decode("GenerationRequest", recursive_record_50k_deep())
    with pytest.raises(UndecodableRecord, match="nests deeper"):
        serde.decode("GenerationRequest", HOSTILE["schema nested 2,000 deep"]())
    with pytest.raises(UnknownSchema, match="none of the known versions"):
        serde.decode("GenerationRequest", null_array_bomb())
    with pytest.raises(UndecodableRecord, match="inflates beyond"):
        serde.decode("GenerationRequest", deflate_bomb(8 * 1024 * 1024))


def test_a_deflate_block_of_a_valid_request_within_the_cap_decodes() -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    block = packer.compress(request_body()) + packer.flush()
    data = container(json.dumps(request_schema()), block, codec="deflate")
    assert AvroSerde(accept_container_files=True).decode("GenerationRequest", data) == REQUEST
    with pytest.raises(UndecodableRecord, match="inflates beyond"):
        AvroSerde(accept_container_files=True, max_container_block_bytes=16).decode("GenerationRequest", data)


@pytest.mark.parametrize("header_change, words", [
    (lambda data: data.replace(b"\x0edeflate", b"\x0csnappy", 1), "codec 'snappy'"),
    (lambda data: data[:-1] + b"\xff", "sync marker"),
    (lambda data: data[:40], "truncated"),
])
def test_malformed_container_files_are_undecodable(header_change, words: str) -> None:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    data = container(json.dumps(request_schema()), packer.compress(request_body()) + packer.flush(), "deflate")
    with pytest.raises(UndecodableRecord, match=words):
        AvroSerde(accept_container_files=True).decode("GenerationRequest", header_change(data))


def test_a_header_entry_larger_than_any_schema_is_refused_before_it_is_read() -> None:
    huge = json.dumps({**request_schema(), "doc": "x" * 200_000})
    with pytest.raises(UndecodableRecord, match="holds"):
        AvroSerde(accept_container_files=True).decode("GenerationRequest", container(huge, request_body()))


def test_a_huge_header_entry_count_is_refused() -> None:
    data = b"Obj\x01" + zigzag(2**62) + b"\x02a\x02b" * 10
    with pytest.raises(UndecodableRecord, match="count"):
        AvroSerde(accept_container_files=True).decode("GenerationRequest", data)


# ---- writer schemas from anywhere (registry, history, registration) --------------------------------------

def test_writer_schemas_with_collections_of_zero_byte_items_are_refused() -> None:
    schema = request_schema()
    schema["fields"].append({"name": "bomb", "type": {"type": "array", "items": "null"}, "default": []})
    with pytest.raises(UnknownSchema, match="zero-byte"):
        AvroSerde().register_writer_schema(schema)
    empty = {"type": "record", "name": "Empty", "fields": [{"name": "n", "type": "null"}]}
    assert zero_byte_collections({"type": "map", "values": empty})
    assert zero_byte_collections({"type": "array", "items": {"type": "fixed", "name": "F", "size": 0}})
    assert not zero_byte_collections({"type": "array", "items": ["null", "string"]})


def test_a_zero_byte_record_cannot_hide_behind_another_of_the_same_short_name() -> None:
    schema = request_schema()
    schema["fields"] += [
        {"name": "one", "type": {"type": "record", "name": "E", "namespace": "b",
                                 "fields": [{"name": "x", "type": "int"}]}},
        {"name": "two", "type": {"type": "record", "name": "E", "fields": []}},  # in the record's namespace
        {"name": "bomb", "type": {"type": "array", "items": "E"}, "default": []},  # fastavro reads it as the empty E
    ]
    with pytest.raises(UnknownSchema, match="zero-byte"):
        AvroSerde().register_writer_schema(schema)


def test_sizing_a_schema_whose_records_reuse_each_other_takes_no_exponential_time() -> None:
    fields = [{"name": "leaf", "type": "int"}]
    levels = [{"type": "record", "name": "R0", "fields": fields}]
    for k in range(1, 60):  # R_k has two fields of R_(k-1): 2**59 paths, 60 definitions
        levels.append({"type": "record", "name": f"R{k}", "fields": [
            {"name": "a", "type": levels[-1] if k == 1 else f"R{k - 1}"}, {"name": "b", "type": f"R{k - 1}"}]})
    nested: dict = levels[-1]
    for k in range(len(levels) - 2, 0, -1):  # each definition written once, inside the first field of the next
        nested["fields"][0]["type"] = levels[k]
        nested = levels[k]
    top = {"type": "record", "name": "Top", "fields": [
        {"name": "r", "type": levels[-1]}, {"name": "many", "type": {"type": "array", "items": f"R{len(levels) - 1}"}}]}
    assert zero_byte_collections(top) == []  # answers at once; each R_k is at least one int


def test_writer_schemas_nested_too_deep_are_refused_without_recursion() -> None:
    deep = json.loads(deep_record_schema(MAX_SCHEMA_NESTING))
    assert nesting_depth(deep) > MAX_SCHEMA_NESTING
    with pytest.raises(UnknownSchema, match="nests deeper"):
        AvroSerde().register_writer_schema(deep)


def test_recursive_writer_schemas_are_refused() -> None:
    schema = request_schema()
    schema["fields"].append({"name": "next", "type": ["null", "GenerationRequest"], "default": None})
    with pytest.raises(UnknownSchema, match="recursive"):
        AvroSerde().register_writer_schema(schema)
    indirect = {"type": "record", "name": "A", "namespace": "n", "fields": [{"name": "b", "type": {
        "type": "record", "name": "B", "fields": [{"name": "a", "type": {"type": "array", "items": "n.A"}}]}}]}
    assert recursive_records(indirect) == ["n.A"]
    reused = {"type": "record", "name": "A", "fields": [
        {"name": "x", "type": {"type": "record", "name": "P", "fields": [{"name": "v", "type": "int"}]}},
        {"name": "y", "type": "P"}]}
    assert recursive_records(reused) == []


def test_none_of_our_schemas_has_a_collection_whose_count_bytes_do_not_bound() -> None:
    for path in SCHEMA_DIR.glob("**/*.avsc"):
        schema = json.loads(path.read_text())
        assert nesting_depth(schema) <= MAX_SCHEMA_NESTING, path
        assert zero_byte_collections(schema) == [], path
        assert recursive_records(schema) == [], path


def test_a_map_count_of_2_to_the_62_in_our_schema_is_undecodable_at_once() -> None:
    serde = AvroSerde()
    data = serde.encode("GenerationRequest", REQUEST)
    assert data.endswith(zigzag(0))  # the empty metadata map closes the body
    for hostile in (data[:-1] + zigzag(2**62), data[:-1] + zigzag(-(2**62)) + zigzag(3) + b"\x02a\x02b"):
        with pytest.raises(UndecodableRecord):
            serde.decode("GenerationRequest", hostile)
        with pytest.raises(UndecodableRecord):
            serde.decode("GenerationRequest", hostile[10:])  # as a bare body
