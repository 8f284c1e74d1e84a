"""Grace counted from the orphan time, on the twins and on Neo4j + Kafka alike: a queue goes
only after TTL + grace *continuously* unreferenced, a new reference starts the grace over,
queues of older graphs get the time of the first run that sees them, and kept queues stay."""

from __future__ import annotations

import uuid
from typing import Any

import neo4j
import pytest
from confluent_kafka import Producer

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.core.gc import DAY
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.ports import GraphStore, SentinelWrite, TopicAdmin
from qmtl_dagmanager.services.canary import CanaryService, Versions
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.queues import QueueService
from tests.contract.test_gc_races import Hooked, World, world
from tests.unit.dags import encode, node

RAW = 8 * DAY  # the raw policy: TTL 7 d + grace 1 d


def collected(run: Any, mine: list[str]) -> list[str]:
    return sorted(p["queue"] for p in run.processed if p["queue"] in mine)


def kept(run: Any, mine: list[str]) -> dict[str, float | None]:
    return {o.topic: o.due for o in run.report.kept if o.topic in mine}


async def release(w: World, strategy: str) -> None:
    await QueueService(w.graph, w.topics, w.metrics, w.clock).cleanup(strategy)


async def test_a_month_old_queue_orphaned_now_survives_until_ttl_and_grace_later(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()  # released, then 30 days pass: due
    again = await w.reference(nodes)  # a month-old queue referenced again ...
    w.clock.advance(3600)
    await release(w, again.plan.strategy_id)  # ... and orphaned now
    orphaned = w.clock.now()
    for step in (0, DAY, 7 * DAY, RAW - 1):
        w.clock.t = orphaned + step
        run = await w.gc().collect()
        assert collected(run, mine) == [], step
        assert kept(run, mine) == dict.fromkeys(mine, orphaned + RAW)
    await w.eventually(lambda listed: set(mine) <= listed)  # the topics are all there
    w.clock.t = orphaned + RAW
    run = await w.gc().collect()
    assert collected(run, mine) == sorted(mine)
    assert w.dropped(mine) == sorted(mine)
    await w.eventually(lambda listed: not set(mine) & listed)


async def test_a_reference_within_grace_starts_the_grace_over(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()
    first = w.clock.now()
    again = await w.reference(nodes)  # within the grace: referenced again
    assert {q.orphaned_at for q in await graph.queues(mine)} == {None}
    w.clock.advance(5 * DAY)
    await release(w, again.plan.strategy_id)
    second = w.clock.now()
    w.clock.t = first + RAW + DAY  # past the first orphan time's due, not the second's
    run = await w.gc().collect()
    assert collected(run, mine) == []
    assert kept(run, mine) == dict.fromkeys(mine, second + RAW)
    w.clock.t = second + RAW
    assert collected(await w.gc().collect(), mine) == sorted(mine)


async def test_a_claim_refuses_a_queue_orphaned_again_after_the_run_read_it(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """The run decided on an old orphan time; before its claim the queue was referenced and
    released again: its grace started over, so the claim is refused and nothing is deleted."""
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()
    w.clock.advance(RAW)
    done: list[str] = []

    async def re_reference(topic: str, *_: Any) -> None:
        if topic in mine and not done:
            again = await w.reference(nodes)
            await release(w, again.plan.strategy_id)
            done.append(again.plan.strategy_id)

    run = await w.gc(Hooked(graph, claim_queue=re_reference)).collect()
    assert done and collected(run, mine) == []
    assert run.report.skipped.get("ReferencedOrClaimed") == 3
    await w.eventually(lambda listed: set(mine) <= listed)
    assert w.dropped(mine) == []


async def forget_orphan_times(graph: GraphStore, topics: list[str]) -> None:
    """Make the queues look as a graph written before orphan times recorded them."""
    if isinstance(graph, MemoryGraphStore):
        for t in topics:
            graph._queues[t].pop("orphaned_at", None)
        return
    assert isinstance(graph, Neo4jGraphStore)

    async def tx(t: neo4j.AsyncManagedTransaction) -> None:
        await (
            await t.run("UNWIND $t AS x MATCH (q:Queue {topic: x}) REMOVE q.orphaned_at", t=topics)
        ).consume()

    await graph._write("simulate an old graph", tx)


async def test_queues_of_an_older_graph_get_the_time_of_the_first_run(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    _, mine = await w.orphans()
    await forget_orphan_times(graph, mine)
    assert {q.orphaned_at for q in await graph.queues(mine)} == {None}
    dry = await w.gc().collect(dry_run=True)  # a dry run changes nothing, not even the times
    assert set(mine) <= set(dry.report.stamp)
    assert {q.orphaned_at for q in await graph.queues(mine)} == {None}
    first = w.clock.now()
    run = await w.gc().collect()  # 30 days unreferenced, but nobody knew since when
    assert collected(run, mine) == []
    assert kept(run, mine) == dict.fromkeys(mine, first + RAW)
    assert {q.orphaned_at for q in await graph.queues(mine)} == {first}
    assert await graph.mark_orphaned(mine, first + 5) == 0  # stamped once
    w.clock.t = first + RAW
    assert collected(await w.gc().collect(), mine) == sorted(mine)


async def test_kept_queues_are_never_collected_and_are_reported(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    _nodes, mine = await w.orphans()
    w.clock.advance(RAW)
    assert await graph.set_keep(mine[:2], "strategydag/ns/alpha", True) == 2
    assert await graph.set_keep(mine[:1], "operator", True) == 1
    assert await graph.set_keep(mine[:1], "operator", True) == 0  # already marked
    run = await w.gc().collect()
    assert collected(run, mine) == [mine[2]]
    assert kept(run, mine) == dict.fromkeys(mine[:2])
    assert not await graph.claim_queue(mine[0], "by-hand", w.clock.now(), 60)
    assert await graph.set_keep(mine[:2], "strategydag/ns/alpha", False) == 2
    # mine[0] is still kept by its other marker; mine[1] goes now
    assert collected(await w.gc().collect(), mine) == [mine[1]]
    details = {q.topic: q.keep_by for q in await graph.queues(mine[:1])}
    assert details == {mine[0]: ("operator",)}


async def test_a_retired_versions_queues_wait_for_a_rollback(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """v2 replaces v1; the queues only v1 used become sentinel queues (kept 180 d + 30 d),
    so a rollback a month after v1's StrategyDAG is gone still finds them; the rollback
    retires v2 instead, and `gc --sentinel` collects v2's queues at once, sparing what a
    live version uses."""
    w = world(graph, topic_admin)
    salt = uuid.uuid4().hex[:8]
    shared = node("RawPriceFeed", tags=["BTC"], code=f"shared-{salt}")
    only_v1 = node("RawPriceFeed", tags=["BTC"], code=f"v1-{salt}")
    only_v2 = node("RawPriceFeed", tags=["BTC"], code=f"v2-{salt}")
    diffs = w.diffs()
    s1, s2 = f"alpha-v1-{salt}", f"alpha-v2-{salt}"
    p1 = (await diffs.diff(Request(s1, world_id="w1"), encode([shared, only_v1]))).plan
    p2 = (await diffs.diff(Request(s2, world_id="w1"), encode([shared, only_v2]))).plan
    topic = {n.node.node_id: n.topic for n in [*p1.nodes, *p2.nodes]}
    canary = CanaryService(graph, ControlBus(w.events, w.clock), w.clock, w.metrics, NoGates())
    sid = f"alpha-{salt}-sentinel"
    versions = Versions(sid, "w1", "v2", "v1")
    await canary.link(Versions(sid, "w1", "v1", ""), s1)
    await canary.link(versions, s2)
    await canary.shift(Versions(sid, "w1", "v1", ""), 100)
    await canary.shift(versions, 100)  # v2 promoted
    assert await canary.retire(versions, "v1", True) == [topic[only_v1["node_id"]]]
    v1_queue, v2_queue = topic[only_v1["node_id"]], topic[only_v2["node_id"]]
    await produce(topic_admin, v1_queue, 3)  # v1's data
    await release(w, s1)  # v1's StrategyDAG deleted
    w.clock.advance(30 * DAY)
    run = await w.gc().collect()
    assert v1_queue not in {p["queue"] for p in run.processed}
    (kept_v1,) = [o for o in run.report.kept if o.topic == v1_queue]
    assert kept_v1.tag == "sentinel" and kept_v1.due is not None
    assert kept_v1.due - (w.clock.now() - 30 * DAY) == pytest.approx(210 * DAY, abs=5)
    await w.eventually(lambda listed: v1_queue in listed)
    assert await topic_admin.message_counts([v1_queue]) == {v1_queue: 3}  # with its data
    # the rollback: v1 takes all traffic again, its queues are back in service, v2 retired
    old, new, retired = await canary.rollback(sid, "w1")
    assert (old, new, retired) == ("v2", "v1", 1)
    assert await graph.sentinel_weights(sid) == {"v1": 1.0, "v2": 0.0}
    marks = {q.topic: q.retired for q in await graph.queues([v1_queue, v2_queue])}
    assert marks == {v1_queue: "", v2_queue: f"{sid}@v2"}
    # collecting v2 by hand: nothing while its StrategyDAG references it, then at once
    forced = await w.gc().collect(scope=f"{sid}@v2", force=True)
    assert forced.processed == [] and forced.report.skipped.get("Referenced") == 1
    await release(w, s2)
    forced = await w.gc().collect(scope="v2", force=True)
    assert [p["queue"] for p in forced.processed] == [v2_queue]
    left = {q.topic for q in await graph.queues(list(topic.values()))}
    assert left == {v1_queue, topic[shared["node_id"]]}


class NoGates:
    async def value(self, base_url: str, query: str) -> float:
        raise AssertionError("no gates in this test")


async def produce(admin: TopicAdmin, topic: str, count: int) -> None:
    """Messages into a queue: through Kafka for the real admin, counted by the twin."""
    if isinstance(admin, MemoryTopicAdmin):
        admin.messages[topic] = admin.messages.get(topic, 0) + count
        return
    assert isinstance(admin, KafkaTopicAdmin)
    producer = Producer({"bootstrap.servers": admin.bootstrap, **admin.extra})
    for i in range(count):
        producer.produce(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    assert producer.flush(30) == 0


async def test_a_node_buffering_for_a_week_is_recomputed_and_its_old_queue_orphaned(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """A back-compatible schema change buffers the node; a week later its next diff creates a
    new queue generation, announces the recompute, and the buffering queue, unreferenced
    from then on, is kept by GC until TTL + grace later."""
    w = world(graph, topic_admin)
    salt = uuid.uuid4().hex[:8]
    src = node("RawPriceFeed", tags=["BTC"], code=f"buf-src-{salt}", schema_hash="s1")
    strategy = f"buffering-{salt}"
    first = (await w.diffs().diff(Request(strategy, world_id="w1"), encode([src]))).plan
    (old_topic,) = [n.topic for n in first.nodes]
    changed = {**src, "schema_hash": "s2"}  # the same node id, a new schema under one compat
    buffered = (await w.diffs().diff(Request(strategy, world_id="w1"), encode([changed]))).plan
    assert [n.action.value for n in buffered.nodes] == ["buffer"]
    w.clock.advance(7 * DAY - 60)
    soon = await w.diffs().diff(Request(strategy, world_id="w1"), encode([changed]))
    assert soon.plan.recomputes == () and [n.topic for n in soon.plan.nodes] == [old_topic]
    w.clock.advance(60)
    due = await w.diffs().diff(Request(strategy, world_id="w1"), encode([changed]))
    (r,) = due.plan.recomputes
    assert r.replaces == old_topic and r.topic != old_topic
    await w.eventually(lambda listed: {r.topic, old_topic} <= listed)
    announced = [
        e.value["data"]
        for e in w.events.read("queue")
        if e.value["type"] == "queue_lifecycle" and e.value["data"]["queue"] == r.topic
    ]
    assert [a["action"] for a in announced] == ["recompute"]
    refs = {q.topic: (q.ref_count, q.orphaned_at) for q in await graph.queues([old_topic, r.topic])}
    assert refs == {old_topic: (0, w.clock.now()), r.topic: (1, None)}
    run = await w.gc().collect()  # orphaned just now: kept for the raw policy's 8 days
    assert {o.topic: o.due for o in run.report.kept if o.topic == old_topic} == {
        old_topic: w.clock.now() + RAW
    }
    # resubmitted (any process): the new generation is reused, nothing more is created
    again = await w.diffs().diff(Request(strategy, world_id="w1"), encode([changed]))
    assert again.plan.creates == () and [n.topic for n in again.plan.nodes] == [r.topic]


async def test_compaction_removes_only_nodes_nothing_needs(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """Nodes whose queues GC dropped go once older than the sentinel TTL; a node with a
    queue, a strategy, or a live sentinel version stays; a diff writing a candidate between
    the listing and the removal keeps it."""
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()  # released 30 days ago
    ids = [n["node_id"] for n in nodes]
    w.clock.advance(RAW)
    assert sorted(
        p["queue"] for p in (await w.gc().collect()).processed if p["queue"] in mine
    ) == sorted(mine)
    service = w.gc()
    young = await service.compact()
    assert not set(ids) & set(young.candidates)  # created 38 days ago: younger than 180 d
    w.clock.advance(180 * DAY)
    live = node("RawPriceFeed", tags=["BTC"], code=f"live-{uuid.uuid4().hex[:8]}")
    kept_by_sentinel = ids[0]
    await graph.link_sentinel(
        SentinelWrite("keep-sentinel", "v1", (kept_by_sentinel,)), w.clock.now()
    )
    await graph.set_sentinel_weight("keep-sentinel", "v1", 1.0, w.clock.now())  # live
    await w.diffs().diff(Request(f"live-{uuid.uuid4().hex[:6]}", world_id="w1"), encode([live]))
    dry = await service.compact(dry_run=True)
    assert set(dry.candidates) & set(ids) == set(ids[1:]) and dry.removed == 0
    assert live["node_id"] not in dry.candidates
    # ids[1] is written by a diff after the listing: it has a queue again and stays
    await w.reference([nodes[1]])
    done = await service.compact()
    assert done.removed >= 1
    left = await graph.read(ids, [])
    assert set(left.records) == {ids[0], ids[1]}
    assert set(left.records[ids[1]].queues) != set()
