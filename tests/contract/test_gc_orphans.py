"""Grace counted from the orphan time, on the twins and on Neo4j + Kafka alike: a queue goes
only after TTL + grace *continuously* unreferenced, a new reference starts the grace over,
queues of older graphs get the time of the first run that sees them, and kept queues stay."""

from __future__ import annotations

from typing import Any

import neo4j

from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.core.gc import DAY
from qmtl_dagmanager.ports import GraphStore, TopicAdmin
from qmtl_dagmanager.services.queues import QueueService
from tests.contract.test_gc_races import Hooked, World, world

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
