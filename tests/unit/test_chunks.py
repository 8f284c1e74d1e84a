"""DiffChunk splitting: limits per chunk, and the union gives back the whole plan."""

from __future__ import annotations

from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.plan import NodeRecord, QueueRecord, Request
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.sidecar import chunks
from tests.gen import dumps, generate

REQ = Request("s1", world_id="w1")


def test_small_plan_is_one_chunk_with_crc_set_even_when_zero() -> None:
    d = dag.parse(dumps({"schema_version": "v1", "nodes": []}))
    p = plan.plan(d, REQ, {}, {}, TopicCatalog())
    (only,) = list(chunks.build(p))
    assert only.HasField("crc32") and only.crc32 == 0
    assert only.sentinel_id == "s1-sentinel" and only.version == "v1"


def test_large_maps_and_many_buffers_are_split_within_limits() -> None:
    d = dag.parse(dumps(generate(1500, seed=1)))
    first = plan.plan(d, REQ, {}, {}, TopicCatalog())
    # every node known with another schema hash: 1500 buffer instructions
    records = {
        p.node.node_id: NodeRecord(
            p.node.node_id, "old", p.node.schema_compat_id, (QueueRecord(p.topic, p.compute_key),)
        )
        for p in first.nodes
    }
    p = plan.plan(d, REQ, records, {}, TopicCatalog())
    assert len(p.buffers) == 1500
    out = list(chunks.build(p, max_bytes=24 * 1024))
    assert len(out) > 15
    union: dict[str, str] = {}
    buffers: list[str] = []
    for c in out:
        assert c.ByteSize() <= 24 * 1024
        assert len(c.buffer_nodes) <= chunks.MAX_BUFFERS
        assert c.HasField("crc32") and c.crc32 == p.crc32
        assert (c.sentinel_id, c.version) == (p.sentinel_id, p.version)
        union.update(c.queue_map)
        buffers.extend(b.node_id for b in c.buffer_nodes)
    assert union == dict(p.queue_map)
    assert sorted(buffers) == sorted(b.node.node_id for b in p.buffers)
    default = list(chunks.build(p))
    assert all(c.ByteSize() <= chunks.MAX_BYTES for c in default)
    assert len(default) == 15  # 100 buffer instructions per chunk
