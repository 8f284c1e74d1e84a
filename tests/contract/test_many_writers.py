"""Many writers on one graph and one Kafka (twins and Neo4j + Kafka alike): each writer keeps
its own node cache, and a stale cache may cost a re-plan but never a wrong answer, a refusal
or a second queue for one (node, compute key). Topics the product created that no queue came
to own are swept."""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

import pytest

from qmtl_dagmanager.adapters.archive import MemoryArchive
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.errors import CrossContextReuse, QueueBusy, StaleRead
from qmtl_dagmanager.core.gc import GcLimits
from qmtl_dagmanager.core.plan import Action, Request
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import GraphStore, Intent, SentinelWrite, TopicAdmin
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.garbage import GcService
from qmtl_dagmanager.services.node_cache import NodeCache
from qmtl_dagmanager.services.queues import QueueService
from tests.contract.conftest import listed_eventually
from tests.unit.dags import encode, node

CATALOG = TopicCatalog()
NOW = 1_800_000_000.0


def salted(n: int = 3, **kw: Any) -> list[dict[str, Any]]:
    salt = uuid.uuid4().hex[:8]
    return [node("RawPriceFeed", tags=["BTC"], code=f"mw-{salt}-{i}", **kw) for i in range(n)]


def with_version(nodes: list[dict[str, Any]], version: str) -> bytes:
    return encode(nodes, version=version)


class Writers:
    """Several writers (as if processes): one graph and one topic admin, a cache each."""

    def __init__(self, graph: GraphStore, topics: TopicAdmin, count: int = 3) -> None:
        self.graph, self.topics = graph, topics
        self.clock = ManualClock(time.time())
        self.events = MemoryEventBus()
        self.metrics = [Metrics() for _ in range(count)]
        self.caches = [NodeCache(self.clock, ttl=60) for _ in range(count)]
        self.diffs = [
            DiffService(
                graph,
                topics,
                ControlBus(self.events, self.clock),
                self.clock,
                m,
                cache=c,
            )
            for m, c in zip(self.metrics, self.caches, strict=True)
        ]

    def gc(self, intent_grace: float = 600.0) -> GcService:
        return GcService(
            self.graph, self.topics, MemoryArchive(), ControlBus(self.events, self.clock),
            self.clock, Metrics(), limits=GcLimits(max_count=10_000, max_fraction=1.0),
            intent_grace=intent_grace,
        )  # fmt: skip

    async def cleanup(self, strategy_id: str) -> None:
        await QueueService(self.graph, self.topics, Metrics(), self.clock).cleanup(strategy_id)

    def replans(self, reason: str) -> float:
        # prometheus_client is untyped: a counter's value is a float
        total: float = sum(m.diff_replans.labels(reason)._value.get() for m in self.metrics)
        return total


async def slots(graph: GraphStore, topics: list[str]) -> dict[tuple[str | None, str], list[str]]:
    out: dict[tuple[str | None, str], list[str]] = {}
    for q in await graph.queues():
        if q.topic in topics or not topics:
            out.setdefault((q.node_id, q.compute_key), []).append(q.topic)
    return out


async def test_a_stale_cache_never_refuses_a_valid_reuse(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """The issue's first finding: writer A cached a node before writer B gave it a queue for
    this compute key; A must reuse B's queue, not refuse it as cross-context."""
    w = Writers(graph, topic_admin)
    nodes = salted()
    a, b = w.diffs[0], w.diffs[1]
    ctx = {"world_id": "w1", "execution_domain": "backtest", "as_of": "2025-01-01"}
    first = await a.diff(Request("a1", **ctx), encode(nodes))  # A caches the nodes
    other = {**ctx, "as_of": "2025-02-01"}  # another compute key in the same namespace
    with pytest.raises(CrossContextReuse):
        await b.diff(Request("b1", **other), encode(nodes))  # a true refusal, fresh data
    await w.cleanup("a1")
    w.clock.advance(1)
    again = await a.diff(Request("a2", **ctx), encode(nodes))
    assert [p.action for p in again.plan.nodes] == [Action.REUSE] * 3
    assert sorted(again.plan.queue_map.values()) == sorted(first.plan.queue_map.values())


async def test_a_stale_cache_never_makes_a_second_queue_for_one_node_and_context(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """The issue's second finding: A cached the nodes without a queue for this context; B
    created them; A's next diff (another version label, so other first-choice names) must
    take B's queues, not add a second queue per (node, compute key)."""
    w = Writers(graph, topic_admin)
    nodes = salted()
    a, b = w.diffs[0], w.diffs[1]
    await a.diff(Request("a1", world_id="w1"), with_version(nodes, "v1"))
    await a.diff(Request("a2", world_id="w2"), with_version(nodes, "v1"))  # cache: w2 queues
    made = await b.diff(Request("b1", world_id="w3"), with_version(nodes, "v1"))
    # A's cache does not know the w3 queues; it plans to create v2 names and is corrected
    got = await a.diff(Request("a3", world_id="w3"), with_version(nodes, "v2"))
    assert sorted(got.plan.queue_map.values()) == sorted(made.plan.queue_map.values())
    assert all(len(t) == 1 for t in (await slots(graph, [])).values())
    assert w.replans("GraphChanged") >= 1


async def test_the_graph_refuses_a_second_queue_for_one_node_and_context(
    graph: GraphStore,
) -> None:
    nodes = salted(1)
    req = Request("g1", world_id="w1")
    d1, d2 = dag.parse(with_version(nodes, "v1")), dag.parse(with_version(nodes, "v2"))
    p1 = plan.plan(d1, req, {}, {}, CATALOG)
    p2 = plan.plan(d2, Request("g2", world_id="w1"), {}, {}, CATALOG)  # stale: no records
    assert p1.nodes[0].topic != p2.nodes[0].topic
    await graph.apply(p1, NOW, SentinelWrite.from_plan(p1, None))
    with pytest.raises(StaleRead):
        await graph.apply(p2, NOW + 1, SentinelWrite.from_plan(p2, None))
    assert (await graph.counts()).queues == 1  # nothing of the second write stayed
    # racing writers: exactly one creates, whatever the interleaving
    nodes = salted(1)
    plans = [
        plan.plan(dag.parse(with_version(nodes, f"v{i}")), Request(f"r{i}"), {}, {}, CATALOG)
        for i in range(4)
    ]
    got = await asyncio.gather(
        *(graph.apply(p, NOW, SentinelWrite.from_plan(p, None)) for p in plans),
        return_exceptions=True,
    )
    assert sum(1 for g in got if not isinstance(g, BaseException)) == 1
    assert all(isinstance(g, StaleRead) for g in got if isinstance(g, BaseException))
    assert (await graph.counts()).queues == 2


async def test_created_by_another_writer_first_the_queue_is_taken_as_it_is(
    graph: GraphStore,
) -> None:
    nodes = salted(2)
    d = dag.parse(encode(nodes))
    p1 = plan.plan(d, Request("x1", world_id="w1"), {}, {}, CATALOG)
    p2 = plan.plan(d, Request("x2", world_id="w1"), {}, {}, CATALOG)  # same names, same slots
    await graph.apply(p1, NOW, SentinelWrite.from_plan(p1, None))
    await graph.apply(p2, NOW + 1, SentinelWrite.from_plan(p2, None))
    assert {q.topic: q.ref_count for q in await graph.queues()} == {n.topic: 2 for n in p1.nodes}
    # a name another node holds is refused (the write plans again with a longer hash)
    foreign = plan.plan(dag.parse(encode(salted(1))), Request("x3", world_id="w1"), {}, {}, CATALOG)
    forged = dataclasses.replace(
        foreign, nodes=(foreign.nodes[0]._replace(topic=p1.nodes[0].topic),)
    )
    with pytest.raises(StaleRead):
        await graph.apply(forged, NOW + 2, SentinelWrite.from_plan(forged, None))


async def test_creation_intents_are_settled_by_the_write_and_swept_otherwise(
    graph: GraphStore,
) -> None:
    nodes = salted(1)
    p = plan.plan(dag.parse(encode(nodes)), Request("i1", world_id="w1"), {}, {}, CATALOG)
    mine = p.nodes[0].topic
    assert (await graph.record_intents([mine, "lost-topic"], NOW, "i1")).busy == ()
    await graph.apply(p, NOW + 1, SentinelWrite.from_plan(p, None))
    assert await graph.stale_intents(NOW + 1000, 10) == ["lost-topic"]  # mine is settled
    assert await graph.claim_intent("lost-topic", "run", NOW + 5, NOW) is Intent.CLAIMED
    # a diff that wants that name while the sweep deletes it is told to wait
    assert (await graph.record_intents(["lost-topic"], NOW + 6, "i2")).busy == ("lost-topic",)
    assert await graph.claim_intent("lost-topic", "other", NOW + 6, NOW) is Intent.KEPT
    await graph.drop_intent("lost-topic", "run", NOW + 6)
    assert await graph.stale_intents(NOW + 1000, 10) == []  # a tombstone is not stale
    assert await graph.claim_intent("lost-topic", "run", NOW + 7, NOW + 7) is Intent.KEPT
    # refreshed by a diff: not stale any more; owned by a queue: adopted
    assert (await graph.record_intents(["again", mine], NOW + 10, "i3")).busy == ()
    assert await graph.claim_intent("again", "run", NOW + 11, NOW + 5) is Intent.KEPT
    assert await graph.claim_intent(mine, "run", NOW + 11, NOW + 20) is Intent.ADOPTED
    assert await graph.stale_intents(NOW + 1000, 10) == ["again"]
    # the tombstone of "lost-topic" goes after its TTL
    assert await graph.purge_tombstones(NOW + 1000) == 1
    assert await graph.claim_intent("lost-topic", "run", NOW + 1001, NOW + 1000) is Intent.KEPT


async def test_a_write_is_refused_when_a_sweep_deleted_its_topic_after_the_intent(
    graph: GraphStore,
) -> None:
    """A diff slower than the grace: the sweep deleted the topic it created. Its write must
    be refused (the topic is gone), and a write after recording again accepted."""
    nodes = salted(1)
    p = plan.plan(dag.parse(encode(nodes)), Request("g1", world_id="w1"), {}, {}, CATALOG)
    mine = p.nodes[0].topic
    first = await graph.record_intents([mine], NOW, "g1")
    assert first.busy == () and set(first.generations) == {mine}
    assert await graph.claim_intent(mine, "run", NOW + 5, NOW) is Intent.CLAIMED
    await graph.drop_intent(mine, "run", NOW + 6)  # the sweep deleted the topic
    with pytest.raises(QueueBusy):
        await graph.apply(p, NOW + 7, SentinelWrite.from_plan(p, None), first.generations)
    assert await graph.queues([mine]) == []  # nothing written
    second = await graph.record_intents([mine], NOW + 8, "g1")
    assert second.generations[mine] != first.generations[mine]
    await graph.apply(p, NOW + 9, SentinelWrite.from_plan(p, None), second.generations)
    assert [q.topic for q in await graph.queues([mine])] == [mine]
    assert mine not in await graph.stale_intents(NOW + 1000, 10_000)  # settled


async def test_tombstones_are_purged_after_their_ttl(graph: GraphStore) -> None:
    topic = f"tomb-{uuid.uuid4().hex[:8]}"
    await graph.record_intents([topic], NOW, "t1")
    assert await graph.claim_intent(topic, "run", NOW + 5, NOW) is Intent.CLAIMED
    await graph.drop_intent(topic, "run", NOW + 6)
    assert await graph.purge_tombstones(NOW + 5) == 0
    assert await graph.purge_tombstones(NOW + 6) == 1
    # forgotten: recording it again starts afresh
    assert (await graph.record_intents([topic], NOW + 7, "t2")).busy == ()


async def test_a_queue_marked_for_deletion_is_never_handed_out(graph: GraphStore) -> None:
    nodes = salted(1)
    p = plan.plan(dag.parse(encode(nodes)), Request("d1", world_id="w1"), {}, {}, CATALOG)
    await graph.apply(p, NOW, SentinelWrite.from_plan(p, None))
    topic = p.nodes[0].topic
    await graph.release("d1", NOW)
    assert await graph.claim_queue(topic, "run", NOW + 1, 60)
    assert await graph.mark_deleting(topic, "run", NOW + 1)
    read = await graph.read([nodes[0]["node_id"]], [])
    again = plan.plan(
        dag.parse(encode(nodes)), Request("d2", world_id="w1"), read.records, {}, CATALOG
    )
    assert again.nodes[0].action is Action.REUSE
    with pytest.raises(QueueBusy):
        await graph.apply(again, NOW + 2, SentinelWrite.from_plan(again, None))
    assert [q.ref_count for q in await graph.queues([topic])] == [0]
    # a mark of a run that died long ago is taken over: the queue is handed back (claimed)
    assert await graph.apply(again, NOW + 100, SentinelWrite.from_plan(again, None)) == (topic,)
    # and a mark is refused once the queue is referenced
    assert not await graph.claim_queue(topic, "next", NOW + 101, 60)


async def test_a_topic_created_but_never_owned_is_swept_after_the_grace(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """The issue's fifth finding: a diff created a topic, then planned again with other
    names (or crashed before its write). Its intent outlives the grace; GC deletes it."""
    w = Writers(graph, topic_admin)
    nodes = salted(2)

    class Crash(Exception):
        pass

    class CrashingGraph:
        def __getattr__(self, name: str) -> Any:
            return getattr(graph, name)

        async def apply(self, *_: Any, **__: Any) -> tuple[str, ...]:
            raise Crash  # the process dies after creating its topics

    crashing = DiffService(
        CrashingGraph(),
        topic_admin,
        ControlBus(w.events, w.clock),
        w.clock,
        Metrics(),
    )
    with pytest.raises(Crash):
        await crashing.diff(Request("lost", world_id="w1"), encode(nodes))
    d = dag.parse(encode(nodes))
    lost = plan.candidate_topics(d, plan.resolve_namespace(d, Request("lost", world_id="w1")))
    assert set(lost) <= await topic_admin.list_topics()
    run = await w.gc(intent_grace=60).collect()
    assert not {p["queue"] for p in run.processed} & set(lost)  # too young
    w.clock.advance(61)
    run = await w.gc(intent_grace=60).collect()
    assert sorted(p["queue"] for p in run.processed) == sorted(lost)
    await listed_eventually(topic_admin, lambda listed: not set(lost) & listed)
    # the same DAG later gets its topics again, and then they are owned: never swept
    done = await w.diffs[0].diff(Request("found", world_id="w1"), encode(nodes))
    assert sorted(done.plan.queue_map.values()) == sorted(lost)
    w.clock.advance(600)
    run = await w.gc(intent_grace=60).collect()
    assert not {p["queue"] for p in run.processed} & set(lost)
    assert set(lost) <= await topic_admin.list_topics()


async def test_a_diff_slower_than_the_intent_grace_never_answers_with_a_swept_topic(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """The diff recorded its intents and created its topics, then took longer than the grace
    before its write, and a GC sweep deleted the topics meanwhile (no queue owned them yet).
    The write must be refused and the topics created again before the answer."""
    w = Writers(graph, topic_admin)
    nodes = salted(2)
    swept: list[str] = []
    ensured: list[list[str]] = []

    class SlowTopics:
        def __getattr__(self, name: str) -> Any:
            return getattr(topic_admin, name)

        async def ensure(self, topics: Any, *, wait_visible: bool = True) -> Any:
            ensured.append(sorted(topics))
            results = await topic_admin.ensure(topics, wait_visible=wait_visible)
            if not swept:  # the diff stalls past the grace; GC runs meanwhile
                w.clock.advance(61)
                run = await w.gc(intent_grace=60).collect()
                swept.extend(p["queue"] for p in run.processed)
            return results

    metrics = Metrics()
    slow = DiffService(
        graph,
        SlowTopics(),
        ControlBus(w.events, w.clock),
        w.clock,
        metrics,
    )
    got = await slow.diff(Request("slow", world_id="w1"), encode(nodes))
    topics = sorted(got.plan.queue_map.values())
    assert sorted(swept) == topics  # the sweep did delete them after their creation
    # the write was refused, the diff planned again and created the topics once more
    assert metrics.diff_replans.labels("QueueBusy")._value.get() == 1
    assert ensured == [topics, topics]
    await listed_eventually(topic_admin, lambda listed: set(topics) <= listed)
    assert not set(topics) & set(await graph.stale_intents(w.clock.now() + 1000, 10_000))


async def test_many_writers_at_once_keep_every_invariant(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    """Three writers diff overlapping strategies (shared node pool, two version labels,
    two worlds) while cleanups and GC runs go on; afterwards: one queue per (node, compute
    key), every referenced queue has its topic, and no diff was refused."""
    w = Writers(graph, topic_admin)
    pool = salted(8)
    answers: list[tuple[str, list[str]]] = []

    async def writer(i: int) -> None:
        for round_ in range(6):
            picked = [pool[(i + round_ + k) % len(pool)] for k in range(4)]
            sid = f"s{i}-{round_ % 2}"
            world = f"w{round_ % 2}"
            got = await w.diffs[i].diff(
                Request(sid, world_id=world), with_version(picked, f"v{1 + round_ % 2}")
            )
            answers.append((sid, sorted(got.plan.queue_map.values())))
            if round_ % 3 == 2:
                await w.cleanup(sid)
            w.clock.advance(3 * 86_400)  # old enough for GC as soon as unreferenced

    async def collector() -> None:
        for _ in range(6):
            await w.gc().collect()
            await asyncio.sleep(0)

    await asyncio.gather(*(writer(i) for i in range(3)), collector())
    assert all(len(t) == 1 for t in (await slots(graph, [])).values())
    referenced = [q.topic for q in await graph.queues() if q.ref_count]
    assert set(referenced) <= await topic_admin.list_topics()
    assert sum(m.cross_context._value.get() for m in w.metrics) == 0
