"""The schema catalog: the current .avsc contracts, older writer versions, and their fingerprints.

Current schemas live in `avro/<Name>.avsc`; they are both what this code writes and what it reads into.
Older (or newer) versions that may still be on the wire live in `avro/history/<Name>.<label>.avsc`
(e.g. `GenerationRequest.v1.avsc`): they are only ever writer schemas, resolved into the current one.

Logical types are stripped before parsing, on purpose: timestamps stay int milliseconds on both
encode and decode, whichever library wrote them. Fingerprints are unaffected (the Parsing Canonical
Form drops logicalType anyway), and the Schema Registry still receives the original .avsc.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastavro import parse_schema
from fastavro.schema import fingerprint as _hex_fingerprint
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import UnknownSchema

SCHEMA_DIR = Path(__file__).parent / "avro"
HISTORY_DIRNAME = "history"


def schema_names(schema_dir: Path = SCHEMA_DIR) -> list[str]:
    """Short names of the current schemas, e.g. ["GenerationRequest", "ImageReady", ...]."""
    return sorted(path.stem for path in schema_dir.glob("*.avsc"))


def read_schema_json(name: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    """The .avsc of a current schema as plain JSON (logical types kept). `name` is short or full."""
    path = schema_dir / f"{short_name(name)}.avsc"
    if not path.is_file():
        raise UnknownSchema(f"no schema named {name!r} in {schema_dir}; known: {', '.join(schema_names(schema_dir))}")
    return json.loads(path.read_text(encoding="utf-8"))


def load_schema(name: str, schema_dir: Path = SCHEMA_DIR) -> dict[str, Any]:
    """A current schema parsed by fastavro, exactly as written in its .avsc (logical types kept)."""
    return parse_schema(read_schema_json(name, schema_dir), named_schemas={})


def short_name(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def full_name(schema: dict[str, Any]) -> str:
    name = schema["name"]
    namespace = schema.get("namespace")
    return name if "." in name or not namespace else f"{namespace}.{name}"


def crc64_fingerprint(schema: dict[str, Any] | str) -> int:
    """CRC-64-AVRO of the schema's Parsing Canonical Form, as the unsigned 64-bit value of the spec."""
    # fastavro renders the 8 bytes in little-endian order, i.e. as they appear on the wire.
    pcf = to_parsing_canonical_form(schema)
    return int.from_bytes(bytes.fromhex(_hex_fingerprint(pcf, "CRC-64-AVRO")), "little")


def strip_logical_types(schema: Any) -> Any:
    """A copy of the schema JSON without any logicalType annotation."""
    if isinstance(schema, dict):
        return {key: strip_logical_types(value) for key, value in schema.items() if key != "logicalType"}
    if isinstance(schema, list):
        return [strip_logical_types(item) for item in schema]
    return schema


@dataclass(frozen=True)
class WriterSchema:
    """One version of one record schema, ready for fastavro."""

    full_name: str
    label: str  # "current", a history label such as "v1", "registry id 7", ...
    fingerprint: int
    parsed: dict[str, Any]  # parsed by fastavro, logical types stripped
    field_names: frozenset[str]

    def describe(self) -> str:
        return f"{short_name(self.full_name)} {self.label} (0x{self.fingerprint:016x})"


def parse_writer_schema(schema: Any, label: str) -> WriterSchema:
    """Parse one record schema (JSON dict) found anywhere: .avsc, registry, container-file header."""
    if not isinstance(schema, dict) or schema.get("type") != "record" or "name" not in schema:
        raise UnknownSchema(f"writer schema ({label}) is not an Avro record schema")
    try:
        parsed = parse_schema(strip_logical_types(schema), named_schemas={})
        fingerprint = crc64_fingerprint(schema)
    except Exception as exc:  # fastavro raises several types for a malformed schema
        raise UnknownSchema(f"writer schema {schema.get('name')!r} ({label}) does not parse: {exc}") from exc
    fields = frozenset(field["name"] for field in schema.get("fields", []))
    return WriterSchema(full_name(schema), label, fingerprint, parsed, fields)


class SchemaCatalog:
    """Current schemas by name, and every known writer version by fingerprint."""

    def __init__(self, schema_dir: Path = SCHEMA_DIR) -> None:
        self.schema_dir = Path(schema_dir)
        self._current: dict[str, WriterSchema] = {}
        self._source: dict[str, dict[str, Any]] = {}
        self._by_fingerprint: dict[int, WriterSchema] = {}
        for name in schema_names(self.schema_dir):
            source = read_schema_json(name, self.schema_dir)
            schema = parse_writer_schema(source, "current")
            self._current[schema.full_name] = schema
            self._current[short_name(schema.full_name)] = schema
            self._source[schema.full_name] = source
            self._by_fingerprint[schema.fingerprint] = schema
        if not self._source:
            raise UnknownSchema(f"no .avsc schema found in {self.schema_dir}")
        history = self.schema_dir / HISTORY_DIRNAME
        for path in sorted(history.glob("*.avsc")) if history.is_dir() else []:
            label = path.stem.split(".", 1)[1] if "." in path.stem else path.stem
            self.register_writer_schema(json.loads(path.read_text(encoding="utf-8")), label)

    def current(self, record_name: str) -> WriterSchema:
        """The schema this code writes and reads into; `record_name` is short or full."""
        try:
            return self._current[record_name]
        except KeyError:
            known = ", ".join(short_name(name) for name in self._source)
            raise UnknownSchema(f"no schema named {record_name!r}; known: {known}") from None

    def source(self, record_name: str) -> dict[str, Any]:
        """The current .avsc JSON as written (logical types kept), for the Schema Registry."""
        return self._source[self.current(record_name).full_name]

    def by_fingerprint(self, fingerprint: int) -> WriterSchema | None:
        return self._by_fingerprint.get(fingerprint)

    def register_writer_schema(self, schema: dict[str, Any], label: str = "registered") -> WriterSchema:
        """Make another version of a record known as a writer schema, so data written with it resolves.

        A version whose fingerprint is already known keeps its first label (the current one wins)."""
        writer = parse_writer_schema(schema, label)
        return self._by_fingerprint.setdefault(writer.fingerprint, writer)

    def describe_known(self, record_name: str | None = None) -> str:
        """`Name label (0xfingerprint)` of the known writer versions, of one record or of all."""
        versions = [w for w in self._by_fingerprint.values() if record_name is None or w.full_name == record_name]
        return ", ".join(w.describe() for w in sorted(versions, key=lambda w: (w.full_name, w.label)))
