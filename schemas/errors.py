"""Errors raised by the serde.

`SerdeError` and its subclasses describe the record itself: a consumer may dead-letter it.
`RegistryUnavailable` describes the Schema Registry, not the record: retry, never dead-letter.
"""
from __future__ import annotations


class SerdeError(Exception):
    """A record could not be encoded or decoded; the message says why."""


class InvalidRecord(SerdeError):
    """A value does not match its schema. `errors` holds one line per offending field."""

    def __init__(self, record_name: str, errors: list[str]) -> None:
        self.record_name = record_name
        self.errors = errors
        super().__init__(f"invalid {record_name}: " + "; ".join(errors))


class UndecodableRecord(SerdeError):
    """The bytes are not an Avro record of any accepted framing (garbage, truncated, empty, None)."""


class UnknownSchema(SerdeError):
    """The framing is well formed but names a writer schema that is unknown or is not the expected record."""


class IncompatibleSchema(UnknownSchema):
    """The writer schema is known but cannot be resolved into the reader's schema."""


class RegistryUnavailable(Exception):
    """The Schema Registry failed to answer (network, auth, 5xx). Not a `SerdeError` on purpose:
    the record may be fine, so it must be retried rather than dead-lettered."""
