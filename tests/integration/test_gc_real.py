"""Garbage collection on the real graph and Kafka, with an injected clock."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

from qmtl_dagmanager.adapters.archive import DirectoryStore, KafkaArchive
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.core.gc import DAY, GcLimits
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.garbage import GcService
from qmtl_dagmanager.services.queues import QueueService
from tests.conftest import Stack, settle_publishers
from tests.gen import dumps, generate
from tests.unit.dags import encode, node


async def test_gc_drops_exactly_the_eligible_queues(stack: Stack, tmp_path: Path) -> None:
    with stack.neo4j_driver() as d:
        d.execute_query("MATCH (n) DETACH DELETE n")  # only this test's queues in the graph
    graph = Neo4jGraphStore(
        stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca
    )
    topics = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
    events = MemoryEventBus()
    clock = ManualClock(time.time())
    metrics = Metrics()
    controlbus = ControlBus(events, clock)
    diffs = DiffService(graph, topics, controlbus, clock, metrics)
    gc = GcService(
        graph,
        topics,
        KafkaArchive(
            stack.kafka_bootstrap, extra=stack.kafka_security, store=DirectoryStore(tmp_path)
        ),
        controlbus,
        clock,
        metrics,
        limits=GcLimits(max_count=1000, max_fraction=1.0),
    )
    try:
        await graph.init_schema()
        salt = uuid.uuid4().hex[:6]
        raw = node("RawPriceFeed", tags=["BTC"], code=f"raw-{salt}")
        ind = node("ProcessingNode", inputs=[raw["node_id"]], code=f"ind-{salt}")
        gone = await diffs.diff(Request("a", world_id="w1"), encode([raw, ind]))
        kept = await diffs.diff(Request("b", world_id="w1"), dumps(generate(3, salt=salt)))
        raw_topic, ind_topic = (gone.plan.nodes[0].topic, gone.plan.nodes[1].topic)
        await QueueService(graph, topics, metrics, clock).cleanup("a")

        clock.advance(7.5 * DAY)  # younger than raw's TTL + grace (8 d)
        assert (await gc.collect()).processed == []
        clock.advance(1 * DAY)
        dry = await gc.collect(dry_run=True)
        assert [p["queue"] for p in dry.processed] == [raw_topic]
        assert raw_topic in await topics.list_topics()
        run = await gc.collect()
        assert [(p["queue"], p["action"]) for p in run.processed] == [(raw_topic, "drop")]
        live = await topics.list_topics()
        assert raw_topic not in live and ind_topic in live
        assert set(kept.plan.queue_map.values()) <= live
        remaining = {q.topic for q in await graph.queues()}
        assert raw_topic not in remaining and ind_topic in remaining
        lifecycle = [
            e.value["data"] for e in events.read("queue") if e.value["type"] == "queue_lifecycle"
        ]
        assert [(d["queue"], d["action"]) for d in lifecycle] == [(raw_topic, "drop")]
        assert (await gc.collect()).processed == []  # never dropped twice
        clock.advance(30 * DAY)
        assert [p["queue"] for p in (await gc.collect()).processed] == [ind_topic]
    finally:
        await settle_publishers()
        await graph.close()
