"""The canary use case's effects: move traffic weights (graph and ControlBus, canary and stable
version), link a version's sentinel node to its compute nodes, and measure analysis gates. The
decisions are the core's state machine; the rollout service sequences both."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from qmtl_dagmanager.core.canary import Gate
from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Clock, GraphStore, MetricQuery, SentinelWrite
from qmtl_dagmanager.services.controlbus import ControlBus

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Versions:
    sentinel_id: str
    world_id: str
    canary: str
    stable: str  # empty: no stable version


@dataclass
class CanaryService:
    graph: GraphStore
    controlbus: ControlBus
    clock: Clock
    metrics: Metrics
    query: MetricQuery
    prometheus_url: str = ""  # used when a VersionSentinel names none

    async def shift(self, v: Versions, weight: int) -> None:
        """Give the canary `weight` percent and the stable version the rest: the sentinel
        nodes in the graph, then one sentinel_weight event each (repeating it is harmless:
        the same content has the same etag)."""
        if not 0 <= weight <= 100:
            raise ValueError(f"weight {weight} is outside [0, 100]")
        now = self.clock.now()
        shares = [(v.canary, weight / 100)]
        if v.stable:
            shares.append((v.stable, (100 - weight) / 100))
        for version, share in shares:
            await self.graph.set_sentinel_weight(v.sentinel_id, version, share, now)
        for version, share in shares:
            await self.controlbus.sentinel_weight(v.sentinel_id, share, version, v.world_id)
            self.metrics.events_published.labels("sentinel_weight").inc()
            self.metrics.version_weight.labels(v.sentinel_id, version).set(share)
        self.metrics.since_weight_change.changed_at[v.sentinel_id] = now
        log.info(
            "sentinel %s: %s at %d%%%s",
            v.sentinel_id,
            v.canary,
            weight,
            f", {v.stable} at {100 - weight}%" if v.stable else "",
        )

    async def link(
        self, v: Versions, strategy_id: str, commit_hash: str = "", release_tag: str = ""
    ) -> int:
        """The canary version's sentinel node, with HAS edges to the strategy's nodes."""
        ids = await self.graph.strategy_nodes(strategy_id) if strategy_id else set()
        await self.graph.link_sentinel(
            SentinelWrite(
                v.sentinel_id, v.canary, tuple(sorted(ids)), None, commit_hash, release_tag
            ),
            self.clock.now(),
        )
        return len(ids)

    async def measure(self, gates: Sequence[Gate], url: str = "") -> dict[str, float | None]:
        """One measurement per gate, concurrently; an unreadable metric is None (the state
        machine counts it as a failed measurement)."""
        base = url or self.prometheus_url
        if gates and not base:
            raise InvalidSpec(
                "spec.analysis needs spec.prometheusUrl or the prometheus_url setting",
                reason="MissingField",
            )

        async def one(gate: Gate) -> float | None:
            try:
                value = await self.query.value(base, gate.query)
            except DagManagerError as e:
                log.warning("gate %s: %s", gate.name, e.message)
                self.metrics.gate_measurements.labels("unreadable").inc()
                return None
            self.metrics.gate_measurements.labels("pass" if gate.passes(value) else "fail").inc()
            return value

        values = await asyncio.gather(*(one(g) for g in gates))
        return {g.name: v for g, v in zip(gates, values, strict=True)}
