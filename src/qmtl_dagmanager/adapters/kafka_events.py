"""The ControlBus transport on Kafka: an idempotent producer (acks from all replicas) that
awaits each delivery, and a small reader used by tests and operators to read events back."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

import orjson
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.ports import Published

log = logging.getLogger(__name__)
MAX_EVENT_BYTES = 64 * 1024 * 1024  # uncompressed; the broker limits the compressed batch


class KafkaEventBus:
    def __init__(
        self, bootstrap: str, *, timeout: float = 10.0, extra: Mapping[str, Any] | None = None
    ) -> None:
        self._producer = Producer(
            {
                "bootstrap.servers": bootstrap,
                "enable.idempotence": True,
                "acks": "all",
                "linger.ms": 2,
                "message.timeout.ms": int(timeout * 1000),
                # QueueUpdated carries a group's whole queue set: megabytes of topic names for
                # a big tag group. Compressed (topic names shrink about tenfold) it fits the
                # broker's default 1 MB batch limit; the client's own limit is on the
                # uncompressed size, so it is raised.
                "compression.type": "zstd",
                "message.max.bytes": MAX_EVENT_BYTES,
                **(extra or {}),
            }
        )
        self._timeout = timeout
        self.fatal = ""  # set when the producer failed for good
        self._stop = threading.Event()
        self._poller = threading.Thread(target=self._poll, name="controlbus-poll", daemon=True)
        self._poller.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                self._producer.poll(0.05)
            except KafkaException as e:
                # A fatal producer error (for example no idempotent-write permission): every
                # event after it fails with this reason; polling on only repeats it.
                self.fatal = str(e.args[0].str() if e.args else e)
                log.error("ControlBus producer failed for good: %s", self.fatal)
                return

    async def publish(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            loop.call_soon_threadsafe(_settle, done, err)

        if self.fatal:
            raise Unavailable(
                f"ControlBus producer failed: {self.fatal}", reason="KafkaUnavailable"
            )
        value = orjson.dumps(event)
        try:
            self._producer.produce(topic, key=key.encode(), value=value, on_delivery=delivered)
        except BufferError as e:
            raise Unavailable(
                f"ControlBus producer queue is full: {e}",
                reason="KafkaUnavailable",
                retry_after=1.0,
            ) from e
        except KafkaException as e:  # refused before sending: too large, unknown topic, ...
            raise Unavailable(
                f"ControlBus refused a {len(value):,}-byte event for {topic}: {e}",
                reason="KafkaUnavailable",
            ) from e
        await done

    async def close(self) -> None:
        await asyncio.to_thread(self._producer.flush, self._timeout)
        self._stop.set()
        await asyncio.to_thread(self._poller.join, 1.0)


def _settle(fut: asyncio.Future[None], err: KafkaError | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        hint = (
            " (the event, compressed, is larger than the topic's max.message.bytes)"
            if err.code() == KafkaError.MSG_SIZE_TOO_LARGE
            else ""
        )
        fut.set_exception(
            Unavailable(f"ControlBus delivery failed: {err.str()}{hint}", reason="KafkaUnavailable")
        )


def read_events(
    bootstrap: str,
    topic: str,
    *,
    timeout: float = 10.0,
    extra: Mapping[str, Any] | None = None,
) -> list[Published]:
    """Every event currently in `topic` (all partitions, from the start), decoded."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            **(extra or {}),
            "group.id": f"qmtl-reader-{uuid.uuid4().hex}",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=timeout)
        parts = list(md.topics[topic].partitions) if topic in md.topics else []
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            for p in parts
        }
        todo = {p for p, end in ends.items() if end > 0}
        consumer.assign([TopicPartition(topic, p, 0) for p in todo])
        out: list[Published] = []
        deadline = time.monotonic() + timeout  # for the whole read, however long the topic
        while todo and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    todo.discard(msg.partition())
                continue
            key = msg.key()
            value = msg.value()
            out.append(
                Published(topic, key.decode() if key else "", orjson.loads(value) if value else {})
            )
            if (msg.offset() or 0) + 1 >= ends[msg.partition()]:
                todo.discard(msg.partition())
        return out
    finally:
        consumer.close()
