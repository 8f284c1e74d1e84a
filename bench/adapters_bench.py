"""Benchmark of the real adapters on the local stack (Neo4j and Kafka).

    python bench/adapters_bench.py     # needs the stack: `make stack-up`, or the env variables

Cases: read the records of 1k known nodes (one query); write a 1k-node plan (one transaction);
batch-create 1k topics on the local broker. The bench removes only what it created.
"""

from __future__ import annotations

import asyncio
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.topics import TopicCatalog, TopicSpec, TopicType
from qmtl_dagmanager.ports import SentinelWrite

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.common import backend_settings, neo4j_driver, stack_env  # noqa: E402


def row(case: str, times: list[float]) -> None:
    med = statistics.median(times) * 1e3
    p90 = sorted(times)[max(int(len(times) * 0.9) - 1, 0)] * 1e3
    print(f"{case:<44} {med:>10.2f} {p90:>8.2f} {len(times):>5}", flush=True)


async def main() -> None:
    e = stack_env()
    raw = (ROOT / "tests" / "data" / "bench-dag-1k.json").read_bytes()
    d = dag.parse(raw, ids=dag.IdMode.TRUST)
    ids = [n.node_id for n in d.nodes]
    req = plan.Request(f"bench-{uuid.uuid4().hex[:6]}", world_id="w1", execution_domain="live")
    s = backend_settings(e)
    store = Neo4jGraphStore(s.neo4j_uri, s.neo4j_user, s.neo4j_password, ca=s.neo4j_ssl_ca)
    sync = neo4j_driver(e)

    def forget() -> None:
        sync.execute_query(
            "UNWIND $ids AS id MATCH (n:ComputeNode {node_id: id}) "
            "OPTIONAL MATCH (n)-[:EMITS]->(q:Queue) DETACH DELETE n, q",
            ids=ids,
        )
        sync.execute_query(
            "MATCH (s:Strategy {strategy_id: $s}) DETACH DELETE s", s=req.strategy_id
        )
        sync.execute_query(
            "MATCH (v:VersionSentinel {sentinel_id: $s}) DETACH DELETE v",
            s=plan.sentinel_id(req.strategy_id),
        )

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}"
    )
    print(f"{'case':<44} {'median ms':>10} {'p90 ms':>8} {'runs':>5}")
    await store.init_schema()
    ns = plan.resolve_namespace(d, req)
    candidates = plan.candidate_topics(d, ns)
    p = plan.plan(d, req, {}, {}, TopicCatalog())
    writes = []
    for _ in range(15):
        forget()
        t0 = time.perf_counter()
        await store.apply(p, time.time(), SentinelWrite.from_plan(p, None))
        writes.append(time.perf_counter() - t0)
    row("neo4j: write a 1k-node plan (1 transaction)", writes)
    rewrites = []
    for _ in range(15):
        t0 = time.perf_counter()
        await store.apply(p, time.time(), SentinelWrite.from_plan(p, None))
        rewrites.append(time.perf_counter() - t0)
    row("neo4j: re-write the same plan (no change)", rewrites)
    known = await store.read(ids, candidates)
    reuse = plan.plan(d, req, known.records, known.owners, TopicCatalog())
    assert reuse.counts["reused"] == len(ids)
    resubmits = []
    for _ in range(15):
        t0 = time.perf_counter()
        await store.apply(reuse, time.time(), SentinelWrite.from_plan(reuse, None))
        resubmits.append(time.perf_counter() - t0)
    row("neo4j: write a resubmission (all reused)", resubmits)
    reads = []
    for _ in range(50):
        t0 = time.perf_counter()
        got = await store.read(ids, candidates)
        reads.append(time.perf_counter() - t0)
    assert len(got.records) == len(ids)
    row("neo4j: read records of 1k known nodes", reads)
    forget()
    await store.close()
    sync.close()

    await kafka(e["KAFKA_BOOTSTRAP_SERVERS"])


async def kafka(bootstrap: str) -> None:
    admin = KafkaTopicAdmin(bootstrap, timeout=60)
    spec = TopicSpec(TopicType.INDICATOR, 1, 1, (("retention.ms", "86400000"),))
    creates = []
    for _ in range(3):
        run = uuid.uuid4().hex[:6]
        names = {f"bench-{run}-{i}": spec for i in range(1000)}
        t0 = time.perf_counter()
        res = await admin.ensure(names)
        creates.append(time.perf_counter() - t0)
        assert all(r.ok for r in res.values())
        await admin.delete(list(names))
    row("kafka: batch-create 1k topics (1 partition)", creates)


if __name__ == "__main__":
    asyncio.run(main())
