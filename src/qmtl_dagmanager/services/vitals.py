"""A process's vital signs on a timer, so the gauges tell the truth without traffic: the graph's
size read from the graph (at start, then every `interval` seconds; a quiet restart exports the
real counts, not zero), and whether Neo4j and Kafka answer (`dependency_up`). A dependency
going down or coming back is a log line, beside the gauge."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field

from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import GraphCounts, GraphStore, TopicAdmin

log = logging.getLogger(__name__)
DEPENDENCIES = ("neo4j", "kafka")


@dataclass(frozen=True, slots=True)
class Reading:
    up: dict[str, bool]
    counts: GraphCounts | None  # None: the graph did not answer
    errors: dict[str, str]


@dataclass
class Vitals:
    graph: GraphStore
    topics: TopicAdmin
    metrics: Metrics
    timeout: float = 5.0
    _up: dict[str, bool] = field(default_factory=dict)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def refresh(self) -> Reading:
        """Probe both dependencies and read the graph's size; set the gauges."""
        errors: dict[str, str] = {}
        counts: GraphCounts | None = None
        try:
            counts = await asyncio.wait_for(self.graph.counts(), self.timeout)
        except (DagManagerError, TimeoutError, OSError) as e:
            errors["neo4j"] = _why(e)
        try:
            await asyncio.wait_for(self.topics.list_topics(), self.timeout)
        except (DagManagerError, TimeoutError, OSError) as e:
            errors["kafka"] = _why(e)
        up = {d: d not in errors for d in DEPENDENCIES}
        for dep, ok in up.items():
            self.metrics.dependency_up.labels(dep).set(1 if ok else 0)
            if self._up.get(dep, True) != ok:
                if ok:
                    log.info("%s answers again", dep)
                else:
                    log.warning("%s does not answer: %s", dep, errors[dep])
            self._up[dep] = ok
        if counts is not None:
            self.metrics.compute_nodes.set(counts.compute_nodes)
            self.metrics.queues.set(counts.queues)
        self.metrics.slo_window.snapshot()
        return Reading(up, counts, errors)

    async def every(self, interval: float) -> None:
        """Refresh now, then every `interval` seconds, until cancelled or `stop`."""
        while not self._stop.is_set():
            await self.refresh()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    def stop(self) -> None:
        """Return from `every` after the refresh in progress (see QueueEvents.stop)."""
        self._stop.set()


def _why(e: BaseException) -> str:
    if isinstance(e, DagManagerError):
        return f"{e.reason}: {e.message}"
    return type(e).__name__ + (f": {e}" if str(e) else "")
