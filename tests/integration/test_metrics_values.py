"""Metrics that tell the truth: values (not names) after real actions, on the twins and on Neo4j
+ Kafka; the graph-size gauges after a restart with no traffic; and the dashboard and the alert
rules query only metrics the code exports."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import time
import uuid
from collections.abc import Callable

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from qmtl_dagmanager.client import GatewayClient
from qmtl_dagmanager.sidecar import app
from tests.conftest import Stack
from tests.gen import dumps, generate
from tests.integration.conftest import Running, real_settings

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def uid() -> str:
    return uuid.uuid4().hex[:8]


async def scrape(base: str) -> Samples:
    async with aiohttp.ClientSession() as http, http.get(f"{base}/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(m: Samples, name: str, **labels: str) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in m, f"{name}{labels} is not exported"
    return m[key]


async def eventually(base: str, check: Callable[[Samples], bool], timeout: float = 15.0) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        m = await scrape(base)
        if check(m) or time.monotonic() > deadline:
            return m
        await asyncio.sleep(0.1)


async def test_metric_values_follow_real_actions(sidecar: Running) -> None:
    base, container = sidecar.http, sidecar.sidecar.container
    # the vitals timer ran at start: both dependencies answered
    m = await eventually(base, lambda m: ("dependency_up", (("dependency", "kafka"),)) in m)
    assert value(m, "dependency_up", dependency="neo4j") == 1
    assert value(m, "dependency_up", dependency="kafka") == 1

    doc = generate(6, salt=uid(), namespace=None)
    text = dumps(doc)
    reply = await sidecar.client.diff(f"m-{uid()}", text, execution_domain="backtest", as_of="1")
    created = len(set(reply.queue_map.values()))
    assert created == 6
    while container.diffs().running():  # the sidecar answers early: its work ends after
        await asyncio.sleep(0.02)
    counts = await container.graph.counts()
    m = await eventually(base, lambda m: m.get(("compute_nodes_total", ())) == counts.compute_nodes)
    assert value(m, "queue_create_success_total") == created
    assert value(m, "queue_create_error_total") == 0
    assert value(m, "diff_chunks_sent_total") == reply.chunks >= 1
    assert value(m, "sentinel_gap_count") == 1  # the generated DAG has no VersionSentinel node
    assert value(m, "compute_nodes_total") == counts.compute_nodes
    assert value(m, "queues_total") == counts.queues
    entries = value(m, "node_cache_entries")
    resident = value(m, "nodecache_resident_bytes", scope="total")
    assert entries >= 6
    assert 150 * entries < resident < 20_000 * entries, (resident, entries)

    # the same nodes under another as-of: every one is a refused cross-context reuse
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await sidecar.client.diff(f"x-{uid()}", text, execution_domain="backtest", as_of="2")
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    m = await scrape(base)
    assert value(m, "cross_context_cache_hit_total") == 6
    # recorded in the graph too, where every process's canary rollouts see it
    assert await container.graph.cross_context_since(container.clock.now() - 60) >= 6
    assert value(m, "diff_failures_total", reason="CrossContextReuse") == 1

    before = time.time()
    async with (
        aiohttp.ClientSession() as http,
        http.post(f"{base}/admin/gc-trigger", json={"id": f"run-{uid()}"}) as r,
    ):
        assert r.status == 202
    m = await scrape(base)
    assert before - 1 <= value(m, "gc_last_run_timestamp") <= time.time() + 1


@pytest.mark.integration
async def test_graph_gauges_are_true_after_a_quiet_restart(stack: Stack) -> None:
    """A process that has served no diff yet exports the graph's real size (read at start),
    not zero: the graph-empty alert must not fire after a restart."""
    settings = real_settings(stack)
    first = await app.start(settings)
    client = GatewayClient(f"127.0.0.1:{first.grpc_port}")
    try:
        await client.diff(f"q-{uid()}", dumps(generate(4, salt=uid())))
    finally:
        await client.close()
        await first.stop(0)
    second = await app.start(dataclasses.replace(settings))
    try:
        counts = await second.container.graph.counts()
        assert counts.compute_nodes >= 4
        base = f"http://127.0.0.1:{second.http_port}"
        m = await eventually(base, lambda m: m.get(("compute_nodes_total", ()), 0) > 0)
        assert value(m, "compute_nodes_total") == counts.compute_nodes
        assert value(m, "queues_total") == counts.queues
        assert value(m, "diff_requests_total") == 0
    finally:
        await second.stop(0)


async def test_dagmanager_status_reads_a_running_sidecar(sidecar: Running) -> None:
    base = sidecar.http
    await sidecar.client.diff(f"st-{uid()}", dumps(generate(3, salt=uid())))
    await eventually(base, lambda m: ("dependency_up", (("dependency", "kafka"),)) in m)
    target = base.removeprefix("http://")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmtl_dagmanager.cli", "status", "--target", target,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    text = out.decode()
    assert proc.returncode == 1, (text, err.decode())  # the DAG had no sentinel: SLO-3 breached
    assert "neo4j    up" in text and "kafka    up" in text, text
    assert "SLO-1 diffs answered within 100 ms" in text
    assert "of 1 " in text  # one diff in the window
    assert "SLO-3" in text and "BREACHED" in text
    assert "/status  ok" in text
    assert "no timed GC in this process" in text


async def test_dagmanager_status_names_an_unreachable_target() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "qmtl_dagmanager.cli", "status", "--target", "127.0.0.1:9",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await proc.communicate()
    assert proc.returncode == 3 and "127.0.0.1:9" in err.decode()
