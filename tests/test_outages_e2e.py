"""Infrastructure outages on the real stack are waited out: no dead letters, every request published once."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from streams.submit import Submitter, build_request
from tests.harness import ROOT, Pipeline
from tests.test_pipeline_e2e import _dlq_reader, _drain

pytestmark = [pytest.mark.stack, pytest.mark.slow]

S3_PID = Path(os.environ.get("ZIMAGE_STACK_DIR", ROOT / ".stack")) / "pids" / "s3.pid"


def stop(pid_file: Path) -> None:
    pid = int(pid_file.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists(), f"{pid_file.stem} did not stop"


def start_s3() -> None:
    up = subprocess.run([str(ROOT / "ops" / "stack"), "up"], capture_output=True, text=True, timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr


@pytest.mark.skipif(not S3_PID.exists(), reason="the S3 endpoint was not started by ops/stack")
def test_an_s3_outage_of_30_seconds_mid_flow_dead_letters_nothing(kafka_bootstrap, tmp_path):
    endpoint = os.environ.get("ZIMAGE_S3_ENDPOINT_URL", "http://127.0.0.1:9000")
    p = Pipeline(tmp_path, ZIMAGE_STORAGE_URL=f"s3://zimage/outage-{tmp_path.name}",
                 ZIMAGE_S3_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="test", AWS_SECRET_ACCESS_KEY="test",
                 AWS_DEFAULT_REGION="us-east-1")
    try:
        p.start("processors", "processors", wait_ready=False)
        p.start("worker", "worker")
        sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
        make = lambda i: build_request({"prompt": f"vase {i}", "seed": i, "width": 32, "height": 32,  # noqa: E731
                                        "steps": 2, "priority": ("high", "normal", "low")[i % 3]})
        requests = [make(i) for i in range(40)]
        sub.submit(requests[:10])
        sub.flush()
        p.wait_published(5)
        stop(S3_PID)
        try:
            sub.submit(requests[10:])
            sub.flush()
            time.sleep(30)
            p.check_alive()
        finally:
            start_s3()
        ids = [r["request_id"] for r in requests]
        events = p.collect(ids, timeout_s=240, settle_s=5)
        missing = [i for i in ids if i not in events]
        assert not missing, f"{len(missing)} never published:\n{p.log('worker')[-3000:]}"
        not_once = {i: [n for n, _ in e] for i, e in events.items() if [n for n, _ in e] != ["ImageReady"]}
        assert not not_once, not_once
        assert _drain(_dlq_reader(p), expected=1, timeout_s=5) == []  # nothing was dead-lettered
        assert "retrying" in p.log("worker")  # the outage was seen, and waited out
    finally:
        p.stop_all()


REDIS_PID = S3_PID.parent / "redis.pid"


@pytest.mark.skipif(not REDIS_PID.exists(), reason="Redis was not started by ops/stack")
def test_redis_stopped_mid_flow_means_no_cache_and_everything_published_once(kafka_bootstrap, tmp_path):
    p = Pipeline(tmp_path)
    try:
        p.start("processors", "processors", wait_ready=False)
        p.start("worker", "worker")
        sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
        make = lambda i, tag: build_request({"prompt": f"bowl {i}", "seed": i, "width": 32,  # noqa: E731
                                             "height": 32, "steps": 2, "request_id": f"{tag}-{i}-{tmp_path.name}"})
        first = [make(i, "a") for i in range(10)]
        sub.submit(first)
        sub.flush()
        p.collect([r["request_id"] for r in first])
        stop(REDIS_PID)
        try:
            repeats = [make(i, "b") for i in range(10)]  # the cache would answer these: it cannot now
            fresh = [make(i, "c") for i in range(10, 20)]
            sub.submit(repeats + fresh)
            sub.flush()
            events = p.collect([r["request_id"] for r in repeats + fresh], timeout_s=180, settle_s=3)
        finally:
            start_s3()  # `ops/stack up` starts whatever is down, Redis included
        ids = [r["request_id"] for r in repeats + fresh]
        kinds = {i: [n for n, _ in events.get(i, [])] for i in ids}
        assert all(k == ["ImageReady"] for k in kinds.values()), kinds
        assert not any(v["cached"] for i in ids for _n, v in events[i])
        assert "Redis unavailable" in p.log("processors")
    finally:
        p.stop_all()
