"""The `zimage` command: worker, processors, sku-connector, api, api-key, submit, tail, demo, topics, topology,
config."""
from __future__ import annotations

import faulthandler
import json
import logging
import signal
import sys
from pathlib import Path

import click

from streams.settings import InvalidSettings, Settings, load_settings
from streams.supervise import CONFIG_ERROR, supervise, supervise_all

PROCESSORS = ("gate", "publication", "status", "webhooks")
RESTART = click.option("--restart/--no-restart", default=True, show_default=True,
                       help="Start a new process when this one crashes (configuration errors are not retried).")


def one_line(message: str) -> str:
    """`head:\n  - a\n  - b` -> `head: a; b`: a start-up error is one line in any log."""
    lines = [line.strip().removeprefix("- ") for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].endswith(":"):
        return f"{lines[0]} {'; '.join(lines[1:])}"
    return "; ".join(lines)


class ConfigError(click.ClickException):
    """A configuration the process can never start with: one line on stderr, exit EX_CONFIG (never restarted)."""

    exit_code = CONFIG_ERROR

    def show(self, file: object = None) -> None:
        click.echo(f"zimage: {one_line(self.format_message())}", err=True)


def _settings() -> Settings:
    """The checked settings; any bad value ends the command here, before a client, a child or a model exists."""
    try:
        return load_settings()
    except InvalidSettings as exc:
        raise ConfigError(f"invalid configuration: {exc}") from None


def _supervised(command: str, restart: bool) -> None:
    """Runs `zimage <command>` in a child process that is restarted when it crashes."""
    if restart:
        sys.exit(supervise([sys.executable, "-m", "streams.cli", *command.split(), "--no-restart"], command))


def _logging(level: str) -> None:
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <pid>` prints every thread's stack: a hang explains itself
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """zimage-stream: a Kafka-native pipeline for the Z-Image diffusion models.

    Every setting comes from ZIMAGE_* environment variables (`zimage config` shows them).
    """


@main.command()
def config() -> None:
    """Print the settings in force, secrets masked."""
    for key, value in _settings().masked().items():
        click.echo(f"{key} = {json.dumps(value) if isinstance(value, (dict, list)) else value}")


@main.command()
def topology() -> None:
    """Print every topic with its partitions, payload, writers and readers."""
    click.echo(_settings().topology.describe())


@main.group()
def topics() -> None:
    """Create or check the declared topics."""


@topics.command("apply")
@click.option("--check", is_flag=True, help="Report drift only; change nothing (exit 1 on drift).")
@click.option("--replication-factor", type=click.IntRange(min=1), default=None,
              help="Replicas of created topics. Default: ZIMAGE_REPLICATION_FACTOR, else min(3, live brokers).")
@click.option("--min-insync-replicas", type=click.IntRange(min=1), default=None,
              help="min.insync.replicas of every topic. Default: ZIMAGE_MIN_INSYNC_REPLICAS, else 2 where the "
                   "replication factor is 3 or more, else 1.")
def topics_apply(check: bool, replication_factor: int | None, min_insync_replicas: int | None) -> None:
    """Create missing topics and fix partition counts and configs (idempotent).

    Replication of existing topics is checked, not changed: a topic with fewer replicas than wanted is drift.
    """
    from connectors.kafka_admin import (
        InvalidReplication,
        TopicWanted,
        apply_topics,
        wait_for_broker,
    )

    s = _settings()
    rf = replication_factor or s.replication_factor
    isr = min_insync_replicas or s.min_insync_replicas
    try:
        wait_for_broker(s.kafka_config())
        report = apply_topics(s.kafka_config(), [TopicWanted(t.name, t.partitions, t.config)
                                                 for t in s.topology.topics()], fix=not check,
                              replication_factor=rf, min_insync_replicas=isr)
    except InvalidReplication as exc:
        raise ConfigError(str(exc)) from None
    except RuntimeError as exc:  # the broker did not answer
        raise click.ClickException(str(exc)) from None
    for word, names in (("created", report.created), ("updated", report.updated),
                        ("unchanged", report.unchanged), ("drift", report.drift)):
        for name in names:
            click.echo(f"{word:9} {name}")
    if check and report.drift:
        sys.exit(1)


@main.command()
@RESTART
def worker(restart: bool) -> None:
    """Run a render worker of pool ZIMAGE_POOL until SIGTERM/SIGINT."""
    s = _settings()
    _supervised("worker", restart)
    from processors.renderer import InvalidModelOptions  # after the checks: these import torch
    from streams.runtime import build_worker, model_options

    try:
        model_options(s).validate()  # the last check, before the metrics port, the model or any client
    except InvalidModelOptions as exc:
        raise ConfigError(str(exc)) from exc
    _logging(s.log_level)
    logging.getLogger(__name__).info("settings: %s", json.dumps(s.masked(), default=str))
    w = build_worker(s)
    signal.signal(signal.SIGTERM, lambda *_: w.stop())
    signal.signal(signal.SIGINT, lambda *_: w.stop())
    w.run()


@main.command()
@RESTART
@click.option("--only", type=click.Choice(PROCESSORS), default=None,
              help="Run one processor only (to scale it by partitions, or to debug it).")
@click.option("--metrics-port-offset", type=int, default=0, hidden=True,
              help="Serve metrics on ZIMAGE_METRICS_PORT plus this (each processor of `processors` has its own).")
def processors(restart: bool, only: str | None, metrics_port_offset: int) -> None:
    """Run the stream processors until SIGTERM/SIGINT, each in its own process: the gate, publication, the status
    view, and the webhooks when ZIMAGE_WEBHOOK_SECRET is set. With ZIMAGE_METRICS_PORT=P, the processors serve
    their metrics on P+1, P+2, ... in that order (`--only NAME` serves on P)."""
    s = _settings()
    if only is None:
        names = [n for n in PROCESSORS if n != "webhooks" or s.webhook_secret is not None]
        sys.exit(supervise_all({name: [sys.executable, "-m", "streams.cli", "processors", "--only", name,
                                       "--metrics-port-offset", str(PROCESSORS.index(name) + 1), "--no-restart"]
                                for name in names}, restart=restart))
    if only == "webhooks" and s.webhook_secret is None:
        raise ConfigError("ZIMAGE_WEBHOOK_SECRET is not set: webhooks are signed with it")
    _supervised(f"processors --only {only} --metrics-port-offset {metrics_port_offset}", restart)
    _logging(s.log_level)
    from streams import metrics
    from streams.processes import build_processor

    metrics.serve(s.metrics_port + metrics_port_offset if s.metrics_port else 0)
    runner = build_processor(only, s)
    signal.signal(signal.SIGTERM, lambda *_: runner.stop())
    signal.signal(signal.SIGINT, lambda *_: runner.stop())
    runner.run()


@main.command("sku-connector")
@RESTART
def sku_connector(restart: bool) -> None:
    """Turn SkuChanged events (the sku.changes topic) into the GenerationRequests of each SKU, one per view of its
    template (ZIMAGE_SKU_TEMPLATES), until SIGTERM/SIGINT. Metrics on ZIMAGE_METRICS_PORT."""
    s = _settings()
    if s.sku_template_set is None:
        raise ConfigError("ZIMAGE_SKU_TEMPLATES is not set: the connector renders SKUs with its templates "
                          "(see examples/sku-templates.toml)")
    _supervised("sku-connector", restart)
    _logging(s.log_level)
    from schemas.serde import AvroSerde
    from streams import metrics
    from streams.sku_connector import SkuConnector

    metrics.serve(s.metrics_port)
    connector = SkuConnector(s, AvroSerde(registry_url=s.schema_registry_url), s.sku_template_set)
    signal.signal(signal.SIGTERM, lambda *_: connector.stop())
    signal.signal(signal.SIGINT, lambda *_: connector.stop())
    connector.run()


@main.command()
@click.argument("prompts", nargs=-1)
@click.option("--file", "jsonl", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JSON lines, one request per line (fields of GenerationRequest; missing ones take defaults).")
@click.option("--priority", type=click.Choice(["high", "normal", "low"]), default=None,
              help="Priority of every request (overrides the file).")
@click.option("--model", default=None)
@click.option("--width", type=int, default=None)
@click.option("--height", type=int, default=None)
@click.option("--steps", type=int, default=None)
@click.option("--guidance", type=float, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--tenant", default=None)
def submit(prompts: tuple[str, ...], jsonl: Path | None, priority: str | None, **fields) -> None:
    """Submit requests: PROMPTS as arguments, or a JSONL file. Prints one request id per line."""
    from schemas.serde import AvroSerde, SerdeError
    from streams.submit import Submitter, build_request, read_jsonl

    if not prompts and jsonl is None:
        raise click.UsageError("give prompts or --file")
    s = _settings()
    rows = [{"prompt": p} for p in prompts] + (list(read_jsonl(jsonl)) if jsonl else [])
    overrides = {k: v for k, v in {**fields, "priority": priority}.items() if v is not None}
    serde, requests = AvroSerde(), []
    for n, row in enumerate(rows, 1):  # every request checked before any is sent: a bad line sends nothing
        try:
            requests.append(build_request({**row, **overrides} if isinstance(row, dict) else row))
            serde.encode("GenerationRequest", requests[-1])
        except (ValueError, SerdeError) as exc:
            raise ConfigError(f"request {n}: {exc}") from exc
    sub = Submitter(s.kafka_config(), s.topology, AvroSerde(registry_url=s.schema_registry_url))
    for req in sub.submit(requests):
        click.echo(f"{req['request_id']}\t{req['priority'].lower()}")
    sub.flush()


@main.command()
@click.option("--from-beginning", is_flag=True, help="Start with the oldest retained event.")
@click.option("--failed/--no-failed", default=True, help="Also show RequestFailed events.")
@click.option("--timeout", type=float, default=None, help="Stop after this many seconds without an event.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
def tail(from_beginning: bool, failed: bool, timeout: float | None, as_json: bool) -> None:
    """Follow image-ready (and failed) events."""
    from schemas.serde import AvroSerde
    from streams.tail import EventFollower

    s = _settings()
    topics = {s.topology.images_ready: "ImageReady"}
    if failed:
        topics[s.topology.failed] = "RequestFailed"
    follower = EventFollower(s.kafka_config(), topics, AvroSerde(registry_url=s.schema_registry_url),
                             from_beginning=from_beginning)
    for name, value, raw in follower.events(timeout):
        if as_json:
            click.echo(json.dumps({"type": name, "value": value}, default=str))
        elif value is None:
            click.echo(f"{name:13} <undecodable {len(raw)} bytes>")
        elif name == "ImageReady":
            click.echo(f"ready   {value['request_id']}  {value['image_uri']}  {value['width']}x{value['height']}"
                       f"  seed={value['seed']}  total={value['timings'].get('total', 0):.0f}ms")
        else:
            click.echo(f"failed  {value['request_id']}  {value['reason_code']}: {value['reason']}")


@main.command()
@click.argument("request_id")
@click.option("--tenant", default="default", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="The status as one JSON object.")
def status(request_id: str, tenant: str, as_json: bool) -> None:
    """Show the latest status of a request (from the status view that `zimage processors` keeps in Redis)."""
    from connectors.redis_store import RedisStore
    from streams.status_view import status_entry_key

    s = _settings()
    found = RedisStore(s.redis_url).get_many([status_entry_key(s.topic_prefix, tenant, request_id)])
    if found is None:
        raise click.ClickException(f"Redis at {s.masked()['redis_url']} does not answer; the statuses are on the "
                                   f"topic {s.topology.status}")
    if not found[0]:
        raise click.ClickException(f"no status for request {request_id!r} of tenant {tenant!r}")
    value = json.loads(found[0])
    if as_json:
        click.echo(json.dumps(value))
        return
    final = " (final)" if value["final"] else ""
    detail = f"  {value['detail']}" if value.get("detail") else ""
    click.echo(f"{value['request_id']}  {value['status']}{final}  at {value['stage']}{detail}")


@main.group()
def review() -> None:
    """Images held for review: list them, approve (publish) or reject (fail) them."""


@review.command("list")
def review_list() -> None:
    """Print every image waiting for a decision, oldest first."""
    from schemas.serde import AvroSerde
    from streams.review import ReviewDesk

    s = _settings()
    for item in ReviewDesk(s, AvroSerde(registry_url=s.schema_registry_url)).waiting():
        r = item.rendered
        quality = ", ".join(f"{k}={v:.1f}" for k, v in sorted(r.get("quality", {}).items()))
        click.echo(f"{r['tenant']}\t{r['request_id']}\t{r['images'][0]['uri']}\t{quality}")


def _decide(decision: str, request_id: str, tenant: str, reviewer: str | None, reason: str | None) -> None:
    from schemas.serde import AvroSerde
    from streams.review import ReviewDesk

    s = _settings()
    try:
        ReviewDesk(s, AvroSerde(registry_url=s.schema_registry_url)).decide(tenant, request_id, decision, reviewer,
                                                                            reason)
    except LookupError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"{decision}d {request_id}")


@review.command("approve")
@click.argument("request_id")
@click.option("--tenant", default="default", show_default=True)
@click.option("--reviewer", default=None)
@click.option("--reason", default=None)
def review_approve(request_id: str, tenant: str, reviewer: str | None, reason: str | None) -> None:
    """Publish an image held for review."""
    _decide("approve", request_id, tenant, reviewer, reason)


@review.command("reject")
@click.argument("request_id")
@click.option("--tenant", default="default", show_default=True)
@click.option("--reviewer", default=None)
@click.option("--reason", default=None)
def review_reject(request_id: str, tenant: str, reviewer: str | None, reason: str | None) -> None:
    """Fail a request held for review: RequestFailed(rejected)."""
    _decide("reject", request_id, tenant, reviewer, reason)


@main.command()
@RESTART
def api(restart: bool) -> None:
    """Run the HTTP API on ZIMAGE_API_HOST:ZIMAGE_API_PORT until SIGTERM/SIGINT (OpenAPI at /docs)."""
    s = _settings()
    if s.api_key_secret is None:
        raise ConfigError("ZIMAGE_API_KEY_SECRET is not set: API keys are checked against keyed hashes")
    _supervised("api", restart)
    _logging(s.log_level)
    from streams import metrics
    from streams.api import run_api

    metrics.serve(s.metrics_port)
    run_api(s)


@main.group("api-key")
def api_key() -> None:
    """API keys of the HTTP API: only their keyed hashes are stored (ZIMAGE_API_KEYS_FILE)."""


@api_key.command("create")
@click.option("--tenant", required=True, help="The tenant every call with this key acts as.")
@click.option("--label", default=None, help="A note stored beside the hash (who holds the key).")
def api_key_create(tenant: str, label: str | None) -> None:
    """Create a key for TENANT and print it once; it cannot be shown again."""
    from connectors.api_keys import append_key
    from processors.api_rules import hash_api_key, new_api_key
    from processors.requests import identity_of

    s = _settings()
    if s.api_key_secret is None:
        raise ConfigError("ZIMAGE_API_KEY_SECRET is not set: API keys are stored as hashes keyed with it")
    if identity_of({"tenant": tenant}, s.limits())["tenant"] is None:
        raise click.BadParameter(f"not blank, printable, at most {s.max_tenant_chars} characters",
                                 param_hint="--tenant")
    key = new_api_key()
    append_key(Path(s.api_keys_file), hash_api_key(s.api_key_secret.get_secret_value().encode(), key), tenant, label)
    click.echo(key)


@main.command()
@click.option("--examples", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=Path("examples/requests.jsonl"), show_default=True)
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("out"),
              show_default=True)
@click.option("--timeout", type=float, default=300.0, show_default=True)
def demo(examples: Path, out_dir: Path, timeout: float) -> None:
    """Start a worker and the processors, submit the example requests, wait, summarise, save the PNGs."""
    from streams.demo import run_demo

    sys.exit(run_demo(_settings(), examples, out_dir, timeout))


def _register_commands() -> None:
    from streams.cli_replay import replay

    main.add_command(replay)


_register_commands()

if __name__ == "__main__":
    main()
