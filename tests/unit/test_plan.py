"""The diff planner: reuse, buffering, creation, names, namespaces and cross-context rules."""

from __future__ import annotations

from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from qmtl_dagmanager.core import dag, plan, topics
from qmtl_dagmanager.core.errors import CrossContextReuse
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import Action, NodeRecord, QueueRecord, Request
from qmtl_dagmanager.core.topics import TopicCatalog
from tests.unit.dags import chain, encode, node

DATA = Path(__file__).parent.parent / "data"
CATALOG = TopicCatalog()
REQ = Request("s1", world_id="w1", execution_domain="live")


def applied(p: plan.Plan) -> dict[NodeId, NodeRecord]:
    """The graph after a plan was written: what the planner sees next time."""
    return {
        n.node.node_id: NodeRecord(
            n.node.node_id,
            n.node.schema_hash,
            n.node.schema_compat_id,
            (QueueRecord(n.topic, n.compute_key),),
        )
        for n in p.nodes
    }


def taken_by(p: plan.Plan) -> dict[str, NodeId]:
    return {n.topic: n.node.node_id for n in p.nodes}


def test_sample_dag_first_diff_creates_everything() -> None:
    d = dag.parse((DATA / "sample-dag.json").read_bytes())
    p = plan.plan(d, REQ, {}, {}, CATALOG)
    assert p.sentinel_id == "s1-sentinel" and p.version == "v1" and p.namespace == "w1.dryrun"
    assert p.counts == {
        "total": 3, "reused": 0, "buffered": 0, "new": 3, "recomputed": 0, "sentinels": 0
    }  # fmt: skip
    assert len(p.queue_map) == 3
    for key, topic in p.queue_map.items():
        nid = key.partition("#")[0].rsplit(":", 2)[0]  # exactly how the Gateway reads it
        assert nid in {n.node_id for n in d.nodes}
        assert topic.startswith("w1.dryrun.") and topics.VALID_TOPIC.match(topic)
    first = p.nodes[0]
    assert first.topic == f"w1.dryrun.btc_StreamInput_{first.node.digest[:8]}_v1"
    assert first.spec is not None and first.spec.topic_type is topics.TopicType.INDICATOR
    assert p.crc32 == d.crc32
    # the new StreamInput's own tag group; the TagQueryNode wants BTC *and* ETH: not matched
    groups = {(g.tags, g.interval, g.match_mode) for g in p.query_groups}
    assert groups == {(("BTC", "price"), 60, "any")}


def test_changed_groups_include_matching_tag_queries_only_when_something_is_new() -> None:
    src = node("StreamInput", tags=["BTC", "ETH"], code="s")
    tq_all = node("TagQueryNode", params={"query_tags": ["BTC", "ETH"], "match_mode": "all"})
    tq_other = node("TagQueryNode", params={"query_tags": ["SOL"]}, code="o")
    d = dag.parse(encode([src, tq_all, tq_other]))
    p = plan.plan(d, REQ, {}, {}, CATALOG)
    groups = {(g.tags, g.interval, g.match_mode) for g in p.query_groups}
    assert groups == {(("BTC", "ETH"), 60, "any"), (("BTC", "ETH"), 60, "all")}
    again = plan.plan(d, REQ, applied(p), taken_by(p), CATALOG)
    assert again.query_groups == ()


def test_plan_of_an_applied_dag_creates_nothing_and_keeps_topics() -> None:
    d = dag.parse(encode(chain(20)))
    first = plan.plan(d, REQ, {}, {}, CATALOG)
    again = plan.plan(d, REQ, applied(first), taken_by(first), CATALOG)
    assert again.creates == () and again.counts["reused"] == 20
    assert again.queue_map == first.queue_map


def test_changed_schema_hash_buffers_with_lag_equal_period() -> None:
    nodes = chain(3)
    first = plan.plan(dag.parse(encode(nodes)), REQ, {}, {}, CATALOG)
    records = applied(first)
    changed = nid = nodes[1]["node_id"]
    records[changed] = NodeRecord(nid, "old-hash", "compat0", records[changed].queues)
    p = plan.plan(dag.parse(encode(nodes)), REQ, records, taken_by(first), CATALOG)
    assert [(b.node.node_id, b.lag) for b in p.buffers] == [(changed, nodes[1]["period"])]
    buffered = next(n for n in p.nodes if n.node.node_id == changed)
    assert buffered.action is Action.BUFFER and buffered.previous_schema_hash == "old-hash"
    assert p.counts["buffered"] == 1 and p.counts["new"] == 0


def test_name_lengthened_only_for_a_different_owner() -> None:
    n = node(tags=["ETH"])
    d = dag.parse(encode([n]))
    base = plan.candidate_topics(d, "w1.live")[0]
    other = NodeId("blake3:" + "1" * 64)
    p = plan.plan(d, REQ, {}, {base: other}, CATALOG)
    digest = n["node_id"][7:]
    assert p.nodes[0].topic == f"w1.live.eth_ProcessingNode_{digest[:10]}_v1"
    # its own name is never treated as a collision
    mine = plan.plan(d, REQ, {}, {base: NodeId(n["node_id"])}, CATALOG)
    assert mine.violations and mine.nodes == ()


def test_cross_context_reuse_is_a_violation() -> None:
    d = dag.parse(encode(chain(2)))
    backtest = Request("s1", execution_domain="backtest", as_of="2024-01-01")
    first = plan.plan(d, backtest, {}, {}, CATALOG)
    other_day = Request("s1", execution_domain="backtest", as_of="2025-01-01")
    p = plan.plan(d, other_day, applied(first), taken_by(first), CATALOG)
    assert len(p.violations) == 2 and p.nodes == ()
    try:
        p.raise_for_violations()
    except CrossContextReuse as e:
        assert e.reason == "CrossContextReuse" and len(e.node_ids) == 2
    else:
        raise AssertionError("no error")
    # another world has its own namespace, hence its own topics: no violation
    w2 = plan.plan(d, Request("s2", world_id="w2"), applied(first), taken_by(first), CATALOG)
    assert not w2.violations and w2.counts["new"] == 2


def test_namespace_resolution_order() -> None:
    d = dag.parse(encode(chain(1), meta={"execution_domain": "shadow"}))
    assert plan.resolve_namespace(d, Request("s", world_id="W1", execution_domain="x")) == (
        "w1.shadow"
    )
    d2 = dag.parse(encode(chain(1)))
    assert plan.resolve_namespace(d2, Request("s", world_id="w1")) == "w1.live"
    assert plan.resolve_namespace(d2, Request("s", world_id="w1", execution_domain="dryrun")) == (
        "w1.dryrun"
    )
    assert plan.resolve_namespace(d2, Request("s")) is None


def test_topic_type_catalog() -> None:
    nodes = [node("TradeOrderNode", code="a"), node("RawPriceFeed", code="b"), node(code="c")]
    p = plan.plan(dag.parse(encode(nodes)), REQ, {}, {}, CATALOG)
    kinds = [
        (
            n.spec.topic_type.value,
            n.spec.partitions,
            n.spec.replication_factor,
            n.spec.retention_ms // 86_400_000,
        )
        for n in p.nodes
        if n.spec
    ]
    assert kinds == [("trade_exec", 1, 3, 90), ("raw", 3, 3, 7), ("indicator", 1, 2, 30)]
    capped = CATALOG.capped(1)
    assert all(s.replication_factor == 1 for s in capped.specs.values())


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 30),
    st.lists(st.sampled_from(["BTC", "ETH", "spx", "Ünï", "a b", ""]), max_size=3),
    st.sampled_from(["", "w1", "World 9"]),
    st.sampled_from(["", "live", "paper", "backtest"]),
    st.sampled_from(["", "2025-01-01"]),
)
def test_plan_invariants(length: int, tags: list[str], world: str, domain: str, as_of: str) -> None:
    d = dag.parse(encode(chain(length, tags=tags)))
    req = Request("s", world_id=world, execution_domain=domain, as_of=as_of)
    p = plan.plan(d, req, {}, {}, CATALOG)
    # every non-sentinel node has exactly one queue_map entry, and names are valid and unique
    ids = [k.partition("#")[0].rsplit(":", 2)[0] for k in p.queue_map]
    assert sorted(ids) == sorted(n.node_id for n in d.nodes)
    assert all(topics.VALID_TOPIC.match(t) for t in p.queue_map.values())
    assert len(set(p.queue_map.values())) == len(p.queue_map)
    # applying the plan reaches its target: the next plan creates nothing
    again = plan.plan(d, req, applied(p), taken_by(p), CATALOG)
    assert again.creates == () and again.queue_map == p.queue_map and not again.violations


def test_a_node_buffering_past_the_max_age_is_recomputed_as_a_new_generation() -> None:
    nodes = chain(3)
    d = dag.parse(encode(nodes))
    first = plan.plan(d, REQ, {}, {}, CATALOG)
    records = applied(first)
    nid = nodes[1]["node_id"]
    old = records[nid]
    week = 7 * 86_400.0
    records[nid] = NodeRecord(nid, old.schema_hash, old.schema_compat_id, old.queues, 1_000.0)
    young = plan.plan(d, REQ, records, taken_by(first), CATALOG, now=1_000 + week - 1,
                      buffer_max_age=week)  # fmt: skip
    assert young.counts["reused"] == 3 and young.recompute_due == 1_000 + week
    due = plan.plan(d, REQ, records, taken_by(first), CATALOG, now=1_000 + week,
                    buffer_max_age=week)  # fmt: skip
    (r,) = due.recomputes
    was = next(n.topic for n in first.nodes if n.node.node_id == nid)
    assert r.node.node_id == nid and r.action is Action.CREATE and r.replaces == was
    assert r.recompute == 1 and r.topic != was and r.topic.endswith("_v1")
    assert r.compute_key != next(n.compute_key for n in first.nodes if n.node.node_id == nid)
    assert due.counts["recomputed"] == 1 and due.counts["new"] == 1
    # once written, the generation is the node's: other plans reuse the new queue
    after = applied(due)
    after[nid] = NodeRecord(nid, old.schema_hash, old.schema_compat_id,
                            after[nid].queues, None, 1)  # fmt: skip
    again = plan.plan(d, REQ, after, taken_by(due), CATALOG, now=1_000 + 2 * week,
                      buffer_max_age=week)  # fmt: skip
    assert again.creates == () and again.queue_map == due.queue_map
    # without a max age nothing is ever recomputed
    never = plan.plan(d, REQ, records, taken_by(first), CATALOG, now=10**12)
    assert never.recomputes == () and never.recompute_due is None
