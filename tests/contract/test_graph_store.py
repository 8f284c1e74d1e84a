"""GraphStore contract: the embedded twin and Neo4j behave the same."""

from __future__ import annotations

import asyncio

import pytest

from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.errors import CrossContextReuse, QueueGone
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import Action, Request
from qmtl_dagmanager.core.tag_match import TagQuery
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.ports import Forgot, GraphStore, PendingDiff, SentinelWrite
from tests.unit.dags import chain, encode, node

CATALOG = TopicCatalog()
NOW = 1_800_000_000.0


async def diff(graph: GraphStore, nodes: list[dict[str, object]], request: Request) -> plan.Plan:
    d = dag.parse(encode(nodes))
    ns = plan.resolve_namespace(d, request)
    read = await graph.read([n.node_id for n in d.nodes], plan.candidate_topics(d, ns))
    return plan.plan(d, request, read.records, read.owners, CATALOG)


async def submit(
    graph: GraphStore, nodes: list[dict[str, object]], request: Request, now: float = NOW
) -> plan.Plan:
    p = await diff(graph, nodes, request)
    p.raise_for_violations()
    await graph.apply(p, now, SentinelWrite.from_plan(p, None))
    return p


async def test_schema_init_and_rollback_are_idempotent(graph: GraphStore) -> None:
    await graph.init_schema()
    await graph.rollback_schema()
    await graph.rollback_schema()
    await graph.init_schema()
    assert await graph.ping()


async def test_first_submission_writes_nodes_queues_and_references(graph: GraphStore) -> None:
    req = Request("s1", world_id="w1")
    p = await submit(graph, chain(5), req)
    c = await graph.counts()
    # 5 EMITS + 5 node USED_BY + 5 queue USED_BY + 5 HAS
    assert (c.compute_nodes, c.queues, c.sentinels, c.strategies, c.relationships) == (
        5,
        5,
        1,
        1,
        20,
    )
    read = await graph.read([n.node.node_id for n in p.nodes], list(p.queue_map.values()))
    assert set(read.records) == {n.node.node_id for n in p.nodes}
    for n in p.nodes:
        rec = read.records[n.node.node_id]
        assert [(q.topic, q.compute_key) for q in rec.queues] == [(n.topic, n.compute_key)]
        assert read.owners[n.topic] == n.node.node_id
    queues = await graph.queues()
    assert {q.topic for q in queues} == set(p.queue_map.values())
    assert all(q.ref_count == 1 and q.managed and q.created_at == NOW for q in queues)
    assert await graph.strategy_nodes("s1") == {n.node.node_id for n in p.nodes}


async def test_reapplying_changes_nothing(graph: GraphStore) -> None:
    req = Request("s1", world_id="w1")
    first = await submit(graph, chain(6), req)
    before = await graph.counts()
    await graph.apply(first, NOW + 10, SentinelWrite.from_plan(first, None))  # repeated write
    again = await submit(graph, chain(6), req, NOW + 20)  # a fresh diff of the same DAG
    assert {p.action for p in again.nodes} == {Action.REUSE}
    assert again.queue_map == first.queue_map
    assert await graph.counts() == before
    assert all(q.created_at == NOW for q in await graph.queues())
    # the strategy's recorded state makes a resubmission a no-op write
    read = await graph.read([p.node.node_id for p in again.nodes], [], "s1")
    assert read.fingerprint == again.fingerprint() and again.unchanged(read.fingerprint)
    assert (await graph.strategy_context("s1") or {})["world_id"] == "w1"
    other = await diff(graph, chain(5), Request("s1", world_id="w1"))
    assert not other.unchanged(read.fingerprint)
    assert (await graph.read([], [], "nobody")).fingerprint is None


async def test_schema_change_is_buffered_then_recorded(graph: GraphStore) -> None:
    req = Request("s1", world_id="w1")
    nodes = chain(3)
    await submit(graph, nodes, req)
    changed = [dict(n) for n in nodes]
    changed[2] = node(inputs=[nodes[1]["node_id"]], params={"i": 2}, code="c2", schema_hash="h-new")
    assert changed[2]["node_id"] == nodes[2]["node_id"]  # schema_hash is not identity
    p = await submit(graph, changed, req, NOW + 5)
    assert [(b.node.node_id, b.lag) for b in p.buffers] == [(nodes[2]["node_id"], 5)]
    again = await diff(graph, changed, req)
    assert again.buffers == () and {n.action for n in again.nodes} == {Action.REUSE}


async def test_reference_counts_are_exact(graph: GraphStore) -> None:
    shared = chain(3)
    extra = node(inputs=[shared[-1]["node_id"]], code="only-s2")
    await submit(graph, shared, Request("s1", world_id="w1"))
    p2 = await submit(graph, [*shared, extra], Request("s2", world_id="w1"))
    refs = {q.topic: q.ref_count for q in await graph.queues()}
    extra_topic = next(n.topic for n in p2.nodes if n.node.node_id == extra["node_id"])
    assert refs.pop(extra_topic) == 1 and set(refs.values()) == {2}
    # s2 resubmits without the extra node: its references become exactly the new DAG
    await submit(graph, shared, Request("s2", world_id="w1"))
    assert {q.topic: q.ref_count for q in await graph.queues()}[extra_topic] == 0
    assert await graph.release("s1", NOW) == 6
    assert {q.ref_count for q in await graph.queues() if q.topic != extra_topic} == {1}
    await graph.release("s2", NOW)
    assert {q.ref_count for q in await graph.queues()} == {0}
    c = await graph.counts()
    assert (c.compute_nodes, c.strategies) == (4, 0)  # nodes are never deleted


async def test_forget_queue_only_when_unreferenced(graph: GraphStore) -> None:
    p = await submit(graph, chain(2), Request("s1", world_id="w1"))
    topic = p.nodes[0].topic
    assert await graph.forget_queue(topic) is Forgot.REFERENCED  # it stays
    assert topic in {q.topic for q in await graph.queues()}
    await graph.release("s1", NOW)
    assert await graph.forget_queue(topic) is Forgot.DROPPED
    assert topic not in {q.topic for q in await graph.queues()}
    assert await graph.forget_queue(topic) is Forgot.ABSENT  # already gone
    assert (await graph.counts()).compute_nodes == 2
    await graph.set_unmanaged([p.nodes[1].topic])
    assert [q.managed for q in await graph.queues([p.nodes[1].topic])] == [False]


async def test_tag_queries(graph: GraphStore) -> None:
    a = node("StreamInput", tags=["BTC", "price"], code="a")
    b = node("StreamInput", tags=["ETH", "price"], code="b")
    c = node("StreamInput", tags=["BTC"], code="c", interval=300)
    p = await submit(graph, [a, b, c], Request("s1", world_id="w1"))
    base = {n.node.node_id: n.topic.removeprefix("w1.live.") for n in p.nodes}
    anyq = await graph.queues_by_tags(["BTC", "ETH"], 60, "any")
    assert [q.topic for q in anyq] == sorted([base[a["node_id"]], base[b["node_id"]]])
    assert not any(q.is_global for q in anyq)
    allq = await graph.queues_by_tags(["BTC", "price"], 60, "all")
    assert [q.topic for q in allq] == [base[a["node_id"]]]
    assert [q.topic for q in await graph.queues_by_tags(["BTC"], 300, "any")] == [
        base[c["node_id"]]
    ]
    assert await graph.queues_by_tags([], 60, "any") == []
    glob = await submit(graph, [node(tags=["SOL"], code="g")], Request("s2"))
    got = await graph.queues_by_tags(["SOL"], 60, "any")
    assert [(q.topic, q.is_global) for q in got] == [(glob.nodes[0].topic, True)]
    queries = [
        TagQuery(("BTC", "ETH"), 60, "any"),
        TagQuery(("BTC", "price"), 60, "all"),
        TagQuery(("BTC",), 300, "any"),
        TagQuery((), 60, "any"),
        TagQuery(("SOL",), 60, "any"),
        TagQuery(("nothing",), 60, "all"),
    ]
    one_by_one = [await graph.queues_by_tags(*q) for q in queries]
    assert await graph.queues_by_tag_queries(queries) == one_by_one  # one read, same answers
    assert await graph.queues_by_tag_queries([]) == []


async def test_sentinel_weights_and_history(graph: GraphStore) -> None:
    await submit(graph, chain(2), Request("s1", world_id="w1"))
    await graph.set_sentinel_weight("s1-sentinel", "v1", 0.9, NOW + 1)
    await graph.set_sentinel_weight("s1-sentinel", "v2", 0.1, NOW + 1)
    await graph.set_sentinel_weight("s1-sentinel", "v2", 0.1, NOW + 2)  # no change
    assert await graph.sentinel_weights("s1-sentinel") == {"v1": 0.9, "v2": 0.1}
    c = await graph.counts()
    assert c.sentinels == 2


async def test_gc_claims_are_exclusive(graph: GraphStore) -> None:
    p = await submit(graph, chain(2), Request("claim", world_id="w1"))
    a, b = (n.topic for n in p.nodes)
    assert not await graph.claim_queue(a, "run1", NOW, 60)  # referenced
    await graph.release("claim", NOW)
    got = await asyncio.gather(*(graph.claim_queue(a, f"r{i}", NOW, 60) for i in range(5)))
    assert sorted(got) == [False] * 4 + [True]  # exactly one of five concurrent runs
    winner = f"r{got.index(True)}"
    assert await graph.claim_queue(a, winner, NOW + 1, 60)  # its own claim holds
    assert not await graph.claim_queue(a, "late", NOW + 30, 60)
    assert await graph.claim_queue(a, "late", NOW + 61, 60)  # a crashed run's claim expires
    assert not await graph.claim_queue("no-such-topic", "x", NOW, 60)
    assert await graph.claim_queue(b, "other", NOW, 60)


async def test_sentinel_links_and_records(graph: GraphStore) -> None:
    p = await submit(graph, chain(3), Request("s1", world_id="w1"))
    ids = tuple(n.node.node_id for n in p.nodes)
    assert await graph.sentinel("s1-sentinel", "v2") is None
    await graph.link_sentinel(SentinelWrite("s1-sentinel", "v2", ids, None, "abc123", "r2"), NOW)
    await graph.link_sentinel(SentinelWrite("s1-sentinel", "v2", ids[:1]), NOW + 1)  # idempotent
    await graph.set_sentinel_weight("s1-sentinel", "v2", 0.1, NOW + 2)
    await graph.set_sentinel_weight("s1-sentinel", "v2", 0.5, NOW + 3)
    rec = await graph.sentinel("s1-sentinel", "v2")
    assert rec is not None
    assert (rec.weight, rec.commit_hash, rec.release_tag, rec.has) == (0.5, "abc123", "r2", 3)
    assert rec.history == ((NOW + 2, 0.1), (NOW + 3, 0.5))


async def test_cross_context_reuse_is_detected_from_the_graph(graph: GraphStore) -> None:
    nodes = chain(2)
    await submit(graph, nodes, Request("s1", execution_domain="backtest", as_of="2024"))
    p = await diff(graph, nodes, Request("s2", execution_domain="backtest", as_of="2025"))
    assert len(p.violations) == 2
    with pytest.raises(CrossContextReuse):
        p.raise_for_violations()


async def test_read_of_unknown_ids_is_empty(graph: GraphStore) -> None:
    read = await graph.read([NodeId("blake3:" + "0" * 64)], ["nope"])
    assert read.records == {} and read.owners == {}


async def test_a_write_notices_queues_gc_claimed_or_dropped_since_the_read(
    graph: GraphStore,
) -> None:
    nodes = chain(3)
    p = await submit(graph, nodes, Request("first", world_id="w1"))
    a, b, c = (n.topic for n in p.nodes)
    await graph.release("first", NOW)
    # a second strategy plans to reuse all three; meanwhile GC claims `a` and drops `b`
    again = await diff(graph, nodes, Request("second", world_id="w1"))
    assert {n.action for n in again.nodes} == {Action.REUSE}
    assert await graph.claim_queue(a, "run", NOW, 60)
    assert await graph.claim_queue(b, "run", NOW, 60)
    assert await graph.forget_queue(b) is Forgot.DROPPED
    with pytest.raises(QueueGone) as gone:
        await graph.apply(again, NOW + 1, SentinelWrite.from_plan(again, None))
    assert gone.value.topics == (b,) and gone.value.reason == "QueueGone"
    assert {q.topic: q.ref_count for q in await graph.queues()} == {a: 0, c: 0}  # nothing written
    # planned again, `b` is created anew; `a` is referenced and its claim released
    again = await diff(graph, nodes, Request("second", world_id="w1"))
    assert [n.action for n in again.nodes].count(Action.CREATE) == 1
    claimed = await graph.apply(again, NOW + 2, SentinelWrite.from_plan(again, None))
    assert claimed == (a,)
    assert await graph.forget_queue(a) is Forgot.REFERENCED  # its claimant cannot drop it
    assert {q.topic: q.ref_count for q in await graph.queues()} == {a: 1, b: 1, c: 1}
    await graph.release("second", NOW)
    assert await graph.claim_queue(a, "next-run", NOW + 3, 60)  # the old claim is gone
    # the record names the topic type, so a revived topic gets the spec it was created with
    (record,) = await graph.queues([a])
    assert CATALOG.spec_for_tag(record.tag) == CATALOG.spec_for(p.nodes[0].node.node_type)


async def test_orphan_times_follow_the_references(graph: GraphStore) -> None:
    """Set when a plan stops referencing a queue or a strategy is released (not while
    another strategy uses it); cleared by a new reference."""
    shared, extra = chain(2), node("Extra", inputs=[], code="orphan-extra")
    p1 = await submit(graph, [*shared, extra], Request("o1", world_id="w1"))
    await submit(graph, shared, Request("o2", world_id="w1"))
    topics = [n.topic for n in p1.nodes if n.node.node_id != extra["node_id"]]
    extra_topic = next(n.topic for n in p1.nodes if n.node.node_id == extra["node_id"])
    await submit(graph, shared, Request("o1", world_id="w1"), now=NOW + 5)  # extra dropped
    assert [q.orphaned_at for q in await graph.queues([extra_topic])] == [NOW + 5]
    await graph.release("o1", NOW + 10)
    assert {q.orphaned_at for q in await graph.queues(topics)} == {None}  # o2 uses them
    await graph.release("o2", NOW + 20)
    assert {q.orphaned_at for q in await graph.queues(topics)} == {NOW + 20}
    await submit(graph, [*shared, extra], Request("o3", world_id="w1"), now=NOW + 30)
    assert {q.orphaned_at for q in await graph.queues([*topics, extra_topic])} == {None}
    assert await graph.mark_orphaned([*topics, extra_topic], NOW + 40) == 0  # all referenced


async def test_cross_context_hits_are_counted_by_time_and_pruned_after_a_week(
    graph: GraphStore,
) -> None:
    assert await graph.cross_context_since(0) == 0
    await graph.record_cross_context("s1", 3, NOW)
    await graph.record_cross_context("s2", 2, NOW + 10)
    assert await graph.cross_context_since(NOW) == 5
    assert await graph.cross_context_since(NOW + 5) == 2
    assert await graph.cross_context_since(NOW + 11) == 0
    # a record eight days later prunes both
    await graph.record_cross_context("s3", 1, NOW + 8 * 86_400)
    assert await graph.cross_context_since(0) == 1


async def test_the_diff_journal_records_claims_and_goes_with_the_write(graph: GraphStore) -> None:
    request = Request("journal-s", world_id="w1", execution_domain="live")
    nodes = chain(3)
    text = encode(nodes).decode()
    entry = PendingDiff("key-1", request, text, "verify", NOW, owner="sidecar-a")
    await graph.record_intents([], NOW, "journal-s", entry)
    assert await graph.pending_diffs(NOW - 1, 10) == []  # newer than asked
    [found] = await graph.pending_diffs(NOW + 1, 10)
    assert (found.key, found.request, found.dag, found.ids) == (
        "key-1",
        request,
        entry.dag,
        "verify",
    )
    assert (found.owner, found.replays) == ("sidecar-a", 0)

    # a replay claims it: its time moves on, so others leave it for a while
    assert await graph.claim_pending_diff("key-1", NOW + 20, NOW + 1)
    assert not await graph.claim_pending_diff("key-1", NOW + 21, NOW + 1)  # taken
    [claimed] = await graph.pending_diffs(NOW + 30, 10)
    assert (claimed.at, claimed.replays) == (NOW + 20, 1)

    # a newer submission of the strategy replaces it; the write of that one removes it
    newer = PendingDiff("key-2", request, text, "verify", NOW + 40)
    await graph.record_intents([], NOW + 40, "journal-s", newer)
    assert [e.key for e in await graph.pending_diffs(NOW + 50, 10)] == ["key-2"]
    p = await diff(graph, nodes, request)
    await graph.apply(p, NOW + 41, SentinelWrite.from_plan(p, None), journal="key-2")
    assert await graph.pending_diffs(NOW + 50, 10) == []

    await graph.record_intents(
        [], NOW, "other-s", PendingDiff("key-3", Request("other-s"), "{}", "off", NOW)
    )
    await graph.drop_pending_diff("key-3")
    assert await graph.pending_diffs(NOW + 50, 10) == []
