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


def stop_s3() -> None:
    pid = int(S3_PID.read_text().split()[0])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)


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
        stop_s3()
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
