"""`zimage processors --only webhooks`: POSTs each ImageReady and RequestFailed that carries a callback_url, signed,
until one attempt succeeds or about two hours have passed.

A faust-streaming app. Two agents read `<prefix>.images.ready` and `<prefix>.requests.failed` (committed records
only, see ReadCommittedTransport) and put each delivery into `pending`, a changelog-backed Table keyed by the
delivery's idempotency key; their offsets commit only after that changelog write is flushed (faust flushes its
producer before every commit). A dispatcher task takes the due entries of the partitions this worker owns and
attempts them concurrently, so a slow or failing receiver delays no other delivery. A failed attempt moves the
entry's due time (processors.webhook_delivery.RetryPolicy); success, a refused destination, a final refusal by
the receiver or giving up mark it done, and done marks are removed after `done_retention_s`. Every attempt's
outcome is a WebhookDelivery event on `<prefix>.webhooks.deliveries`.

Delivery is at least once: a crash after a successful POST and before its done mark is written repeats the POST,
with the same Idempotency-Key. Before each attempt the host is resolved again and every address checked
(processors.address_guard), and the connection goes to a checked address (connectors.http.post_pinned).
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import ssl
import time
from collections.abc import AsyncIterable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

import aiohttp
import faust
from faust.transport.drivers import aiokafka as aiokafka_driver

from connectors.http import post_pinned, resolve_addresses
from processors.address_guard import UnsafeCallbackUrl, check_resolved, check_url_at_intake, literal_address
from processors.webhook_delivery import (
    AttemptResult,
    Delivery,
    EventType,
    RetryPolicy,
    decide,
    delivery_for,
    outcome_event,
    short_error,
    signed_headers,
)
from schemas.serde import AvroSerde, RegistryUnavailable, SerdeError
from streams.liveness import Heartbeat
from streams.setting_values import webhook_security
from streams.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"http": 80, "https": 443}


def _now_ms() -> int:
    return int(time.time() * 1000)


# --- committed records only -----------------------------------------------------------------------------------
# faust-streaming reads read_committed only in processing_guarantee="exactly_once", which also moves every send and
# commit into per-partition transactions (publication.py explains why the pipeline does not use that mode). These
# three classes keep the at-least-once machinery and change only the consumer's isolation level.

class ReadCommittedConsumerThread(aiokafka_driver.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        # aiokafka reads this attribute when start() builds its fetcher; the constructor argument faust passes
        # is fixed to read_uncommitted outside exactly_once.
        consumer._isolation_level = "read_committed"
        return consumer


class ReadCommittedConsumer(aiokafka_driver.Consumer):
    def _new_consumer_thread(self) -> aiokafka_driver.AIOKafkaConsumerThread:
        return ReadCommittedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class ReadCommittedTransport(aiokafka_driver.Transport):
    Consumer = ReadCommittedConsumer


class WebhooksApp(faust.App):
    def _new_transport(self) -> Any:
        return ReadCommittedTransport(self.conf.broker_consumer, self)


# --- the dispatcher --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class WebhookOptions:
    secret: str
    allowlist: tuple[str, ...] = ()
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    tick_s: float = 1.0  # how often due retries are looked for; a new delivery wakes the dispatcher at once
    timeout_s: float = 10.0  # one attempt, connection to last byte of the status line
    max_in_flight: int = 64
    # How long a finished delivery is remembered: a source record read again after a crash (its offset not yet
    # committed) finds the mark and is not delivered a second time. Minutes cover any commit interval.
    done_retention_s: float = 600.0


async def checked_addresses(url: str, allowlist: tuple[str, ...]) -> tuple[str, ...]:
    """Resolves the URL's host now and returns the addresses the guard accepts. Raises UnsafeCallbackUrl, or
    OSError when the name does not resolve. A URL refused on its face is refused before any DNS query."""
    check_url_at_intake(url, allowlist)
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".")
    port = parts.port or DEFAULT_PORTS[parts.scheme]
    resolved = [] if literal_address(host) is not None else await resolve_addresses(host, port)
    return check_resolved(url, lambda _host, _port: list(resolved), allowlist)


class WebhookDispatcher:
    """The faust app with its agents, table and timer; `run()` runs it under faust's Worker."""

    def __init__(self, settings: Settings, options: WebhookOptions, serde: AvroSerde | None = None):
        self.options = options
        self.topology = settings.topology
        self.serde = serde or AvroSerde(settings.schema_registry_url)
        self.heartbeat = Heartbeat(settings.health_file, settings.worker_id)
        servers = settings.kafka_config()["bootstrap.servers"]
        partitions = self.topology.output_partitions
        self.app = WebhooksApp(
            f"{settings.topic_prefix}-webhooks",
            broker=";".join(f"kafka://{server.strip()}" for server in servers.split(",") if server.strip()),
            datadir=str(Path(settings.state_dir) / "webhooks"),
            store="memory://",
            web_enabled=False,
            topic_partitions=partitions,
            topic_replication_factor=settings.replication_factor or 1,
            consumer_auto_offset_reset="earliest",  # a first start delivers what was published before it
            producer_acks=-1,
            # a killed worker's partitions move after 10 s instead of faust's 60 s: its retries wait meanwhile
            broker_session_timeout=10.0,
            broker_credentials=broker_credentials(webhook_security(settings.kafka_extra)),
        )
        # keys and values travel as JSON (faust's default for a table without types)
        self.pending = self.app.Table("pending", default=None, partitions=partitions)
        self.outcomes = self.app.topic(self.topology.webhook_deliveries, key_serializer="raw",
                                       value_serializer="raw")
        self._wake = asyncio.Event()
        self._in_flight: set[str] = set()
        self._unusable: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._agent(self.topology.images_ready, "ImageReady", "image.ready")
        self._agent(self.topology.failed, "RequestFailed", "request.failed")
        self.app.task(self._dispatch_forever)

    def run(self) -> None:
        """Runs until SIGTERM/SIGINT; faust's Worker ends the process with SystemExit when it stops."""
        Path(self.app.conf.datadir).mkdir(parents=True, exist_ok=True)
        faust.Worker(self.app, loglevel=logging.getLogger().getEffectiveLevel(), override_logging=False,
                     redirect_stdouts=False).execute_from_commandline()

    # --- agents: event -> pending entry ---

    def _agent(self, topic_name: str, record_name: str, event_type: EventType) -> None:
        topic = self.app.topic(topic_name, key_serializer="raw", value_serializer="raw")

        async def schedule_deliveries(stream: AsyncIterable[Any]) -> None:
            async for event in cast(Any, stream).events():
                await scheduled(functools.partial(self._schedule, event, record_name, event_type),
                                f"{event.message.topic}[{event.message.partition}]@{event.message.offset}")

        schedule_deliveries.__name__ = schedule_deliveries.__qualname__ = f"schedule_{record_name}"
        self.app.agent(topic, name=f"webhooks-{record_name}")(schedule_deliveries)

    def _schedule(self, event: Any, record_name: str, event_type: EventType) -> None:
        message = event.message
        try:
            record = self.serde.decode(record_name, event.value, topic=message.topic)
        except SerdeError as exc:
            log.warning("webhooks: skipping undecodable %s at %s[%d]@%d: %s", record_name, message.topic,
                        message.partition, message.offset, short_error(str(exc)))
            return
        delivery = delivery_for(event_type, record)
        # no callback, or a record read again after a crash: its delivery is pending or done already
        if delivery is None or delivery.delivery_id in self.pending:
            return
        self.pending[delivery.delivery_id] = {
            "request_id": delivery.request_id, "tenant": delivery.tenant, "event_type": delivery.event_type,
            "url": delivery.url, "body": delivery.body.decode(), "partition": message.partition,
            "attempts": 0, "first_ms": None, "due_ms": _now_ms()}
        self._wake.set()

    # --- dispatcher: due entries -> attempts ---

    async def _dispatch_forever(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.options.tick_s)
            self._wake.clear()
            try:
                self._dispatch_due()
            except Exception:  # the loop must outlive any one bad entry
                log.exception("webhooks: dispatch round failed")

    def _dispatch_due(self) -> None:
        self.heartbeat.beat("dispatch")
        recovery = cast(Any, self.app.tables).recovery
        if recovery.in_recovery:  # entries of a partition being restored may still be missing their removal
            return
        changelog = self.pending.changelog_topic.get_topic_name()
        owned = {tp.partition for tp in recovery.active_tps if tp.topic == changelog}
        now = _now_ms()
        for key, entry in list(self.pending.data.items()):
            if len(self._in_flight) >= self.options.max_in_flight:
                break
            if not usable_entry(entry):  # written by hand or by another program: never sent, never in the way
                if key not in self._unusable:
                    self._unusable.add(key)
                    log.error("webhooks: ignoring the unusable pending entry %r: %r", key, entry)
                continue
            if key in self._in_flight or entry["partition"] not in owned:
                continue
            if "done_ms" in entry:
                if now - entry["done_ms"] > self.options.done_retention_s * 1000:
                    self._forget(key, entry["partition"])
                continue
            if entry["due_ms"] > now:
                continue
            self._in_flight.add(key)
            self._spawn(self._attempt(key, entry))

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _attempt(self, key: str, entry: dict[str, Any]) -> None:
        delivery = Delivery(delivery_id=key, request_id=entry["request_id"], tenant=entry["tenant"],
                            event_type=entry["event_type"], url=entry["url"], body=entry["body"].encode())
        attempt = entry["attempts"] + 1
        first_ms = entry["first_ms"] or _now_ms()
        try:
            try:
                result = await self._try_once(delivery)
            except Exception as exc:  # an unexpected error is one failed attempt, never a lost delivery
                log.exception("webhooks: attempt %d of %s failed unexpectedly", attempt, key)
                result = AttemptResult(error=short_error(exc))
            now = _now_ms()
            outcome, due_ms = decide(result, self.options.policy, attempt, first_ms, now)
            if due_ms is not None:
                self._store(key, {**entry, "attempts": attempt, "first_ms": first_ms, "due_ms": due_ms})
            else:
                self._store(key, {"partition": entry["partition"], "done_ms": now, "outcome": outcome})
            record = outcome_event(delivery, attempt=attempt, outcome=outcome, result=result, now_ms=now)
            level = logging.INFO if outcome in ("delivered", "retrying") else logging.WARNING
            log.log(level, "webhooks: %s %s attempt %d -> %s (status %s, %s)", delivery.event_type, key, attempt,
                    outcome, result.http_status, result.error or "no error")
            await self.outcomes.send(key=key.encode(), value=self.serde.encode("WebhookDelivery", record,
                                                                                 topic=self.topology.webhook_deliveries))
        except Exception:
            log.exception("webhooks: could not record attempt %d of %s", attempt, key)
        finally:
            self._in_flight.discard(key)

    async def _try_once(self, delivery: Delivery) -> AttemptResult:
        try:
            addresses = await checked_addresses(delivery.url, self.options.allowlist)
        except UnsafeCallbackUrl as exc:
            return AttemptResult(error=short_error(str(exc)), refused=True)
        except OSError as exc:  # DNS failures are often transient: retried like a failed connection
            return AttemptResult(error=short_error(exc))
        headers = signed_headers(self.options.secret, delivery, time.time())
        try:
            status = await post_pinned(delivery.url, addresses, delivery.body, headers,
                                       timeout_s=self.options.timeout_s)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return AttemptResult(error=short_error(exc))
        return AttemptResult(http_status=status)

    # Changes made outside an agent: faust's Table writes its changelog to the current event's partition, and a
    # timer has no event, so the partition the entry was scheduled under is given explicitly.

    def _store(self, key: str, entry: dict[str, Any]) -> None:
        self.pending.data[key] = entry
        self.pending.send_changelog(entry["partition"], key, entry)

    def _forget(self, key: str, partition: int) -> None:
        self.pending.data.pop(key, None)
        self.pending.send_changelog(partition, key, None, value_serializer="raw")


async def scheduled(schedule: Callable[[], None], where: str, first_delay_s: float = 0.5,
                    max_delay_s: float = 30.0) -> None:
    """Runs `schedule` for one record. A Schema Registry outage is waited out (backoff; the agent's stream waits
    with it), since moving past the record would lose its delivery; any other error is that record's alone:
    logged, and the agent goes on."""
    delay = first_delay_s
    while True:
        try:
            schedule()
            return
        except RegistryUnavailable as exc:
            log.warning("webhooks: the Schema Registry does not answer (%s); %s waits %.1fs", exc, where, delay)
            await asyncio.sleep(delay)
            delay = min(2 * delay, max_delay_s)
        except Exception:  # one record must not stop the agent: log it and go on
            log.exception("webhooks: could not schedule the delivery for %s", where)
            return


def broker_credentials(security: dict[str, str]) -> Any:
    """faust's credentials for the security settings of ZIMAGE_KAFKA_EXTRA (streams.setting_values
    .webhook_security): the other processors pass them to librdkafka, this app to aiokafka. None: plaintext."""
    protocol = security["protocol"]
    context = None
    if protocol in ("SSL", "SASL_SSL"):
        context = ssl.create_default_context(cafile=security.get("ca"))
        if "certificate" in security:
            context.load_cert_chain(security["certificate"], security.get("key"), security.get("key_password"))
    if protocol == "SSL":
        return faust.SSLCredentials(context)
    if protocol.startswith("SASL"):
        return faust.SASLCredentials(username=security.get("username"), password=security.get("password"),
                                     ssl_context=context, mechanism=security["mechanism"])
    return None


def usable_entry(entry: Any) -> bool:
    """A pending entry as `_schedule` and `_attempt` write it: the dispatcher reads nothing else."""
    if not isinstance(entry, dict) or not _is_int(entry.get("partition")):
        return False
    if "done_ms" in entry:
        return _is_int(entry["done_ms"])
    texts = ("request_id", "tenant", "event_type", "url", "body")
    return (all(isinstance(entry.get(name), str) for name in texts) and _is_int(entry.get("attempts"))
            and _is_int(entry.get("due_ms")) and (entry.get("first_ms") is None or _is_int(entry.get("first_ms"))))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def run_webhooks(settings: Settings, *, secret: str, allowlist: tuple[str, ...], policy: RetryPolicy | None = None,
                 tick_s: float = 1.0, timeout_s: float = 10.0, max_in_flight: int = 64) -> None:
    """The webhooks process: runs until SIGTERM/SIGINT."""
    if not secret:
        raise ValueError("webhooks need a signing secret")
    options = WebhookOptions(secret=secret, allowlist=tuple(allowlist), policy=policy or RetryPolicy(),
                             tick_s=tick_s, timeout_s=timeout_s, max_in_flight=max_in_flight)
    WebhookDispatcher(settings, options).run()
