"""The HTTP API application in process, with its service and key ring replaced: what happens per request before the
service is called (no broker, no Redis)."""
from __future__ import annotations

import threading
from typing import Any

from fastapi.testclient import TestClient

from processors.api_rules import hash_api_key
from streams.api import create_app
from streams.settings import Settings

SECRET = "app-test-secret"


class RecordingRing:
    """A key ring of one key that notes the thread each lookup ran on."""

    def __init__(self, key: str, tenant: str):
        self._hash = hash_api_key(SECRET.encode(), key)
        self._tenant = tenant
        self.threads: list[int] = []

    def tenant_of(self, key_hash: str) -> str | None:
        self.threads.append(threading.get_ident())
        return self._tenant if key_hash == self._hash else None

    def __len__(self) -> int:
        return 1


class RecordingService:
    """Accepts every request; notes the thread its coroutine ran on (the event loop's)."""

    feed = None

    def __init__(self) -> None:
        self.submitted: list[tuple[str, Any]] = []
        self.threads: list[int] = []

    async def submit(self, tenant: str, body: Any, idem: str | None) -> tuple[str, None]:
        self.threads.append(threading.get_ident())
        self.submitted.append((tenant, body))
        return f"req-{len(self.submitted)}", None


def app_with(ring: RecordingRing, service: RecordingService) -> TestClient:
    settings = Settings(_env_file=None, api_key_secret=SECRET)
    return TestClient(create_app(settings, keys=ring, service=service))  # type: ignore[arg-type]


def test_the_key_is_checked_on_the_event_loop_without_a_thread_hop() -> None:
    ring, service = RecordingRing("zk_good", "acme"), RecordingService()
    with app_with(ring, service) as client:
        answers = [client.post("/v1/images/generations", json={"prompt": f"a teapot {i}"},
                               headers={"Authorization": "Bearer zk_good"}) for i in range(3)]
    assert [a.status_code for a in answers] == [202, 202, 202]
    assert answers[0].json() == {"id": "req-1", "state": "queued", "status_url": "/v1/tasks/req-1"}
    assert [tenant for tenant, _ in service.submitted] == ["acme"] * 3
    # each lookup ran on the thread that runs the service's coroutines: the loop, not a worker thread
    assert ring.threads == service.threads


def test_an_unknown_key_is_refused_before_the_service_is_called() -> None:
    ring, service = RecordingRing("zk_good", "acme"), RecordingService()
    with app_with(ring, service) as client:
        answer = client.post("/v1/images/generations", json={"prompt": "a teapot"},
                             headers={"X-API-Key": "zk_forged"})
    assert answer.status_code == 401
    assert answer.headers["WWW-Authenticate"] == "Bearer"
    assert service.submitted == []


def test_the_submit_body_is_checked_from_its_bytes_and_documented_in_openapi() -> None:
    ring, service = RecordingRing("zk_good", "acme"), RecordingService()
    key = {"Authorization": "Bearer zk_good"}
    with app_with(ring, service) as client:
        form = client.post("/v1/images/generations", content=b"prompt=a+teapot",
                           headers={**key, "Content-Type": "application/x-www-form-urlencoded"})
        broken = client.post("/v1/images/generations", content=b"{not json",
                             headers={**key, "Content-Type": "application/json"})
        wrong = client.post("/v1/images/generations", json={"prompt": "a teapot", "steps": "many"}, headers=key)
        schema = client.get("/openapi.json").json()
    assert form.status_code == 415
    assert broken.status_code == 422 and "JSON" in broken.json()["detail"]
    assert wrong.status_code == 422 and "body.steps" in wrong.json()["detail"]
    assert service.submitted == []
    submit = schema["paths"]["/v1/images/generations"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert "prompt" in body["required"] and "callback_url" in body["properties"]
    assert {"200", "202", "422", "429"} <= set(submit["responses"])


def test_a_page_cursor_that_is_no_finite_number_is_refused_before_redis_is_asked() -> None:
    ring, service = RecordingRing("zk_good", "acme"), RecordingService()
    with app_with(ring, service) as client:
        answers = [client.get(f"/v1/tasks?before={value}", headers={"Authorization": "Bearer zk_good"})
                   for value in ("nan", "inf", "-inf")]
    assert [a.status_code for a in answers] == [422, 422, 422]
