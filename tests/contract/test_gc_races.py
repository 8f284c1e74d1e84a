"""GC racing diffs, on the twins and on Neo4j + Kafka alike: whichever order the steps of a GC
run and of a diff interleave in (or a GC run dying half-way), a queue a strategy references
keeps its graph record and its topic, and a queue is announced dropped only when it is."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from qmtl_dagmanager.adapters.archive import MemoryArchive
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.core.errors import QueueBusy
from qmtl_dagmanager.core.gc import DAY, GcLimits
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import DELETING_TTL, GraphStore, TopicAdmin
from qmtl_dagmanager.services import diffs as diffs_module
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffOutcome, DiffService
from qmtl_dagmanager.services.garbage import CLAIM_TTL, GcService
from qmtl_dagmanager.services.queues import QueueService
from tests.contract.conftest import listed_eventually
from tests.unit.dags import encode, node


class Killed(BaseException):
    """The process dies here: nothing after this point of the GC run happens."""


class Hooked:
    """A graph store, except that `hooks[name]` runs before the named method."""

    def __init__(self, graph: GraphStore, **hooks: Any) -> None:
        self._graph = graph
        self.hooks = hooks

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._graph, name)
        hook = self.hooks.get(name)
        if hook is None:
            return method

        async def hooked(*args: Any, **kwargs: Any) -> Any:
            await hook(*args, **kwargs)
            return await method(*args, **kwargs)

        return hooked


@dataclass
class World:
    graph: GraphStore
    topics: TopicAdmin
    events: MemoryEventBus
    clock: ManualClock
    metrics: Metrics

    def diffs(self, graph: Any = None) -> DiffService:
        bus = ControlBus(self.events, self.clock)
        return DiffService(graph or self.graph, self.topics, bus, self.clock, self.metrics)

    def gc(self, graph: Any = None, topics: Any = None) -> GcService:
        return GcService(
            graph or self.graph, topics or self.topics, MemoryArchive(),
            ControlBus(self.events, self.clock),
            self.clock, self.metrics, limits=GcLimits(max_count=10_000, max_fraction=1.0),
        )  # fmt: skip

    async def orphans(self) -> tuple[list[dict[str, Any]], list[str]]:
        """Three queues of a strategy that is gone, old enough for GC."""
        salt = uuid.uuid4().hex[:8]
        nodes = [node("RawPriceFeed", tags=["BTC"], code=f"race-{salt}-{i}") for i in range(3)]
        done = await self.diffs().diff(Request(f"old-{salt}", world_id="w1"), encode(nodes))
        await QueueService(self.graph, self.topics, self.metrics, self.clock).cleanup(f"old-{salt}")
        self.clock.advance(30 * DAY)
        return nodes, [p.topic for p in done.plan.nodes]

    async def reference(self, nodes: list[dict[str, Any]], diffs: Any = None) -> DiffOutcome:
        service = diffs or self.diffs()
        return await service.diff(
            Request(f"new-{uuid.uuid4().hex[:8]}", world_id="w1"), encode(nodes)
        )

    def dropped(self, mine: list[str]) -> list[str]:
        return sorted(
            e.value["data"]["queue"]
            for e in self.events.read("queue")
            if e.value["type"] == "queue_lifecycle" and e.value["data"]["queue"] in mine
        )

    async def assert_whole(self, topics: list[str]) -> None:
        """Each topic is in the graph, referenced, and exists in Kafka."""
        refs = {q.topic: q.ref_count for q in await self.graph.queues(topics)}
        assert refs == dict.fromkeys(topics, 1), refs
        await self.eventually(lambda listed: set(topics) <= listed)

    async def eventually(self, check: Callable[[set[str]], bool], seconds: float = 30) -> None:
        await listed_eventually(self.topics, check, seconds)


def world(graph: GraphStore, topic_admin: TopicAdmin) -> World:
    return World(graph, topic_admin, MemoryEventBus(), ManualClock(time.time()), Metrics())


async def test_referenced_after_the_claim_the_queue_and_its_topic_stay(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()
    got: list[DiffOutcome] = []

    async def diff_first(topic: str, *_: Any) -> None:
        if not got:  # the first queue is claimed, not yet marked: a diff references all three
            got.append(await w.reference(nodes))

    racing = w.gc(Hooked(graph, mark_deleting=diff_first))
    run = await racing.collect()
    assert [p["queue"] for p in run.processed if p["queue"] in mine] == []
    assert run.report.skipped.get("ReferencedOrClaimed") == 3
    assert {p.action.value for p in got[0].plan.nodes} == {"reuse"}
    await w.assert_whole(mine)  # no topic was deleted
    assert w.dropped(mine) == []  # nothing announced as dropped
    assert w.metrics.queues_revived._value.get() >= 1


async def test_a_diff_arriving_while_a_topic_is_deleted_waits_and_answers_existing_topics(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()
    started: list[asyncio.Task[DiffOutcome]] = []

    async def diff_now(topic: str, *_: Any) -> None:
        if not started:  # the first topic is deleted, its queue not yet forgotten
            started.append(asyncio.ensure_future(w.reference(nodes)))
            # the diff reads the graph and is refused (busy) before the queue is forgotten
            deadline = time.monotonic() + 10
            while w.metrics.diff_replans.labels("QueueBusy")._value.get() < 1:
                assert time.monotonic() < deadline, "the diff never met the deletion mark"
                await asyncio.sleep(0.01)

    run = await w.gc(Hooked(graph, forget_queue=diff_now)).collect()
    assert run.processed and run.processed[0]["queue"] in mine  # dropped first
    done = await started[0]  # it waited for the run, then planned again
    assert sorted(p.topic for p in done.plan.nodes) == sorted(mine)
    await w.assert_whole(mine)  # every topic it answered with exists
    assert len(w.dropped(mine)) == len(set(w.dropped(mine)))  # each announced at most once
    assert w.metrics.diff_replans.labels("QueueBusy")._value.get() >= 1


async def test_a_gc_run_killed_after_deleting_a_topic_is_repaired_by_the_next_diff(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()

    async def die(topic: str) -> None:
        raise Killed(topic)

    try:
        await w.gc(Hooked(graph, forget_queue=die)).collect()
    except Killed as k:
        victim = str(k)
    assert victim in mine
    await w.eventually(lambda listed: victim not in listed)  # the topic is really gone
    # while the dead run's deletion mark is fresh, a diff waits for it, then gives up
    with pytest.raises(QueueBusy):
        await w.reference(nodes, _impatient(w.diffs()))
    # once it is DELETING_TTL old, the next diff takes the queue over: the claim is released
    # and the topic is created again before the answer
    w.clock.advance(DELETING_TTL + 1)
    done = await w.reference(nodes)
    assert {p.action.value for p in done.plan.nodes} == {"reuse"}
    await w.assert_whole(mine)
    # later GC runs never drop it while it is referenced, and nothing was announced
    w.clock.advance(CLAIM_TTL + 1)
    run = await w.gc().collect()
    assert not {p["queue"] for p in run.processed} & set(mine)
    assert w.dropped(mine) == []


async def test_a_gc_run_killed_after_claiming_resumes_once_the_claim_expires(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    _, mine = await w.orphans()

    async def die(topics: list[str]) -> None:
        raise Killed(topics[0])

    with contextlib.suppress(Killed):
        await w.gc(topics=_Dying(topic_admin, die)).collect()  # dies at its first deletion
    run = await w.gc().collect()  # the claim is fresh: another run leaves that queue alone
    first = {p["queue"] for p in run.processed}
    assert len(first & set(mine)) == 2
    w.clock.advance(CLAIM_TTL + 1)
    run = await w.gc().collect()  # the dead run's claim expired: dropped now, exactly once
    assert len({p["queue"] for p in run.processed} & set(mine)) == 1
    assert w.dropped(mine) == sorted(mine)
    await w.eventually(lambda listed: not set(mine) & listed)
    assert not set(mine) & {q.topic for q in await graph.queues()}


def _impatient(diffs: DiffService) -> DiffService:
    diffs_module.BUSY_WAIT = 0.0  # restored by the fixture below
    return diffs


@pytest.fixture(autouse=True)
def _busy_wait() -> Any:
    saved = diffs_module.BUSY_WAIT
    yield
    diffs_module.BUSY_WAIT = saved


class _Dying:
    """A topic admin whose delete runs `hook` first."""

    def __init__(self, admin: TopicAdmin, hook: Any) -> None:
        self._admin, self._hook = admin, hook

    def __getattr__(self, name: str) -> Any:
        return getattr(self._admin, name)

    async def delete(self, topics: list[str]) -> dict[str, str | None]:
        await self._hook(topics)
        return await self._admin.delete(topics)


async def test_dropped_between_a_diffs_read_and_its_write_the_diff_plans_again(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    nodes, mine = await w.orphans()
    runs: list[Any] = []

    async def gc_first(*_: Any, **__: Any) -> None:
        if not runs:  # the diff has read the graph and planned to reuse all three
            runs.append(await w.gc().collect())

    done = await w.reference(nodes, w.diffs(Hooked(graph, apply=gc_first)))
    assert sorted(p["queue"] for p in runs[0].processed) == sorted(mine)
    assert {p.action.value for p in done.plan.nodes} == {"create"}  # the second plan
    await w.assert_whole(mine)
    assert w.dropped(mine) == sorted(mine)  # dropped once, then created anew


async def test_concurrent_gc_runs_drop_each_queue_exactly_once(
    graph: GraphStore, topic_admin: TopicAdmin
) -> None:
    w = world(graph, topic_admin)
    for _ in range(3):
        mine: list[str] = []
        for _ in range(4):
            mine += (await w.orphans())[1]
            w.clock.advance(-30 * DAY)
        w.clock.advance(30 * DAY)
        runs = await asyncio.gather(*(w.gc().collect() for _ in range(3)))
        dropped = [p["queue"] for r in runs for p in r.processed if p["queue"] in mine]
        assert sorted(dropped) == sorted(mine)  # each once, by one of the runs
        assert w.dropped(mine) == sorted(mine)  # and announced once
        assert not set(mine) & {q.topic for q in await graph.queues()}

        def gone(listed: set[str], mine: list[str] = mine) -> bool:
            return not set(mine) & listed

        await w.eventually(gone)
