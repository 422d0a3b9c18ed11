"""Schema ids from a Confluent-compatible Schema Registry, in both directions, cached.

Subject naming: `<topic>-value` (Confluent's TopicNameStrategy, its default) when the topic is known,
else the record's full name (RecordNameStrategy), e.g. `zimage.v1.GenerationRequest`.
confluent_kafka is imported only when a registry is configured.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from schemas.catalog import WriterSchema, parse_writer_schema
from schemas.errors import (
    IncompatibleSchema,
    RegistryUnavailable,
    SerdeError,
    UnknownSchema,
)

REQUEST_TIMEOUT_S = 10
MAX_SCHEMA_ID = 2**31 - 1  # ids are 4-byte big-endian signed in the wire format


def subject_name(record_full_name: str, topic: str | None) -> str:
    return f"{topic}-value" if topic else record_full_name


def client_for_url(url: str) -> Any:
    """A registry client; `mock://<scope>` gives confluent-kafka's in-memory registry (for tests)."""
    from confluent_kafka.schema_registry import SchemaRegistryClient

    # new_client() is the factory that understands mock:// (the constructor does not). Without a timeout a
    # registry that accepts connections and never answers would hang the caller for good.
    conf: dict[str, Any] = {"url": url}
    if not url.startswith("mock://"):
        conf["timeout"] = REQUEST_TIMEOUT_S
    return SchemaRegistryClient.new_client(conf)


def _status(exc: Exception) -> int | None:
    return getattr(exc, "http_status_code", None)


class ConfluentRegistry:
    """Looks up (or registers) the id of each schema it writes, and the writer schema of each id it reads."""

    def __init__(self, client: Any, *, auto_register: bool = True) -> None:
        self._client = client
        self._auto_register = auto_register
        self._ids: dict[tuple[str, str], int] = {}
        self._writers: dict[int, WriterSchema] = {}

    def schema_id(self, subject: str, record_full_name: str, schema: dict[str, Any]) -> int:
        """The id of `schema` (the current version of the record) under `subject`, registering it first
        when auto_register is on. Cached: the registry is asked once per subject and record."""
        key = (subject, record_full_name)
        cached = self._ids.get(key)
        if cached is not None:
            return cached
        from confluent_kafka.schema_registry import Schema

        registry_schema = Schema(json.dumps(schema), "AVRO")
        if self._auto_register:
            schema_id = self._call(lambda: self._client.register_schema(subject, registry_schema), subject)
        else:
            registered = self._call(lambda: self._client.lookup_schema(subject, registry_schema), subject)
            schema_id = registered.schema_id
        if isinstance(schema_id, bool) or not isinstance(schema_id, int) or not 0 <= schema_id <= MAX_SCHEMA_ID:
            raise RegistryUnavailable(f"Schema Registry answered {subject} with the id {schema_id!r}, which no "
                                      "record can carry")  # not cached: asked again
        self._ids[key] = schema_id
        return schema_id

    def writer_schema(self, schema_id: int, resolve_known: Callable[[int], WriterSchema | None]) -> WriterSchema:
        """The writer schema of `schema_id`; `resolve_known` maps a fingerprint to an already parsed version."""
        cached = self._writers.get(schema_id)
        if cached is not None:
            return cached
        registered = self._call(lambda: self._client.get_schema(schema_id), f"schema id {schema_id}")
        if (registered.schema_type or "AVRO") != "AVRO":
            raise UnknownSchema(f"schema id {schema_id} is a {registered.schema_type} schema, not Avro")
        try:
            source = json.loads(registered.schema_str)
        except (ValueError, TypeError, RecursionError) as exc:  # not a string, not JSON, or nested beyond reason
            raise UnknownSchema(f"schema id {schema_id} is not a JSON schema: {type(exc).__name__}") from exc
        writer = parse_writer_schema(source, f"registry id {schema_id}")
        writer = resolve_known(writer.fingerprint) or writer
        self._writers[schema_id] = writer
        return writer

    def _call(self, request: Callable[[], Any], what: str) -> Any:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        try:
            return request()
        except SchemaRegistryError as exc:
            status = _status(exc)
            if status == 404:
                raise UnknownSchema(f"Schema Registry does not know {what}: {exc}") from exc
            if status == 409:
                raise IncompatibleSchema(f"Schema Registry refused {what} as incompatible: {exc}") from exc
            if status == 422:
                raise SerdeError(f"Schema Registry refused {what} as invalid: {exc}") from exc
            raise RegistryUnavailable(f"Schema Registry failed on {what}: {exc}") from exc
        except Exception as exc:  # connection refused, timeouts, TLS: the registry, not the record
            raise RegistryUnavailable(f"Schema Registry unreachable for {what}: {type(exc).__name__}: {exc}") from exc
