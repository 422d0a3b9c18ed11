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
from typing import Any, cast

from fastavro import parse_schema
from fastavro.schema import fingerprint as _hex_fingerprint
from fastavro.schema import to_parsing_canonical_form

from schemas.errors import UnknownSchema

SCHEMA_DIR = Path(__file__).parent / "avro"
HISTORY_DIRNAME = "history"
# Ours nest 7 deep. fastavro's compiled parser and reader recurse on the C stack, so a schema nested thousands
# deep crashes the process instead of raising; nothing that deep is parsed.
MAX_SCHEMA_NESTING = 32
PRIMITIVE_MIN_BYTES = {"null": 0, "boolean": 1, "int": 1, "long": 1, "float": 4, "double": 8, "bytes": 1, "string": 1}


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
    # a record's .avsc parses to a dict (fastavro types the result as any schema: str, list or dict)
    return cast(dict[str, Any], parse_schema(read_schema_json(name, schema_dir), named_schemas={}))


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


def nesting_depth(schema: Any, limit: int = MAX_SCHEMA_NESTING) -> int:
    """How deeply dicts and lists nest in a schema's JSON, counted without recursion; stops past `limit`."""
    deepest, pending = 0, [(schema, 1)]
    while pending:
        node, depth = pending.pop()
        if not isinstance(node, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            break
        pending.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def zero_byte_collections(schema: Any) -> list[str]:
    """Arrays and maps whose items may encode to zero bytes (null, empty records, fixed of size 0).

    A block count in such a collection is not bounded by the bytes that follow it: a count of 2**62
    makes a reader loop for ever on a record of a few bytes. Call only on a schema within MAX_SCHEMA_NESTING."""
    # Every definition under each name it may be referred to by (its name as written, its full name, its short
    # name): a reference takes the smallest of the definitions it may mean. Namespaces are not resolved here, so
    # two records called E in two namespaces cannot hide a zero-byte one behind the other.
    named: dict[str, list[Any]] = {}
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            if node.get("type") in ("record", "error", "enum", "fixed") and isinstance(node.get("name"), str):
                for name in {node["name"], full_name(node), short_name(full_name(node))}:
                    named.setdefault(name, []).append(node)
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    known: dict[int, int] = {}  # by definition: a record used by many fields is sized once, not once per path

    def min_bytes(node: Any, visiting: frozenset[int]) -> int:
        if isinstance(node, str):
            if node in PRIMITIVE_MIN_BYTES:
                return PRIMITIVE_MIN_BYTES[node]
            meant = named.get(node) or named.get(short_name(node))
            if not meant:
                return 1  # an unknown name fails parsing anyway
            return min(min_bytes(definition, visiting) for definition in meant)
        if isinstance(node, list) or not isinstance(node, dict) or id(node) in visiting:
            return 1  # a union writes its branch index; a record inside itself cannot be finite
        if id(node) in known:
            return known[id(node)]
        kind = node.get("type")
        if kind in ("record", "error"):
            fields = node["fields"] if isinstance(node.get("fields"), list) else []
            size = sum(min_bytes(f.get("type") if isinstance(f, dict) else None, visiting | {id(node)})
                       for f in fields)
        elif kind == "fixed":
            size = node["size"] if isinstance(node.get("size"), int) else 1
        elif kind in ("enum", "array", "map"):
            size = 1
        else:
            size = min_bytes(kind, visiting)
        known[id(node)] = size
        return size

    found = []
    pending = [schema]
    while pending:
        node = pending.pop()
        if isinstance(node, dict):
            kind, items = node.get("type"), node.get("items", node.get("values"))
            if kind in ("array", "map") and min_bytes(items, frozenset()) == 0:
                found.append(f"{kind} of {json.dumps(items)[:80]}")
            pending.extend(node.values())
        elif isinstance(node, list):
            pending.extend(node)
    return found


def recursive_records(schema: Any) -> list[str]:
    """Records that hold themselves, directly or through other types. A reader recurses once per level of the
    data, and fastavro's compiled reader does so on the C stack: 50 KB of nesting crashes the process.
    Call only on a schema within MAX_SCHEMA_NESTING."""
    found = []
    pending: list[tuple[Any, frozenset[str]]] = [(schema, frozenset())]
    while pending:
        node, enclosing = pending.pop()
        if isinstance(node, str):
            if node in enclosing or short_name(node) in enclosing:
                found.append(node)
        elif isinstance(node, list):
            pending.extend((branch, enclosing) for branch in node)
        elif isinstance(node, dict):
            kind = node.get("type")
            if kind in ("record", "error") and isinstance(node.get("name"), str):
                inner = enclosing | {node["name"], full_name(node), short_name(node["name"])}
                fields = node["fields"] if isinstance(node.get("fields"), list) else []
                pending.extend((field.get("type"), inner) for field in fields if isinstance(field, dict))
            elif kind == "array":
                pending.append((node.get("items"), enclosing))
            elif kind == "map":
                pending.append((node.get("values"), enclosing))
            elif isinstance(kind, (dict, list)):
                pending.append((kind, enclosing))
    return found


@dataclass(frozen=True)
class WriterSchema:
    """One version of one record schema, ready for fastavro."""

    full_name: str
    label: str  # "current", a history label such as "v1", "registry id 7", ...
    fingerprint: int
    parsed: dict[str, Any]  # parsed by fastavro, logical types stripped
    field_names: frozenset[str]
    # (field, record name) of each field whose type is null or one record: the writer is told the branch, so
    # that it does not first validate the whole record against every branch (a third of encoding a routed request).
    record_branches: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        return f"{short_name(self.full_name)} {self.label} (0x{self.fingerprint:016x})"


def parse_writer_schema(schema: Any, label: str) -> WriterSchema:
    """Parse one record schema (JSON dict) from an .avsc, the history folder, a registration or the registry;
    schemas nested too deep, recursive, or with collections of zero-byte items are refused (see above)."""
    if not isinstance(schema, dict) or schema.get("type") != "record" or "name" not in schema:
        raise UnknownSchema(f"writer schema ({label}) is not an Avro record schema")
    if nesting_depth(schema) > MAX_SCHEMA_NESTING:
        raise UnknownSchema(f"writer schema ({label}) nests deeper than {MAX_SCHEMA_NESTING} levels")
    spinning = zero_byte_collections(schema)
    if spinning:
        raise UnknownSchema(f"writer schema ({label}) has collections of zero-byte items, whose counts no data "
                            f"bounds: {'; '.join(spinning)}")
    recursive = recursive_records(schema)
    if recursive:
        raise UnknownSchema(f"writer schema ({label}) is recursive ({', '.join(sorted(set(recursive)))}): data "
                            "nested deep enough would overflow the reader's stack")
    try:
        parsed = cast(dict[str, Any], parse_schema(strip_logical_types(schema), named_schemas={}))
        fingerprint = crc64_fingerprint(schema)
    except Exception as exc:  # fastavro raises several types for a malformed schema
        raise UnknownSchema(f"writer schema {schema.get('name')!r} ({label}) does not parse: {exc}") from exc
    fields = frozenset(field["name"] for field in schema.get("fields", []))
    return WriterSchema(full_name(schema), label, fingerprint, parsed, fields, _record_branches(parsed))


def _record_branches(parsed: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    """The fields of a parsed record whose type is ["null", one record] (in either order), with that record's
    full name as fastavro's parser wrote it: a definition (a dict) or a reference to one defined before."""
    named = parsed.get("__named_schemas", {})
    found = []
    for field in parsed.get("fields", []):
        branches = field["type"]
        if not isinstance(branches, list) or len(branches) != 2 or "null" not in branches:
            continue
        other = branches[1] if branches[0] == "null" else branches[0]
        name = other.get("name") if isinstance(other, dict) and other.get("type") == "record" else other
        if isinstance(name, str) and isinstance(named.get(name), dict) and named[name].get("type") == "record":
            found.append((field["name"], name))
    return tuple(found)


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
