"""The sidecar answers a new diff once it is journaled and Kafka validated its creations; the
work then creates the topics and writes the graph. A journal entry whose work never wrote
(the process died) is replayed by any process: every name handed out is created in the end."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.errors import Conflict, DagManagerError, Unavailable
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import TopicResult, TopicStatus
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diff_journal import DiffJournal
from qmtl_dagmanager.services.diff_work import DiffWork
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.topic_settle import TopicSettler
from tests.gen import dumps, generate

REQUEST = Request("s1", world_id="w1", execution_domain="live")


class HeldGraph:
    """The twin, except that `apply` (the graph write) waits for `gate`, or fails with
    `failure` (the process dies right after answering)."""

    def __init__(self, graph: MemoryGraphStore) -> None:
        self._graph = graph
        self.gate = asyncio.Event()
        self.failure: DagManagerError | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._graph, name)

    async def apply(self, *args: Any, **kwargs: Any) -> tuple[str, ...]:
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        return await self._graph.apply(*args, **kwargs)


class RefusingTopics(MemoryTopicAdmin):
    """A controller whose authorizer refuses every creation."""

    async def validate(self, topics: Mapping[str, TopicSpec]) -> dict[str, TopicResult]:
        return {
            t: TopicResult(t, TopicStatus.FORBIDDEN, "TOPIC_AUTHORIZATION_FAILED") for t in topics
        }


def sidecar_service(graph: Any, topics: MemoryTopicAdmin, clock: ManualClock) -> DiffService:
    metrics = Metrics()
    bus = ControlBus(MemoryEventBus(), clock)
    return DiffService(
        graph,
        topics,
        bus,
        clock,
        metrics,
        work=DiffWork(metrics),
        settler=TopicSettler(topics, graph, bus, metrics),
        answer_early=True,
    )


def operator_service(graph: Any, topics: MemoryTopicAdmin, clock: ManualClock) -> DiffService:
    return DiffService(graph, topics, ControlBus(MemoryEventBus(), clock), clock, Metrics())


async def test_answered_before_the_write_and_the_entry_goes_with_the_write() -> None:
    twin, topics, clock = MemoryGraphStore(), MemoryTopicAdmin(), ManualClock()
    held = HeldGraph(twin)
    svc = sidecar_service(held, topics, clock)
    text = dumps(generate(30, salt="early"))

    outcome = await asyncio.wait_for(svc.diff(REQUEST, text), 5)  # the write is still held
    names = {n.topic for n in outcome.plan.nodes}
    assert outcome.plan.counts["new"] == 30
    assert svc.metrics.diff_answered_early._value.get() == 1
    assert list(twin.journal) and twin.journal[next(iter(twin.journal))].request == REQUEST
    assert not await twin.strategy_nodes("s1")  # not written yet
    assert len(svc.running()) == 1  # the work goes on
    assert svc.settler is not None and set(svc.settler.pending(names)) == names

    held.gate.set()
    while svc.running():
        await asyncio.sleep(0.01)
    assert len(await twin.strategy_nodes("s1")) == 30
    assert names <= await topics.list_topics()
    assert not twin.journal  # removed by the write's own transaction


async def test_a_leftover_entry_is_replayed_by_another_process() -> None:
    twin, topics, clock = MemoryGraphStore(), MemoryTopicAdmin(), ManualClock()
    held = HeldGraph(twin)
    held.failure = Unavailable("the process died", reason="Crash")
    crashed = sidecar_service(held, topics, clock)
    text = dumps(generate(25, salt="replay"))
    answer = await crashed.diff(REQUEST, text)
    handed_out = {n.topic for n in answer.plan.nodes}
    held.gate.set()
    while crashed.running():
        await asyncio.sleep(0.01)
    assert crashed.metrics.diff_completion_failures.labels("Crash")._value.get() == 1
    assert len(twin.journal) == 1  # answered, never written

    other = operator_service(twin, topics, clock)
    journal = DiffJournal(twin, other, clock, other.metrics, grace=15)
    assert await journal.replay_once() == 0  # within the grace: its own work may still end
    clock.advance(16)
    assert await journal.replay_once() == 1
    assert not twin.journal
    assert len(await twin.strategy_nodes("s1")) == 25
    assert handed_out <= await topics.list_topics()  # every name handed out exists
    assert other.metrics.diff_journal_replays.labels("completed")._value.get() == 1


async def test_a_replay_refused_for_good_is_dropped() -> None:
    twin, topics, clock = MemoryGraphStore(), MemoryTopicAdmin(), ManualClock()
    held = HeldGraph(twin)
    held.failure = Unavailable("the process died", reason="Crash")
    crashed = sidecar_service(held, topics, clock)
    await crashed.diff(REQUEST, dumps(generate(5, salt="refused")))
    held.gate.set()
    while crashed.running():
        await asyncio.sleep(0.01)
    refusing = RefusingTopics()  # the authorizer refuses now: the replay cannot succeed
    journal = DiffJournal(twin, sidecar_service(twin, refusing, clock), clock, Metrics(), grace=1)
    clock.advance(2)
    assert await journal.replay_once() == 0
    assert not twin.journal
    assert journal.metrics.diff_journal_replays.labels("dropped")._value.get() == 1


async def test_a_refused_creation_is_never_answered_and_leaves_no_entry() -> None:
    twin, clock = MemoryGraphStore(), ManualClock()
    svc = sidecar_service(twin, RefusingTopics(), clock)
    with pytest.raises(Conflict) as raised:
        await svc.diff(REQUEST, dumps(generate(10, salt="forbidden")))
    assert raised.value.reason == "KafkaForbidden"
    await asyncio.sleep(0.05)  # the entry goes in the background
    assert not twin.journal
    assert not await twin.strategy_nodes("s1")


async def test_a_resubmission_leaves_no_entry() -> None:
    twin, topics, clock = MemoryGraphStore(), MemoryTopicAdmin(), ManualClock()
    svc = sidecar_service(twin, topics, clock)
    text = dumps(generate(10, salt="again"))
    await svc.diff(REQUEST, text)
    while svc.running():
        await asyncio.sleep(0.01)
    fresh = sidecar_service(twin, topics, clock)  # another sidecar: no resubmission cache
    again = await fresh.diff(REQUEST, text)
    assert again.plan.counts["new"] == 0
    await asyncio.sleep(0.05)
    assert not twin.journal
    assert fresh.metrics.diff_answered_early._value.get() == 0


async def test_a_newer_submission_replaces_the_older_entry() -> None:
    twin, topics, clock = MemoryGraphStore(), MemoryTopicAdmin(), ManualClock()
    held = HeldGraph(twin)
    svc = sidecar_service(held, topics, clock)
    await svc.diff(REQUEST, dumps(generate(5, salt="v1")))
    await svc.diff(REQUEST, dumps(generate(6, salt="v2")))
    assert len(twin.journal) == 1  # the last submission is the one to finish
    assert next(iter(twin.journal.values())).dag.count('"node_id"') == 6
    held.gate.set()
    while svc.running():
        await asyncio.sleep(0.01)
    assert not twin.journal
