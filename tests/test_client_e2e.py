"""The client SDK against a real `zimage api` on loopback and the pipeline behind it: batch_generate with a
concurrency limit and a progress bar, over a mix of requests that render, are refused, and are blocked; and the
Kafka transport, which skips the API."""
from __future__ import annotations

import hashlib
import time
import uuid

import httpx
import pytest

from connectors.client import GenerationFailed, ZImageClient, ZImageError
from tests.test_api_e2e import SMALL, stack  # noqa: F401 - the module's own API stack (a fixture)

pytestmark = pytest.mark.stack


def test_batch_generate_returns_each_items_result_or_error(stack, capsys):  # noqa: F811 - the fixture
    client = ZImageClient(stack.base, api_key=stack.key("acme"))
    tag = uuid.uuid4().hex[:6]
    requests = [{"prompt": f"a red cup {tag}", **SMALL},
                {"prompt": f"a blue cup {tag}", **SMALL, "width": 33},  # refused by the API: 422
                {"prompt": f"a porn scene {tag}", **SMALL},  # blocked by the gate: failed
                {"prompt": f"a green cup {tag}", **SMALL, "seed": 9},
                {"prompt": f"a grey cup {tag}", **SMALL}]
    items = client.batch_generate(requests, concurrency=2, timeout_s=120, progress=True)
    assert [i.ok for i in items] == [True, False, False, True, True]
    assert isinstance(items[1].error, ZImageError) and items[1].error.status == 422 and items[1].result is None
    assert isinstance(items[2].error, GenerationFailed) and items[2].result.state == "failed"
    assert "blocked" in (items[2].result.error or "")
    assert items[3].result.seed == 9
    png = httpx.get(items[0].result.url or "", timeout=10)
    assert png.content.startswith(b"\x89PNG")
    assert hashlib.sha256(png.content).hexdigest() == items[0].result.images[0].sha256
    assert "5/5" in capsys.readouterr().err  # tqdm's bar, on stderr


def test_generate_and_submit_over_http_and_over_kafka(stack):  # noqa: F811 - the fixture
    client = ZImageClient(stack.base, api_key=stack.key("acme"))
    result = client.generate(f"a chair {uuid.uuid4().hex[:6]}", timeout_s=120, **SMALL)
    assert result.ok and result.url and result.url.startswith("http://127.0.0.1:")
    handle = client.submit(f"a stool {uuid.uuid4().hex[:6]}", **SMALL)
    assert handle.wait(120).ok
    with pytest.raises(ZImageError) as late:
        handle.cancel()
    assert late.value.status == 409
    direct = ZImageClient.over_kafka(stack.p.env["ZIMAGE_BOOTSTRAP_SERVERS"], tenant="acme",
                                     topic_prefix=stack.p.prefix)
    over_kafka = direct.generate(f"a bench {uuid.uuid4().hex[:6]}", timeout_s=120, **SMALL)
    assert over_kafka.ok and over_kafka.images[0].url.startswith("s3://")  # the object URI: no API to sign it
    # the API answers for any producer's request of the key's tenant, once the outcome is in: with a signed URL
    # (the status view may say `completed` a moment before the API's own outcome consumer has the images: the
    # README's fallback when the API missed an outcome)
    deadline = time.monotonic() + 20
    while (seen := client.task(over_kafka.id)) is None or not seen.images:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert seen.ok and seen.url and seen.url.startswith("http://127.0.0.1:")
    assert seen.images[0].sha256 == over_kafka.images[0].sha256
