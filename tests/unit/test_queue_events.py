"""Group commit of QueueUpdated events: concurrent diffs share flushes, every caller's groups
are published by a flush that began after its request, and a failure reaches every waiter."""

from __future__ import annotations

import asyncio
import time

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.plan import QueryGroup, Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.queue_events import QueueEvents
from tests.unit.dags import encode, node


async def test_concurrent_diffs_share_flushes_and_the_last_event_has_every_queue() -> None:
    graph, bus, clock = MemoryGraphStore(), MemoryEventBus(), ManualClock(time.time())
    diffs = DiffService(graph, MemoryTopicAdmin(), ControlBus(bus, clock), clock, Metrics())
    docs = [encode([node("RawPriceFeed", tags=["BTC"], code=f"c{i}")]) for i in range(20)]
    outcomes = await asyncio.gather(
        *(diffs.diff(Request(f"s{i}", world_id="w"), d) for i, d in enumerate(docs))
    )
    assert diffs._events is not None and diffs._events.flushes < 20  # shared
    events = [e.value["data"] for e in bus.read("queue") if e.value["type"] == "queue_updated"]
    btc = [e for e in events if e["tags"] == ["BTC"]]
    assert len(btc) == diffs._events.flushes  # one per flush, not one per diff
    mine = {o.plan.nodes[0].topic.removeprefix("w.live.") for o in outcomes}
    assert {q["queue"] for q in btc[-1]["queues"]} == mine


async def test_a_failed_flush_fails_every_waiter_and_the_next_one_runs() -> None:
    class Broken(MemoryGraphStore):
        fail = True

        async def queues_by_tag_queries(self, queries):  # type: ignore[no-untyped-def]
            await asyncio.sleep(0.01)
            if self.fail:
                raise Unavailable("graph down")
            return await super().queues_by_tag_queries(queries)

    graph = Broken()
    events = QueueEvents(graph, ControlBus(MemoryEventBus(), ManualClock(0)), Metrics())
    g = QueryGroup(("BTC",), 60, "any")
    results = await asyncio.gather(*(events.publish([g]) for _ in range(3)), return_exceptions=True)
    assert all(isinstance(r, Unavailable) for r in results)
    graph.fail = False
    await events.publish([g])
    assert not events._running and events.flushes == 2  # drained; one shared failed flush
