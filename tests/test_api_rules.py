"""The HTTP API's pure rules and its small connectors: request ids from Idempotency-Key, fingerprints, key hashes,
limits, task states, the keys file, image URLs; the Lua token bucket against the stack's Redis."""
from __future__ import annotations

import asyncio
import os
import uuid
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

from connectors.api_keys import KeyFileError, KeyRing, append_key, read_keys
from connectors.api_ledger import Admission, SubmissionLedger
from connectors.api_urls import ImageUrls
from processors import api_rules
from processors.api_rules import (
    BadIdempotencyKey,
    TenantLimits,
    body_fingerprint,
    hash_api_key,
    limits_for,
    request_id_for,
    retry_after_s,
    task_state,
)


def test_an_idempotency_key_that_is_a_valid_id_is_the_request_id():
    assert request_id_for("order-1234") == "order-1234"


def test_a_key_that_does_not_fit_the_id_rules_is_hashed_the_same_way_every_time():
    for key in ("has spaces", "é-accent", "x" * 300, "idem-looks-like-a-hash"):
        rid = request_id_for(key)
        assert rid.startswith("idem-") and len(rid) == 5 + 64 and rid == request_id_for(key)
        assert all("!" <= c <= "~" for c in rid)
    assert request_id_for("has spaces") != request_id_for("has  spaces")


def test_no_key_gives_a_new_id_each_time_and_bad_keys_are_refused():
    assert request_id_for(None) != request_id_for(None)
    for bad in ("", "a\x00b", "a\nb", "k" * 2000):
        with pytest.raises(BadIdempotencyKey):
            request_id_for(bad)


def test_the_fingerprint_ignores_key_order_and_sees_every_value():
    a = {"prompt": "a lamp", "width": 32, "metadata": {"x": "1", "y": "2"}}
    b = {"metadata": {"y": "2", "x": "1"}, "width": 32, "prompt": "a lamp"}
    assert body_fingerprint(a) == body_fingerprint(b)
    assert body_fingerprint(a) != body_fingerprint({**a, "width": 48})


def test_key_hashes_depend_on_the_secret_and_keys_are_random():
    key = api_rules.new_api_key()
    assert key.startswith("zk_") and len(key) > 40 and key != api_rules.new_api_key()
    assert hash_api_key(b"s1", key) == hash_api_key(b"s1", key) != hash_api_key(b"s2", key)


def test_tenant_limits_take_overrides_and_refuse_nonsense():
    default = TenantLimits(5.0, 20, 1000)
    assert limits_for("acme", default, {}) == default
    assert limits_for("acme", default, {"acme": {"burst": 3}}) == TenantLimits(5.0, 3, 1000)
    with pytest.raises(ValueError):
        TenantLimits(0, 1, 1)
    with pytest.raises(ValueError):
        TenantLimits(1.0, 0, 1)
    assert retry_after_s(1) == 1 and retry_after_s(1001) == 2 and retry_after_s(0) == 1


@pytest.mark.parametrize(("status", "result", "accepted", "claim", "state"), [
    (None, None, False, None, None),
    (None, None, True, None, "queued"),
    (None, None, True, b"rendering", "in_progress"),
    ({"status": "admitted"}, None, True, None, "queued"),
    ({"status": "admitted"}, None, True, b"rendering", "in_progress"),
    ({"status": "in_review"}, None, True, None, "in_progress"),
    ({"status": "published"}, None, True, None, "completed"),
    ({"status": "failed", "detail": "blocked: sexual"}, None, True, None, "failed"),
    ({"status": "failed", "detail": "cancelled: while queued"}, None, True, None, "cancelled"),
    ({"status": "duplicate"}, None, True, None, "in_progress"),
    ({"status": "duplicate"}, {"kind": "ready"}, True, None, "completed"),
    (None, {"kind": "failed", "reason_code": "cancelled"}, True, None, "cancelled"),
    (None, {"kind": "failed", "reason_code": "render_error"}, False, None, "failed"),
])
def test_task_states(status, result, accepted, claim, state):
    assert task_state(status, result, accepted, claim) == state


def test_only_a_queued_task_can_be_cancelled():
    assert api_rules.cancellable("queued")
    assert not any(api_rules.cancellable(s) for s in ("in_progress", "completed", "failed", "cancelled", None))


def test_the_keys_file_holds_hashes_and_new_keys_are_seen_without_a_restart(tmp_path: Path):
    path = tmp_path / "keys.jsonl"
    now = [0.0]
    ring = KeyRing(path, clock=lambda: now[0])
    assert ring.tenant_of("h1") is None
    append_key(path, "h1", "acme", "ci")
    assert "acme" in path.read_text() and oct(path.stat().st_mode)[-3:] == "600"
    now[0] += 2
    assert ring.tenant_of("h1") == "acme"
    path.write_text(path.read_text() + "not json\n")
    now[0] += 2
    assert ring.tenant_of("h1") == "acme"  # a broken file keeps the keys already read
    with pytest.raises(KeyFileError):
        read_keys(path)


def test_image_urls_are_presigned_or_under_the_cdn_never_s3(tmp_path: Path):
    urls = ImageUrls("s3://zimage/p", endpoint_url="http://127.0.0.1:9000", expiry_s=600)
    url = urls.url_for("s3://zimage/p/images/acme-1/ab/abc.png")
    parsed = urlparse(url or "")
    assert parsed.scheme == "http" and parsed.netloc == "127.0.0.1:9000"
    assert parsed.path == "/zimage/p/images/acme-1/ab/abc.png"
    query = parse_qs(parsed.query)
    assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
    cdn = ImageUrls("s3://zimage/p", cdn_base_url="https://cdn.example.com/img/")
    assert cdn.url_for("s3://zimage/p/images/a b.png") == "https://cdn.example.com/img/p/images/a%20b.png"
    local = ImageUrls(str(tmp_path))
    assert local.url_for((tmp_path / "images/x.png").as_uri()) is None
    local_cdn = ImageUrls(str(tmp_path), cdn_base_url="https://cdn.example.com")
    assert local_cdn.url_for((tmp_path / "images/x.png").as_uri()) == "https://cdn.example.com/images/x.png"
    assert local_cdn.url_for("file:///etc/passwd") is None


@pytest.mark.stack
def test_the_token_bucket_in_redis_limits_rate_and_daily_quota():
    url = os.environ.get("ZIMAGE_REDIS_URL", "redis://127.0.0.1:6379/0")

    async def scenario() -> None:
        limiter = SubmissionLedger(url, f"t{uuid.uuid4().hex[:8]}")
        try:
            got = [await limiter.admit(Admission("acme", 1.0, 3, 100)) for _ in range(4)]
            assert [d.allowed for d in got] == [True, True, True, False]
            assert got[-1].reason == "rate" and 0 < got[-1].wait_ms <= 1000
            assert (await limiter.admit(Admission("globex", 1.0, 3, 100))).allowed  # per tenant
            quota = [await limiter.admit(Admission("small", 1000.0, 1000, 2)) for _ in range(3)]
            assert [d.allowed for d in quota] == [True, True, False]
            assert quota[-1].reason == "quota" and quota[-1].wait_ms > 0
            await asyncio.sleep(1.05)
            assert (await limiter.admit(Admission("acme", 1.0, 3, 100))).allowed  # refilled
        finally:
            await limiter.close()
        down = SubmissionLedger("redis://127.0.0.1:1/0", "tdown")  # nothing listens on port 1
        try:
            decision = await down.admit(Admission("acme", 1.0, 1, 1))
            assert decision.allowed and decision.unavailable
        finally:
            await down.close()

    asyncio.run(scenario())


@pytest.mark.stack
def test_admissions_of_one_turn_go_in_one_call_and_claim_each_id_once():
    url = os.environ.get("ZIMAGE_REDIS_URL", "redis://127.0.0.1:6379/0")
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def ask(claim: str, value: bytes, tenant: str = "acme", burst: int = 100) -> Admission:
        return Admission(tenant, 1.0, burst, 1000, f"zimage:{prefix}:claim:{claim}", value, 60.0)

    async def scenario() -> None:
        ledger = SubmissionLedger(url, prefix)
        try:
            answers = await asyncio.gather(ledger.admit(ask("a", b"first")), ledger.admit(ask("a", b"second")),
                                           ledger.admit(ask("b", b"other")),
                                           ledger.admit(ask("c", b"poor", tenant="poor", burst=1)),
                                           ledger.admit(ask("d", b"poor again", tenant="poor", burst=1)))
            assert ledger.admit.calls == 1  # five requests, one script call
            assert [d.allowed for d in answers] == [True, True, True, True, False]
            # the first claim of an id stands; the second learns what it was, in order within the batch
            assert [d.previous_claim for d in answers[:3]] == [None, b"first", None]
            assert answers[4].reason == "rate"
            # a refused request claims nothing: its id is free for a later try
            assert (await ledger.admit(ask("d", b"later", tenant="rich"))).previous_claim is None
        finally:
            await ledger.close()

    asyncio.run(scenario())


def test_the_api_commands_refuse_to_start_without_the_key_secret(tmp_path: Path, monkeypatch):
    from click.testing import CliRunner

    from streams.cli import main

    monkeypatch.delenv("ZIMAGE_API_KEY_SECRET", raising=False)
    monkeypatch.setenv("ZIMAGE_API_KEYS_FILE", str(tmp_path / "keys.jsonl"))
    for args in (["api", "--no-restart"], ["api-key", "create", "--tenant", "acme"]):
        out = CliRunner().invoke(main, args)
        assert out.exit_code == 78 and "ZIMAGE_API_KEY_SECRET" in out.output, out.output
    monkeypatch.setenv("ZIMAGE_API_KEY_SECRET", "s")
    made = CliRunner().invoke(main, ["api-key", "create", "--tenant", "acme"])
    key = made.output.strip()
    assert made.exit_code == 0 and key.startswith("zk_")
    assert read_keys(tmp_path / "keys.jsonl") == {hash_api_key(b"s", key): "acme"}
    assert CliRunner().invoke(main, ["api-key", "create", "--tenant", " "]).exit_code == 2
