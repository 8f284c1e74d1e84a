"""The resync loop on the twins: every page is reconciled once, status and events go through
the API port, deleting objects are left to kopf, and a dependency outage is retried on a
fresh read until the object is Ready, without waiting for the next period."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_config_maps import MemoryConfigMaps
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.kube.resync import Resync
from qmtl_dagmanager.kube.strategy_reconciler import Reconciler
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import TopicResult
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.strategies import StrategyService
from tests.unit.dags import document, node


class FlakyTopics(MemoryTopicAdmin):
    """Kafka that is down for the first `down` ensure calls."""

    def __init__(self, down: int = 0) -> None:
        super().__init__()
        self.down = down

    async def ensure(
        self, topics: Mapping[str, TopicSpec], *, wait_visible: bool = True
    ) -> dict[str, TopicResult]:
        if self.down > 0:
            self.down -= 1
            raise Unavailable("the broker did not answer", retry_after=0.01)
        return await super().ensure(topics, wait_visible=wait_visible)


class Objects:
    """The API port over a dict of bodies, recording every write."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = {b["metadata"]["name"]: b for b in bodies}
        self.pages: list[str | None] = []
        self.patches: list[tuple[str, dict[str, Any]]] = []
        self.events: list[tuple[str, bool, str]] = []

    def page(
        self, namespace: str | None, limit: int, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        self.pages.append(token)
        names = sorted(self.bodies)
        start = int(token or 0)
        nxt = start + limit
        return [self.bodies[n] for n in names[start:nxt]], str(nxt) if nxt < len(names) else None

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.bodies.get(name)

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.patches.append((name, dict(status)))
        body = self.bodies[name]
        body["status"] = {**(body.get("status") or {}), **status}

    def event(self, obj: Mapping[str, Any], warning: bool, reason: str, message: str) -> None:
        self.events.append((str(obj["metadata"]["name"]), warning, reason))


def strategy(name: str, *, deleting: bool = False) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "uid": f"uid-{name}", "generation": 1}
    if deleting:
        meta["deletionTimestamp"] = "2026-12-02T00:00:00Z"
    src = node("StreamInput", tags=["BTC"], code=name)
    return {
        "metadata": meta,
        "spec": {
            "strategyId": name,
            "dag": document([src, node(inputs=[src["node_id"]], code=name)]),
        },
    }


def reconciler(topics: MemoryTopicAdmin) -> Reconciler:
    clock = ManualClock(time.time())
    diffs = DiffService(
        MemoryGraphStore(), topics, ControlBus(MemoryEventBus(), clock), clock, Metrics()
    )
    return Reconciler(StrategyService(diffs, diffs.graph), MemoryConfigMaps())


def test_every_page_is_reconciled_once_and_written_through_the_port() -> None:
    objects = Objects([strategy(f"s{i}") for i in range(5)] + [strategy("gone", deleting=True)])
    resync = Resync(reconciler(MemoryTopicAdmin()), objects, None, 60.0, page_size=2)

    assert asyncio.run(resync.once()) == 5
    assert objects.pages == [None, "2", "4"]
    assert sorted(name for name, _ in objects.patches) == [f"s{i}" for i in range(5)]
    assert all(status["phase"] == "Ready" for _, status in objects.patches)
    assert sorted(objects.events) == [(f"s{i}", False, "Reconciled") for i in range(5)]
    assert "status" not in objects.bodies["gone"]  # a deleting object is kopf's to finish


def test_a_pass_over_settled_objects_writes_nothing() -> None:
    """The first pass creates, the second sees every node reused (its counts change), the
    third changes nothing and writes nothing."""
    objects = Objects([strategy("a"), strategy("b")])
    resync = Resync(reconciler(MemoryTopicAdmin()), objects, ["ns"], 60.0)

    async def run() -> None:
        await resync.once()
        await resync.once()
        assert all(status["nodes"]["reused"] == 2 for _, status in objects.patches[2:])
        objects.patches.clear()
        objects.events.clear()
        assert await resync.once() == 2

    asyncio.run(run())
    assert objects.patches == [] and objects.events == []


def test_an_outage_is_degraded_then_retried_on_a_fresh_read_until_ready() -> None:
    objects = Objects([strategy("a")])
    resync = Resync(reconciler(FlakyTopics(down=3)), objects, ["ns"], 60.0)

    async def run() -> None:
        await resync.once()
        first = objects.patches[0][1]
        degraded = {c["type"]: c for c in first["conditions"]}["Degraded"]
        assert (degraded["status"], degraded["reason"]) == ("True", "DependencyUnavailable")
        deadline = time.monotonic() + 5
        while objects.bodies["a"]["status"].get("phase") != "Ready":
            assert time.monotonic() < deadline, objects.patches
            await asyncio.sleep(0.01)
        assert resync._retrying == {}  # the retry ended with the success

    asyncio.run(run())
    warnings = [reason for _, warning, reason in objects.events if warning]
    assert warnings == ["DependencyUnavailable"] * 3
    assert objects.events[-1] == ("a", False, "Reconciled")
