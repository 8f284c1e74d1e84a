"""QueueUpdated publication with group commit. Each event carries the full queue set of its
(tags, interval, match_mode) group, read from the graph. When many diffs finish at once their
groups are gathered: while one flush runs, later requests wait for the next flush, which reads
the union of their groups once and publishes each group once. A caller returns only after a
flush that began after its request (so after its own graph write) has published its groups;
a failed flush fails every caller waiting on it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from qmtl_dagmanager.core.plan import QueryGroup
from qmtl_dagmanager.core.tag_match import TagQuery
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import GraphStore
from qmtl_dagmanager.services.controlbus import ControlBus


class QueueEvents:
    def __init__(self, graph: GraphStore, controlbus: ControlBus, metrics: Metrics) -> None:
        self.graph, self.controlbus, self.metrics = graph, controlbus, metrics
        self._pending: dict[QueryGroup, None] = {}  # ordered set
        self._next: asyncio.Future[None] | None = None
        self._running = False
        self.flushes = 0

    async def publish(self, groups: Iterable[QueryGroup]) -> None:
        new = dict.fromkeys(groups)
        if not new:
            return
        self._pending.update(new)
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if not self._running:
            self._running = True
            asyncio.get_running_loop().create_task(self._drain())
        await asyncio.shield(waiting)

    async def _drain(self) -> None:
        try:
            while self._pending:
                groups, done = list(self._pending), self._next
                self._pending, self._next = {}, None
                assert done is not None
                try:
                    await self._flush(groups)
                except Exception as e:  # noqa: BLE001  (every waiting caller gets it)
                    done.set_exception(e)
                else:
                    done.set_result(None)
        finally:
            self._running = False

    async def _flush(self, groups: list[QueryGroup]) -> None:
        self.flushes += 1
        sets = await self.graph.queues_by_tag_queries(
            [TagQuery(g.tags, g.interval, g.match_mode) for g in groups]
        )
        for g, refs in zip(groups, sets, strict=True):
            await self.controlbus.queue_updated(
                g.tags, g.interval, [(r.topic, r.is_global) for r in refs], g.match_mode
            )
            self.metrics.events_published.labels("queue_updated").inc()
