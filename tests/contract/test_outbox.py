"""The QueueUpdated outbox (twin and Neo4j alike): a plan write marks the groups it changed in
the same transaction; one publisher at a time holds a group; a group that changed while it was
being published stays pending; a dead publisher's claim expires; and with several publishers
racing over concurrent diffs, the last event of each group carries its final set."""

from __future__ import annotations

import asyncio
import time
import uuid

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.plan import QueryGroup, Request
from qmtl_dagmanager.core.tag_match import TagQuery
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import EVENT_CLAIM_TTL, GraphStore, PendingEvent, SentinelWrite
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.queue_events import QueueEvents
from tests.unit.dags import encode, node

NOW = 1_800_000_000.0


async def write(graph: GraphStore, tag: str, code: str, now: float) -> plan.Plan:
    d = dag.parse(encode([node("RawPriceFeed", tags=[tag], code=code)]))
    p = plan.plan(d, Request(f"s-{code}", world_id="w1"), {}, {}, TopicCatalog())
    await graph.apply(p, now, SentinelWrite.from_plan(p, None))
    return p


async def claim(graph: GraphStore, owner: str, now: float, tag: str) -> list[PendingEvent]:
    return [e for e in await graph.claim_events(owner, now, 10_000) if e.group.tags == (tag,)]


async def test_a_write_marks_its_groups_and_a_change_while_publishing_stays_pending(
    graph: GraphStore,
) -> None:
    tag = f"T{uuid.uuid4().hex[:6]}"
    p = await write(graph, tag, "o1", NOW)
    group = QueryGroup((tag,), 60, "any")
    assert group in p.query_groups
    held = await claim(graph, "pub1", NOW, tag)
    assert [e.group for e in held] == [group]
    assert await claim(graph, "pub2", NOW + 1, tag) == []  # held by pub1
    await write(graph, tag, "o2", NOW + 2)  # the group changes while pub1 publishes
    assert await graph.settle_events("pub1", held) == 1
    again = await claim(graph, "pub2", NOW + 3, tag)
    assert [e.group for e in again] == [group]
    assert len(again[0].marks) == 1 and not set(again[0].marks) & set(held[0].marks)
    assert await graph.settle_events("pub2", again) == 0
    assert await claim(graph, "pub3", NOW + 4, tag) == []  # published at its last change
    assert await graph.pending_events() == 0


async def test_a_dead_publishers_claim_expires_and_a_released_one_is_free_at_once(
    graph: GraphStore,
) -> None:
    tag = f"T{uuid.uuid4().hex[:6]}"
    await write(graph, tag, "d1", NOW)
    held = await claim(graph, "dead", NOW, tag)
    assert len(held) == 1
    assert await claim(graph, "alive", NOW + EVENT_CLAIM_TTL - 1, tag) == []
    taken = await claim(graph, "alive", NOW + EVENT_CLAIM_TTL + 1, tag)
    assert len(taken) == 1
    assert await graph.settle_events("dead", held) == 0  # not its claim any more: no effect
    assert await graph.pending_events() == 1
    await graph.release_events("alive", taken)
    assert len(await claim(graph, "next", NOW + EVENT_CLAIM_TTL + 2, tag)) == 1


async def test_racing_publishers_end_on_each_groups_final_set(graph: GraphStore) -> None:
    tag = f"T{uuid.uuid4().hex[:6]}"
    bus, clock = MemoryEventBus(), ManualClock(time.time())
    publishers = [
        QueueEvents(graph, ControlBus(bus, clock), Metrics(), clock, owner=f"p{i}")
        for i in range(3)
    ]
    writers = [
        DiffService(graph, MemoryTopicAdmin(), ControlBus(bus, clock), clock, Metrics(), events=pub)
        for pub in publishers
    ]

    async def diffs(i: int) -> None:
        for k in range(8):
            doc = encode([node("RawPriceFeed", tags=[tag], code=f"r{i}-{k}")])
            await writers[i].diff(Request(f"r{i}-{k}", world_id="w1"), doc)
            await publishers[(i + k) % 3].drain()

    await asyncio.gather(*(diffs(i) for i in range(3)))
    for pub in publishers:
        await pub.settled()
    await publishers[0].drain()
    assert await graph.pending_events() == 0
    final = (await graph.queues_by_tag_queries([TagQuery((tag,), 60, "any")]))[0]
    assert len(final) == 24
    last = [
        e.value["data"]
        for e in bus.read("queue")
        if e.value["type"] == "queue_updated" and e.value["data"]["tags"] == [tag]
    ][-1]
    assert sorted(q["queue"] for q in last["queues"]) == sorted(r.topic for r in final)
