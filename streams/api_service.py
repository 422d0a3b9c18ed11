"""What the HTTP API does, apart from HTTP: accept a request (limits, idempotency, Kafka), wait for its outcome,
answer its task, cancel it, list a tenant's tasks. Every failure is an ApiError carrying its HTTP status."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter

from connectors.api_ledger import Admission, ProducedMark, SubmissionLedger
from connectors.api_store import ApiStore, StoreUnavailable
from connectors.api_urls import ImageUrls
from connectors.redis_store import cancel_entry_key, key_part
from processors import api_rules
from processors.requests import InvalidRequest, validate
from schemas.serde import AvroSerde, RegistryUnavailable
from streams.api_models import ErrorOut, GenerationBody, ImageOut, Task
from streams.api_outcomes import Key, Outcome, OutcomeFeed
from streams.api_producer import AsyncRequestProducer, NotDelivered
from streams.settings import Settings
from streams.status_view import status_entry_key
from streams.submit import build_request

log = logging.getLogger(__name__)

# the values of the cancellation key that streams/cancellation.py settles the race with (first writer wins)
CANCEL_MARK = b"cancelled"
CANCEL_TTL_S = 7 * 24 * 3600.0

SUBMITTED = Counter("zimage_api_requests_total", "Submissions answered by the API, by outcome", ["outcome"])
DEGRADED = Counter("zimage_api_redis_skipped_total",
                   "Steps done without Redis while it did not answer (limits, idempotency, index, results)",
                   ["step"])


@dataclass
class ApiError(Exception):
    status: int
    message: str
    headers: dict[str, str] = field(default_factory=dict)


def idempotency_key(prefix: str, tenant: str, request_id: str) -> str:
    return f"zimage:{prefix}:api:accepted:{key_part(tenant)}:{key_part(request_id)}"


def index_key(prefix: str, tenant: str) -> str:
    return f"zimage:{prefix}:api:tasks:{key_part(tenant)}"


def result_key(prefix: str, tenant: str, request_id: str) -> str:
    return f"zimage:{prefix}:api:result:{key_part(tenant)}/{key_part(request_id)}"


async def encoded_request(serde: AvroSerde, request: dict[str, Any], topic: str, *, off_the_loop: bool) -> bytes:
    """The request's Avro value. With a Schema Registry, encoding may ask it over the network: that happens off the
    event loop, so a slow registry stalls this request only, and an outage is a 503 to retry, not a 500."""
    try:
        if off_the_loop:
            return await asyncio.to_thread(serde.encode, "GenerationRequest", request, topic=topic)
        return serde.encode("GenerationRequest", request, topic=topic)
    except RegistryUnavailable as exc:
        SUBMITTED.labels("registry_unavailable").inc()
        raise ApiError(503, f"the Schema Registry does not answer ({exc}); retry", {"Retry-After": "5"}) from None


class ApiService:
    def __init__(self, s: Settings, serde: AvroSerde, store: ApiStore, ledger: SubmissionLedger, urls: ImageUrls,
                 producer: AsyncRequestProducer, feed: OutcomeFeed | None = None):
        self.s = s
        self._serde = serde
        self._store = store
        self._ledger = ledger
        self._urls = urls
        self._producer = producer
        self.feed = feed
        self._limits = s.limits()
        self._models = tuple(m for models in s.pools.values() for m in models)
        self._default_limits = api_rules.TenantLimits(s.api_rate_per_s, s.api_burst, s.api_daily_quota)
        self._window_s = s.idempotency_window_days * 24 * 3600

    # --- submitting ---

    async def submit(self, tenant: str, body: GenerationBody, idem: str | None) -> tuple[str, Task | None]:
        """Accepts a request: (request id, its finished task in sync mode, or None when it is still running)."""
        if body.tenant is not None and body.tenant != tenant:
            raise ApiError(403, f"this API key belongs to tenant {tenant!r}; a body cannot name another")
        try:
            request_id = api_rules.request_id_for(idem, self._limits.max_request_id_chars)
        except api_rules.BadIdempotencyKey as exc:
            raise ApiError(400, str(exc)) from None
        request = build_request({**body.request_fields(), "tenant": tenant, "request_id": request_id})
        try:
            validate(request, self._limits, self._models)
        except InvalidRequest as exc:
            SUBMITTED.labels("invalid").inc()
            raise ApiError(422, f"{exc.code}: {exc.reason}") from None
        fingerprint = api_rules.body_fingerprint({k: v for k, v in request.items() if k != "submitted_at"})
        produced_before = await self._admit(tenant, request_id, fingerprint)
        key: Key = (tenant, request_id)
        waiter = self.feed.wait_for(key) if body.mode == "sync" and self.feed is not None else None
        try:
            if not produced_before:
                await self._produce(request, fingerprint)
            if waiter is None:
                SUBMITTED.labels("accepted").inc()
                return request_id, None
            if produced_before:  # a repeat: the outcome may be known already
                task = await self.task(tenant, request_id)
                if task is not None and task.final:
                    return request_id, task
            timeout = min(body.timeout_s or self.s.api_sync_timeout_s, self.s.api_sync_timeout_s)
            try:
                outcome = await asyncio.wait_for(asyncio.shield(waiter), timeout)
            except TimeoutError:
                SUBMITTED.labels("sync_timeout").inc()
                return request_id, None
            SUBMITTED.labels("sync_answered").inc()
            return request_id, self._task_of(tenant, request_id, None, outcome, True, None, None)
        finally:
            if waiter is not None and self.feed is not None:
                self.feed.forget(key, waiter)

    async def _admit(self, tenant: str, request_id: str, fingerprint: str) -> bool:
        """Takes the tenant's budget (429 when spent) and records the request id as this body's; True when the same
        body was already produced under it. A different body under the same id is refused (422). Redis down:
        accepted unchecked (the gate still drops a repeat of an admitted (tenant, request_id))."""
        limits = api_rules.limits_for(tenant, self._default_limits, self.s.api_tenant_limits)
        claim = json.dumps({"fp": fingerprint, "produced": False, "at": int(time.time() * 1000)}).encode()
        decision = await self._ledger.admit(Admission(
            tenant, limits.rate_per_s, limits.burst, limits.daily_quota,
            idempotency_key(self.s.topic_prefix, tenant, request_id), claim, self._window_s))
        if decision.unavailable:
            DEGRADED.labels("limits").inc()
            DEGRADED.labels("idempotency").inc()
            return False
        if not decision.allowed:
            SUBMITTED.labels(f"limited_{decision.reason}").inc()
            what = "daily quota" if decision.reason == "quota" else "rate limit"
            raise ApiError(429, f"tenant {tenant!r} is over its {what}",
                           {"Retry-After": str(api_rules.retry_after_s(decision.wait_ms))})
        if decision.previous_claim is None:
            return False
        previous = json.loads(decision.previous_claim)
        if previous["fp"] != fingerprint:
            SUBMITTED.labels("idempotency_conflict").inc()
            raise ApiError(422, f"Idempotency-Key was used for a different body (request {request_id!r}); use a "
                                f"new key for a new request")
        return bool(previous["produced"])

    async def _produce(self, request: dict[str, Any], fingerprint: str) -> None:
        tenant, request_id = request["tenant"], request["request_id"]
        topic = self.s.topology.request_topic(request["priority"].lower())
        value = await encoded_request(self._serde, request, topic, off_the_loop=self.s.schema_registry_url is not None)
        try:
            await self._producer.send(topic, value, request_id.encode())
        except NotDelivered as exc:
            SUBMITTED.labels("kafka_unavailable").inc()
            raise ApiError(503, f"the request could not be queued ({exc}); retry", {"Retry-After": "5"}) from None
        accepted_at = request["submitted_at"]
        try:
            await self._ledger.mark_produced(ProducedMark(
                idempotency_key(self.s.topic_prefix, tenant, request_id),
                json.dumps({"fp": fingerprint, "produced": True, "at": accepted_at}).encode(), self._window_s,
                index_key(self.s.topic_prefix, tenant), request_id, accepted_at, self.s.api_task_index_size,
                self._window_s))
        except StoreUnavailable:
            DEGRADED.labels("index").inc()

    # --- outcomes, tasks ---

    async def store_outcomes(self, found: list[tuple[Key, Outcome]]) -> None:
        """The outcome feed's digests, kept for GET /v1/tasks/{id}."""
        items = [(result_key(self.s.topic_prefix, t, rid), json.dumps(o).encode()) for (t, rid), o in found]
        try:
            await self._store.set_many(items, self.s.publication_window_days * 24 * 3600)
        except StoreUnavailable:
            DEGRADED.labels("results").inc(len(items))

    async def task(self, tenant: str, request_id: str) -> Task | None:
        prefix = self.s.topic_prefix
        try:
            status, result, accepted, claim = await self._store.get_many([
                status_entry_key(prefix, tenant, request_id), result_key(prefix, tenant, request_id),
                idempotency_key(prefix, tenant, request_id), cancel_entry_key(prefix, tenant, request_id)])
        except StoreUnavailable:
            raise ApiError(503, "the status store (Redis) does not answer; retry", {"Retry-After": "5"}) from None
        return self._task_of(tenant, request_id, _json(status), _json(result), accepted is not None, claim,
                             _json(accepted))

    def _task_of(self, tenant: str, request_id: str, status: dict[str, Any] | None, result: dict[str, Any] | None,
                 accepted: bool, claim: bytes | None, acceptance: dict[str, Any] | None) -> Task | None:
        state = api_rules.task_state(status, result, accepted, claim)
        if state is None:
            return None
        task = Task(id=request_id, tenant=tenant, state=state, status_url=f"/v1/tasks/{request_id}",
                    cancel_requested=claim == CANCEL_MARK,
                    accepted_at=acceptance.get("at") if acceptance else None)
        if status is not None:
            task.status, task.final, task.detail = status["status"], bool(status["final"]), status.get("detail")
        if result is not None and result["kind"] == "ready":
            task.images = [ImageOut(index=i["index"], url=self._urls.url_for(i["uri"]), sha256=i["sha256"],
                                    seed=i["seed"]) for i in result["images"]]
            task.url, task.seed, task.final = task.images[0].url, result["seed"], True
        elif result is not None:
            task.error = ErrorOut(code=result["reason_code"], message=result["reason"])
            task.final = True
        elif state in (api_rules.FAILED, api_rules.CANCELLED) and status is not None:
            code, _, message = str(status.get("detail") or "failed").partition(": ")
            task.error = ErrorOut(code=code, message=message or code)
        return task

    async def cancel(self, tenant: str, request_id: str) -> Task:
        task = await self.task(tenant, request_id)
        if task is None:
            raise ApiError(404, f"no task {request_id!r}")
        if not api_rules.cancellable(task.state):
            raise ApiError(409, f"task {request_id!r} is {task.state}: too late to cancel")
        key = cancel_entry_key(self.s.topic_prefix, tenant, request_id)
        try:
            if not await self._store.set_if_absent(key, CANCEL_MARK, CANCEL_TTL_S):
                [held] = await self._store.get_many([key])
                if held != CANCEL_MARK:  # a worker took it first
                    raise ApiError(409, f"task {request_id!r} is rendering: too late to cancel")
        except StoreUnavailable:
            raise ApiError(503, "the cancellation store (Redis) does not answer; retry",
                           {"Retry-After": "5"}) from None
        task.cancel_requested = True
        return task

    async def list_tasks(self, tenant: str, before: float | None, limit: int,
                         before_id: str | None = None) -> tuple[list[Task], float | None, str | None]:
        """A page of the tenant's tasks, newest first, and the cursor of the next (None, None on the last)."""
        try:
            page = await self._store.index_page(index_key(self.s.topic_prefix, tenant), before, limit, before_id)
        except StoreUnavailable:
            raise ApiError(503, "the task index (Redis) does not answer; retry", {"Retry-After": "5"}) from None
        tasks = [t for rid, _ in page if (t := await self.task(tenant, rid)) is not None]
        if len(page) < limit:
            return tasks, None, None
        return tasks, page[-1][1], page[-1][0]


def _json(value: bytes | None) -> dict[str, Any] | None:
    return None if value is None else json.loads(value)
