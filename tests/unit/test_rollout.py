"""The VersionSentinel rollout use case on the twins and a manual clock: no API server, no
Prometheus, no sleeps. Each test drives `RolloutService.reconcile` the way the tick timer
does (the status it returned becomes the next call's old status) and checks the status, the
events, the graph's sentinel weights and the ControlBus."""

from __future__ import annotations

from typing import Any

import pytest

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.api.v1alpha1.versionsentinel import parse_spec
from qmtl_dagmanager.core import canary
from qmtl_dagmanager.core.conditions import same
from qmtl_dagmanager.core.errors import Conflict, InvalidSpec, Unavailable
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.core.rollout import Run, SentinelSpec, rollback_target
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.canary import CanaryService
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.rollout import RolloutOutcome, RolloutService
from tests.unit.dags import encode, node


class Readiness:
    """StrategyDAGs by name: the strategy id once Ready, None before."""

    def __init__(self) -> None:
        self.ready_ids: dict[str, str | None] = {}
        self.down = False

    async def ready(self, namespace: str, name: str) -> str | None:
        if self.down:
            raise Unavailable("the API server did not answer")
        return self.ready_ids.get(name)


class Metric:
    """PromQL answers by query; a missing query is unreadable."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.asked: list[tuple[str, str]] = []

    async def value(self, base_url: str, query: str) -> float:
        self.asked.append((base_url, query))
        if query not in self.values:
            raise Unavailable(f"{query}: no samples", reason="MetricUnavailable")
        return self.values[query]


class Rig:
    def __init__(self) -> None:
        self.clock = ManualClock()
        self.graph = MemoryGraphStore()
        self.bus = MemoryEventBus(history=1000)
        self.controlbus = ControlBus(self.bus, self.clock)
        self.metrics = Metrics()
        self.metric = Metric()
        self.readiness = Readiness()
        canary = CanaryService(self.graph, self.controlbus, self.clock, self.metrics, self.metric)
        self.service = RolloutService(canary, self.readiness, self.clock, self.metrics)
        self.status: dict[str, Any] = {}
        self.generation = 1
        self.events: list[tuple[bool, str, str]] = []

    async def tick(
        self, spec: SentinelSpec, action: tuple[str, str] | None = None
    ) -> RolloutOutcome:
        out = await self.service.reconcile(spec, self.status, self.generation, "ns", action, "vs")
        if out.status is not None:
            self.status = out.status
        self.events += [(n.warning, n.reason, n.message) for n in out.notices]
        return out

    def weights(self) -> list[tuple[str, float]]:
        return [
            (e.value["data"]["sentinel_version"], e.value["data"]["weight"])
            for e in self.bus.read(self.controlbus.topics.sentinel_weight)
        ]


def spec(**extra: Any) -> SentinelSpec:
    body: dict[str, Any] = {
        "strategyId": "alpha",
        "version": "v2",
        "stableVersion": "v1",
        "strategyRef": {"name": "alpha-v2"},
        "steps": [{"weight": 10, "pause": 60}, {"weight": 50, "pause": 60}, {"weight": 100}],
        **extra,
    }
    return parse_spec(body)


async def test_waits_for_the_strategy_then_steps_10_50_100() -> None:
    rig = Rig()
    s = spec()
    out = await rig.tick(s)
    assert rig.status["phase"] == "Pending" and rig.weights() == []
    assert out.transitions == []
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    await rig.tick(s)
    assert (rig.status["phase"], rig.status["currentWeight"]) == ("Progressing", 10)
    assert rig.weights() == [("v2", 0.1), ("v1", 0.9)]
    assert await rig.graph.sentinel_weights(s.sentinel_id) == {"v2": 0.1, "v1": 0.9}
    # nothing is due before the pause ends: no status write, no new event
    rig.clock.advance(30)
    assert (await rig.tick(s)).status is None
    assert len(rig.weights()) == 2
    rig.clock.advance(31)
    await rig.tick(s)
    assert rig.status["currentWeight"] == 50
    rig.clock.advance(61)
    await rig.tick(s)
    assert (rig.status["phase"], rig.status["currentWeight"]) == ("Progressing", 100)
    await rig.tick(s)  # the last step has no pause: the next tick promotes (one step a tick)
    assert (rig.status["phase"], rig.status["currentWeight"]) == ("Promoted", 100)
    assert rig.weights()[-2:] == [("v2", 1.0), ("v1", 0.0)]
    history = [(h["phase"], h["weight"]) for h in rig.status["history"]]
    assert history == [
        ("Progressing", 10),
        ("Progressing", 50),
        ("Progressing", 100),
        ("Promoted", 100),
    ]
    assert all(not warning for warning, _, _ in rig.events)
    conditions = {c["type"]: c["status"] for c in rig.status["conditions"]}
    assert conditions == {
        "Progressing": "False",
        "Promoted": "True",
        "Degraded": "False",
        "Halted": "False",
    }


async def test_abort_annotation_returns_all_traffic_to_stable_once() -> None:
    rig = Rig()
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    s = spec()
    await rig.tick(s)
    await rig.tick(s, ("abort", "abort"))
    assert (rig.status["phase"], rig.status["currentWeight"]) == ("Aborted", 0)
    assert rig.status["abortedBy"] == "annotation"
    assert rig.weights()[-2:] == [("v2", 0.0), ("v1", 1.0)]
    assert any(w and reason for w, reason, _ in rig.events)  # a warning event
    # the same annotation value again is not a new action
    before = len(rig.weights())
    assert (await rig.tick(s, ("abort", "abort"))).status is None
    assert len(rig.weights()) == before


async def test_an_action_that_does_nothing_says_so() -> None:
    rig = Rig()
    await rig.tick(spec(), ("resume", "resume"))
    assert ("ActionIgnored" in [r for _, r, _ in rig.events]) and rig.weights() == []
    assert rig.status["lastAction"] == "resume"


async def test_spec_pause_holds_and_unpausing_resumes() -> None:
    rig = Rig()
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    await rig.tick(spec())
    await rig.tick(spec(paused=True))
    assert (rig.status["held"], rig.status["heldBy"]) == (True, "spec")
    rig.clock.advance(600)
    await rig.tick(spec(paused=True))
    assert rig.status["currentWeight"] == 10  # held: time does not advance the rollout
    await rig.tick(spec())
    assert rig.status["held"] is False
    rig.clock.advance(61)
    await rig.tick(spec())
    assert rig.status["currentWeight"] == 50


async def test_a_failing_gate_rolls_back_on_its_own() -> None:
    rig = Rig()
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    gated = spec(
        prometheusUrl="http://prometheus:9090",
        analysis=[{"name": "errors", "query": "error_rate", "threshold": 0.01, "interval": 10}],
    )
    rig.metric.values["error_rate"] = 0.001
    await rig.tick(gated)
    rig.clock.advance(11)
    await rig.tick(gated)
    assert rig.status["gates"]["errors"]["lastValue"] == 0.001
    assert rig.metric.asked[-1] == ("http://prometheus:9090", "error_rate")
    rig.metric.values["error_rate"] = 0.5
    rig.clock.advance(11)
    await rig.tick(gated)
    assert rig.status["phase"] in ("Aborted", "RolledBack")
    assert rig.status["currentWeight"] == 0
    assert rig.weights()[-2:] == [("v2", 0.0), ("v1", 1.0)]


async def test_an_unreadable_gate_counts_as_a_failed_measurement() -> None:
    rig = Rig()
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    gated = spec(
        prometheusUrl="http://prometheus:9090",
        analysis=[{"name": "lag", "query": "missing", "threshold": 5, "interval": 10}],
    )
    await rig.tick(gated)
    rig.clock.advance(11)
    await rig.tick(gated)
    assert rig.status["currentWeight"] == 0
    assert rig.status["gates"]["lag"]["failures"] >= 1


async def test_gates_without_a_prometheus_url_are_reported_and_move_nothing() -> None:
    rig = Rig()
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    gated = spec(analysis=[{"name": "lag", "query": "q", "threshold": 5, "interval": 10}])
    out = await rig.tick(gated)
    assert out.status is not None
    degraded = next(c for c in rig.status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "MissingField")
    assert "prometheusUrl" in degraded["message"]
    assert rig.weights() == []


async def test_a_refused_spec_is_written_once() -> None:
    rig = Rig()
    error = InvalidSpec("spec.version is required", reason="MissingField")
    first = rig.service.refuse(rig.status, 1, error)
    assert first.status is not None and first.notices[0].reason == "MissingField"
    again = rig.service.refuse(first.status, 1, error)
    assert again.status is None and again.notices == []


async def test_a_dependency_down_raises_for_a_retry_and_changes_nothing() -> None:
    rig = Rig()
    rig.readiness.down = True
    with pytest.raises(Unavailable):
        await rig.tick(spec())
    assert rig.status == {} and rig.weights() == []


async def test_a_restart_continues_from_the_status_alone() -> None:
    rig = Rig()
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    await rig.tick(spec())
    rig.clock.advance(20)
    # a new operator process: new service, same status
    fresh = Rig()
    fresh.clock, fresh.status = rig.clock, rig.status
    fresh.readiness.ready_ids["alpha-v2"] = "alpha"
    canary = CanaryService(fresh.graph, fresh.controlbus, fresh.clock, fresh.metrics, fresh.metric)
    fresh.service = RolloutService(canary, fresh.readiness, fresh.clock, fresh.metrics)
    assert (await fresh.tick(spec())).status is None  # 20 s into a 60 s pause: nothing due
    rig.clock.advance(41)
    await fresh.tick(spec())
    assert fresh.status["currentWeight"] == 50


def test_same_ignores_nulls_and_timestamps() -> None:
    old = {"phase": "Ready", "conditions": [{"type": "Ready", "lastTransitionTime": "a"}]}
    new = {
        "phase": "Ready",
        "topics": None,
        "lastReconcileTime": "b",
        "conditions": [{"type": "Ready", "lastTransitionTime": "c"}],
    }
    assert same(old, new)
    assert not same(old, {**new, "phase": "Degraded"})


async def test_promotion_retires_the_stable_version_and_an_abort_the_canary() -> None:
    """Promoted (no rollback window): v1's own queues become sentinel queues; a new
    rollout of v3 aborted: v3's own queues do, and a retry brings them back."""
    rig = Rig()
    shared = node("RawPriceFeed", tags=["BTC"], code="retire-shared")
    v1_only = node("RawPriceFeed", tags=["BTC"], code="retire-v1")
    v2_only = node("RawPriceFeed", tags=["BTC"], code="retire-v2")
    diffs = DiffService(rig.graph, MemoryTopicAdmin(), rig.controlbus, rig.clock, rig.metrics)
    p1 = (await diffs.diff(Request("alpha", world_id="w"), encode([shared, v1_only]))).plan
    await diffs.diff(Request("alpha-v2", world_id="w"), encode([shared, v2_only]))
    s = spec(steps=[{"weight": 100}])
    rig.readiness.ready_ids["alpha-v2"] = "alpha-v2"
    await rig.tick(s)  # starts at 100
    await rig.tick(s)  # promoted
    assert rig.status["phase"] == "Promoted"
    v1_topic = next(n.topic for n in p1.nodes if n.node.node_id == v1_only["node_id"])
    marks = {q.topic: q.retired for q in await rig.graph.queues()}
    assert {t for t, m in marks.items() if m} == {v1_topic}
    assert marks[v1_topic] == f"{s.sentinel_id}@v1"
    assert "VersionRetired" in {reason for _, reason, _ in rig.events}
    # a rollback window delays the stable version's retirement until it closes
    windowed = spec(steps=[{"weight": 100}], rollbackWindow=60)
    run = Run.start(windowed, canary.State(), 0.0, {})
    run.do(canary.Event.START)
    run.tick()
    assert run.retirements() == []  # promoted, window open: v1 can still take traffic back
    run.now = 61.0
    run.tick()
    assert run.retirements() == [("v1", True)]


def test_retirements_apply_the_last_change_restores_first() -> None:
    s = spec(steps=[{"weight": 50}])
    run = Run.start(s, canary.State(), 0.0, {})
    run.do(canary.Event.START)
    run.do(canary.Event.ABORT)
    assert run.retirements() == [("v2", True)]
    run.do(canary.Event.RETRY)
    assert run.retirements() == [("v2", False)]  # aborted, then retried: back in service


def test_rollback_target_is_the_version_that_took_traffic_last() -> None:
    weights = {"v1": 0.0, "v2": 0.0, "v3": 1.0}
    histories = {"v1": [(1.0, 1.0), (5.0, 0.0)], "v2": [(5.0, 1.0), (9.0, 0.0)], "v3": []}
    assert rollback_target(weights, histories) == ("v3", "v2")
    with pytest.raises(Conflict, match="nothing to roll back from"):
        rollback_target({"v1": 0.0}, {})
    with pytest.raises(Conflict, match="before v3"):
        rollback_target({"v3": 1.0}, {"v3": [(1.0, 1.0)]})


async def test_a_cross_context_hit_halts_steps_and_promotion_until_the_window_is_clear() -> None:
    rig = Rig()
    s = spec(analysisWindow="5m")
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    await rig.tick(s)
    assert rig.status["currentWeight"] == 10
    # another process refused a cross-context reuse of 3 nodes
    await rig.graph.record_cross_context("other", 3, rig.clock.now())
    rig.clock.advance(61)  # the step's pause is over
    await rig.tick(s)
    halted = {c["type"]: c for c in rig.status["conditions"]}["Halted"]
    assert (halted["status"], halted["reason"]) == ("True", "CrossContextHit")
    assert "3 node(s)" in halted["message"] and rig.status["currentWeight"] == 10
    assert rig.events[-1][:2] == (True, "CrossContextHit")
    assert rig.metrics.canary_halts.labels("halted")._value.get() == 1
    # a promotion by annotation is refused while halted, with the reason
    await rig.tick(s, ("promote", "p1"))
    assert rig.status["phase"] == "Progressing" and rig.status["currentWeight"] == 10
    assert rig.events[-1][:2] == (True, "ActionHalted")
    assert rig.status["lastAction"] == "p1"
    # the hit leaves the 5-minute window: the halt clears and the overdue step is taken
    rig.clock.advance(300)
    await rig.tick(s)
    halted = {c["type"]: c for c in rig.status["conditions"]}["Halted"]
    assert (halted["status"], rig.status["currentWeight"]) == ("False", 50)
    assert (False, "CrossContextClear") in [e[:2] for e in rig.events]
    assert rig.metrics.canary_halts.labels("cleared")._value.get() == 1


async def test_hits_outside_the_window_or_after_promotion_change_nothing() -> None:
    rig = Rig()
    s = spec(analysisWindow=60)
    await rig.graph.record_cross_context("other", 1, rig.clock.now() - 61)
    rig.readiness.ready_ids["alpha-v2"] = "alpha"
    await rig.tick(s)
    rig.clock.advance(61)
    await rig.tick(s)
    assert rig.status["currentWeight"] == 50
    assert all(e[1] != "CrossContextHit" for e in rig.events)
