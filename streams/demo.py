"""`zimage demo`: the whole pipeline on the local stack, as a user would run it.

Starts one render worker and the processors as child processes, submits the example requests across the three
priorities, follows image-ready events until every request has an outcome, prints a summary and saves the PNGs.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import click

from connectors.kafka_admin import TopicWanted, apply_topics, wait_for_broker
from connectors.storage import open_object_store
from schemas.serde import AvroSerde
from streams.settings import Settings
from streams.submit import Submitter, build_request, read_jsonl
from streams.tail import EventFollower

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _spawn(name: str, env: dict[str, str], log_dir: Path) -> subprocess.Popen:
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"demo-{name}.log").open("wb")
    return subprocess.Popen([sys.executable, "-m", "streams.cli", name], env=env, stdout=log,
                            stderr=subprocess.STDOUT)


def _stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()


def run_demo(s: Settings, examples: Path, out_dir: Path, timeout_s: float) -> int:
    conf = s.kafka_config()
    wait_for_broker(conf)
    apply_topics(conf, [TopicWanted(t.name, t.partitions, t.config) for t in s.topology.topics()])
    env = dict(os.environ)
    if "ZIMAGE_STORAGE_URL" not in env and s.s3_endpoint_url:
        env["ZIMAGE_STORAGE_URL"] = f"s3://{s.s3_bucket}/images"  # the local stack's S3 endpoint
    run_dir = Path(".stack/run")
    ready_file = run_dir / f"demo-worker-{uuid.uuid4().hex[:6]}.ready"
    env["ZIMAGE_HEALTH_FILE"] = str(ready_file)
    store = open_object_store(env.get("ZIMAGE_STORAGE_URL", s.storage_url), s.s3_endpoint_url)
    serde = AvroSerde(registry_url=s.schema_registry_url)

    click.echo(f"storage: {env.get('ZIMAGE_STORAGE_URL', s.storage_url)}   kafka: {s.bootstrap_servers}")
    procs = [_spawn("worker", env, Path(".stack/logs")), _spawn("processors", env, Path(".stack/logs"))]
    try:
        start = time.monotonic()
        while not ready_file.exists():
            if any(p.poll() is not None for p in procs):
                raise click.ClickException("a child process exited early; see .stack/logs/demo-*.log")
            if time.monotonic() - start > 180:
                raise click.ClickException("the worker did not become ready in 180s; see .stack/logs/demo-worker.log")
            time.sleep(0.2)
        click.echo(f"worker ready after {time.monotonic() - start:.1f}s (model loaded and warmed up)")

        run = uuid.uuid4().hex[:8]
        rows = list(read_jsonl(examples))
        requests = [build_request({**row, "request_id": f"demo-{run}-{n:02d}"}) for n, row in enumerate(rows, 1)]
        follower = EventFollower(conf, {s.topology.images_ready: "ImageReady", s.topology.failed: "RequestFailed"},
                                 serde)
        sub = Submitter(conf, s.topology, serde)
        sub.submit(requests)
        sub.flush()
        submitted = time.monotonic()
        click.echo(f"submitted {len(requests)} requests (run {run}); waiting for them ...")
        outcomes = _wait(follower, {r["request_id"]: r for r in requests}, submitted, timeout_s, procs)
        follower.close()
    finally:
        _stop(procs)
    return _summarise(requests, outcomes, store, out_dir)


def _wait(follower: EventFollower, wanted: dict[str, dict], t0: float, timeout_s: float,
          procs: list[subprocess.Popen]) -> dict[str, tuple[str, dict, float]]:
    """Outcomes of the wanted requests, printed as they arrive, until all are in, time is up or a child died."""
    outcomes: dict[str, tuple[str, dict, float]] = {}
    deadline = time.monotonic() + timeout_s
    while len(outcomes) < len(wanted) and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        for name, value, _raw in follower.events(idle_timeout_s=5.0):  # ends after 5 idle seconds
            if value is None:
                continue
            rid = value.get("request_id")
            if rid in wanted and rid not in outcomes:
                seconds = time.monotonic() - t0
                outcomes[rid] = (name, value, seconds)
                word = "ready " if name == "ImageReady" else "FAILED"
                click.echo(f"  [{len(outcomes):2}/{len(wanted)}] {word} {wanted[rid]['priority'].lower():6} {rid}  "
                           f"after {seconds:5.1f}s")
            if len(outcomes) == len(wanted) or time.monotonic() > deadline:
                break
    return outcomes


def _summarise(requests: list[dict], outcomes: dict, store, out_dir: Path) -> int:
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.png"):
        old.unlink()
    header = f"{'request':18} {'priority':8} {'status':8} {'seed':>6} {'latency':>8}  file"
    click.echo("\n" + header + "\n" + "-" * len(header))
    ok = 0
    for req in requests:
        rid = req["request_id"]
        name, value, seconds = outcomes.get(rid, ("missing", {}, 0.0))
        file = ""
        if name == "ImageReady":
            data = store.get(value["image_uri"])
            if data.startswith(PNG_MAGIC):
                path = out_dir / f"{rid}.png"
                path.write_bytes(data)
                file = str(path)
                ok += 1
        status = {"ImageReady": "ready", "RequestFailed": "failed"}.get(name, "missing")
        click.echo(f"{rid:18} {req['priority'].lower():8} {status:8} {value.get('seed', req.get('seed')) or '':>6} "
                   f"{seconds:7.1f}s  {file}")
    click.echo(f"\n{ok}/{len(requests)} requests rendered and published; PNGs in {out_dir}/")
    return 0 if ok == len(requests) else 1
