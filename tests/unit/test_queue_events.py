"""QueueUpdated through the graph's outbox (embedded twin): diffs answer without waiting for
publication, a burst of diffs on one group is published a few times, not once per diff, the
last event of a group always carries its current set, and a failed publication loses
nothing."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from tests.unit.dags import encode, node


def btc_events(bus: MemoryEventBus) -> list[dict[str, Any]]:
    return [
        e.value["data"]
        for e in bus.read("queue")
        if e.value["type"] == "queue_updated" and e.value["data"]["tags"] == ["BTC"]
    ]


async def test_a_burst_of_diffs_is_coalesced_and_the_last_event_has_every_queue() -> None:
    graph, bus, clock = MemoryGraphStore(), MemoryEventBus(), ManualClock(time.time())
    diffs = DiffService(graph, MemoryTopicAdmin(), ControlBus(bus, clock), clock, Metrics())
    docs = [encode([node("RawPriceFeed", tags=["BTC"], code=f"c{i}")]) for i in range(20)]
    outcomes = await asyncio.gather(
        *(diffs.diff(Request(f"s{i}", world_id="w"), d) for i, d in enumerate(docs))
    )
    await diffs.queue_events().settled()
    btc = btc_events(bus)
    assert 1 <= len(btc) < 20  # coalesced: groups go out per round, not per diff
    mine = {o.plan.nodes[0].topic.removeprefix("w.live.") for o in outcomes}
    assert {q["queue"] for q in btc[-1]["queues"]} == mine
    assert await graph.pending_events() == 0


async def test_the_answer_does_not_wait_for_publication() -> None:
    class Slow(MemoryEventBus):
        gate = asyncio.Event()

        async def publish(self, topic: str, key: str, event: Any) -> None:
            await self.gate.wait()
            await super().publish(topic, key, event)

    graph, bus, clock = MemoryGraphStore(), Slow(), ManualClock(time.time())
    diffs = DiffService(graph, MemoryTopicAdmin(), ControlBus(bus, clock), clock, Metrics())
    doc = encode([node("RawPriceFeed", tags=["BTC"], code="slow")])
    await asyncio.wait_for(diffs.diff(Request("s", world_id="w"), doc), 5)  # answered
    assert btc_events(bus) == [] and await graph.pending_events() == 1
    Slow.gate.set()
    await diffs.queue_events().settled()
    assert len(btc_events(bus)) == 1 and await graph.pending_events() == 0


async def test_a_failed_publication_is_retried_and_loses_nothing() -> None:
    class Flaky(MemoryEventBus):
        failures = 3

        async def publish(self, topic: str, key: str, event: Any) -> None:
            if self.failures:
                self.failures -= 1
                raise Unavailable("Kafka down", reason="KafkaUnavailable")
            await super().publish(topic, key, event)

    graph, bus, clock = MemoryGraphStore(), Flaky(), ManualClock(time.time())
    metrics = Metrics()
    diffs = DiffService(graph, MemoryTopicAdmin(), ControlBus(bus, clock), clock, metrics)
    first = await diffs.diff(
        Request("a", world_id="w"), encode([node("RawPriceFeed", tags=["BTC"], code="f1")])
    )
    second = await diffs.diff(
        Request("b", world_id="w"), encode([node("RawPriceFeed", tags=["BTC"], code="f2")])
    )
    await asyncio.wait_for(diffs.queue_events().settled(), 30)
    assert bus.failures == 0
    last = btc_events(bus)[-1]
    want = {o.plan.nodes[0].topic.removeprefix("w.live.") for o in (first, second)}
    assert {q["queue"] for q in last["queues"]} == want
    assert await graph.pending_events() == 0
