"""Publishing ControlBus events (contract §9): CloudEvents 1.0 envelopes on the `queue` and
`sentinel_weight` topics, built from the core's payloads with the time and ids passed in."""

from __future__ import annotations

import asyncio
import datetime
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from qmtl_dagmanager.core import events
from qmtl_dagmanager.core.topics import DAY_MS, TopicSpec, TopicType
from qmtl_dagmanager.ports import Clock, EventBus

SOURCE = "qmtl/dagmanager"
# The event topics themselves: one partition keeps per-key order trivially; a week of history.
EVENT_TOPIC_SPEC = TopicSpec(
    TopicType.INDICATOR, 1, 1, (("cleanup.policy", "delete"), ("retention.ms", str(7 * DAY_MS)))
)


@dataclass(frozen=True, slots=True)
class EventTopics:
    queue: str = events.QUEUE_TOPIC
    sentinel_weight: str = events.SENTINEL_WEIGHT_TOPIC


class ControlBus:
    def __init__(self, bus: EventBus, clock: Clock, topics: EventTopics = EventTopics()) -> None:
        self._bus = bus
        self._clock = clock
        self.topics = topics

    def _iso(self) -> str:
        return datetime.datetime.fromtimestamp(self._clock.now(), datetime.UTC).isoformat()

    async def _send(self, topic: str, event_type: str, key: str, data: dict[str, object]) -> None:
        envelope = events.cloud_event(
            event_type, data, event_id=str(uuid.uuid4()), time_iso=self._iso(), source=SOURCE
        )
        await self._bus.publish(topic, key, envelope)

    async def queue_updated(
        self,
        tags: Iterable[str],
        interval: int,
        queues: Iterable[tuple[str, bool]],
        match_mode: str,
    ) -> None:
        # built in a worker thread: a common tag's set can hold tens of thousands of queues,
        # and sorting and hashing them in the event loop would hold up every call meanwhile
        key, data = await asyncio.to_thread(
            events.queue_updated, tags, interval, list(queues), match_mode
        )
        await self._send(self.topics.queue, "queue_updated", key, data)

    async def queue_lifecycle(self, queue: str, action: str, reason: str) -> None:
        key, data = events.queue_lifecycle(queue, action, reason)
        await self._send(self.topics.queue, "queue_lifecycle", key, data)

    async def sentinel_weight(
        self, sentinel_id: str, weight: float, sentinel_version: str, world_id: str
    ) -> None:
        key, data = events.sentinel_weight(sentinel_id, weight, sentinel_version, world_id)
        await self._send(self.topics.sentinel_weight, "sentinel_weight_updated", key, data)
