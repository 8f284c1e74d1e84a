"""StrategyDAG use cases for the operator: reconcile a spec (one level-based function for
create, update, resume and resync) and clean up on deletion. No Kubernetes in here: the kopf
driver reads the resource, calls these, and renders the result into status and events."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import Any

import orjson

from qmtl_dagmanager.core import dag
from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.core.plan import Plan, Request
from qmtl_dagmanager.core.strategy_spec import DeletionPolicy, StrategySpec
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.ports import GraphStore, TopicStatus
from qmtl_dagmanager.services.diffs import DiffOutcome, DiffService

log = logging.getLogger(__name__)


def dag_document(spec: StrategySpec, config_map_text: str | None) -> dict[str, Any] | str:
    """The DAG as the SDK would send it: from the inline spec, or the ConfigMap's JSON."""
    if spec.config_map is not None:
        if config_map_text is None:
            name, key = spec.config_map
            raise InvalidSpec(
                f"spec.dagConfigMapRef: ConfigMap {name} has no key {key!r}", reason="DagNotFound"
            )
        return config_map_text
    if spec.dag is None:
        raise InvalidSpec("spec: set dag or dagConfigMapRef", reason="MissingField")
    doc: dict[str, Any] = {
        "schema_version": spec.dag.get("schemaVersion", "v1"),
        "nodes": spec.dag.get("nodes", []),
        "meta": spec.dag.get("meta") or {},
    }
    if spec.version:
        doc["version"] = spec.version
    return doc


def dag_text(spec: StrategySpec, config_map_text: str | None) -> str:
    """The DAG as JSON text; a value JSON cannot carry (an integer beyond 64 bits, say) is
    an invalid spec naming the field."""
    doc = dag_document(spec, config_map_text)
    if isinstance(doc, str):
        return doc
    try:
        return orjson.dumps(doc).decode()
    except (TypeError, orjson.JSONEncodeError) as e:
        raise InvalidSpec(
            f"spec.dag: not representable as JSON: {e}", reason="InvalidField"
        ) from None


@dataclass(frozen=True)
class Drift:
    recreated: list[str] = field(default_factory=list)
    altered: dict[str, str] = field(default_factory=dict)


@dataclass
class StrategyService:
    diffs: DiffService
    graph: GraphStore
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    def _lock(self, strategy_id: str) -> asyncio.Lock:
        return self._locks.setdefault(strategy_id, asyncio.Lock())

    async def reconcile(self, spec: StrategySpec, dag_json: str | bytes) -> DiffOutcome:
        """Make the graph and Kafka match the spec (or, with dryRun, only plan)."""
        if not spec.strategy_id.strip():
            raise InvalidSpec("spec.strategyId is required", reason="MissingField")
        request = Request(
            spec.strategy_id,
            world_id=spec.world_id,
            execution_domain=spec.execution_domain,
            as_of=spec.as_of,
            partition=spec.partition,
        )
        # An inline DAG went through the API server's JSON, which stores integral floats as
        # integers (1.0 becomes 1) and so changes the canonical params a NodeID is computed
        # from: its ids are taken as submitted. A ConfigMap keeps the SDK's exact JSON, so
        # its ids are checked as configured.
        ids = dag.IdMode.TRUST if spec.config_map is None else None
        async with self._lock(spec.strategy_id):
            return await self.diffs.diff(request, dag_json, dry_run=spec.dry_run, ids=ids)

    async def repair_drift(self, outcome: DiffOutcome) -> Drift:
        """One-way truth: every topic the plan uses must exist as the catalog says. A topic
        deleted out of band is created again; one altered out of band, or less durable than
        the catalog asks, is reported."""
        if outcome.dry_run or not outcome.plan.nodes:
            return Drift()
        catalog = self.diffs.catalog
        wanted: dict[str, TopicSpec] = {
            n.topic: catalog.spec_for(n.node.node_type) for n in outcome.plan.nodes
        }
        results = await self.diffs.topics.ensure(wanted)
        drift = Drift(
            recreated=sorted(
                t
                for t, r in results.items()
                if r.status is TopicStatus.CREATED and t not in outcome.topics
            ),
            # altered out of band, or reused below the durability the profile asks
            altered={t: r.message for t, r in results.items() if not r.ok or r.message},
        )
        if drift.recreated or drift.altered:
            log.warning(
                "strategy %s: drift: %d topic(s) recreated, %d altered",
                outcome.plan.strategy_id,
                len(drift.recreated),
                len(drift.altered),
            )
            self.diffs.metrics.drift_corrected.inc(len(drift.recreated))
            self.diffs.metrics.drift_detected.inc(len(drift.recreated) + len(drift.altered))
        return drift

    async def protect(self, outcome_plan: Plan, keeper: str, keep: bool) -> int:
        """Mark (or unmark) the plan's queues as kept by `keeper`: GC never touches a queue
        while any marker remains. Returns how many queues changed."""
        topics = sorted({n.topic for n in outcome_plan.nodes})
        changed = await self.graph.set_keep(topics, keeper, keep)
        if changed:
            log.info("%s: %s %d queue(s)", keeper, "kept" if keep else "released", changed)
        return changed

    async def delete(self, spec: StrategySpec, topics: list[str]) -> int:
        """Drop the strategy's references; with Retain, keep its topics as unmanaged."""
        return await self.release(spec.strategy_id, spec.deletion_policy, topics)

    async def release(self, strategy_id: str, policy: DeletionPolicy, topics: list[str]) -> int:
        """What deleting a StrategyDAG does to the graph (also for a deletion recorded while
        the backends were down, completed later). Idempotent: a second call drops nothing."""
        async with self._lock(strategy_id):
            if policy is DeletionPolicy.RETAIN and topics:
                await self.graph.set_unmanaged(topics)
            dropped = await self.graph.release(strategy_id, self.diffs.clock.now())
        self._locks.pop(strategy_id, None)
        log.info("strategy %s deleted (%s): %d references dropped", strategy_id, policy, dropped)
        return dropped
