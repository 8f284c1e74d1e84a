"""A Diff's work outlives its caller (the Gateway cancels after 0.1 s), and an identical
request that arrives while it runs joins it: one creation, one answer."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping

import grpc
import pytest

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.client import GatewayClient
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc
from qmtl_dagmanager.ports import TopicResult
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diff_work import DiffWork
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.sidecar.errors import Guard
from qmtl_dagmanager.sidecar.security import SecurityInterceptor
from qmtl_dagmanager.sidecar.servicers import DiffServicer
from tests.gen import dumps, generate


class GatedTopics(MemoryTopicAdmin):
    """Topic creation that waits for the test to let it through, and counts its batches."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.batches: list[int] = []

    async def ensure(
        self, topics: Mapping[str, TopicSpec], *, wait_visible: bool = True
    ) -> dict[str, TopicResult]:
        if topics:
            self.batches.append(len(topics))
            self.entered.set()
            await self.gate.wait()
        return await super().ensure(topics, wait_visible=wait_visible)


def service(topics: GatedTopics, graph: MemoryGraphStore, deadline: float = 60.0) -> DiffService:
    clock = ManualClock()
    metrics = Metrics()
    return DiffService(
        graph,
        topics,
        ControlBus(MemoryEventBus(), clock),
        clock,
        metrics,
        work=DiffWork(metrics, deadline=deadline),
    )


async def test_a_cancelled_diff_completes_and_an_identical_request_joins_it() -> None:
    topics, graph = GatedTopics(), MemoryGraphStore()
    svc = service(topics, graph)
    text = dumps(generate(20))
    request = Request("s1", world_id="w1", execution_domain="live")

    # the Gateway's pattern: wait 0.1 s, then cancel the call
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(svc.diff(request, text), 0.1)
    await topics.entered.wait()
    assert len(svc.running()) == 1  # the work goes on without its caller

    joiner = asyncio.create_task(svc.diff(request, text))  # identical: joins
    other = asyncio.create_task(svc.diff(Request("s2"), dumps(generate(5, seed=3))))  # its own
    await asyncio.sleep(0.05)
    assert svc.metrics.diff_joined._value.get() == 1
    topics.gate.set()
    joined, separate = await joiner, await other

    assert joined.plan.counts["new"] == 20
    assert sorted(topics.batches) == [5, 20]  # one creation each: the joiner started none
    assert separate.plan.counts["new"] == 5
    read = await graph.read([n.node.node_id for n in joined.plan.nodes], [], "s1")
    assert read.fingerprint == joined.plan.fingerprint()  # the cancelled work wrote it
    assert set(await topics.list_topics()) >= {n.topic for n in joined.plan.nodes}
    assert svc.metrics.diff_callers_left.labels("started")._value.get() == 1
    assert len(svc.running()) == 0

    # and a retry after the work ended is a resubmission that creates nothing
    again = await asyncio.wait_for(svc.diff(request, text), 0.1)
    assert again.plan.counts["new"] == 0
    assert sorted(topics.batches) == [5, 20]


async def test_work_still_waiting_for_a_slot_is_dropped_when_its_caller_leaves() -> None:
    topics, graph = GatedTopics(), MemoryGraphStore()
    svc = service(topics, graph)
    svc.max_inflight = 1
    busy = asyncio.create_task(svc.diff(Request("a"), dumps(generate(3))))
    await topics.entered.wait()
    with pytest.raises(TimeoutError):  # waits for the only slot, then its caller leaves
        await asyncio.wait_for(svc.diff(Request("b"), dumps(generate(4, seed=9))), 0.05)
    await asyncio.sleep(0.02)
    assert len(svc.running()) == 1  # it changed nothing: dropped, not run later
    assert svc.metrics.diff_callers_left.labels("waiting")._value.get() == 1
    topics.gate.set()
    await busy
    assert topics.batches == [3]


async def test_work_has_a_deadline_of_its_own() -> None:
    topics, graph = GatedTopics(), MemoryGraphStore()
    svc = service(topics, graph, deadline=0.2)
    with pytest.raises(Unavailable) as raised:
        await svc.diff(Request("slow"), dumps(generate(3)))
    assert raised.value.reason == "DiffDeadline"
    assert len(svc.running()) == 0


async def test_the_audit_line_records_the_work_and_that_the_caller_left(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Through the sidecar's gRPC server: the caller cancels, the audit line waits for the
    work and records its outcome with `caller=left`."""
    topics, graph = GatedTopics(), MemoryGraphStore()
    svc = service(topics, graph)
    server = grpc.aio.server(interceptors=[SecurityInterceptor(metrics=svc.metrics)])
    pb_grpc.add_DiffServiceServicer_to_server(DiffServicer(svc, Guard(svc.metrics)), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = GatewayClient(f"127.0.0.1:{port}")
    caplog.set_level(logging.INFO, logger="qmtl_dagmanager.audit")
    try:
        text = dumps(generate(5))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.diff("audited", text), 0.1)
        await topics.entered.wait()
        await asyncio.sleep(0.05)
        assert not [r for r in caplog.records if r.name == "qmtl_dagmanager.audit"]
        topics.gate.set()
        for _ in range(100):
            if len(svc.running()) == 0:
                break
            await asyncio.sleep(0.01)
        lines = [r.getMessage() for r in caplog.records if r.name == "qmtl_dagmanager.audit"]
        assert len(lines) == 1, lines
        assert "strategy=audited" in lines[0]
        assert "outcome=OK caller=left after" in lines[0]
        assert svc.metrics.diff_callers_left.labels("started")._value.get() == 1
        reply = await client.diff("audited", text)  # the retry finds the work done
        assert len(reply.queue_map) == 5
        assert "outcome=OK caller=answered" in caplog.records[-1].getMessage()
    finally:
        await client.close()
        await server.stop(None)
