"""Faults on the real stack, each followed by a check that the graph, the topics and the
resources are exactly what they should be: no loss, no duplicate, no half-written plan."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qmtl_dagmanager.adapters.archive import MemoryArchive
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.client import GatewayClient
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.gc import DAY, GcLimits
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.garbage import GcService
from qmtl_dagmanager.services.queues import QueueService
from qmtl_dagmanager.sidecar import app
from tests.conftest import (
    Stack,
    clear_cross_context_hits,
    free_port,
    settle_publishers,
    topic_stems,
)
from tests.gen import dumps, generate
from tests.integration.conftest import real_settings
from tests.integration.kube_harness import Cluster, condition, spec_of, until
from tests.proxy import Proxy
from tests.unit.dags import encode, node

BIN = Path(sys.executable).parent / "dagmanager"


@pytest.fixture
async def sidecar(stack: Stack, tmp_path: Path) -> AsyncIterator[app.Sidecar]:
    s = await app.start(real_settings(stack, archive_dir=str(tmp_path), diff_answer_early=True))
    yield s
    await s.stop(0)


def uid() -> str:
    return uuid.uuid4().hex[:6]


async def test_neo4j_killed_mid_diff_leaves_the_graph_unchanged(
    sidecar: app.Sidecar, stack: Stack
) -> None:
    """Neo4j stops after the sidecar answered (journaled) and before the diff's graph write:
    the work fails, nothing is half-written, the journal entry stays, and once Neo4j is back
    the Gateway's resubmission completes the strategy and removes the entry."""
    graph = sidecar.container.graph
    strategy, doc = f"neo-{uid()}", dumps(generate(30, salt=uid()))
    write = graph.apply
    stopped = False

    async def crash_first(*a: Any, **k: Any) -> tuple[str, ...]:
        nonlocal stopped
        graph.apply = write  # type: ignore[method-assign]
        await asyncio.to_thread(stack.stop_server, "neo4j")  # dies between read and write
        stopped = True
        return await write(*a, **k)

    graph.apply = crash_first  # type: ignore[method-assign]
    client = GatewayClient(f"127.0.0.1:{sidecar.grpc_port}")
    failures = sidecar.container.metrics.diff_completion_failures
    try:
        reply = await client.diff(strategy, doc, world_id="w1", timeout=60)  # answered early
        answered = set(reply.topics_by_node("w1.live").values())
        running = sidecar.container.diffs().running()
        await until(lambda: len(running) == 0, 120, "the diff's work to end")
        assert stopped
        assert failures.labels("Neo4jUnavailable")._value.get() >= 1
        await asyncio.to_thread(stack.start_server, "neo4j")
        stopped = False
        assert len(await graph.strategy_nodes(strategy)) == 0  # nothing half-written
        left = await graph.pending_diffs(time.time() + 60, 100)
        assert [e.request.strategy_id for e in left].count(strategy) == 1  # to be replayed
        reply = await client.diff(strategy, doc, world_id="w1", timeout=60)
        await until(lambda: len(running) == 0, 120, "the resubmission's work to end")
        assert len(await graph.strategy_nodes(strategy)) == 30
        topics = set(reply.topics_by_node("w1.live").values())
        assert topics == answered  # the names handed out first are the ones created
        assert len(topics) == 30 and topics <= await sidecar.container.topics.list_topics()
        left = await graph.pending_diffs(time.time() + 60, 100)
        assert strategy not in [e.request.strategy_id for e in left]
    finally:
        await client.close()
        if stopped:  # never leave the stack short of a server for the tests after this one
            await asyncio.to_thread(stack.start_server, "neo4j")


async def test_kafka_killed_during_topic_creation_converges_without_duplicates(
    sidecar: app.Sidecar, stack: Stack
) -> None:
    """Kafka stops after the sidecar answered (validated, journaled) and before the topics are
    created: the work fails after its answer, nothing is written; once Kafka is back the
    resubmission creates exactly the names handed out, none misnamed or twice."""
    admin = sidecar.container.topics
    strategy, salt = f"kaf-{uid()}", uid()
    doc = dumps(generate(20, salt=salt))
    ensure = admin.ensure
    stopped = False

    async def crash_first(*a: Any, **k: Any) -> Any:
        nonlocal stopped
        admin.ensure = ensure  # type: ignore[method-assign]
        await asyncio.to_thread(stack.stop_server, "kafka")
        stopped = True
        return await ensure(*a, **k)

    admin.ensure = crash_first  # type: ignore[method-assign]
    client = GatewayClient(f"127.0.0.1:{sidecar.grpc_port}")
    try:
        reply = await client.diff(strategy, doc, world_id="w1", timeout=120)  # answered early
        planned = set(reply.topics_by_node("w1.live").values())
        running = sidecar.container.diffs().running()
        await until(lambda: len(running) == 0, 150, "the diff's work to give up")
        assert stopped
        assert await sidecar.container.graph.strategy_nodes(strategy) == set()
        await asyncio.to_thread(stack.start_server, "kafka")
        stopped = False
        again = await client.diff(strategy, doc, world_id="w1", timeout=120)
        await until(lambda: len(running) == 0, 150, "the resubmission's work to end")
        assert set(again.topics_by_node("w1.live").values()) == planned
        stems = topic_stems(planned)
        mine = {t for t in await admin.list_topics() if any(p in t for p in stems)}
        assert len(planned) == 20 and mine == planned  # exactly the plan's, none misnamed
        assert len(await sidecar.container.graph.strategy_nodes(strategy)) == 20
    finally:
        await client.close()
        if stopped:
            await asyncio.to_thread(stack.start_server, "kafka")


async def test_latency_and_cut_connections_to_neo4j(stack: Stack, tmp_path: Path) -> None:
    scheme, _, address = stack.neo4j_uri.partition("://")
    host, port = address.rsplit(":", 1)
    proxy = await Proxy(host, int(port)).start()
    settings = dataclasses.replace(
        real_settings(stack, archive_dir=str(tmp_path)),
        neo4j_uri=f"{scheme}://127.0.0.1:{proxy.port}",  # TLS end to end, through the proxy
        node_cache_ttl_seconds=0,
        resubmission_cache_nodes=0,
    )
    s = await app.start(settings)
    client = GatewayClient(f"127.0.0.1:{s.grpc_port}")
    doc = dumps(generate(10, salt=uid()))
    try:
        await client.diff(f"px-{uid()}", doc, world_id="w1", timeout=30)
        proxy.latency = 3.0  # every chunk of the Bolt stream waits 3 s
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.diff(f"px-{uid()}", doc, world_id="w1", timeout=1.0)
        assert e.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0  # the deadline holds
        health = health_pb2_grpc.HealthStub(client.channel)
        # types-grpcio-health-checking's HealthStub declares no RPCs
        ok = await health.Check(health_pb2.HealthCheckRequest(), timeout=1.0)  # type: ignore[attr-defined]
        assert ok.status == health_pb2.HealthCheckResponse.SERVING  # the sidecar still answers
        proxy.latency, proxy.cut = 0.0, True
        proxy.sever()
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await client.diff(f"px-{uid()}", doc, world_id="w1", timeout=60)
        assert e.value.code() is grpc.StatusCode.UNAVAILABLE, e.value.details()
        assert time.monotonic() - started < 40  # bounded by the driver's retry time: no hang
        proxy.cut = False
        await until(lambda: True, 1)
        reply = await client.diff(f"px-{uid()}", doc, world_id="w1", timeout=60)
        assert len(reply.queue_map) == 10  # back to normal once the link is
    finally:
        await client.close()
        await s.stop(0)
        await proxy.stop()


async def test_cut_connections_to_kafka_are_unavailable_not_a_hang(
    stack: Stack, tmp_path: Path
) -> None:
    host, port = stack.kafka_bootstrap.rsplit(":", 1)
    proxy = await Proxy(host, int(port)).start()
    # the broker advertises its own address, so only the bootstrap goes through the proxy: a
    # cut proxy is a Kafka the sidecar cannot reach when it (re)connects
    proxy.cut = True
    admin = KafkaTopicAdmin(f"127.0.0.1:{proxy.port}", timeout=3.0, extra=stack.kafka_security)
    started = time.monotonic()
    with pytest.raises(Unavailable):
        await admin.list_topics()
    assert time.monotonic() - started < 15
    await admin.close()
    await proxy.stop()


async def test_apiserver_restart_the_watch_resumes_and_no_update_is_missed(
    cluster: Cluster, stack: Stack
) -> None:
    # a lease that outlives the restart (with the default, losing it is the right outcome)
    await cluster.stop_operator()
    cluster.lease_duration = 60
    await cluster.start_operator()
    doc = generate(3, salt=uid())
    cluster.create("api", spec_of(doc, f"api-{uid()}"))
    await cluster.ready("api")
    await asyncio.to_thread(stack.stop_server, "kube-apiserver")
    await asyncio.to_thread(stack.start_server, "kube-apiserver")
    bigger = generate(4, salt=uid())  # an update right after the restart
    cluster.patch_spec("api", {"dag": spec_of(bigger, "x")["dag"]})
    generation = cluster.get("api")["metadata"]["generation"]

    def caught_up() -> bool:
        obj = cluster.get("api")
        return (
            obj["status"].get("observedGeneration") == generation
            and condition(obj, "Ready").get("status") == "True"
        )

    await until(caught_up, 90, "the update after the restart")
    assert cluster.get("api")["status"]["nodes"]["total"] == 4


async def test_gc_never_drops_twice_nor_a_queue_that_became_referenced(
    stack: Stack, tmp_path: Path
) -> None:
    graph = Neo4jGraphStore(
        stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca
    )
    topics = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
    events, clock, metrics = MemoryEventBus(), ManualClock(time.time()), Metrics()
    bus = ControlBus(events, clock)
    diffs = DiffService(graph, topics, bus, clock, metrics)

    def service() -> GcService:
        return GcService(
            graph, topics, MemoryArchive(), bus, clock, metrics,
            limits=GcLimits(max_count=10_000, max_fraction=1.0),
        )  # fmt: skip

    async def orphans(tag: str) -> tuple[list[dict[str, Any]], set[str]]:
        salt = uid()
        nodes = [node("RawPriceFeed", tags=["BTC"], code=f"{tag}-{salt}-{i}") for i in range(3)]
        done = await diffs.diff(Request(f"{tag}-{salt}", world_id="w1"), encode(nodes))
        await QueueService(graph, topics, metrics, clock).cleanup(f"{tag}-{salt}")
        return nodes, {p.topic for p in done.plan.nodes}

    def lifecycle(mine: set[str]) -> list[str]:
        return sorted(
            e.value["data"]["queue"]
            for e in events.read("queue")
            if e.value["type"] == "queue_lifecycle" and e.value["data"]["queue"] in mine
        )

    try:
        await graph.init_schema()
        # 1. a diff references a queue again between GC's decision and its action
        nodes, mine = await orphans("race")
        clock.advance(30 * DAY)
        revived = sorted(mine)[0]
        again = next(n for n in nodes if revived.split("_")[-2] in n["node_id"])
        racing = service()
        claim = graph.claim_queue

        class Racing:
            """The graph, except that a diff gets in just before `revived` is claimed."""

            def __getattr__(self, name: str) -> Any:
                return getattr(graph, name)

            async def claim_queue(self, topic: str, *a: Any) -> bool:
                if topic == revived:
                    await diffs.diff(Request(f"back-{uid()}", world_id="w1"), encode([again]))
                return await claim(topic, *a)

        racing.graph = Racing()
        run = await racing.collect()
        assert sorted(p["queue"] for p in run.processed if p["queue"] in mine) == sorted(
            mine - {revived}
        )
        assert revived in await topics.list_topics() and lifecycle(mine) == sorted(mine - {revived})
        # 2. two GC runs at once: each queue is dropped exactly once
        _, mine = await orphans("twice")
        clock.advance(30 * DAY)
        runs = await asyncio.gather(service().collect(), service().collect())
        dropped = [p["queue"] for r in runs for p in r.processed if p["queue"] in mine]
        assert sorted(dropped) == sorted(mine) and lifecycle(mine) == sorted(mine)
        assert not mine & await topics.list_topics()
    finally:
        await settle_publishers()
        await graph.close()
        await topics.close()


async def test_operator_killed_during_a_canary_pause_resumes_the_same_step(
    cluster: Cluster, stack: Stack, tmp_path: Path
) -> None:
    await cluster.stop_operator()  # this test runs the operator as processes it can kill

    def operator() -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "KUBECONFIG": stack.kubeconfig,
            **stack.neo4j_env,
            "NEO4J_USER": stack.neo4j_user,
            "NEO4J_PASSWORD": stack.neo4j_password,
            **stack.kafka_process_env(),
            "QMTL_ARCHIVE_DIR": str(tmp_path / "archive"),
            "QMTL_GC_INTERVAL_SECONDS": "0",
        }
        with (tmp_path / "operator.log").open("ab") as out:  # the child keeps its own copy
            return subprocess.Popen(
                [
                    str(BIN), "operator", f"--namespace={cluster.namespace}",
                    f"--lease-namespace={cluster.namespace}", "--lease-duration=3",
                    "--sentinel-tick=0.5", f"--liveness=http://127.0.0.1:{free_port()}/healthz",
                    "--metrics-port=0",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )  # fmt: skip

    clear_cross_context_hits(stack)  # other tests' refusals would halt the rollout
    first = operator()
    try:
        strategy = f"kill-{uid()}"
        cluster.create(strategy, spec_of(generate(3, salt=uid()), strategy))
        await cluster.ready(strategy, 90)
        cluster.create_sentinel(
            "v2",
            {
                "strategyId": strategy, "strategyRef": {"name": strategy}, "version": "v2",
                "stableVersion": "v1", "steps": [{"weight": 20, "pause": "8s"}, {"weight": 100}],
            },
        )  # fmt: skip
        obj = await cluster.phase("v2", "Progressing", 60)
        pause_until = obj["status"]["pauseUntil"]
        first.send_signal(signal.SIGKILL)  # no clean-up, no lease release
        first.wait(10)
        second = operator()
        try:
            obj = await cluster.phase("v2", "Promoted", 90)
        finally:
            second.send_signal(signal.SIGTERM)
            second.wait(30)
        history = obj["status"]["history"]
        assert [h["weight"] for h in history] == [20, 100, 100]  # no step repeated or skipped
        advanced = next(h for h in history if h["reason"] == "StepAdvanced")
        assert advanced["time"] >= pause_until  # the pause was kept across the kill
    finally:
        if first.poll() is None:
            first.kill()
        await cluster.start_operator()  # the fixture stops it at the end
