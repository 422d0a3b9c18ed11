"""`zimage api`: the HTTP API (FastAPI on uvicorn; OpenAPI at /docs).

    POST   /v1/images/generations   accept a request: 202 with its id (async), or wait for its image (sync)
    GET    /v1/tasks/{id}           queued | in_progress | completed | failed | cancelled, with image URLs
    DELETE /v1/tasks/{id}           cancel a request still queued (202), else 409
    GET    /v1/tasks                the key's tenant's requests, newest first

Every call needs an API key (`Authorization: Bearer <key>` or `X-API-Key`) of one tenant, which sets the tenant of
everything the call sees or submits. Requests go to Kafka like any other producer's; the gate and workers do the
rest. What each piece does is in streams/api_service.py; the outcomes come from streams/api_outcomes.py.
"""
# no `from __future__ import annotations`: FastAPI reads the route signatures, which name local dependencies
import asyncio
import logging
import math
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Header, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.requests import ClientDisconnect

from connectors.api_keys import KeyRing
from connectors.api_ledger import SubmissionLedger
from connectors.api_store import ApiStore
from connectors.api_urls import ImageUrls
from processors.api_rules import hash_api_key
from schemas.serde import AvroSerde
from streams.api_models import Accepted, GenerationBody, Task, TaskPage
from streams.api_outcomes import OutcomeFeed
from streams.api_producer import AsyncRequestProducer
from streams.api_service import ApiError, ApiService
from streams.heap import freeze_start_up_heap
from streams.settings import Settings

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024  # the largest valid request (prompts, metadata, callback) is far below this


def create_app(s: Settings, *, keys: KeyRing | None = None, service: ApiService | None = None) -> FastAPI:
    """The application; its lifespan opens Redis, the producer and the outcome feed unless `service` is given."""
    if s.api_key_secret is None:
        raise ValueError("ZIMAGE_API_KEY_SECRET is not set: API keys are checked against keyed hashes")
    secret = s.api_key_secret.get_secret_value().encode()
    ring = keys if keys is not None else KeyRing(Path(s.api_keys_file))
    state: dict[str, ApiService] = {}

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        if service is not None:
            state["service"] = service
            yield
            return
        built = _build_service(s)
        assert built.feed is not None
        built.feed.start(asyncio.get_running_loop())
        await asyncio.to_thread(built.feed.positioned.wait, 120)  # no sync request may miss its outcome
        state["service"] = built
        freeze_start_up_heap()
        log.info("API on %s:%s, %d keys", s.api_host, s.api_port, len(ring))
        try:
            yield
        finally:
            built.feed.stop()
            built._producer.close()

    app = FastAPI(title="zimage-stream API", version="1", lifespan=lifespan, max_body_size=MAX_BODY_BYTES,
                  description="Submit image generation requests to the zimage-stream pipeline and follow them.")

    def tenant_for(authorization: str | None, x_api_key: str | None) -> str:
        key = x_api_key
        if key is None and authorization is not None:
            scheme, _, value = authorization.partition(" ")
            key = value.strip() if scheme.lower() == "bearer" else None
        tenant = ring.tenant_of(hash_api_key(secret, key)) if key else None
        if tenant is None:
            raise ApiError(401, "a valid API key is needed: Authorization: Bearer <key>",
                           {"WWW-Authenticate": "Bearer"})
        return tenant

    # The dependency is a coroutine: FastAPI runs a plain `def` dependency in a worker thread, two thread hops
    # per request for an HMAC and a dict lookup (the keys file is re-read at most once a second, when it changed).
    async def tenant_of(authorization: Annotated[str | None, Header()] = None,
                        x_api_key: Annotated[str | None, Header()] = None) -> str:
        return tenant_for(authorization, x_api_key)

    async def svc() -> ApiService:
        return state["service"]

    Tenant = Annotated[str, Depends(tenant_of)]
    Service = Annotated[ApiService, Depends(svc)]

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def bad_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": _described(exc.errors())}, status_code=422)

    # The submit route reads its own body and writes its own answer, the way FastAPI documents for a hot path
    # ("custom OpenAPI path operation schema"): the body is one pydantic model checked from the JSON bytes, so
    # FastAPI's per-request dependency solving and response-model round trip would only add CPU to every POST.
    # /docs still shows the body and both answers from the same models.
    @app.post("/v1/images/generations", status_code=202, response_model=None, openapi_extra=_SUBMIT_BODY,
              responses={200: {"model": Task, "description": "sync mode: the finished task"},
                         202: {"model": Accepted, "description": "queued (async, or sync past its timeout)"},
                         401: {}, 403: {}, 413: {}, 415: {}, 422: {}, 429: {}, 503: {}})
    async def generate(request: Request) -> Response:
        """Queue a request. Async (default): 202 with its id and status URL; its `callback_url`, if any, is
        called with the outcome. Sync: waits up to `timeout_s` and answers 200 with the task (image URLs and
        seed, or the failure), or 202 when it is still running then."""
        headers = request.headers
        tenant = tenant_for(headers.get("authorization"), headers.get("x-api-key"))
        try:
            raw = await request.body()
        except ClientDisconnect:
            raise ApiError(400, "the client went away before its body arrived") from None
        body = parse_generation_body(raw, headers.get("content-type"))
        request_id, task = await state["service"].submit(tenant, body, headers.get("idempotency-key"))
        location = {"Location": f"/v1/tasks/{request_id}"}
        if task is not None:
            return Response(task.model_dump_json(), 200, location, media_type="application/json")
        accepted = Accepted(id=request_id, state="queued", status_url=location["Location"])
        return Response(accepted.model_dump_json(), 202, location, media_type="application/json")

    @app.get("/v1/tasks/{request_id}", response_model=Task, responses={404: {}})
    async def get_task(request_id: str, tenant: Tenant, service: Service) -> Task:
        task = await service.task(tenant, request_id)
        if task is None:
            raise ApiError(404, f"no task {request_id!r}")
        return task

    @app.delete("/v1/tasks/{request_id}", status_code=202, response_model=Task, responses={404: {}, 409: {}})
    async def cancel_task(request_id: str, tenant: Tenant, service: Service) -> Task:
        """Cancel a request nothing has started rendering: 202, and it ends `cancelled`; otherwise 409."""
        return await service.cancel(tenant, request_id)

    @app.get("/v1/tasks", response_model=TaskPage)
    async def list_tasks(key_tenant: Tenant, service: Service,
                         tenant: Annotated[str | None, Query(description="Defaults to the key's tenant.")] = None,
                         limit: Annotated[int, Query(ge=1, le=100)] = 20,
                         before: Annotated[float | None, Query(description="From a page's next_before.")] = None,
                         before_id: Annotated[str | None, Query(description="From a page's next_before_id.",
                                                                max_length=256)] = None,
                         ) -> TaskPage:
        if tenant is not None and tenant != key_tenant:
            raise ApiError(403, f"this API key lists tenant {key_tenant!r} only")
        if before is not None and not math.isfinite(before):  # Redis refuses it, and that reads as Redis down
            raise ApiError(422, "before must be a finite number (a page's next_before)")
        tasks, next_before, next_before_id = await service.list_tasks(key_tenant, before, limit, before_id)
        return TaskPage(tasks=tasks, next_before=next_before, next_before_id=next_before_id)

    @app.get("/healthz", include_in_schema=False)
    async def health() -> dict[str, Any]:
        service = state.get("service")
        return {"ok": service is not None, "waiting": service.feed.waiting if service and service.feed else 0}

    return app


_SUBMIT_BODY: dict[str, Any] = {"requestBody": {"required": True, "content": {"application/json": {
    "schema": GenerationBody.model_json_schema(ref_template="#/components/schemas/{model}")}}}}


def parse_generation_body(raw: bytes, content_type: str | None) -> GenerationBody:
    """The submit body, checked straight from its JSON bytes; every problem is a 4xx ApiError naming the field."""
    if content_type is not None and "json" not in content_type.lower():
        raise ApiError(415, f"the body must be JSON (Content-Type: application/json), not {content_type[:100]!r}")
    try:
        return GenerationBody.model_validate_json(raw)
    except ValidationError as exc:
        raise ApiError(422, _described(exc.errors(), within=("body",))) from None


def _described(errors: Sequence[Any], within: tuple[str, ...] = ()) -> str:
    """pydantic's errors as one line: `where.it.is: what is wrong; ...`."""
    problems = [f"{'.'.join(str(p) for p in (*within, *e['loc']))}: {e['msg']}" for e in errors]
    return "; ".join(problems)[:2000]


def _build_service(s: Settings) -> ApiService:
    serde = AvroSerde(registry_url=s.schema_registry_url)
    store = ApiStore(s.redis_url)
    holder: list[ApiService] = []

    async def store_outcomes(found: Any) -> None:
        await holder[0].store_outcomes(found)

    feed = OutcomeFeed(s.kafka_config(), {s.topology.images_ready: "ready", s.topology.failed: "failed"}, serde,
                       replay_s=s.api_results_replay_s, store_digests=store_outcomes)
    urls = ImageUrls(s.storage_url, endpoint_url=s.s3_endpoint_url, cdn_base_url=s.api_cdn_base_url,
                     expiry_s=s.api_presign_expiry_s)
    service = ApiService(s, serde, store, SubmissionLedger(s.redis_url, s.topic_prefix), urls,
                         AsyncRequestProducer(s.kafka_config()), feed)
    holder.append(service)
    return service


def run_api(s: Settings) -> None:
    import uvicorn

    uvicorn.run(create_app(s), host=s.api_host, port=s.api_port, log_level=s.log_level.lower(),
                proxy_headers=False, server_header=False)
