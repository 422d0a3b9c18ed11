"""Intake of a render worker: one record of its pool's render topics in, one decision out. It never raises for
a record.

- `Admit`: a request to schedule;
- `Finish`: the record's outcome is known now (a RequestFailed plus dead letter);
- `Hold`: an infrastructure fault (the Schema Registry) stopped the decoding; the record is not at fault and
  must be read again later.

The gate checked every request before routing it here; the worker checks again what it trusts least (the
decoding, the limits) and what only its loaded model can tell. Any exception while decoding or checking one
record becomes RequestFailed (`internal_error` when it is not a known kind) plus a dead letter.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from connectors.kafka import OutRecord
from processors.admission import PoolInfo
from processors.batching import CompatKey, Pending
from processors.render_settings import BatchRenderer, UnsupportedSettings
from processors.requests import InvalidRequest, settings_of, validate
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError, UnknownSchema
from streams.crash_journal import Deaths
from streams.failures import FailureRecords, Origin
from streams.rendering import Admitted
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
        self._my_models = settings.pool_models
        self._settings = settings

    def pool_announcement(self, now_ms: int) -> dict[str, Any]:
        """What this pool has loaded (model version, sizes), for the gate, which routes nothing here before it:
        the same limits this intake checks, announced on the compacted pools topic."""
        s, r = self._settings, self._renderer
        info = PoolInfo(s.pool, s.pool_models[0], r.model_id, r.model_version, r.max_side, r.size_multiple)
        return info.announcement(s.worker_id, now_ms)

    def decide(self, origin: Origin, priority: str) -> Admit | Finish | Hold:
        try:
            return self._decide(origin, priority)
        except RegistryUnavailable as exc:  # decoding, or writing the failure of a bad record: read it again later
            return Hold(str(exc))

    def _decide(self, origin: Origin, priority: str) -> Admit | Finish:
        request: dict[str, Any] | None = None
        try:
            request = self._serde.decode("GenerationRequest", origin.value, topic=origin.topic)
            validate(request, self._limits, self._my_models)  # another pool's model: misrouted
            check_admitted(request, self._settings.pool)
            self._renderer.check_settings(settings_of(request))
        except RegistryUnavailable:
            raise
        except (SerdeError, InvalidRequest, UnsupportedSettings) as exc:
            return Finish(self.failed(_code_of(exc), str(exc), origin, request, priority))
        except Exception as exc:  # a record never ends the process (logged with its traceback)
            log.exception("unexpected error on %s[%d]@%d", origin.topic, origin.partition, origin.offset)
            return Finish(self.failed("internal_error", f"{type(exc).__name__}: {exc}", origin, request, priority))
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

    def poison(self, origin: Origin, priority: str, deaths: Deaths) -> Outcome:
        """A record at which worker processes died too often: dead-lettered undecoded."""
        return self.failed("poison_record", f"the worker died {deaths.total} times while handling this record "
                           f"({deaths.by_fault} by a fault of its own: a fatal signal, a deadline or an exception)",
                           origin, None, priority)


def check_admitted(request: dict[str, Any], pool: str) -> None:
    """Render topics carry what the gate admitted, moderated and routed: a record produced there by anyone else
    (no admission, or another pool's) is refused, not rendered past the gate's checks. (Who may write there at
    all is for the cluster's ACLs: only the gate's principal.)"""
    admitted = request.get("admission")
    if not isinstance(admitted, dict) or admitted.get("pool") != pool:
        raise InvalidRequest("invalid_request", f"not admitted by the gate for pool {pool}: produce requests to "
                             "the request topics (zimage.requests.<priority>), never to a render topic")


def _code_of(exc: Exception) -> str:
    if isinstance(exc, InvalidRequest):
        return exc.code
    if isinstance(exc, UnsupportedSettings):
        return "invalid_request"
    return "unknown_schema" if isinstance(exc, UnknownSchema) else "undecodable"


def pending_of(origin: Origin, priority: str, admit: Admit, model_version: str, epoch: int,
               solo: bool) -> Pending:
    """What the scheduler holds of an admitted request until a batch takes it."""
    request = admit.request
    mono, wall_ms = time.monotonic(), int(time.time() * 1000)
    key = CompatKey(model=request["model"], model_version=model_version, width=request["width"],
                    height=request["height"], steps=request["steps"], guidance=float(request["guidance"]),
                    # a record the worker died with once renders alone: its batch mates are not blamed
                    extra=origin.source if solo else ())
    deadline = None if admit.deadline_ms is None else mono + (admit.deadline_ms - wall_ms) / 1000
    return Pending(request_id=request["request_id"], priority=priority, key=key, source=origin.source,
                   enqueued_at=mono, deadline=deadline, payload=Admitted(request, origin, epoch, wall_ms),
                   cost=request["num_images"])
