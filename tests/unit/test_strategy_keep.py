"""A StrategyDAG annotated `qmtl.io/gc-keep: "true"` marks its queues keep; removing the
annotation removes the marker at the next reconcile; GC keeps marked queues."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_config_maps import MemoryConfigMaps
from qmtl_dagmanager.core.gc import DAY
from qmtl_dagmanager.kube.strategy_reconciler import KEEP_ANNOTATION, Reconciler
from qmtl_dagmanager.services.strategies import StrategyService
from tests.unit.test_resync import strategy


class Sink:
    def __init__(self, body: dict[str, Any]) -> None:
        self.body = body
        self.events: list[str] = []

    def status(self, patch: Mapping[str, Any]) -> None:
        self.body["status"] = {**(self.body.get("status") or {}), **patch}

    def event(self, warning: bool, reason: str, message: str) -> None:
        self.events.append(reason)


async def test_the_keep_annotation_marks_and_unmarks_the_queues() -> None:
    clock = ManualClock()
    c = bootstrap.build_fake(clock=clock)
    rec = Reconciler(
        StrategyService(c.diffs(shed_load=False), c.graph), MemoryConfigMaps(), c.metrics
    )
    body = strategy("alpha")
    body["metadata"]["annotations"] = {KEEP_ANNOTATION: "true"}
    sink = Sink(body)
    await rec.reconcile(body, sink, "create")
    assert body["status"]["gcKeep"] is True
    details = await c.graph.queues()
    assert details and {q.keep_by for q in details} == {("strategydag/ns/alpha",)}
    # deleted with the annotation on: the references go, the marker stays, GC keeps them
    await c.queues().cleanup("alpha")
    clock.advance(400 * DAY)
    run = await c.garbage().collect()
    assert run.processed == []
    assert {o.why for o in run.report.kept} == {"marked keep"}
    # re-applied without the annotation: the next reconcile removes its marker
    body["metadata"]["annotations"] = {}
    await rec.reconcile(body, sink, "resync")
    assert body["status"].get("gcKeep") is False
    assert {q.keep_by for q in await c.graph.queues()} == {()}


async def test_without_the_annotation_nothing_is_marked() -> None:
    c = bootstrap.build_fake()
    rec = Reconciler(StrategyService(c.diffs(shed_load=False), c.graph), MemoryConfigMaps())
    body = strategy("beta")
    await rec.reconcile(body, Sink(body), "create")
    assert body["status"].get("gcKeep") is False
    assert {q.keep_by for q in await c.graph.queues()} == {()}
