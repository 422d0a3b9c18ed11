"""The API's producer with an autospecced confluent-kafka Producer: delivery reports resolve the waiting sends, a
failed delivery is NotDelivered, and a poll's reports wake the event loop once."""
from __future__ import annotations

import asyncio
import threading
from typing import Any
from unittest import mock

import pytest
from confluent_kafka import KafkaError, Producer

from streams import api_producer
from streams.api_producer import AsyncRequestProducer, NotDelivered


class Reports:
    """What the autospecced producer was given; `release` makes its next poll() report those deliveries."""

    def __init__(self) -> None:
        self.callbacks: list[Any] = []
        self.release = threading.Event()
        self.errors: dict[bytes, KafkaError] = {}

    def produce(self, topic: str, value: bytes, key: bytes, on_delivery: Any) -> None:
        self.callbacks.append((key, on_delivery))

    def poll(self, timeout: float) -> int:
        if not self.release.wait(timeout):
            return 0
        self.release.clear()
        served, self.callbacks = self.callbacks, []
        for key, callback in served:
            callback(self.errors.get(key), None)
        return len(served)


def test_deliveries_resolve_their_sends_with_one_wake_up_per_poll() -> None:
    reports = Reports()
    client = mock.create_autospec(Producer, instance=True)
    client.produce.side_effect = reports.produce
    client.poll.side_effect = reports.poll
    reports.errors[b"r3"] = KafkaError(KafkaError._MSG_TIMED_OUT)
    with mock.patch.object(api_producer.kafka, "producer", return_value=client):
        producer = AsyncRequestProducer({"bootstrap.servers": "127.0.0.1:1"})

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()
        wakes = mock.patch.object(loop, "call_soon_threadsafe", wraps=loop.call_soon_threadsafe)
        with wakes as woken:
            sends = [asyncio.ensure_future(producer.send("t", b"v", f"r{i}".encode())) for i in (1, 2, 3)]
            while len(reports.callbacks) < 3:
                await asyncio.sleep(0)
            reports.release.set()
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
            assert woken.call_count == 1  # three reports, one wake-up of the loop
        return outcomes

    try:
        outcomes = asyncio.run(scenario())
    finally:
        producer.close(0)
    assert outcomes[:2] == [None, None]
    assert isinstance(outcomes[2], NotDelivered)
    assert [c.args[2] for c in client.produce.call_args_list] == [b"r1", b"r2", b"r3"]


def test_a_full_local_queue_is_retried_until_the_deadline() -> None:
    client = mock.create_autospec(Producer, instance=True)
    client.produce.side_effect = BufferError("queue full")
    client.poll.return_value = 0
    with mock.patch.object(api_producer.kafka, "producer", return_value=client):
        producer = AsyncRequestProducer({"bootstrap.servers": "127.0.0.1:1"}, delivery_timeout_s=0.1)
    try:
        with pytest.raises(NotDelivered, match="queue stayed full"):
            asyncio.run(producer.send("t", b"v", b"k"))
    finally:
        producer.close(0)
    assert client.produce.call_count > 1


def test_reports_that_close_flushes_still_resolve_their_sends() -> None:
    reports = Reports()
    client = mock.create_autospec(Producer, instance=True)
    client.produce.side_effect = reports.produce
    client.poll.side_effect = reports.poll  # never released: only flush() serves the reports

    def flush(timeout: float) -> int:
        served, reports.callbacks = reports.callbacks, []
        for _key, callback in served:
            callback(None, None)
        return 0

    client.flush.side_effect = flush
    with mock.patch.object(api_producer.kafka, "producer", return_value=client):
        producer = AsyncRequestProducer({"bootstrap.servers": "127.0.0.1:1"})

    async def scenario() -> None:
        send = asyncio.ensure_future(producer.send("t", b"v", b"late"))
        while not reports.callbacks:
            await asyncio.sleep(0)
        await asyncio.to_thread(producer.close, 1.0)  # shutting down with a send in flight
        await asyncio.wait_for(send, 1.0)  # acknowledged by the flush: not a timeout, not NotDelivered

    asyncio.run(scenario())


def test_the_outcome_feed_waits_out_a_registry_outage_rather_than_drop_an_outcome():
    from processors.events import request_failed
    from schemas.serde import AvroSerde, RegistryUnavailable
    from streams.api_outcomes import OutcomeFeed

    serde = AvroSerde()
    event = request_failed(code="blocked", reason="no", stage="gate", source=("t.requests.normal", 0, 1), now_ms=5,
                           request={"tenant": "acme", "request_id": "r1"}, retriable=False)
    value = serde.encode("RequestFailed", event)
    outage = {"left": 2}

    class RegistryDown(AvroSerde):
        def decode(self, *args, **kwargs):
            if outage["left"]:
                outage["left"] -= 1
                raise RegistryUnavailable("the registry does not answer")
            return super().decode(*args, **kwargs)

    async def store(_found):
        return None

    feed = OutcomeFeed({}, {"t.failed": "failed"}, RegistryDown(), replay_s=0.0, store_digests=store)
    decoded = feed._decode("t.failed", value)
    assert outage["left"] == 0 and decoded is not None
    assert decoded[0] == ("acme", "r1") and decoded[1]["reason_code"] == "blocked"
    assert feed._decode("t.failed", b"\x00garbage") is None  # the record's own fault: skipped


def test_a_registry_outage_while_encoding_a_submission_is_a_503_to_retry_and_runs_off_the_loop():

    from schemas.serde import AvroSerde, RegistryUnavailable
    from streams.api_service import ApiError, encoded_request
    from streams.submit import build_request

    threads: list[int] = []

    class Registry(AvroSerde):
        down = True

        def encode(self, *args, **kwargs):
            threads.append(threading.get_ident())
            if self.down:
                raise RegistryUnavailable("the registry does not answer")
            return super().encode(*args, **kwargs)

    serde, request = Registry(), build_request({"prompt": "a teapot", "tenant": "acme"})

    async def main() -> bytes:
        with pytest.raises(ApiError) as refused:
            await encoded_request(serde, request, "t.requests.normal", off_the_loop=True)
        assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "5"}
        serde.down = False
        return await encoded_request(serde, request, "t.requests.normal", off_the_loop=True)

    value = asyncio.run(main())
    assert AvroSerde().decode("GenerationRequest", value)["request_id"] == request["request_id"]
    assert threading.get_ident() not in threads  # encoded on a worker thread, not the event loop's
