"""Quality below the bar on the real stack: re-renders with new seeds, then REVIEW; `zimage review` approves
(ImageReady) or rejects (RequestFailed)."""
from __future__ import annotations

import subprocess
import sys
import time

import pytest

from processors.quality import rerender_seed
from streams.submit import Submitter, build_request
from tests.harness import ROOT

pytestmark = [pytest.mark.stack, pytest.mark.slow]

SMALL = {"width": 32, "height": 32, "steps": 2, "tenant": "acme"}


def zimage(pipeline, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "streams.cli", *args], cwd=ROOT, env=pipeline.env,
                          capture_output=True, text=True, timeout=120)


def waiting(pipeline, count: int) -> dict[str, list[str]]:
    deadline = time.monotonic() + 120
    while True:
        out = zimage(pipeline, "review", "list")
        assert out.returncode == 0, out.stderr
        rows = {line.split("\t")[1]: line.split("\t") for line in out.stdout.splitlines()}
        if len(rows) >= count:
            return rows
        assert time.monotonic() < deadline, f"only {len(rows)} items in review: {out.stdout}"
        time.sleep(1)


def test_images_below_the_bar_are_rerendered_then_reviewed_then_approved_or_rejected(fresh_pipeline):
    p = fresh_pipeline
    p.start("processors", "processors", wait_ready=False)
    # No image can be this sharp: every render fails the quality bar.
    p.start("worker", "worker", ZIMAGE_QUALITY_SHARPNESS_MIN="1e15", ZIMAGE_QUALITY_MAX_RERENDERS="2")
    keep = build_request({"prompt": "a vase to keep", "seed": 3, **SMALL})
    drop = build_request({"prompt": "a vase to drop", "seed": 4, **SMALL})
    seedless = build_request({"prompt": "a vase without a seed", **SMALL})
    sub = Submitter(p.settings.kafka_config(), p.topology, p.serde)
    sub.submit([keep, drop, seedless])
    sub.flush()
    rows = waiting(p, 3)
    assert {keep["request_id"], drop["request_id"], seedless["request_id"]} <= rows.keys()
    assert "passed=0.0" in rows[keep["request_id"]][3]
    assert not p.collect([keep["request_id"]], timeout_s=3)  # held: nothing is published meanwhile

    from schemas.serde import AvroSerde
    from streams.review import ReviewDesk

    held = {i.rendered["request_id"]: i.rendered for i in ReviewDesk(p.settings, AvroSerde()).waiting()}
    assert held[keep["request_id"]]["attempt"] == 0  # the caller's own seed: its bytes, straight to review
    assert held[seedless["request_id"]]["attempt"] == 2  # two re-renders, each with a new derived seed
    assert held[seedless["request_id"]]["images"][0]["seed"] == rerender_seed(seedless["request_id"], 2)

    assert zimage(p, "review", "approve", keep["request_id"], "--tenant", "acme").returncode == 0
    out = zimage(p, "review", "reject", drop["request_id"], "--tenant", "acme", "--reason", "too blurry")
    assert out.returncode == 0, out.stderr
    events = p.collect([keep["request_id"], drop["request_id"]], timeout_s=60)
    [(kind, ready)] = events[keep["request_id"]]
    assert kind == "ImageReady" and ready["quality"]["passed"] == 0.0 and ready["seed"] == 3
    [(kind, failed)] = events[drop["request_id"]]
    assert (kind, failed["reason_code"]) == ("RequestFailed", "rejected") and "too blurry" in failed["reason"]
    again = zimage(p, "review", "approve", keep["request_id"], "--tenant", "acme")
    assert again.returncode == 1 and "nothing" in again.stderr  # decided once
