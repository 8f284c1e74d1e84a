"""VersionSentinel canaries driven by the operator against the real kube-apiserver, Neo4j and
Kafka: a full rollout with the weights read back from the ControlBus, an abort, an operator
restart during a pause, and an analysis gate (a small Prometheus-compatible endpoint) that
rolls back on its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from qmtl_dagmanager.adapters.kafka_events import read_events
from qmtl_dagmanager.core.conditions import epoch
from tests.conftest import Stack, clear_cross_context_hits
from tests.gen import generate
from tests.integration.kube_harness import Cluster, condition, spec_of, until


@pytest.fixture(autouse=True)
def _no_cross_context_hits(stack: Stack) -> None:
    """Other tests on the shared graph refuse cross-context reuses on purpose, and each such
    hit halts every rollout for its analysis window: start each test without any."""
    clear_cross_context_hits(stack)


def weights(stack: Stack, topic: str, sentinel_id: str) -> dict[str, list[float]]:
    """version → the weights published for it, in order."""
    out: dict[str, list[float]] = {}
    for e in read_events(stack.kafka_bootstrap, topic, extra=stack.kafka_security):
        data = e.value["data"]
        if e.key == sentinel_id and data["sentinel_id"] == sentinel_id:
            out.setdefault(data["sentinel_version"], []).append(data["weight"])
    return out


def dedup(xs: list[float]) -> list[float]:
    """Consecutive repeats folded (a repeat after a crash is allowed: same etag)."""
    return [x for i, x in enumerate(xs) if i == 0 or xs[i - 1] != x]


async def version_running(cluster: Cluster, strategy: str) -> str:
    doc = generate(5, salt=uuid.uuid4().hex[:6])
    cluster.create(strategy, spec_of(doc, strategy, version="v2"))
    await cluster.ready(strategy)
    return strategy


def sentinel_spec(strategy: str, steps: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {
        "strategyId": strategy,
        "strategyRef": {"name": strategy},
        "worldId": "w1",
        "version": "v2",
        "stableVersion": "v1",
        "commitHash": "c0ffee",
        "releaseTag": "r2",
        "steps": steps,
        **extra,
    }


async def test_rollout_reaches_promoted_and_the_controlbus_shows_each_weight(
    cluster: Cluster, stack: Stack
) -> None:
    strategy = await version_running(cluster, f"canary-{uuid.uuid4().hex[:6]}")
    steps: list[dict[str, Any]] = [
        {"weight": 10, "pause": "1s"},
        {"weight": 50, "pause": "1s"},
        {"weight": 100},
    ]
    cluster.create_sentinel("v2", sentinel_spec(strategy, steps, rollbackWindow="1h"))
    obj = await cluster.phase("v2", "Promoted", 60)
    st = obj["status"]
    assert (st["currentWeight"], st["stableWeight"]) == (100, 0)
    assert [h["weight"] for h in st["history"]] == [10, 50, 100, 100]
    assert condition(obj, "Promoted")["status"] == "True" and st["rollbackWindowEndsAt"]
    sid = f"{strategy}-sentinel"
    got = weights(stack, cluster.settings.sentinel_weight_topic, sid)
    assert dedup(got["v2"]) == [0.1, 0.5, 1.0]
    assert dedup(got["v1"]) == [0.9, 0.5, 0.0]
    graph = cluster.container.graph
    rec = await graph.sentinel(sid, "v2")
    assert rec is not None and rec.weight == 1.0 and rec.has == 5
    assert (rec.commit_hash, rec.release_tag) == ("c0ffee", "r2")
    assert [w for _, w in rec.history] == [0.1, 0.5, 1.0]
    assert await graph.sentinel_weights(sid) == {"v1": 0.0, "v2": 1.0}
    reasons = " ".join(cluster.events("v2"))
    assert "Started" in reasons and "StepAdvanced" in reasons and "StepsCompleted" in reasons
    # a rollback within the window returns all traffic to v1
    cluster.act("v2", "rollback")
    obj = await cluster.phase("v2", "RolledBack")
    assert obj["status"]["currentWeight"] == 0
    assert condition(obj, "Degraded")["status"] == "True"
    assert await graph.sentinel_weights(sid) == {"v1": 1.0, "v2": 0.0}


async def test_abort_at_fifty_returns_the_canary_to_zero(cluster: Cluster, stack: Stack) -> None:
    strategy = await version_running(cluster, f"abort-{uuid.uuid4().hex[:6]}")
    steps: list[dict[str, Any]] = [
        {"weight": 10, "pause": "0.5s"},
        {"weight": 50, "pause": "indefinite"},
        {"weight": 100},
    ]
    cluster.create_sentinel("v2", sentinel_spec(strategy, steps))
    obj = await cluster.phase("v2", "Paused")
    assert obj["status"]["currentWeight"] == 50
    cluster.patch_sentinel("v2", {"spec": {"abort": True}})
    obj = await cluster.phase("v2", "Aborted")
    assert (obj["status"]["currentWeight"], obj["status"]["abortedBy"]) == (0, "spec")
    got = weights(stack, cluster.settings.sentinel_weight_topic, f"{strategy}-sentinel")
    assert dedup(got["v2"]) == [0.1, 0.5, 0.0] and dedup(got["v1"]) == [0.9, 0.5, 1.0]
    # abort back to false starts over from the first step
    cluster.patch_sentinel("v2", {"spec": {"abort": False}})
    obj = await cluster.phase("v2", "Paused")
    history = [(h["weight"], h["reason"]) for h in obj["status"]["history"]]
    assert history[-3:] == [(0, "Aborted"), (10, "Retried"), (50, "StepAdvanced")]


async def test_a_restart_during_a_pause_resumes_at_the_same_step(cluster: Cluster) -> None:
    strategy = await version_running(cluster, f"restart-{uuid.uuid4().hex[:6]}")
    steps: list[dict[str, Any]] = [{"weight": 20, "pause": "6s"}, {"weight": 100}]
    cluster.create_sentinel("v2", sentinel_spec(strategy, steps))
    obj = await cluster.phase("v2", "Progressing")
    pause_until = epoch(obj["status"]["pauseUntil"])
    assert pause_until is not None and obj["status"]["currentWeight"] == 20
    await cluster.stop_operator()
    await cluster.start_operator()
    obj = await cluster.phase("v2", "Promoted", 60)
    assert time.time() >= pause_until  # the pause was neither restarted nor cut short
    advanced = [h for h in obj["status"]["history"] if h["reason"] == "StepAdvanced"]
    assert len(advanced) == 1 and epoch(advanced[0]["time"]) >= pause_until  # type: ignore[operator]
    assert [h["weight"] for h in obj["status"]["history"]] == [20, 100, 100]


@pytest.fixture
async def prometheus() -> AsyncIterator[tuple[dict[str, float], str]]:
    """A Prometheus-compatible /api/v1/query answering the value the test sets."""
    value = {"error_rate": 0.01}

    async def query(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "status": "success",
                "data": {"resultType": "scalar", "result": [time.time(), str(value["error_rate"])]},
            }
        )

    app = web.Application()
    app.router.add_get("/api/v1/query", query)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield value, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_failing_gate_rolls_back_on_its_own(
    cluster: Cluster, stack: Stack, prometheus: tuple[dict[str, float], str]
) -> None:
    value, url = prometheus
    strategy = await version_running(cluster, f"gate-{uuid.uuid4().hex[:6]}")
    gate = {"name": "errors", "query": "error_rate", "threshold": 0.05, "interval": "1s"}
    steps: list[dict[str, Any]] = [
        {"weight": 10, "pause": "1s"},
        {"weight": 40, "pause": "1h"},
        {"weight": 100},
    ]
    cluster.create_sentinel(
        "v2", sentinel_spec(strategy, steps, analysis=[gate], prometheusUrl=url)
    )
    obj = await cluster.phase("v2", "Progressing")
    await until(  # the gate passes: the first step completes
        lambda: cluster.sentinel("v2")["status"]["currentWeight"] == 40, 30, "weight 40"
    )
    value["error_rate"] = 0.3  # the canary misbehaves
    obj = await cluster.phase("v2", "RolledBack", 30)
    st = obj["status"]
    assert (st["currentWeight"], st["reason"]) == (0, "AnalysisFailed")
    assert st["gates"]["errors"]["lastValue"] == 0.3
    assert any(e.startswith("AnalysisFailed") for e in cluster.events("v2"))
    got = weights(stack, cluster.settings.sentinel_weight_topic, f"{strategy}-sentinel")
    assert dedup(got["v2"]) == [0.1, 0.4, 0.0] and dedup(got["v1"])[-1] == 1.0


async def test_a_cross_context_hit_halts_the_rollout_until_its_window_is_clear(
    cluster: Cluster,
) -> None:
    strategy = await version_running(cluster, f"halt-{uuid.uuid4().hex[:6]}")
    # another process refused a cross-context reuse just now (recorded in the shared graph)
    await cluster.container.graph.record_cross_context("elsewhere", 2, time.time())
    steps: list[dict[str, Any]] = [{"weight": 10, "pause": "1s"}, {"weight": 100}]
    started = time.monotonic()
    cluster.create_sentinel("v2", sentinel_spec(strategy, steps, analysisWindow="12s"))

    def halted() -> dict[str, Any] | None:
        obj = cluster.sentinel("v2")
        c = condition(obj, "Halted") if (obj.get("status") or {}).get("conditions") else {}
        return obj if c.get("status") == "True" else None

    obj = await until(halted, 30, "Halted=True")
    assert condition(obj, "Halted")["reason"] == "CrossContextHit"
    assert "2 node(s)" in condition(obj, "Halted")["message"]
    assert obj["status"]["currentWeight"] == 10
    cluster.act("v2", "promote")  # refused while halted
    await until(lambda: "ActionHalted" in " ".join(cluster.events("v2")), 30, "ActionHalted")
    assert cluster.sentinel("v2")["status"]["phase"] == "Progressing"
    obj = await cluster.phase("v2", "Promoted", 60)
    assert time.monotonic() - started >= 10  # not before the hit left the 12 s window
    assert condition(obj, "Halted")["status"] == "False"
    reasons = " ".join(cluster.events("v2"))
    assert "CrossContextHit" in reasons and "CrossContextClear" in reasons
