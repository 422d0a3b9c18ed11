"""Intake of a render worker: one consumed record in, one decision out. It never raises for a record.

- `Admit`: a request of this pool, to be scheduled;
- `Finish`: the record's outcome is known now (a RequestFailed plus dead letter, or nothing to produce because
  another pool renders it);
- `Hold`: an infrastructure fault (the Schema Registry) stopped the decoding; the record is not at fault and
  must be read again later.

Any exception while decoding or checking one record becomes RequestFailed (`internal_error` when it is not a
known kind) plus a dead letter. Exactly one pool reports a failure: the pool of the request's model, or the
first pool for a record that names no served model (undecodable, invalid, unknown model).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from connectors.kafka import OutRecord
from processors.render_settings import UnsupportedSettings
from processors.requests import InvalidRequest, settings_of, validate
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError, UnknownSchema
from streams.failures import FailureRecords, Origin
from streams.rendering import BatchRenderer
from streams.settings import Settings

log = logging.getLogger(__name__)


class Outcome(NamedTuple):
    """A finished request as the tracker holds it until commit: its records and how to count it."""

    records: list[OutRecord]
    priority: str
    status: str | None  # None: not this worker's to count (another pool's request)


@dataclass(frozen=True)
class Admit:
    request: dict[str, Any]
    deadline_ms: int | None


@dataclass(frozen=True)
class Finish:
    outcome: Outcome


@dataclass(frozen=True)
class Hold:
    reason: str


class Intake:
    def __init__(self, settings: Settings, serde: AvroSerde, renderer: BatchRenderer, failures: FailureRecords):
        self._serde = serde
        self._renderer = renderer
        self._failures = failures
        self._limits = settings.limits()
        self._all_models = tuple(m for ms in settings.pool_table.values() for m in ms)
        self._my_models = frozenset(settings.pool_models)
        self._reports_unroutable = settings.reports_unroutable

    def decide(self, origin: Origin, priority: str) -> Admit | Finish | Hold:
        request: dict[str, Any] | None = None
        try:
            request = self._serde.decode("GenerationRequest", origin.value, topic=origin.topic)
            validate(request, self._limits, self._all_models)
            if request["model"] in self._my_models:
                self._renderer.check_settings(settings_of(request))
        except RegistryUnavailable as exc:
            return Hold(str(exc))
        except (SerdeError, InvalidRequest, UnsupportedSettings) as exc:
            return Finish(self._refused(_code_of(exc), str(exc), origin, request, priority))
        except Exception as exc:  # a record never ends the process (logged with its traceback)
            log.exception("unexpected error on %s[%d]@%d", origin.topic, origin.partition, origin.offset)
            return Finish(self._refused("internal_error", f"{type(exc).__name__}: {exc}", origin, request,
                                        priority))
        if request["model"] not in self._my_models:
            return Finish(Outcome([], priority, None))  # another pool's group renders it
        deadline = request.get("deadline")
        now_ms = int(time.time() * 1000)
        if deadline is not None and deadline <= now_ms:
            return Finish(self.failed("deadline_exceeded",
                                      f"deadline passed {now_ms - deadline} ms before the request was read",
                                      origin, request, priority))
        return Admit(request, deadline)

    def failed(self, code: str, reason: str, origin: Origin, request: dict[str, Any] | None,
               priority: str) -> Outcome:
        """The outcome of a request of this pool that failed."""
        return Outcome(self._failures(code, reason, origin, request), priority, code)

    def poison(self, origin: Origin, priority: str, strikes: int) -> Outcome:
        """A record at which the worker died `strikes` times: dead-lettered undecoded. Each pool whose workers it
        killed reports it (undecoded, its model is unknown): better twice than never."""
        return self.failed("poison_record", f"the worker died {strikes} times while handling this record",
                           origin, None, priority)

    def _refused(self, code: str, reason: str, origin: Origin, request: dict[str, Any] | None,
                 priority: str) -> Outcome:
        model = request.get("model") if isinstance(request, dict) else None
        mine = model in self._my_models
        unowned = model not in self._all_models
        if mine or (unowned and self._reports_unroutable):
            return self.failed(code, reason, origin, request, priority)  # RequestFailed keeps only the fields that pass
        return Outcome([], priority, None)


def _code_of(exc: Exception) -> str:
    if isinstance(exc, InvalidRequest):
        return exc.code
    if isinstance(exc, UnsupportedSettings):
        return "invalid_request"
    return "unknown_schema" if isinstance(exc, UnknownSchema) else "undecodable"
