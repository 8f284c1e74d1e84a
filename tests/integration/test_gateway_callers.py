"""What the Gateway really does to the sidecar, on Neo4j + Kafka: it cancels a Diff after its
0.1 s budget and retries; a strategy's producers write the moment the answer arrives; the
servers die under traffic. No timing here is a performance target (those live in
`make bench-gateway`); the bounds checked are the contract's: an outage is answered, not hung.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import aiohttp
import grpc
import pytest
import yaml
from confluent_kafka import Consumer, Producer

from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.client import GatewayClient
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from qmtl_dagmanager.ports import TopicResult
from qmtl_dagmanager.sidecar import app
from tests.conftest import Stack, free_port
from tests.gen import dumps, generate
from tests.integration.conftest import real_settings
from tests.integration.kube_harness import until
from tests.writers import _serving

pytestmark = pytest.mark.integration
ANSWER_BOUND = 5.0  # every RPC answers within this while a server is down (issue: 5 s)
GC_BOUND = 2.0  # the GC trigger answers 503 within this


def uid() -> str:
    return uuid.uuid4().hex[:6]


@pytest.fixture
async def sidecar(stack: Stack, tmp_path: Path) -> AsyncIterator[app.Sidecar]:
    s = await app.start(real_settings(stack, archive_dir=str(tmp_path), diff_answer_early=True))
    yield s
    await s.stop(0)


async def test_a_cancelled_diff_completes_and_an_identical_request_joins_it(
    sidecar: app.Sidecar, caplog: pytest.LogCaptureFixture
) -> None:
    """The Gateway's pattern with a budget no real diff meets: the call is cancelled, the work
    goes on, an identical retry joins it, and the work's result is all there."""
    caplog.set_level(logging.INFO, logger="qmtl_dagmanager.audit")
    client = GatewayClient(f"127.0.0.1:{sidecar.grpc_port}")
    diffs = sidecar.container.diffs()
    strategy, doc = f"gwc-{uid()}", dumps(generate(200, salt=uid()))
    created_before = sidecar.container.metrics.queue_create_successes._value.get()
    admin = sidecar.container.topics
    validate, entered, gate = admin.validate, asyncio.Event(), asyncio.Event()

    async def held(topics: Mapping[str, TopicSpec]) -> dict[str, TopicResult]:
        if len(topics) == 200:  # this diff's batch, nobody else's
            entered.set()  # the diff is changing state: its journal entry is being written
            await gate.wait()
        return await validate(topics)

    admin.validate = held  # type: ignore[method-assign]
    try:
        call = asyncio.create_task(client.diff(strategy, doc, world_id="w1"))
        await asyncio.wait_for(entered.wait(), 30)
        call.cancel()  # the Gateway's budget ran out
        with pytest.raises(asyncio.CancelledError):
            await call
        assert len(diffs.running()) == 1  # the work goes on without its caller
        retry = asyncio.create_task(client.diff(strategy, doc, world_id="w1", timeout=60))
        await until(lambda: sidecar.container.metrics.diff_joined._value.get() >= 1, 10)
        gate.set()
        joined = await retry  # the identical retry joined the running work
        topics = set(joined.topics_by_node("w1.live").values())
        assert len(topics) == 200
        await until(lambda: len(diffs.running()) == 0, 30)  # answered early: let it end
        # one creation of 200 topics in all: the joiner started no second one
        created = sidecar.container.metrics.queue_create_successes._value.get()
        assert created - created_before == 200
        assert len(await sidecar.container.graph.strategy_nodes(strategy)) == 200
        assert topics <= await sidecar.container.topics.list_topics()
        admin.validate = validate  # type: ignore[method-assign]
        lines = [r.getMessage() for r in caplog.records if r.name == "qmtl_dagmanager.audit"]
        mine = [line for line in lines if f"strategy={strategy}" in line]
        assert any("outcome=OK caller=left after" in line for line in mine), mine
        assert any("outcome=OK caller=answered" in line for line in mine), mine
    finally:
        await client.close()


async def test_a_producer_writing_right_after_the_answer_loses_nothing(
    sidecar: app.Sidecar, stack: Stack
) -> None:
    """The answer comes on Kafka's acknowledgement, before brokers describe the topics: a
    producer with an SDK's default settings writes to every topic at once, and a consumer
    reads every message back."""
    client = GatewayClient(f"127.0.0.1:{sidecar.grpc_port}")
    doc, run = generate(40, salt=uid()), uid()
    for n in doc["nodes"]:  # a tag of its own: other tests' queue stats never see these messages
        n["tags"] = [f"prod{run}"]
    try:
        reply = await client.diff(f"prod-{run}", dumps(doc), world_id="w1")
    finally:
        await client.close()
    topics = sorted(set(reply.topics_by_node("w1.live").values()))
    assert len(topics) == 40
    producer = Producer(stack.kafka_client())  # defaults, as the SDK's producer
    failures: list[str] = []

    def delivered(err: object, msg: object) -> None:
        if err is not None:
            failures.append(str(err))

    for t in topics:
        for i in range(3):
            producer.produce(
                t, key=f"k{i}".encode(), value=f"{t}:{i}".encode(), on_delivery=delivered
            )
    assert await asyncio.to_thread(producer.flush, 60) == 0
    assert failures == []
    consumer = Consumer(
        {
            **stack.kafka_client(),
            "group.id": f"qmtl-test-{uid()}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    got: set[bytes] = set()
    deadline = time.monotonic() + 60
    try:
        while len(got) < 3 * len(topics) and time.monotonic() < deadline:
            msg = await asyncio.to_thread(consumer.poll, 1.0)
            value = None if msg is None or msg.error() else msg.value()
            if value is not None:
                got.add(value)
    finally:
        consumer.close()
    assert got == {f"{t}:{i}".encode() for t in topics for i in range(3)}


Call = Callable[[], Awaitable[object]]


async def traffic(
    client: GatewayClient, known: tuple[str, str], stop: asyncio.Event
) -> list[tuple[str, float, str]]:
    """Every RPC in a loop, each timed; (method, seconds, status code name)."""
    out: list[tuple[str, float, str]] = []
    strategy, doc = known
    calls: dict[str, Call] = {
        "Diff(new)": lambda: client.diff(
            f"out-{uid()}", dumps(generate(5, salt=uid())), world_id="w1", timeout=30
        ),
        "Diff(again)": lambda: client.diff(strategy, doc, world_id="w1", timeout=30),
        "GetQueues": lambda: client.tags.GetQueues(pb_tags(), timeout=30),
        "GetQueueStats": lambda: client.queue_stats("tag=btc"),
        "Cleanup": lambda: client.cleanup(f"gone-{uid()}"),
        "Status": client.status,
    }
    while not stop.is_set():
        for name, call in calls.items():
            t0 = time.monotonic()
            try:
                await call()
                code = "OK"
            except grpc.aio.AioRpcError as e:
                code = e.code().name
            out.append((name, time.monotonic() - t0, code))
    return out


def pb_tags() -> pb.TagQueryRequest:
    return pb.TagQueryRequest(tags=["btc"], interval=60, match_mode="any")


async def gc_trigger(port: int) -> tuple[int, float]:
    t0 = time.monotonic()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"http://127.0.0.1:{port}/admin/gc-trigger", json={"id": f"out-{uid()}"}) as r,
    ):
        await r.read()
        return r.status, time.monotonic() - t0


@pytest.mark.parametrize("server", ["neo4j", "kafka"])
async def test_an_outage_is_answered_fast_and_service_returns(
    sidecar: app.Sidecar, stack: Stack, server: str
) -> None:
    """A server killed under traffic: every RPC answers (UNAVAILABLE where it needs the dead
    server) within 5 s, the GC trigger 503 within 2 s; after a restart everything works."""
    clients = [GatewayClient(f"127.0.0.1:{sidecar.grpc_port}") for _ in range(3)]
    known = (f"known-{uid()}", dumps(generate(10, salt=uid())))
    await clients[0].diff(*known, world_id="w1")
    stop = asyncio.Event()
    try:
        await asyncio.to_thread(stack.kill_server, server)
        runs = [asyncio.create_task(traffic(c, known, stop)) for c in clients]
        triggers = []
        for _ in range(3):
            triggers.append(await gc_trigger(sidecar.http_port))
            await asyncio.sleep(2)
        stop.set()
        calls = [c for r in runs for c in await r]
    finally:
        stop.set()
        await asyncio.to_thread(stack.start_server, server)
    slow = [c for c in calls if c[1] > ANSWER_BOUND]
    assert not slow, slow
    assert {code for _, _, code in calls} <= {"OK", "UNAVAILABLE"}, calls
    needs = {"Diff(new)", "GetQueueStats"} if server == "kafka" else {"Diff(new)", "GetQueues"}
    refused = {name for name, _, code in calls if code == "UNAVAILABLE"}
    assert needs <= refused, refused
    assert all(status == 503 and secs <= GC_BOUND for status, secs in triggers), triggers
    status = [c for c in calls if c[0] == "Status"]
    assert status  # the custom health call answered throughout

    # back in service: a new strategy's diff succeeds again
    async def recovered() -> bool:
        try:
            await clients[0].diff(
                f"back-{uid()}", dumps(generate(5, salt=uid())), world_id="w1", timeout=10
            )
        except grpc.aio.AioRpcError:
            return False
        return True

    deadline = time.monotonic() + 90
    while not await recovered():
        assert time.monotonic() < deadline, f"no diff succeeded 90 s after {server} restarted"
        await asyncio.sleep(1)
    for c in clients:
        await c.close()


async def test_a_sidecar_killed_after_its_answer_is_completed_by_another(
    stack: Stack, tmp_path: Path
) -> None:
    """Sidecar A answers a new 1k-node DAG (journaled, validated) and is SIGKILLed at once,
    before its work writes the graph; sidecar B's journal replays the entry: the graph holds
    the strategy and every topic of A's answer exists."""
    grpc_port = free_port()
    cfg = tmp_path / "a.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "neo4j_dsn": stack.neo4j_uri,
                "neo4j_user": stack.neo4j_user,
                "kafka_dsn": stack.kafka_bootstrap,
                "grpc_port": grpc_port,
                "http_port": free_port(),
                "gc_interval_seconds": 0,
                "gc_archive_bucket": str(tmp_path / "archive"),
                "diff_answer_early": True,
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))}
    env["NEO4J_PASSWORD"] = stack.neo4j_password
    env["NEO4J_SSL_CA"] = stack.neo4j_ca
    env.update(stack.kafka_process_env())
    with (tmp_path / "a.log").open("wb") as out:
        a = subprocess.Popen(
            [sys.executable, "-m", "qmtl_dagmanager.cli", "--config", str(cfg), "server"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    graph = Neo4jGraphStore(
        stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca
    )
    strategy, client = f"kill9-{uid()}", GatewayClient(f"127.0.0.1:{grpc_port}")
    try:
        await _serving(grpc_port, a)
        reply = await client.diff(strategy, dumps(generate(1000, salt=uid())), world_id="w1")
        a.send_signal(signal.SIGKILL)  # at once: its work is still creating and writing
        a.wait(30)
        handed_out = set(reply.topics_by_node("w1.live").values())
        assert len(handed_out) == 1000
        pending = [e for e in await graph.pending_diffs(time.time() + 60, 100)
                   if e.request.strategy_id == strategy]  # fmt: skip
        assert len(pending) == 1, "A wrote the graph before it died: nothing left to replay"
        assert len(await graph.strategy_nodes(strategy)) < 1000
    finally:
        await client.close()
        if a.poll() is None:
            a.send_signal(signal.SIGKILL)
            a.wait(30)
    b = await app.start(
        real_settings(
            stack,
            archive_dir=str(tmp_path / "b"),
            diff_journal_grace_seconds=1,
            diff_answer_early=True,
            diff_journal_interval_seconds=1,
        )
    )
    try:

        async def written() -> bool:
            return len(await graph.strategy_nodes(strategy)) == 1000

        await until_async(written, 90)
        assert handed_out <= await b.container.topics.list_topics()
        left = await graph.pending_diffs(time.time() + 60, 100)
        assert not [e for e in left if e.request.strategy_id == strategy]
        assert b.container.metrics.diff_journal_replays.labels("completed")._value.get() >= 1
    finally:
        await b.stop(0)
        await graph.close()


async def until_async(check: Callable[[], Awaitable[bool]], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout:g} s")
        await asyncio.sleep(0.5)
