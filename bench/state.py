"""Memory of a long window: publication's state of many requests, in the heap or on disk (ZIMAGE_STATE_STORE).

    python -m bench.state [--requests 1000000]     (part of `make bench`)

Each store is filled in a process of its own, with ImageReady events as publication applies them, and measured
there: the process's RSS growth over the fill, the rate of applies, and the time of a decision (a lookup, as
every rendered image costs) once full. The RSS of a whole window is the growth measured, plus what the second half
of the fill added per request times the requests of the window left to fill (the heap grows with every request;
the database's page cache stops at ZIMAGE_STATE_CACHE_MB). At 100,000 requests a day, the 30-day default window holds
three million. Goal: the state of a 30-day window keeps publication (and the gate, whose admitted keys are kept
the same way) within the 200 MB of a processor that loads no model. Figures go to bench/results/state.json.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import random
import tempfile
import time
from pathlib import Path

from processors.events import image_ready, image_rendered
from processors.publication_state import PublicationState
from streams.state_store import DiskRequests, StateStore
from streams.submit import build_request

RESULTS = Path(__file__).resolve().parent / "results" / "state.json"
WINDOW_REQUESTS = 3_000_000  # 100,000 a day for 30 days
GOAL_RSS_MB = 200.0
T0 = 1_767_225_600_000


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS")) / 1024


def rendered_template() -> dict:
    request = build_request({"prompt": "a product photo, studio light", "tenant": "bench", "seed": 1})
    image = {"index": 0, "uri": "s3://bench/x.png", "sha256": "0" * 64, "seed": 1, "size_bytes": 40_000}
    return image_rendered(request=request, images=[image], model_id="simulated", model_version="sim-1",
                          timings_ms={"render": 1.0}, batch_id="b", batch_size=1, worker_id="bench",
                          source=("zimage.requests.normal", 0, 0), now_ms=T0)


def fill_and_measure(store: str, requests: int, out: multiprocessing.Queue) -> None:
    template = rendered_template()
    folder = tempfile.mkdtemp(prefix="bench-state-")
    disk = StateStore(folder)
    state = PublicationState(31 * 24 * 3600 * 1000, DiskRequests(disk, 0) if store == "disk" else None)
    before = rss_mb()
    halfway = before
    started = time.perf_counter()
    for i in range(requests):
        rendered = {**template, "request_id": f"shop-{i:012d}", "generation": "zimage-turbo@v1"}
        rendered["images"] = [{**template["images"][0], "sha256": f"{i:064x}"}]
        state.apply(image_ready(rendered, T0 + i, version=1))
        if i == requests // 2:
            halfway = rss_mb()
    applied_s = time.perf_counter() - started
    grown = rss_mb() - before
    per_request = max(0.0, (grown - (halfway - before)) / (requests - requests // 2))
    picks = random.Random(7).sample(range(requests), min(requests, 20_000))
    started = time.perf_counter()
    for i in picks:
        rendered = {**template, "request_id": f"shop-{i:012d}", "generation": "zimage-turbo@v1"}
        rendered["images"] = [{**template["images"][0], "sha256": f"{i:064x}"}]
        assert not state.decide(rendered, T0 + requests).publish
    decide_us = (time.perf_counter() - started) / len(picks) * 1e6
    len(state)  # writes what waits
    out.put({"store": store, "disk_bytes_per_request": disk.size_bytes() / requests, "grown_mb": grown,
             "window_mb": grown + per_request * max(0, WINDOW_REQUESTS - requests),
             "applies_per_s": requests / applied_s, "decide_us": decide_us})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--requests", type=int, default=1_000_000)
    args = ap.parse_args()
    results = []
    for store in ("memory", "disk"):
        queue: multiprocessing.Queue = multiprocessing.Queue()
        proc = multiprocessing.get_context("fork").Process(target=fill_and_measure, args=(store, args.requests, queue))
        proc.start()
        results.append(queue.get(timeout=1800))
        proc.join()
    print(f"publication state of {args.requests:,} requests, each store in a process of its own:")
    figures = []
    for r in results:
        window_mb = r["window_mb"]
        ok = window_mb <= GOAL_RSS_MB
        print(f"  {r['store']:7} RSS +{r['grown_mb']:7.1f} MB, about +{window_mb:7.1f} MB for a 30-day window of"
              f" {WINDOW_REQUESTS:,} (goal <= {GOAL_RSS_MB:.0f} {'ok' if ok else 'MISSED'});"
              f" {r['applies_per_s']:7,.0f} applies/s; a decision {r['decide_us']:5.1f} us"
              + (f"; {r['disk_bytes_per_request']:.0f} bytes a request on disk" if r["store"] == "disk" else ""))
        figures.append({"name": f"state_{r['store']}_window_rss_mb", "value": round(window_mb, 1), "unit": "MB",
                        "goal": f"<= {GOAL_RSS_MB:.0f}", "met": ok})
        figures.append({"name": f"state_{r['store']}_decide_us", "value": round(r["decide_us"], 1), "unit": "us"})
        figures.append({"name": f"state_{r['store']}_applies_per_s", "value": round(r["applies_per_s"]),
                        "unit": "1/s"})
        if r["store"] == "disk":
            figures.append({"name": "state_disk_bytes_per_request", "value": round(r["disk_bytes_per_request"]),
                            "unit": "B"})
    RESULTS.write_text(json.dumps({"requests": args.requests, "figures": figures}, indent=2) + "\n")


if __name__ == "__main__":
    main()
