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
from qmtl_dagmanager.core.rollout import rollback_target
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

    async def retire(self, v: Versions, version: str, retired: bool) -> list[str]:
        """Mark (or unmark) the queues only `version` used as a retired version's: GC keeps
        them as sentinel queues (180 d + 30 d by default, then archived), so that a rollback
        finds their topics and data."""
        topics = await self.graph.retire_version(v.sentinel_id, version, self.clock.now(), retired)
        self.metrics.retired_queues.labels("retired" if retired else "restored").inc(len(topics))
        log.info(
            "sentinel %s: version %s %s; %d queue(s) %s",
            v.sentinel_id,
            version,
            "retired" if retired else "back in service",
            len(topics),
            "kept as sentinel queues" if retired else "back to their own GC policy",
        )
        return topics

    async def rollback(self, sentinel_id: str, world_id: str = "") -> tuple[str, str, int]:
        """Point all traffic of a sentinel back to its previous version (the Gateway-side
        rollback of `redo-diff --rollback`): weights in the graph and on the ControlBus,
        the current version retired (its queues kept as sentinel queues) and the previous
        one back in service. Returns (from, to, queues retired)."""
        weights = await self.graph.sentinel_weights(sentinel_id)
        histories: dict[str, tuple[tuple[float, float], ...]] = {}
        for version in weights:
            record = await self.graph.sentinel(sentinel_id, version)
            if record is not None:
                histories[version] = record.history
        current, previous = rollback_target(weights, histories)
        v = Versions(sentinel_id, world_id, previous, current)
        await self.shift(v, 100)
        await self.retire(v, previous, False)  # first: what it uses is live again
        retired = await self.retire(v, current, True)
        log.warning("sentinel %s: rolled back from %s to %s", sentinel_id, current, previous)
        return current, previous, len(retired)

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

    async def cross_context_hits(self, window: float) -> int:
        """Nodes refused as cross-context reuses by any process within `window` seconds."""
        return await self.graph.cross_context_since(self.clock.now() - window)

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
