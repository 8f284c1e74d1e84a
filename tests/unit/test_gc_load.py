"""GC throttled by a broker load metric read from a Prometheus-compatible HTTP API (a small
real HTTP server here), on the embedded graph and topic admin."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from aiohttp import web

from qmtl_dagmanager.adapters.archive import MemoryArchive
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.adapters.prometheus import PrometheusQuery
from qmtl_dagmanager.core import gc
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.gc import DAY, GcLimits
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.garbage import GcRun, GcService
from qmtl_dagmanager.services.queues import QueueService
from tests.unit.dags import encode, node


def test_the_cap_is_halved_under_load() -> None:
    queues = [gc.GcQueue(f"t{i}", "raw", 0.0, 0, True, 0.0) for i in range(40)]
    limits = GcLimits(max_count=10, max_fraction=1.0)
    assert gc.select(queues, 30 * DAY, limits=limits).cap == 10
    loaded = gc.select(queues, 30 * DAY, limits=limits, loaded=True)
    assert loaded.cap == 5 and len(loaded.decisions) == 5 and loaded.loaded
    assert gc.cap_for(1, GcLimits(max_count=1, max_fraction=1.0), loaded=True) == 0


@dataclass
class FakePrometheus:
    """Answers /api/v1/query with whatever the test sets."""

    answer: dict[str, Any] = field(default_factory=dict)
    status: int = 200
    queries: list[str] = field(default_factory=list)

    def vector(self, *values: float) -> None:
        self.answer = {
            "status": "success",
            "data": {
                "resultType": "vector",
                "result": [
                    {"metric": {"i": str(i)}, "value": [1, str(v)]} for i, v in enumerate(values)
                ],
            },
        }

    async def handle(self, request: web.Request) -> web.Response:
        self.queries.append(request.query.get("query", ""))
        return web.json_response(self.answer, status=self.status)


@pytest.fixture
async def prom() -> AsyncIterator[tuple[FakePrometheus, str]]:
    fake = FakePrometheus()
    app = web.Application()
    app.router.add_get("/api/v1/query", fake.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield fake, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_prometheus_query_reduces_to_one_number(prom: tuple[FakePrometheus, str]) -> None:
    fake, url = prom
    q = PrometheusQuery(url, 'max(kafka_request_handler_idle_ratio{job="kafka"})')
    fake.vector(0.2, 0.9, float("nan"))
    assert await q.value() == 0.9
    assert fake.queries == ['max(kafka_request_handler_idle_ratio{job="kafka"})']
    fake.answer = {"status": "success", "data": {"resultType": "scalar", "result": [1, "3.5"]}}
    assert await q.value() == 3.5
    fake.vector()
    with pytest.raises(Unavailable, match="no samples"):
        await q.value()
    fake.answer, fake.status = {"status": "error", "error": "parse error at char 3"}, 400
    with pytest.raises(Unavailable, match="parse error at char 3"):
        await q.value()
    await q.close()
    down = PrometheusQuery("http://127.0.0.1:9", "up", timeout=1)
    with pytest.raises(Unavailable, match=r"127\.0\.0\.1:9"):
        await down.value()
    await down.close()
    with pytest.raises(ValueError, match="http"):
        PrometheusQuery("localhost:9090", "up")


async def _orphans(n: int) -> tuple[GcService, ManualClock]:
    graph, topics, clock, metrics = (
        MemoryGraphStore(),
        MemoryTopicAdmin(),
        ManualClock(time.time()),
        Metrics(),
    )
    controlbus = ControlBus(MemoryEventBus(), clock)
    nodes = [node("RawPriceFeed", tags=["BTC"], code=f"raw-{i}") for i in range(n)]
    await DiffService(graph, topics, controlbus, clock, metrics).diff(
        Request("s", world_id="w"), encode(nodes)
    )
    await QueueService(graph, topics, metrics, clock).cleanup("s")
    clock.advance(30 * DAY)
    service = GcService(
        graph,
        topics,
        MemoryArchive(),
        controlbus,
        clock,
        metrics,
        limits=GcLimits(max_count=4, max_fraction=1.0),
    )
    return service, clock


async def test_gc_halves_its_batch_when_the_broker_is_loaded(
    prom: tuple[FakePrometheus, str],
) -> None:
    fake, url = prom
    service, _ = await _orphans(12)
    load = PrometheusQuery(url, "broker_load")
    service.load, service.load_threshold = load, 0.8
    fake.vector(0.95)
    run = await service.collect()
    assert len(run.processed) == 2 and run.as_json()["report"]["loaded"] is True
    assert run.as_json()["report"]["load"] == 0.95
    fake.vector(0.3)
    run = await service.collect()
    assert len(run.processed) == 4 and run.report.loaded is False
    fake.answer, fake.status = {}, 503  # unreadable: treated as loaded
    run = await service.collect()
    assert len(run.processed) == 2 and run.report.loaded
    assert service.metrics.registry.get_sample_value("gc_throttled_total") == 2
    await load.close()


def test_a_report_lists_at_most_a_thousand_kept_orphans_soonest_first() -> None:
    clock = ManualClock(time.time())
    report = gc.select(
        [gc.GcQueue(f"t{i:05d}", "raw", 0.0, 0, True, clock.now() - i) for i in range(1500)],
        clock.now(),
    )
    run = GcRun(report, [], [], False, clock.now())
    doc = run.as_json()
    assert len(doc["kept"]) == 1000 and doc["report"]["kept"] == 1500
    assert doc["report"]["kept_listed"] == 1000
    assert doc["kept"][0]["queue"] == "t01499"  # orphaned longest ago: due first
    assert len(orjson.dumps(doc)) < 1024 * 1024
