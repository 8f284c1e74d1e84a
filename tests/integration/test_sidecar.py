"""The sidecar as the Gateway sees it: every RPC, over loopback gRPC, on both backends."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qmtl_dagmanager.client import DiffReply
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from tests.gen import dumps, generate
from tests.integration.conftest import Running
from tests.unit.dags import node

DATA = Path(__file__).parent.parent / "data"


def uid() -> str:
    return uuid.uuid4().hex[:8]


async def topics_exist(s: Running, reply: DiffReply, namespace: str | None) -> None:
    wanted = set(reply.topics_by_node(namespace).values())
    have = await s.sidecar.container.topics.list_topics()
    assert wanted <= have, sorted(wanted - have)[:5]


async def test_sample_dag_round_trip(sidecar: Running) -> None:
    raw = (DATA / "sample-dag.json").read_text()
    doc = json.loads(raw)
    salt = uid()
    for n in doc["nodes"]:  # fresh content per run, same shape: recompute nothing else
        n["name"] = f"{n['name']}-{salt}"
    strategy = f"s-{salt}"
    first = await sidecar.client.diff(strategy, json.dumps(doc), world_id="w1")
    assert first.sentinel_id == f"{strategy}-sentinel" and first.version == "v1"
    assert len(first.queue_map) == 3
    ids = {n["node_id"] for n in doc["nodes"]}
    assert set(first.topics_by_node("w1.dryrun")) == ids
    assert all(t.startswith("w1.dryrun.") for t in first.queue_map.values())
    await topics_exist(sidecar, first, "w1.dryrun")
    again = await sidecar.client.diff(strategy, json.dumps(doc), world_id="w1")
    assert again.queue_map == first.queue_map
    status = await sidecar.client.status()
    assert status == {"neo4j": "ok", "state": "running"}


@pytest.mark.parametrize("size", [10, 200, 2000])
async def test_generated_dags(sidecar: Running, size: int) -> None:
    doc = generate(size, seed=size, salt=uid())
    text = dumps(doc)
    reply = await sidecar.client.diff(f"gen-{uid()}", text, world_id="w1")
    assert len(reply.queue_map) == size
    assert set(reply.topics_by_node("w1.live")) == {n["node_id"] for n in doc["nodes"]}
    await topics_exist(sidecar, reply, "w1.live")
    # the tag groups of new queues were announced with their full queue sets
    events = await sidecar.sidecar.container.graph.queues_by_tags(["BTC"], 60, "any")
    assert events or "BTC" not in text


async def test_schema_change_is_buffered(sidecar: Running) -> None:
    doc = generate(30, seed=3, salt=uid())
    strategy = f"buf-{uid()}"
    await sidecar.client.diff(strategy, dumps(doc), world_id="w1")
    changed = [n for n in doc["nodes"] if n["node_type"] == "ProcessingNode"][:2]
    for n in changed:
        n["schema_hash"] = "f" * 64  # not part of the NodeID
    reply = await sidecar.client.diff(strategy, dumps(doc), world_id="w1")
    assert sorted(b.node_id for b in reply.buffers) == sorted(n["node_id"] for n in changed)
    assert all(
        b.lag == next(n["period"] for n in changed if n["node_id"] == b.node_id)
        for b in reply.buffers
    )
    assert len(reply.queue_map) == 30


async def test_concurrent_dry_runs_share_a_strategy_id(sidecar: Running) -> None:
    docs = [dumps(generate(50, seed=i, salt=uid())) for i in range(20)]
    replies = await asyncio.wait_for(
        asyncio.gather(*(sidecar.client.diff("dryrun", d, world_id="w1") for d in docs)), timeout=60
    )
    assert all(r.sentinel_id == "dryrun-sentinel" and len(r.queue_map) == 50 for r in replies)
    # a dry run writes nothing
    graph = sidecar.sidecar.container.graph
    assert await graph.strategy_nodes("dryrun") == set()


async def test_malformed_requests_are_invalid_argument(sidecar: Running) -> None:
    cases = [
        "{",
        json.dumps({"schema_version": "v9", "nodes": []}),
        json.dumps({"nodes": [{"node_id": "blake3:xyz", "node_type": "N"}]}),
    ]
    doc = generate(3, salt=uid())
    doc["nodes"][1]["period"] = 12345  # content no longer matches its id
    cases.append(dumps(doc))
    for text in cases:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await sidecar.client.diff(f"bad-{uid()}", text)
        assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
        assert info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sidecar.client.diff(f"bad-{uid()}", text)
    assert doc["nodes"][1]["node_id"] in (info.value.details() or "")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sidecar.client.diff("", dumps(generate(2)))
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sidecar.client.get_queues(["BTC"], 60, "sometimes")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sidecar.client.queue_stats("colour=red")
    assert info.value.code() is grpc.StatusCode.INVALID_ARGUMENT


async def test_cross_context_reuse_is_failed_precondition(sidecar: Running) -> None:
    text = dumps(generate(5, salt=uid(), namespace=None))
    await sidecar.client.diff(f"a-{uid()}", text, execution_domain="backtest", as_of="2024")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sidecar.client.diff(f"b-{uid()}", text, execution_domain="backtest", as_of="2025")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "CrossContextReuse" in (info.value.details() or "")


async def test_tag_queries_cleanup_stats_and_redo(sidecar: Running) -> None:
    salt = uid()
    doc = generate(40, seed=7, salt=salt)
    strategy = f"q-{salt}"
    reply = await sidecar.client.diff(strategy, dumps(doc), world_id="w1")
    btc = await sidecar.client.get_queues(["BTC"], 60, "any")
    btc_nodes = {n["node_id"] for n in doc["nodes"] if "BTC" in n["tags"]}
    mine = {
        t.removeprefix("w1.live.") for nid, t in reply.topics_by_node().items() if nid in btc_nodes
    }
    assert mine <= {q for q, _ in btc} and not any(g for _, g in btc)
    stats = await sidecar.client.queue_stats("tag=BTC;interval=1m")
    assert set(stats) >= {t for nid, t in reply.topics_by_node().items() if nid in btc_nodes}
    assert set(stats.values()) == {0}
    graph = sidecar.sidecar.container.graph
    assert len(await graph.strategy_nodes(strategy)) == 40
    doc["meta"]["version"] = "hotfix-2"
    fix = node("RawPriceFeed", tags=["BTC"], code=f"hotfix-{salt}")
    redo = await sidecar.client.redo_diff(
        f"{strategy}-sentinel", dumps({**doc, "nodes": [*doc["nodes"], fix]})
    )
    assert redo.sentinel_id == f"{strategy}-sentinel" and redo.version == "hotfix-2"
    redone = dict(redo.queue_map)
    new = {k: t for k, t in redone.items() if k.startswith(fix["node_id"])}
    assert len(new) == 1 and next(iter(new.values())).endswith("_hotfix-2")  # its own topic
    assert {k: t for k, t in redone.items() if k not in new} == reply.queue_map  # the rest reused
    # back to the submitted DAG (the hotfix node is no longer referenced)
    await sidecar.client.redo_diff(f"{strategy}-sentinel", dumps(doc))
    await sidecar.client.cleanup(strategy)
    assert await graph.strategy_nodes(strategy) == set()
    # the same bytes again after a cleanup: the cached answer is not trusted blindly
    again = await sidecar.client.diff(strategy, dumps(doc), world_id="w1")
    assert again.queue_map == reply.queue_map
    assert len(await graph.strategy_nodes(strategy)) == 40


async def test_standard_grpc_health(sidecar: Running) -> None:
    stub = health_pb2_grpc.HealthStub(sidecar.client.channel)
    for service in ("", "qmtl.services.dagmanager.DiffService"):
        # types-grpcio-health-checking's HealthStub declares no RPCs
        r = await stub.Check(health_pb2.HealthCheckRequest(service=service))  # type: ignore[attr-defined]
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    ack = await sidecar.client.diff_stub.AckChunk(pb.ChunkAck(sentinel_id="x", chunk_id=0))
    assert (ack.sentinel_id, ack.chunk_id) == ("x", 0)


async def test_http_admin(sidecar: Running) -> None:
    await sidecar.client.diff(f"h-{uid()}", dumps(generate(5, salt=uid())), world_id="w1")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{sidecar.http}/status") as r:
            assert r.status == 200
            assert await r.json() == {"status": "ok", "neo4j": "ok", "dagmanager": "running"}
        async with http.post(f"{sidecar.http}/admin/gc-trigger", json={}) as r:
            assert r.status == 422
        async with http.post(f"{sidecar.http}/admin/gc-trigger", json={"id": "run-1"}) as r:
            assert r.status == 202
            body = await r.json()
            assert set(body) >= {"processed", "report"} and body["id"] == "run-1"
        async with http.get(f"{sidecar.http}/metrics") as r:
            text = await r.text()
    for name in (
        "diff_duration_seconds_bucket",
        "diff_requests_total",
        "diff_failures_total",
        "queue_create_error_total",
        "sentinel_gap_count",
        "orphan_queue_total",
        "compute_nodes_total",
        "queues_total",
        "cross_context_cache_hit_total",
        "gc_last_run_timestamp",
    ):
        assert name in text, name
    assert "diff_requests_total 1.0" in text
