"""Producing requests from the event loop: an idempotent producer (acks=all) whose deliveries resolve futures.

The delivery reports arrive on the producer's poll thread. Each one is queued there, and the event loop is woken
once per batch of reports, not once per record: a wake-up is a system call on both sides.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time

from confluent_kafka import KafkaError, Message

from connectors import kafka


class NotDelivered(RuntimeError):
    """Kafka did not take the record in time: the request was not accepted (the caller may retry)."""


class AsyncRequestProducer:
    def __init__(self, kafka_conf: dict[str, str], delivery_timeout_s: float = 15.0):
        self._timeout_s = delivery_timeout_s
        self._producer = kafka.producer(kafka_conf, **{"acks": "all", "linger.ms": 2,
                                                       "delivery.timeout.ms": int(delivery_timeout_s * 1000)})
        self._stop = threading.Event()
        self._settled: collections.deque[tuple[asyncio.Future[None], KafkaError | None]] = collections.deque()
        self._wake_pending = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._serve, name="api-producer", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            if self._settled and not self._wake_pending and self._loop is not None:
                self._wake_pending = True
                try:
                    self._loop.call_soon_threadsafe(self._settle_queued)
                except RuntimeError:  # the loop closed: nobody waits any more
                    self._settled.clear()

    def _settle_queued(self) -> None:  # on the event loop
        self._wake_pending = False
        while self._settled:
            _settle(*self._settled.popleft())

    async def send(self, topic: str, value: bytes, key: bytes) -> None:
        """Returns once the broker acknowledged the record (every in-sync replica); raises NotDelivered."""
        loop = self._loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()

        def settle(err: KafkaError | None, _msg: Message) -> None:  # on the poll thread, inside poll()
            self._settled.append((future, err))

        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                self._producer.produce(topic, value, key, on_delivery=settle)
                break
            except BufferError:  # the local queue is full: the broker is slow or away
                if time.monotonic() > deadline:
                    raise NotDelivered("the producer's queue stayed full") from None
                await asyncio.sleep(0.02)
        try:
            await asyncio.wait_for(future, self._timeout_s + 5)
        except TimeoutError:
            raise NotDelivered("no acknowledgement from Kafka") from None

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(5)
        self._producer.flush(timeout_s)
        if self._settled and self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._settle_queued)  # reports that flush() served: their sends are done


def _settle(future: asyncio.Future[None], err: KafkaError | None) -> None:
    if future.done():
        return
    if err is None:
        future.set_result(None)
    else:
        future.set_exception(NotDelivered(str(err)))
