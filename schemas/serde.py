"""Avro serde for the zimage.v1 records.

Writes Avro single-object encoding (0xC3 0x01, 8-byte little-endian CRC-64-AVRO fingerprint of the
schema's Parsing Canonical Form, binary body), or the Confluent wire format (0x00, 4-byte big-endian
schema id, binary body) when a Schema Registry is configured (subjects: see schemas.registry).

Reads:
  1. single-object encoding, the writer schema found by fingerprint among the current schemas, the
     history folder (avro/history/) and `register_writer_schema()`;
  2. Confluent wire format, the writer schema fetched from the registry by id (cached);
  3. Avro Object Container Files (b"Obj\\x01"), only with `accept_container_files=True`: the first record,
     and only when the header's writer schema is one of the known versions (by fingerprint, checked before
     that schema is parsed), with the codec null or deflate and the inflated block capped (schemas.container);
  4. a bare Avro body of the expected record, only if it decodes with the current schema, consumes
     every byte and re-encodes to the very same bytes (garbage rarely does all three).
Data written with another version of the record is resolved into the current schema (Avro schema
resolution: new fields take their defaults, removed fields are skipped).

Values are plain dicts; enums are strings; timestamps are int milliseconds since the epoch on both
encode and decode (datetime objects are refused on encode, never returned on decode).
"""
from __future__ import annotations

import json
import struct
from collections.abc import Mapping
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import fastavro
from fastavro.read import SchemaResolutionError
from fastavro.validation import ValidationError, validate

from schemas.catalog import (
    MAX_SCHEMA_NESTING,
    SCHEMA_DIR,
    SchemaCatalog,
    WriterSchema,
    crc64_fingerprint,
    load_schema,
    schema_names,
    short_name,
)
from schemas.container import (
    CONTAINER_MAGIC,
    MAX_DECODED_BLOCK_BYTES,
    first_block,
    read_header,
)
from schemas.errors import (
    IncompatibleSchema,
    InvalidRecord,
    RegistryUnavailable,
    SerdeError,
    UndecodableRecord,
    UnknownSchema,
)
from schemas.registry import ConfluentRegistry, client_for_url, subject_name

__all__ = [
    "SCHEMA_DIR", "AvroSerde", "IncompatibleSchema", "InvalidRecord", "RegistryUnavailable", "SerdeError",
    "UndecodableRecord", "UnknownSchema", "load_schema", "schema_names",
]

SINGLE_OBJECT_MAGIC = b"\xc3\x01"
SINGLE_OBJECT_HEADER_LEN = 10
CONFLUENT_MAGIC = 0
CONFLUENT_HEADER_LEN = 5


class AvroSerde:
    """Encodes and decodes the records of the .avsc contracts. Thread-safe once constructed."""

    def __init__(
        self,
        registry_url: str | None = None,
        registry_client: Any = None,
        *,
        schema_dir: Path = SCHEMA_DIR,
        auto_register: bool = True,
        allow_bare: bool = True,
        accept_container_files: bool = False,
        max_container_block_bytes: int = MAX_DECODED_BLOCK_BYTES,
    ) -> None:
        self.catalog = SchemaCatalog(schema_dir)
        if registry_client is None and registry_url:
            registry_client = client_for_url(registry_url)
        self._registry = ConfluentRegistry(registry_client, auto_register=auto_register) if registry_client else None
        self._allow_bare = allow_bare
        # Off by default: a container file names its own writer schema, so it is the one framing in which a
        # record brings a schema nobody registered.
        self._accept_container_files = accept_container_files
        self._max_container_block_bytes = max_container_block_bytes
        self._single_object_headers: dict[str, bytes] = {}

    @property
    def wire_format(self) -> str:
        return "confluent" if self._registry is not None else "single-object"

    def register_writer_schema(self, schema: dict[str, Any], label: str = "registered") -> int:
        """Accept data written with another version of a record (a dict as in an .avsc); returns its fingerprint."""
        return self.catalog.register_writer_schema(schema, label).fingerprint

    # ---- encode -------------------------------------------------------------------------------

    def encode(self, record_name: str, value: Mapping[str, Any], *, topic: str | None = None,
               validate: bool = True) -> bytes:
        """Validate `value` against the current schema of `record_name` and frame it; raises InvalidRecord.

        `validate=False` is for values a processor built from records it decoded, whose types are already the
        schema's: fastavro's writer alone still refuses a missing field, a wrong union branch, an unknown symbol or
        a str for bytes, but coerces a few types (a bool or a float into an int, a string into a double) that the
        full validation refuses. That validation costs twice the writer and was the largest part of a processor's
        time under load; input from outside (the API, the CLI) is always fully validated."""
        schema = self.catalog.current(record_name)
        _check_fields(schema, value)
        if validate:
            _validate(schema, value)
        buffer = BytesIO()
        buffer.write(self._header(schema, topic))
        try:
            fastavro.schemaless_writer(buffer, schema.parsed, _branches_named(schema, value))
        except Exception as exc:  # noqa: BLE001 - the writer fails in many ways; each means "not this schema"
            _validate(schema, value)  # says why, field by field
            raise InvalidRecord(short_name(schema.full_name), [f"{type(exc).__name__}: {exc}"]) from None
        return buffer.getvalue()

    def _header(self, schema: WriterSchema, topic: str | None) -> bytes:
        if self._registry is not None:
            subject = subject_name(schema.full_name, topic)
            schema_id = self._registry.schema_id(subject, schema.full_name, self.catalog.source(schema.full_name))
            return bytes([CONFLUENT_MAGIC]) + schema_id.to_bytes(4, "big")
        header = self._single_object_headers.get(schema.full_name)
        if header is None:
            header = SINGLE_OBJECT_MAGIC + struct.pack("<Q", schema.fingerprint)
            self._single_object_headers[schema.full_name] = header
        return header

    # ---- decode -------------------------------------------------------------------------------

    def decode(self, record_name: str, data: bytes | None, *, topic: str | None = None) -> dict[str, Any]:
        """The record in the current schema of `record_name`, from any accepted framing.

        Raises UndecodableRecord, UnknownSchema (IncompatibleSchema), or RegistryUnavailable (retry)."""
        reader = self.catalog.current(record_name)
        where = f" on topic {topic}" if topic else ""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise UndecodableRecord(
                f"expected bytes for a {short_name(reader.full_name)}{where}, got {type(data).__name__}")
        data = bytes(data)
        if not data:
            raise UndecodableRecord(f"empty value where a {short_name(reader.full_name)} was expected{where}")
        if data[:2] == SINGLE_OBJECT_MAGIC:
            return self._decode_single_object(data, reader, where)
        if data[:4] == CONTAINER_MAGIC:
            return self._decode_container(data, reader, where)
        if data[0] == CONFLUENT_MAGIC and self._registry is not None:
            try:
                return self._decode_confluent(data, reader, where)
            except (UnknownSchema, UndecodableRecord):
                # A bare body may start with 0x00 too (an empty string, a null union branch).
                value = _try_bare(data, reader) if self._allow_bare else None
                if value is None:
                    raise
                return value
        if self._allow_bare:
            value = _try_bare(data, reader)
            if value is not None:
                return value
        if data[0] == CONFLUENT_MAGIC and len(data) >= CONFLUENT_HEADER_LEN:
            schema_id = int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")
            raise UnknownSchema(
                f"value{where} looks like Confluent wire format (schema id {schema_id}) but no Schema Registry "
                "is configured")
        raise UndecodableRecord(
            f"value{where} ({len(data)} bytes, starting {data[:8].hex()}) is no Avro "
            f"{short_name(reader.full_name)}: no single-object, Confluent or container-file header, "
            "and not a bare body of the current schema")

    def _decode_single_object(self, data: bytes, reader: WriterSchema, where: str) -> dict[str, Any]:
        if len(data) < SINGLE_OBJECT_HEADER_LEN:
            raise UndecodableRecord(f"truncated single-object header{where}: {len(data)} bytes")
        fingerprint = struct.unpack_from("<Q", data, 2)[0]
        writer = self.catalog.by_fingerprint(fingerprint)
        if writer is None:
            raise UnknownSchema(
                f"unknown schema fingerprint 0x{fingerprint:016x} (single-object encoding){where}; "
                f"known: {self.catalog.describe_known()}")
        return _read_body(data, SINGLE_OBJECT_HEADER_LEN, writer, reader, f"single-object encoding{where}")

    def _decode_confluent(self, data: bytes, reader: WriterSchema, where: str) -> dict[str, Any]:
        assert self._registry is not None
        if len(data) < CONFLUENT_HEADER_LEN:
            raise UndecodableRecord(f"truncated Confluent wire-format header{where}: {len(data)} bytes")
        schema_id = int.from_bytes(data[1:CONFLUENT_HEADER_LEN], "big")
        writer = self._registry.writer_schema(schema_id, self.catalog.by_fingerprint)
        return _read_body(data, CONFLUENT_HEADER_LEN, writer, reader, f"Confluent wire format{where}")

    def _decode_container(self, data: bytes, reader: WriterSchema, where: str) -> dict[str, Any]:
        framing = f"Avro container file{where}"
        if not self._accept_container_files:
            raise UndecodableRecord(f"{framing}: container files are not accepted here; write single-object "
                                    "encoding or the Confluent wire format")
        header = read_header(data, MAX_SCHEMA_NESTING, framing)
        try:
            fingerprint = crc64_fingerprint(json.loads(header.schema_json))
        except Exception as exc:  # bounded and shallow by now; fastavro raises several types for a bad schema
            raise UnknownSchema(f"{framing}: header schema does not parse: {type(exc).__name__}: {exc}") from exc
        writer = self.catalog.by_fingerprint(fingerprint)
        if writer is None:
            raise UnknownSchema(f"{framing}: writer schema 0x{fingerprint:016x} is none of the known versions; "
                                f"known: {self.catalog.describe_known()}")
        _check_name(writer, reader, framing)
        block = first_block(data, header, framing, self._max_container_block_bytes)
        value, _ = _read(BytesIO(block), writer, reader, framing)
        return value


def _why(exc: Exception) -> str:
    if isinstance(exc, EOFError):
        return "truncated (ran out of bytes)"
    return f"{type(exc).__name__}: {exc}"


def _check_name(writer: WriterSchema, reader: WriterSchema, framing: str) -> None:
    if writer.full_name != reader.full_name:
        raise UnknownSchema(
            f"{framing}: writer schema is {writer.full_name} ({writer.label}, 0x{writer.fingerprint:016x}), "
            f"expected {reader.full_name}")


def _read(stream: BytesIO, writer: WriterSchema, reader: WriterSchema, framing: str) -> tuple[dict[str, Any], int]:
    """Decode one record from `stream`; returns it and the stream position after it."""
    # Same fingerprint means same binary layout: skip resolution, it is the common and fast case.
    reader_schema = None if writer.fingerprint == reader.fingerprint else reader.parsed
    try:
        value = cast(dict[str, Any], fastavro.schemaless_reader(stream, writer.parsed, reader_schema))  # a record
    except SchemaResolutionError as exc:
        raise IncompatibleSchema(
            f"{framing}: writer schema {writer.describe()} cannot be resolved into {reader.describe()}: {exc}"
        ) from exc
    except Exception as exc:  # fastavro reports bad bytes as EOFError, ValueError, IndexError, ...
        raise UndecodableRecord(
            f"{framing}: body does not decode as {writer.describe()}: {_why(exc)}") from exc
    return value, stream.tell()


def _read_body(data: bytes, offset: int, writer: WriterSchema, reader: WriterSchema, framing: str) -> dict[str, Any]:
    _check_name(writer, reader, framing)
    stream = BytesIO(data)
    stream.seek(offset)
    value, end = _read(stream, writer, reader, framing)
    if end != len(data):
        raise UndecodableRecord(
            f"{framing}: {len(data) - end} unexpected bytes after the {short_name(writer.full_name)} body")
    return value


def _try_bare(data: bytes, reader: WriterSchema) -> dict[str, Any] | None:
    stream = BytesIO(data)
    try:
        value = cast(dict[str, Any], fastavro.schemaless_reader(stream, reader.parsed))  # a record
        if stream.tell() != len(data):
            return None
        # Garbage can decode by chance; a genuine body re-encodes to exactly the same bytes.
        again = BytesIO()
        fastavro.schemaless_writer(again, reader.parsed, value)
    except Exception:  # noqa: BLE001 - garbage fails inside fastavro in any way; all of them mean "not a bare body"
        return None
    return value if again.getvalue() == data else None


def _branches_named(schema: WriterSchema, value: Mapping[str, Any]) -> Mapping[str, Any]:
    """`value` with each optional record written in fastavro's tuple notation, (record name, record): the writer
    then takes that branch at once instead of validating the whole record against each branch first."""
    for field, record_name in schema.record_branches:
        inner = value.get(field)
        if inner is not None and isinstance(inner, Mapping):
            value = {**value, field: (record_name, inner)}
    return value


def _check_fields(schema: WriterSchema, value: Any) -> None:
    if isinstance(value, dict) and schema.field_names.issuperset(value):  # the common case, with no set built
        return
    name = short_name(schema.full_name)
    if not isinstance(value, Mapping):
        raise InvalidRecord(name, [f"expected a dict, got {type(value).__name__}"])
    unknown = value.keys() - schema.field_names
    if unknown:
        raise InvalidRecord(name, [f"{name}.{field}: not a field of the schema" for field in sorted(map(str, unknown))])


def _validate(schema: WriterSchema, value: Any) -> None:
    name = short_name(schema.full_name)
    try:
        validate(value, schema.parsed, raise_errors=True)
    except ValidationError as exc:
        raise InvalidRecord(name, [_describe_error(error) for error in exc.errors]) from None


def _describe_error(error: Any) -> str:
    datum = error.datum
    hint = " (timestamps are int milliseconds since the epoch)" if hasattr(datum, "tzinfo") else ""
    shown = repr(datum)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    expected = _describe_type(error.schema)
    return f"{_field_path(error.field)}: got {shown} ({type(datum).__name__}), expected {expected}{hint}"


def _field_path(field: str) -> str:
    # fastavro reports `zimage.v1.GenerationRequest.width`; the namespace adds nothing to the message.
    parts = field.split(".")
    first_named = next((i for i, part in enumerate(parts) if part[:1].isupper()), 0)
    return ".".join(parts[first_named:]) or "record"


def _describe_type(schema: Any) -> str:
    if isinstance(schema, str):
        return short_name(schema)
    if isinstance(schema, list):
        return " or ".join(_describe_type(branch) for branch in schema)
    if isinstance(schema, dict):
        kind = schema.get("type", "?")
        if kind in ("record", "enum", "fixed"):
            detail = f" {schema.get('symbols')}" if kind == "enum" else ""
            return f"{kind} {short_name(str(schema.get('name', '')))}{detail}"
        if kind == "array":
            return f"array of {_describe_type(schema.get('items'))}"
        if kind == "map":
            return f"map of {_describe_type(schema.get('values'))}"
        return _describe_type(kind)
    return str(schema)
