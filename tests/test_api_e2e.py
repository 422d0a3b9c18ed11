"""The HTTP API on the real stack: a `zimage api` process on loopback in front of a worker and the processors (S3 on
moto, webhooks on): keys and tenants, bad bodies, limits, idempotency, sync and async modes, cancellation."""
from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from connectors.redis_store import cancel_entry_key
from processors.webhook_delivery import verify_signature
from tests.harness import ROOT, Pipeline

pytestmark = pytest.mark.stack

SECRET = "api-test-secret"
HOOK_SECRET = "hook-test-secret"
SMALL: dict[str, Any] = {"width": 32, "height": 32, "steps": 2}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ApiStack:
    """A pipeline plus `zimage api`, and one key per tenant."""

    def __init__(self, pipeline: Pipeline, port: int):
        self.p = pipeline
        self.base = f"http://127.0.0.1:{port}"
        self.keys: dict[str, str] = {}

    def start_api(self) -> None:
        self.p.start("api", "api --no-restart", wait_ready=False)
        deadline = time.monotonic() + 90
        while True:
            self.p.check_alive()
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).json()["ok"]:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.p.log("api")[-3000:]
            time.sleep(0.3)

    def key(self, tenant: str) -> str:
        if tenant not in self.keys:
            out = subprocess.run([sys.executable, "-m", "streams.cli", "api-key", "create", "--tenant", tenant],
                                 cwd=ROOT, env=self.p.env, capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            self.keys[tenant] = out.stdout.strip()
        return self.keys[tenant]

    def client(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.key(tenant)}"}, timeout=60)


def api_env(tmp: Path, port: int, **more: str) -> dict[str, str]:
    return {"ZIMAGE_API_KEY_SECRET": SECRET, "ZIMAGE_API_KEYS_FILE": str(tmp / "keys.jsonl"),
            "ZIMAGE_API_PORT": str(port), "ZIMAGE_API_SYNC_TIMEOUT_S": "90", **more}


@pytest.fixture(scope="module")
def stack(kafka_bootstrap, tmp_path_factory) -> Iterator[ApiStack]:
    tmp = tmp_path_factory.mktemp("api")
    port = free_port()
    prefix_probe = uuid.uuid4().hex[:6]
    p = Pipeline(tmp, **api_env(tmp, port), ZIMAGE_STORAGE_URL=f"s3://zimage/api-{prefix_probe}",
                 ZIMAGE_WEBHOOK_SECRET=HOOK_SECRET, ZIMAGE_CALLBACK_ALLOWLIST="127.0.0.1",
                 ZIMAGE_WEBHOOK_RETRY_BASE_S="0.5", ZIMAGE_WEBHOOK_RETRY_MAX_DELAY_S="1",
                 ZIMAGE_API_TENANT_LIMITS=json.dumps({"limited": {"rate_per_s": 0.05, "burst": 2}}))
    stack = ApiStack(p, port)
    try:
        p.start("worker-1", "worker")
        p.start("processors", "processors", wait_ready=False)
        stack.start_api()
        yield stack
    finally:
        p.stop_all()


class Receiver:
    def __init__(self) -> None:
        self.calls: list[tuple[dict[str, str], bytes]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.calls.append((dict(self.headers), body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def body(prompt: str, **more) -> dict:
    return {"prompt": f"{prompt} {uuid.uuid4().hex[:6]}", **SMALL, **more}


def test_calls_without_a_valid_key_are_refused(stack):
    anonymous = httpx.post(f"{stack.base}/v1/images/generations", json=body("a lamp"))
    assert anonymous.status_code == 401 and anonymous.headers["WWW-Authenticate"] == "Bearer"
    wrong = httpx.get(f"{stack.base}/v1/tasks/x", headers={"Authorization": "Bearer zk_not-a-key"})
    assert wrong.status_code == 401
    stack.key("acme")
    forged = httpx.get(f"{stack.base}/v1/tasks/x", headers={"X-API-Key": stack.key("acme") + "x"})
    assert forged.status_code == 401
    assert stack.key("acme") not in (Path(stack.p.env["ZIMAGE_API_KEYS_FILE"])).read_text()  # hashes only
    assert httpx.get(f"{stack.base}/openapi.json").json()["paths"]["/v1/tasks/{request_id}"]


def test_sync_mode_answers_with_a_presigned_url_of_the_png_and_tenants_do_not_see_each_other(stack):
    with stack.client("acme") as acme, stack.client("globex") as globex:
        answer = acme.post("/v1/images/generations", json=body("a teapot", mode="sync", seed=7))
        assert answer.status_code == 200, answer.text
        task = answer.json()
        assert task["state"] == "completed" and task["seed"] == 7 and task["tenant"] == "acme"
        assert task["url"].startswith("http://127.0.0.1:") and "X-Amz-Signature" in task["url"]
        png = httpx.get(task["url"], timeout=10)
        assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
        assert hashlib.sha256(png.content).hexdigest() == task["images"][0]["sha256"]
        rid = task["id"]
        deadline = time.monotonic() + 20
        while (seen := acme.get(f"/v1/tasks/{rid}").json())["status"] != "published":
            assert time.monotonic() < deadline, seen
            time.sleep(0.3)
        assert seen["state"] == "completed" and seen["final"] and seen["images"][0]["sha256"] == png_sha(png)
        assert globex.get(f"/v1/tasks/{rid}").status_code == 404
        assert globex.delete(f"/v1/tasks/{rid}").status_code == 404
        assert acme.delete(f"/v1/tasks/{rid}").status_code == 409  # rendered: too late
        listed = acme.get("/v1/tasks").json()["tasks"]
        assert rid in [t["id"] for t in listed]
        assert rid not in [t["id"] for t in globex.get("/v1/tasks").json()["tasks"]]
        assert acme.get("/v1/tasks", params={"tenant": "globex"}).status_code == 403


def png_sha(response: httpx.Response) -> str:
    return hashlib.sha256(response.content).hexdigest()


def test_bad_bodies_get_clear_4xx_answers(stack):
    with stack.client("acme") as acme:
        cases = [({**SMALL}, 422, "prompt"), (body("x", width=33), 422, "multiple of 16"),
                 (body("x", steps="many"), 422, "steps"), (body("x", colour="red"), 422, "colour"),
                 (body(" ", priority="urgent"), 422, "priority"), (body("x", model="dall-e"), 422, "unknown_model"),
                 ({**SMALL, "prompt": "a\x07bell"}, 422, "control character"),
                 (body("x", tenant="globex"), 403, "tenant")]
        for sent, status, words in cases:
            answer = acme.post("/v1/images/generations", json=sent)
            assert answer.status_code == status and words in answer.json()["detail"], (sent, answer.text)
        broken = acme.post("/v1/images/generations", content=b"{not json", headers={"Content-Type": "application/json"})
        assert broken.status_code == 422
        huge = acme.post("/v1/images/generations", json=body("x", negative_prompt="y" * 300_000))
        assert huge.status_code == 413
        bad_key = acme.post("/v1/images/generations", json=body("x"), headers={"Idempotency-Key": "a\x01"})
        assert bad_key.status_code in (400, 422)


def test_an_idempotency_key_names_the_request_and_guards_its_body(stack):
    key = f"order {uuid.uuid4().hex}"  # a space: not a valid request id, so it is hashed
    sent = body("a chair")
    with stack.client("acme") as acme:
        first = acme.post("/v1/images/generations", json=sent, headers={"Idempotency-Key": key})
        again = acme.post("/v1/images/generations", json=sent, headers={"Idempotency-Key": key})
        assert first.status_code == again.status_code == 202
        assert first.json()["id"] == again.json()["id"] and first.json()["id"].startswith("idem-")
        other = acme.post("/v1/images/generations", json={**sent, "seed": 3}, headers={"Idempotency-Key": key})
        assert other.status_code == 422 and "different body" in other.json()["detail"]
        plain = acme.post("/v1/images/generations", json=sent, headers={"Idempotency-Key": "order-77-" + key[6:]})
        assert plain.json()["id"] == "order-77-" + key[6:]


def test_a_tenant_over_its_rate_gets_429_with_retry_after(stack):
    with stack.client("limited") as limited, stack.client("acme") as acme:
        # a deadline long past: the gate fails these at once, nothing renders
        answers = [limited.post("/v1/images/generations", json=body("a cup", deadline=1)) for _ in range(3)]
        assert [a.status_code for a in answers] == [202, 202, 429]
        assert int(answers[-1].headers["Retry-After"]) >= 1 and "rate limit" in answers[-1].json()["detail"]
        assert acme.post("/v1/images/generations", json=body("a cup", deadline=1)).status_code == 202


def test_async_mode_answers_202_and_the_callback_brings_the_outcome(stack):
    receiver = Receiver()
    try:
        with stack.client("acme") as acme:
            answer = acme.post("/v1/images/generations", json=body("a vase", callback_url=receiver.url))
            assert answer.status_code == 202 and answer.headers["Location"] == answer.json()["status_url"]
            rid = answer.json()["id"]
            deadline = time.monotonic() + 90
            while not receiver.calls:
                assert time.monotonic() < deadline, stack.p.log("processors")[-3000:]
                time.sleep(0.2)
            headers, raw = receiver.calls[0]
            assert verify_signature(HOOK_SECRET, headers["X-Zimage-Timestamp"], raw, headers["X-Zimage-Signature"],
                                    tolerance_s=300, now_s=time.time())
            event = json.loads(raw)
            assert event["type"] == "image.ready" and event["event"]["request_id"] == rid
            task = acme.get(f"/v1/tasks/{rid}").json()
            assert task["state"] == "completed" and task["images"][0]["sha256"] == event["event"]["sha256"]
    finally:
        receiver.close()


def test_a_queued_request_is_cancelled_with_202_and_one_a_worker_took_gets_409(fresh_pipeline, tmp_path):
    port = free_port()
    fresh_pipeline.env.update(api_env(tmp_path, port))
    stack = ApiStack(fresh_pipeline, port)
    stack.start_api()  # no gate, no worker: what it accepts stays queued
    with stack.client("acme") as acme, stack.client("globex") as globex:
        rid = acme.post("/v1/images/generations", json=body("a queued lamp")).json()["id"]
        assert acme.get(f"/v1/tasks/{rid}").json()["state"] == "queued"
        assert globex.delete(f"/v1/tasks/{rid}").status_code == 404
        cancelled = acme.delete(f"/v1/tasks/{rid}")
        assert cancelled.status_code == 202 and cancelled.json()["cancel_requested"]
        assert acme.delete(f"/v1/tasks/{rid}").status_code == 202  # asking twice is fine
        mark = redis.Redis.from_url(fresh_pipeline.settings.redis_url)
        prefix = fresh_pipeline.prefix
        assert mark.get(cancel_entry_key(prefix, "acme", rid)) == b"cancelled"
        taken = acme.post("/v1/images/generations", json=body("a taken lamp")).json()["id"]
        mark.set(cancel_entry_key(prefix, "acme", taken), b"rendering", ex=60)  # what a worker's batch claims
        assert acme.delete(f"/v1/tasks/{taken}").status_code == 409
        assert acme.get(f"/v1/tasks/{taken}").json()["state"] == "in_progress"
        assert acme.delete("/v1/tasks/no-such-task").status_code == 404
