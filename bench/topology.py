"""The whole topology on the local stack: the gate, a worker with a null renderer, and publication.

    python -m bench.topology [--warmup 3000] [--light 200] [--burst 20000] [--bursts 3]     (part of `make bench`)

Before anything is measured, `--warmup` distinct requests go through the topology, unmeasured: a broker started
a minute ago still compiles its hot paths, and answered every hop about twice as slowly then.

Figures, each measured in this one run:
- the latency the topology adds at light load: ImageReady.published_at - submitted_at - render time;
- cache-hit end-to-end latency: the same requests again under new ids, answered by the gate from Redis;
- whole-topology capacity: a burst of distinct requests, from the first produce to the last ImageReady; the
  median of three bursts (the lowest and highest printed too). A burst is long (20,000 requests, about ten
  seconds) so that the figure is the sustained rate: the pipeline's fill (the gate's first batch of 500 before the
  worker has anything) and drain (publication's last batch) leave cores idle, and they weighed 5 to 8% of a
  burst of 5,000;
- the resident memory of the gate and publication processes after the burst.

The gate, the worker (with a renderer that takes no time: bench/null_worker.py) and publication each run in a
process of their own, as deployed.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from connectors.kafka_admin import TopicWanted, apply_topics
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.submit import build_request
from streams.tail import EventFollower

ROOT = Path(__file__).resolve().parent.parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (a supervisor runs the processor in a child)."""
    total = 0
    for p in [pid, *_children(pid)]:
        status = Path(f"/proc/{p}/status")
        if status.exists():
            total += next(int(line.split()[1]) for line in status.read_text().splitlines()
                          if line.startswith("VmRSS:"))
    return total / 1024


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        children = (task / "children")
        if children.exists():
            found += [int(c) for c in children.read_text().split()]
    return found


class Topology:
    def __init__(self, state: Path):
        prefix = f"bt{uuid.uuid4().hex[:8]}"
        self.env = {**os.environ, "ZIMAGE_TOPIC_PREFIX": prefix, "ZIMAGE_STATE_DIR": str(state),
                    "ZIMAGE_WORKER_ID": "bench", "ZIMAGE_MAX_BATCH_SIZE": "16", "ZIMAGE_MAX_WAIT_MS": "2",
                    "ZIMAGE_BUFFER_PER_PRIORITY": "4096", "PYTHONUNBUFFERED": "1"}
        self.settings = Settings(_env_file=None, topic_prefix=prefix, state_dir=str(state), worker_id="bench",
                                 bootstrap_servers=os.environ.get("ZIMAGE_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                                 max_batch_size=16, max_wait_ms=2, buffer_per_priority=4096)
        self.conf = self.settings.kafka_config()
        apply_topics(self.conf, [TopicWanted(t.name, t.partitions, t.config) for t in self.settings.topology.topics()])
        self.serde = AvroSerde()
        # Every processor in a process of its own, as deployed; the worker renders nothing (bench/null_worker.py).
        commands = {name: ["-m", "streams.cli", "processors", "--only", name, "--no-restart"]
                    for name in ("gate", "publication")}
        commands["worker"] = ["-m", "bench.null_worker"]
        self.procs = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=self.env,
                                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                      for name, args in commands.items()}
        try:
            self.producer = Producer({**self.conf, "linger.ms": 0, "enable.idempotence": True,
                                      "partitioner": "murmur2_random"})  # on each request's home partition
            self.follower = EventFollower(self.conf, {self.settings.topology.images_ready: "ImageReady"},
                                          self.serde, from_beginning=True)
        except BaseException:  # processes left running would poll on and skew every later figure
            self._stop_processes()
            raise

    def encoded(self, request: dict) -> tuple[bytes, bytes]:
        topic = self.settings.topology.request_topic("normal")
        return self.serde.encode("GenerationRequest", request, topic=topic), request["request_id"].encode()

    def submit(self, request: dict) -> None:
        self.send(*self.encoded(request))

    def send(self, value: bytes, key: bytes) -> None:
        self.producer.produce(self.settings.topology.request_topic("normal"), value, key)
        self.producer.poll(0)

    def warm_up(self, count: int) -> None:
        """`count` distinct requests through the topology, unmeasured, then a second of quiet."""
        tag = uuid.uuid4().hex[:6]
        warming = [self.encoded(request(f"warmup-{tag}", i)) for i in range(count)]
        for value, key in warming:
            self.send(value, key)
        self.producer.flush(60)
        self.wait_for_keys({key for _, key in warming})
        time.sleep(1.0)

    def wait_for_keys(self, keys: set[bytes], timeout_s: float = 600) -> None:
        """Until an ImageReady keyed by each of `keys` is committed. It reads keys only: decoding thousands of
        events would take the topology's cores for the benchmark's own work."""
        consumer = Consumer({**self.conf, "group.id": f"bench-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False,
                             "isolation.level": "read_committed", "auto.offset.reset": "earliest"})
        topic = self.settings.topology.images_ready
        partitions = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])  # no group to join
        left, deadline = set(keys), time.monotonic() + timeout_s
        try:
            while left and time.monotonic() < deadline:
                for msg in consumer.consume(1000, timeout=0.2):
                    if msg.error() is None:
                        left.discard(msg.key() or b"")
        finally:
            consumer.close()
        if left:
            raise TimeoutError(f"{len(left)} of {len(keys)} never published")

    def wait_for(self, ids: set[str], timeout_s: float = 300) -> dict[str, dict]:
        seen: dict[str, dict] = {}
        deadline = time.monotonic() + timeout_s
        while not ids <= seen.keys() and time.monotonic() < deadline:
            for _name, value, _raw in self.follower.events(idle_timeout_s=1.0):
                if value is not None and value["request_id"] in ids:
                    seen[value["request_id"]] = value
                if ids <= seen.keys():
                    break
        if not ids <= seen.keys():
            raise TimeoutError(f"{len(ids - seen.keys())} of {len(ids)} never published")
        return seen

    def close(self) -> None:
        self._stop_processes()
        self.follower.close()
        drop_topics(self.conf, self.settings.topic_prefix)

    def _stop_processes(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def drop_topics(conf: dict[str, str], *prefixes: str) -> None:
    """Deletes the topics of `prefixes` (a benchmark's own, a test session's): a broker left holding thousands of
    partitions from earlier runs is slower, and every figure measured on it with it. Never raises: no broker to
    ask leaves the topics where they are."""
    admin = AdminClient(dict(conf))
    # The webhook dispatcher's own topics (faust's changelog and assignor) are named `<prefix>-webhooks-...`.
    starts = tuple(f"{prefix}{separator}" for prefix in prefixes for separator in ".-")
    try:
        mine = [t for t in admin.list_topics(timeout=10).topics if t.startswith(starts)] if starts else []
    except KafkaException as exc:
        print(f"  (topics not deleted: {exc})", file=sys.stderr)
        return
    for at in range(0, len(mine), 200):  # in requests of a bounded size
        for future in admin.delete_topics(mine[at:at + 200], operation_timeout=60).values():
            try:
                future.result()
            except KafkaException as exc:  # already gone, or the broker is busy: the next purge takes it
                print(f"  (a topic was not deleted: {exc})", file=sys.stderr)


def request(tag: str, i: int, **fields) -> dict:
    return build_request({"prompt": f"{tag} {i}", "seed": i, "width": 16, "height": 16, "steps": 2,
                          "priority": "normal", "tenant": "bench", **fields})


def run(light: int, burst: int, warmup: int = 3000, bursts: int = 3) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as state:
        topo = Topology(Path(state))
        try:
            warm = request("warm", 0)
            topo.submit(warm)
            topo.wait_for({warm["request_id"]}, timeout_s=120)  # the pool announced, every process is up
            figures: dict[str, float] = {}

            topo.warm_up(warmup)
            tag = uuid.uuid4().hex[:6]
            light_requests = [request(f"light-{tag}", i) for i in range(light)]
            for r in light_requests:
                r["submitted_at"] = int(time.time() * 1000)
                topo.submit(r)
                time.sleep(0.02)  # light load: one request every 20 ms
            ready = topo.wait_for({r["request_id"] for r in light_requests})
            added = [max(0.0, v["timings"]["total"] - v["timings"].get("render", 0.0)) for v in ready.values()]
            figures["topology_added_latency_p50_ms"] = statistics.median(added)
            figures["topology_added_latency_p99_ms"] = percentile(added, 0.99)

            time.sleep(1.0)  # the cache is filled after each publication commits
            repeats = [{**r, "request_id": f"again-{r['request_id']}"} for r in light_requests]
            for r in repeats:
                r["submitted_at"] = int(time.time() * 1000)
                topo.submit(r)
                time.sleep(0.02)
            cached = topo.wait_for({r["request_id"] for r in repeats})
            hits = [v["timings"]["total"] for v in cached.values() if v["cached"]]
            figures["cache_hit_share"] = len(hits) / len(repeats)
            figures["cache_hit_latency_p50_ms"] = statistics.median(hits) if hits else float("nan")
            figures["cache_hit_latency_p99_ms"] = percentile(hits, 0.99) if hits else float("nan")

            # Encoded before the clock starts, and awaited by key: the figure is the topology's, not the load's.
            # Identical bursts on this machine gave rates 30% apart (every process's CPU per request moved
            # together): the figure is the median of `bursts`, and the lowest and highest are printed beside it.
            rates = []
            for b in range(bursts):
                burst_records = [topo.encoded(request(f"burst{b}-{tag}", i)) for i in range(burst)]
                started = time.monotonic()
                for value, key in burst_records:
                    topo.send(value, key)
                topo.producer.flush(60)
                topo.wait_for_keys({key for _, key in burst_records})
                rates.append(burst / (time.monotonic() - started))
            figures["topology_capacity_rps"] = statistics.median(rates)
            figures["topology_capacity_rps_lowest"] = min(rates)
            figures["topology_capacity_rps_highest"] = max(rates)
            figures["gate_rss_mb"] = rss_mb(topo.procs["gate"].pid)
            figures["publication_rss_mb"] = rss_mb(topo.procs["publication"].pid)
            return figures
        finally:
            topo.close()


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--warmup", type=int, default=3000, help="requests through the topology before measuring")
    ap.add_argument("--light", type=int, default=200)
    ap.add_argument("--burst", type=int, default=20000)
    ap.add_argument("--bursts", type=int, default=3, help="bursts measured; capacity is their median")
    args = ap.parse_args()
    for name, value in run(args.light, args.burst, args.warmup, args.bursts).items():
        print(f"  {name:34} {value:10.2f}")
