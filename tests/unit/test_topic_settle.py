"""The sidecar answers on Kafka's acknowledgement and sees each topic through to describable:
pending topics are told from ready ones, and a topic that never shows is created again, its
failure surfaced, and not handed out by the next diff."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence

import grpc
import pytest

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.core.topics import TopicSpec, TopicType
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc
from qmtl_dagmanager.ports import TopicResult, TopicStatus
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.queues import QueueService
from qmtl_dagmanager.services.topic_settle import TopicSettler
from qmtl_dagmanager.sidecar.errors import Guard
from qmtl_dagmanager.sidecar.servicers import (
    PENDING_KEY,
    PENDING_NAMES_KEY,
    AdminServicer,
    DiffServicer,
    TagQueryServicer,
)
from tests.gen import dumps, generate


class LaggingTopics(MemoryTopicAdmin):
    """A broker that describes created topics only once `shown` is set; creations sent again
    fail while `refuse` is set."""

    def __init__(self) -> None:
        super().__init__()
        self.shown = False
        self.refuse = False
        self.waited: list[bool] = []
        self.bus = MemoryEventBus()  # where the test reads the ControlBus back

    async def ensure(
        self, topics: Mapping[str, TopicSpec], *, wait_visible: bool = True
    ) -> dict[str, TopicResult]:
        self.waited.append(wait_visible)
        if self.refuse:
            return {t: TopicResult(t, TopicStatus.FAILED, "broker on fire", retriable=True)
                    for t in topics}  # fmt: skip
        return await super().ensure(topics, wait_visible=wait_visible)

    async def unseen(self, topics: Sequence[str]) -> list[str]:
        return [] if self.shown else list(topics)


def sidecar_diffs(topics: LaggingTopics, bound: float) -> tuple[DiffService, TopicSettler]:
    clock, metrics, graph = ManualClock(), Metrics(), MemoryGraphStore()
    controlbus = ControlBus(topics.bus, clock)
    settler = TopicSettler(topics, graph, controlbus, metrics, bound=bound)
    svc = DiffService(graph, topics, controlbus, clock, metrics, settler=settler)
    return svc, settler


async def test_answered_on_acknowledgement_and_seen_through() -> None:
    topics = LaggingTopics()
    svc, settler = sidecar_diffs(topics, bound=30)
    runner = asyncio.create_task(settler.run())
    try:
        out = await svc.diff(Request("s", world_id="w1"), dumps(generate(6)))
        assert topics.waited == [False]  # answered without waiting for the broker's metadata
        names = [n.topic for n in out.plan.nodes]
        assert sorted(settler.pending(names)) == sorted(names)
        assert svc.metrics.topics_pending._value.get() == 6
        await asyncio.sleep(0.2)
        assert len(settler) == 6  # still not described: still pending
        topics.shown = True
        for _ in range(100):
            if not len(settler):
                break
            await asyncio.sleep(0.02)
        assert settler.pending(names) == []
        assert svc.metrics.topics_pending._value.get() == 0
        assert svc.metrics.topic_visible_seconds._sum.get() > 0.2
    finally:
        settler.stop()
        await asyncio.wait_for(runner, 5)


async def test_a_topic_that_never_shows_is_created_again_surfaced_and_not_handed_out() -> None:
    topics = LaggingTopics()
    svc, settler = sidecar_diffs(topics, bound=0.1)
    text = dumps(generate(4))
    out = await svc.diff(Request("s", world_id="w1"), text)
    names = [n.topic for n in out.plan.nodes]
    topics.refuse = True
    await asyncio.sleep(0.15)
    await settler.settle_once()  # past the bound: created again, which fails
    assert sorted(settler.failed(names)) == sorted(names)
    assert svc.metrics.topic_settle_failures._value.get() == 4
    lifecycle = [e for e in topics.bus.read("queue") if e.value["type"] == "queue_lifecycle"]
    assert {e.key for e in lifecycle} == set(names)
    assert all(e.value["data"]["action"] == "create_failed" for e in lifecycle)
    # the next diff (a resubmission) creates them again before answering: still failing,
    # it answers UNAVAILABLE rather than hand out topics that do not exist
    with pytest.raises(Unavailable):
        await svc.diff(Request("s", world_id="w1"), text)
    topics.refuse = False
    again = await svc.diff(Request("s", world_id="w1"), text)
    assert again.plan.counts["new"] == 0
    topics.shown = True
    await settler.settle_once()
    assert len(settler) == 0


async def test_a_topic_no_queue_owns_any_more_is_dropped_from_the_watch() -> None:
    topics = LaggingTopics()
    _, settler = sidecar_diffs(topics, bound=0.05)
    spec = TopicSpec(TopicType.INDICATOR, 1, 1)
    settler.watch({"orphan_topic": spec}, "nobody")  # no queue in the graph owns it
    await asyncio.sleep(0.06)
    await settler.settle_once()
    assert len(settler) == 0


async def test_answers_tell_pending_topics_in_trailing_metadata() -> None:
    """Diff, GetQueues and GetQueueStats name the topics of their answer that are pending."""
    topics = LaggingTopics()
    svc, settler = sidecar_diffs(topics, bound=30)
    queues = QueueService(svc.graph, topics, svc.metrics, svc.clock, settler=settler)
    guard = Guard(svc.metrics)
    server = grpc.aio.server()
    pb_grpc.add_DiffServiceServicer_to_server(DiffServicer(svc, guard, queues), server)
    pb_grpc.add_TagQueryServicer_to_server(TagQueryServicer(queues, guard), server)
    pb_grpc.add_AdminServiceServicer_to_server(AdminServicer(svc, queues, guard), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        doc = generate(6)
        call = pb_grpc.DiffServiceStub(channel).Diff(
            pb.DiffRequest(strategy_id="s", dag_json=dumps(doc), world_id="w1")
        )
        reply = [chunk async for chunk in call]
        answered = set().union(*(c.queue_map.values() for c in reply))
        trailing = dict(await call.trailing_metadata())
        assert trailing[PENDING_KEY] == "6"
        assert set(str(trailing[PENDING_NAMES_KEY]).split(",")) == answered
        stats = pb_grpc.AdminServiceStub(channel).GetQueueStats(pb.QueueStatsRequest(filter=""))
        sizes = (await stats).sizes
        assert answered <= set(sizes) and all(sizes[t] == 0 for t in answered)
        assert dict(await stats.trailing_metadata())[PENDING_KEY] == "6"
        topics.shown = True
        await settler.settle_once()
        again = pb_grpc.DiffServiceStub(channel).Diff(
            pb.DiffRequest(strategy_id="s", dag_json=dumps(doc), world_id="w1")
        )
        assert [c async for c in again]
        assert PENDING_KEY not in dict(await again.trailing_metadata())  # all ready now
    finally:
        await channel.close()
        await server.stop(None)
