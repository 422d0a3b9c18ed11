"""`zimage processors`: the faust-streaming app downstream of the render workers.

Publication: ImageRendered (zimage.rendered) -> ImageReady (zimage.images.ready), once per request.
- processing_guarantee="exactly_once": the agent reads committed records only (an aborted worker transaction is
  never seen) and its sends, table updates and offsets commit in one transaction.
- A table of published request ids, backed by a changelog topic, turns a second ImageRendered for the same
  request (a re-submitted request, a replay) into a no-op: subscribers see one ImageReady per request id.
"""
from __future__ import annotations

import logging
import os
import time

import faust

from processors.events import dead_letter_headers, image_ready, request_failed
from schemas.serde import AvroSerde, InvalidRecord, UndecodableRecord, UnknownSchema
from streams.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings | None = None) -> faust.App:
    s = settings or Settings()
    topo = s.topology
    serde = AvroSerde(registry_url=s.schema_registry_url)
    app = faust.App(
        f"{s.topic_prefix}-processors",
        broker=",".join(f"kafka://{b.strip()}" for b in s.bootstrap_servers.split(",")),
        store="memory://",
        processing_guarantee="exactly_once",
        topic_partitions=s.output_partitions,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        broker_commit_every=100,
        broker_commit_interval=0.2,
        producer_linger_ms=5,
    )
    rendered = app.topic(topo.rendered, value_type=bytes, key_type=bytes, value_serializer="raw",
                         key_serializer="raw", partitions=s.output_partitions, internal=False)
    ready = app.topic(topo.images_ready, value_type=bytes, key_type=bytes, value_serializer="raw",
                      key_serializer="raw", partitions=s.output_partitions)
    failed = app.topic(topo.failed, value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")
    dlq = app.topic(topo.dlq, value_type=bytes, key_type=bytes, value_serializer="raw", key_serializer="raw")
    published = app.Table("published-requests", default=None, partitions=s.output_partitions,
                          key_type=bytes, value_type=int)

    @app.agent(rendered)
    async def publish(stream):  # noqa: ANN001 - faust's stream type
        async for event in stream.events():
            try:
                await _publish_one(event)
            except Exception:  # noqa: BLE001 - see _crash; cancellation (shutdown) passes through
                _crash(event)

    async def _publish_one(event) -> None:  # noqa: ANN001 - faust's event type
        source = (event.message.topic, event.message.partition, event.message.offset)
        try:
            value = serde.decode("ImageRendered", event.value, topic=topo.rendered)
            key = value["request_id"].encode()
            if published.get(key) is not None:
                log.info("request %s already published; skipping duplicate", value["request_id"])
                return
            ready_event = image_ready(value, int(time.time() * 1000))
            out = serde.encode("ImageReady", ready_event, topic=topo.images_ready)
        except (InvalidRecord, UndecodableRecord, UnknownSchema, ValueError, KeyError) as exc:
            # A broken record must not stop publication of the others: park it with its reason.
            log.error("unpublishable record at %s: %s", source, exc)
            ts = int(time.time() * 1000)
            reason = f"{type(exc).__name__}: {exc}"
            await failed.send(value=serde.encode("RequestFailed", request_failed(
                code="unpublishable", reason=reason, stage="processors:publication", source=source,
                now_ms=ts), topic=topo.failed))
            await dlq.send(key=event.key, value=event.value, headers=dead_letter_headers(
                code="unpublishable", reason=reason, stage="processors:publication", source=source, now_ms=ts))
            return
        await ready.send(key=key, value=out)
        published[key] = ready_event["published_at"]

    return app


def _crash(event) -> None:  # noqa: ANN001 - faust's event type
    """Anything but a bad record (a registry outage, a failed send) ends the process before faust acks the
    event: faust acks even when the agent raises, which would drop the request. The open transaction is
    aborted, the supervisor starts a new process, and the event is read again."""
    log.critical("publication failed at %s[%s]@%s; exiting so that it is retried",
                 event.message.topic, event.message.partition, event.message.offset, exc_info=True)
    logging.shutdown()
    os._exit(70)
