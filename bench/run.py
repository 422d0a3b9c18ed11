"""`make bench`: the render worker against the real local broker, with a simulated renderer (cost a + b*n s).

Each figure is measured in one run of this script; ratios compare runs made here, one after the other. First, an
unmeasured backlog of 3,000 requests at no render cost goes through a worker (`--warmup`): a broker started a
minute ago still compiles its hot paths, and the first figures after a fresh start were the slowest.
Prints a table and writes bench/results/latest.json ([{name, value, goal, unit, ok}]).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaException, TopicPartition

from bench.simulated import MemoryStore, SimulatedRenderer, routed
from bench.topology import drop_topics
from connectors.kafka_admin import TopicWanted, apply_topics
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.submit import Submitter, build_request
from streams.worker import RenderWorker

RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


class Scenario:
    """Private topics, a producer, and one in-process worker with a simulated renderer."""

    def __init__(self, a: float, b: float, max_batch: int, **settings: Any):
        self.a, self.b = a, b
        self.settings = Settings(_env_file=None, topic_prefix=f"bench{uuid.uuid4().hex[:8]}",
                                 bootstrap_servers=os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                                 max_batch_size=max_batch, worker_id="bench", **settings)
        self.conf = self.settings.kafka_config()
        apply_topics(self.conf, [TopicWanted(t.name, t.partitions, t.config) for t in self.settings.topology.topics()])
        self.batches: list[tuple[float, list[str]]] = []  # (start, prompts)
        self.renderer = SimulatedRenderer(a, b, on_batch=lambda t, items: self.batches.append(
            (t, [i.prompt for i in items])))
        # straight onto the pool's render topics: these figures are the worker's, without a gate in front
        self.submitter = Submitter(self.conf, self.settings.topology, AvroSerde(), pool=self.settings.pool)
        self.worker: RenderWorker | None = None
        self.thread: threading.Thread | None = None

    def submit(self, n: int, priority: str, tag: str) -> dict[str, float]:
        """Produces n requests; returns request tag -> submit time (monotonic)."""
        sent: dict[str, float] = {}
        for i in range(n):
            prompt = f"{tag}-{i}"
            # the smallest size: PNG encoding and quality scoring of the simulated image stay out of the figures
            req = build_request({"prompt": prompt, "priority": priority, "width": 16, "height": 16, "steps": 2,
                                 "seed": i})
            self.submitter.submit([routed(req, self.settings.pool)])
            sent[prompt] = time.monotonic()
        return sent

    def start(self) -> None:
        self.worker = RenderWorker(self.settings, self.renderer, MemoryStore(self.settings.storage_url), AvroSerde())
        self.thread = threading.Thread(target=self.worker.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        if self.worker and self.thread:
            self.worker.stop()
            self.thread.join(60)
        drop_topics(self.conf, self.settings.topic_prefix)

    def wait_drained(self, timeout_s: float = 300) -> float:
        """Waits until the group has committed everything submitted; returns the time it saw that. Nothing more
        is produced meanwhile, so the end offsets are read once, and each check is one request for the group's
        committed offsets, from one client: the probe stays out of the figures it measures."""
        assert self.worker is not None, "start() first"
        topics = list(self.settings.topology.render_input_topics(self.settings.pool).values())
        probe = Consumer({**self.conf, "group.id": self.worker.group_id, "enable.auto.commit": False})
        try:
            parts = [TopicPartition(t, p) for t in topics
                     for p in probe.list_topics(t, timeout=10).topics[t].partitions]
            ends = {(tp.topic, tp.partition): probe.get_watermark_offsets(tp, timeout=10)[1] for tp in parts}
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                try:
                    committed = probe.committed(parts, timeout=10)
                except KafkaException as exc:  # a just-started broker: "not coordinator" for a moment
                    if not exc.args[0].retriable():
                        raise
                    time.sleep(0.2)
                    continue
                if all(tp.offset >= ends[(tp.topic, tp.partition)] for tp in committed
                       if ends[(tp.topic, tp.partition)] > 0):
                    return time.monotonic()
                time.sleep(0.05)
        finally:
            probe.close()
        raise TimeoutError(f"not drained in {timeout_s}s")

    def batch_cost(self, n: int) -> float:
        return self.a + self.b * n


def saturated(a: float, b: float, max_batch: int, n: int) -> dict[str, float]:
    """Backlog of n requests, then render it all: busy fraction and throughput while the backlog lasts."""
    sc = Scenario(a, b, max_batch)
    sc.submit(n, "normal", "sat")
    sc.submitter.flush()
    sc.start()
    sc.wait_drained()
    sc.stop()
    starts = [t for t, _ in sc.batches]
    ends = [t + sc.batch_cost(len(p)) for t, p in sc.batches]
    span = max(ends) - min(starts)
    busy = sum(e - s for s, e in zip(starts, ends, strict=True))
    items = sum(len(p) for _, p in sc.batches)
    return {"busy_fraction": busy / span, "throughput": items / span, "items": items}


def high_behind_low(a: float, b: float, max_batch: int, backlog: int, highs: int) -> list[float]:
    sc = Scenario(a, b, max_batch)
    sc.submit(backlog, "low", "low")
    sc.submitter.flush()
    sc.start()
    while len(sc.batches) < 20:  # rendering of the low backlog is under way
        time.sleep(0.01)
    sent: dict[str, float] = {}
    for i in range(highs):
        sent.update(sc.submit(1, "high", f"high{i}"))
        sc.submitter._producer.flush(5)  # each high request leaves at once, as an interactive caller's would
        time.sleep(0.05)
    time.sleep(2 * sc.batch_cost(max_batch) + 0.5)
    sc.stop()
    started = {p: t for t, ps in sc.batches for p in ps if p.startswith("high")}
    missing = [p for p in sent if p not in started]
    if missing:
        raise RuntimeError(f"{len(missing)} high requests never rendered")
    return [started[p] - sent[p] for p in sent]


def low_share_under_high_load(a: float, b: float, max_batch: int, seconds: float, min_low: float) -> float:
    sc = Scenario(a, b, max_batch, min_share_low=min_low, min_share_normal=0.0)
    sc.submit(3000, "low", "low")
    sc.submitter.flush()
    capacity = max_batch / sc.batch_cost(max_batch)
    stop = threading.Event()

    def steady_high() -> None:  # 1.5x what the renderer can take: high alone would saturate it
        i, t0 = 0, time.monotonic()
        while not stop.is_set():
            sc.submit(1, "high", f"high{i}")
            i += 1
            time.sleep(max(0.0, t0 + i / (1.5 * capacity) - time.monotonic()))

    producer = threading.Thread(target=steady_high, daemon=True)
    producer.start()
    time.sleep(1.0)  # a high backlog builds up first
    sc.start()
    time.sleep(seconds)
    stop.set()
    producer.join()
    sc.stop()
    # steady state: skip the first second of rendering
    t0 = sc.batches[0][0] + 1.0
    counted = [p for t, ps in sc.batches if t >= t0 for p in ps]
    return sum(1 for p in counted if p.startswith("low")) / max(1, len(counted))


def null_throughput(n: int) -> float:
    sc = Scenario(0.0, 0.0, 16, max_wait_ms=5, buffer_per_priority=2048)
    sc.submit(n, "normal", "null")
    sc.submitter.flush()
    t0 = time.monotonic()
    sc.start()
    done = sc.wait_drained()
    sc.stop()
    return n / (done - t0)


def relay_footprint() -> tuple[float, float]:
    """`zimage processors` as a process: seconds until it serves, and its resident memory (MB) once serving."""
    settings = Settings(_env_file=None, topic_prefix=f"bench{uuid.uuid4().hex[:8]}",
                        bootstrap_servers=os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"))
    apply_topics(settings.kafka_config(), [TopicWanted(t.name, t.partitions, t.config)
                                           for t in settings.topology.topics()])
    env = {**os.environ, "ZIMAGE_TOPIC_PREFIX": settings.topic_prefix, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "streams.cli", "processors", "--no-restart"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if "publishing" in line:
                break
        serving = time.monotonic() - started
        time.sleep(3)  # subscribed and polling: what it holds while it works
        rss_kb = next(int(line.split()[1]) for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines()
                      if line.startswith("VmRSS:"))
    finally:
        proc.terminate()
        proc.wait(30)
        drop_topics(settings.kafka_config(), settings.topic_prefix)  # left behind, they slow every later figure
    return serving, rss_kb / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--a", type=float, default=0.02, help="fixed seconds per batch")
    ap.add_argument("--b", type=float, default=0.002, help="seconds per image in a batch")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--quick", action="store_true", help="smaller workloads (for a smoke run)")
    ap.add_argument("--warmup", type=int, default=3000, help="unmeasured requests through a worker first")
    args = ap.parse_args()
    a, b, batch = args.a, args.b, args.batch
    scale = 0.25 if args.quick else 1.0
    figures = []
    if args.warmup:
        saturated(0.0, 0.0, 16, args.warmup)

    def figure(name: str, value: float, goal: str, unit: str, ok: bool) -> None:
        figures.append({"name": name, "value": round(value, 4), "goal": goal, "unit": unit, "ok": ok})
        print(f"  {name:32} {value:12.3f} {unit:10} goal {goal:14} {'ok' if ok else 'MISSED'}", flush=True)

    print(f"cost model: a={a * 1000:.1f} ms + b={b * 1000:.1f} ms per image; max batch {batch}")
    big = saturated(a, b, batch, int(2400 * scale))
    figure("renderer_busy_fraction", big["busy_fraction"], ">= 0.98", "fraction", big["busy_fraction"] >= 0.98)
    single = saturated(a, b, 1, int(400 * scale))
    theory = batch * (a + b) / (a + b * batch)
    gain = big["throughput"] / single["throughput"]
    figure("batching_gain_fraction", gain / theory, ">= 0.95", "fraction", gain / theory >= 0.95)
    figure("batching_gain", gain, f"theory {theory:.2f}", "x", True)

    waits = high_behind_low(a, b, batch, 10_000, int(100 * scale) or 10)
    limit_ms = (a + b * batch) * 1000 + 100
    p50 = statistics.median(waits) * 1000
    p99 = sorted(waits)[max(0, int(len(waits) * 0.99) - 1)] * 1000
    figure("high_priority_wait_p50_ms", p50, f"<= {limit_ms:.0f}", "ms", p50 <= limit_ms)
    figure("high_priority_wait_p99_ms", p99, f"<= {limit_ms:.0f}", "ms", p99 <= limit_ms)

    min_low = 0.1
    share = low_share_under_high_load(a, b, batch, 10 * scale + 2, min_low)
    figure("low_priority_share", share, f">= {min_low}", "fraction", share >= min_low)

    rps = null_throughput(int(20_000 * scale))
    figure("null_renderer_throughput_rps", rps, ">= 2000", "req/s", rps >= 2000)

    start_s, rss_mb = relay_footprint()
    figure("relay_start_s", start_s, "< 2", "s", start_s < 2)
    figure("relay_rss_mb", rss_mb, "<= 200", "MB", rss_mb <= 200)

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                                   "cost_model": {"a_s": a, "b_s": b, "max_batch_size": batch},
                                   "cpu_count": os.cpu_count(), "figures": figures}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
