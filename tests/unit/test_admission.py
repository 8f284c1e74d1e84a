"""The sidecar sheds load at once when too many diffs are in flight."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.errors import Overloaded
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import GraphRead
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from tests.gen import dumps, generate


class SlowGraph(MemoryGraphStore):
    def __init__(self) -> None:
        super().__init__()
        self.release_reads = asyncio.Event()

    async def read(
        self, node_ids: Sequence[NodeId], topics: Sequence[str], strategy_id: str = ""
    ) -> GraphRead:
        await self.release_reads.wait()
        return await super().read(node_ids, topics, strategy_id)


async def test_overload_is_refused_at_once_and_slots_come_back() -> None:
    graph = SlowGraph()
    clock = ManualClock()
    service = DiffService(
        graph,
        MemoryTopicAdmin(),
        ControlBus(MemoryEventBus(), clock),
        clock,
        Metrics(),
        max_inflight=1,
        max_waiting=1,
        max_wait=5.0,
    )
    text = dumps(generate(3))
    first = asyncio.create_task(service.diff(Request("a"), text))
    await asyncio.sleep(0.01)
    second = asyncio.create_task(service.diff(Request("b"), text))  # waits for the slot
    await asyncio.sleep(0.01)
    with pytest.raises(Overloaded):
        await service.diff(Request("c"), text)  # one running, one waiting: shed
    graph.release_reads.set()
    assert (await first).plan.counts["new"] == 3
    assert (await second).plan.counts["reused"] == 3
    assert (await service.diff(Request("d"), text)).plan.counts["reused"] == 3
