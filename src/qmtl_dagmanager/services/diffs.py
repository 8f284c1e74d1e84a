"""The Diff use case: parse → read the graph (one query) → plan → create topics (one batch)
→ write the graph (one transaction) → publish QueueUpdated events.

Order and failure: topics are created before the graph is written. If the write fails, the
new topics stay as unmanaged leftovers that a retry of the same diff adopts ("exists with the
same configuration" is success), and the graph is unchanged: no partial graph writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from qmtl_dagmanager.adapters.clock import SystemClock
from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.errors import (
    Conflict,
    DagManagerError,
    Overloaded,
    QueueGone,
    Unavailable,
)
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import (
    Clock,
    GraphStore,
    SentinelWrite,
    TopicAdmin,
    TopicResult,
    TopicStatus,
)
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.node_cache import NodeCache, ResubmissionCache
from qmtl_dagmanager.services.queue_events import QueueEvents
from qmtl_dagmanager.services.queue_topics import ensure_queue_topics

log = logging.getLogger(__name__)
MAX_RENAME_ROUNDS = 3
PLAN_ATTEMPTS = 3  # plans of one diff when GC drops reused queues under it


@dataclass(frozen=True, slots=True)
class DiffOutcome:
    plan: plan.Plan
    dag: dag.Dag
    dry_run: bool
    topics: dict[str, TopicResult] = field(default_factory=dict)


@dataclass
class DiffService:
    graph: GraphStore
    topics: TopicAdmin
    controlbus: ControlBus
    clock: Clock
    metrics: Metrics
    catalog: TopicCatalog = field(default_factory=TopicCatalog)
    limits: dag.Limits = field(default_factory=dag.Limits)
    ids: dag.IdMode = dag.IdMode.VERIFY
    dry_run_strategy: str = "dryrun"
    namespaces: bool = True
    cache: NodeCache = field(default_factory=lambda: NodeCache(SystemClock(), ttl=0))
    max_inflight: int = 8
    max_waiting: int = 64
    max_wait: float = 2.0
    resubmissions: ResubmissionCache = field(default_factory=lambda: ResubmissionCache(0))
    _gaps: dict[str, bool] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    _waiting: int = 0
    _events: QueueEvents | None = None

    async def diff(
        self,
        request: plan.Request,
        dag_json: str | bytes,
        *,
        dry_run: bool = False,
        ids: dag.IdMode | None = None,
    ) -> DiffOutcome:
        """Diff a DAG; with `dry_run` (or the dry-run strategy id) nothing is written.
        `ids` overrides the configured NodeID check for this request."""
        started = time.perf_counter()
        self.metrics.diff_requests.inc()
        dry = dry_run or request.strategy_id == self.dry_run_strategy
        try:
            async with self._admission():
                outcome = await self._diff(request, dag_json, dry, ids or self.ids)
        except DagManagerError as e:
            self.metrics.diff_failures.labels(e.reason).inc()
            self.metrics.diff_duration.labels("error").observe(time.perf_counter() - started)
            log.info("diff of %s failed: %s: %s", request.strategy_id, e.reason, e.message)
            raise
        self.metrics.diff_duration.labels("ok").observe(time.perf_counter() - started)
        return outcome

    @contextlib.asynccontextmanager
    async def _admission(self) -> AsyncIterator[None]:
        """At most `max_inflight` diffs run at once; at most `max_waiting` wait, each for at
        most `max_wait` seconds. Beyond that the sidecar sheds load at once instead of
        queueing work the Gateway will have discarded (its budget is 0.1 s)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise Overloaded(f"{self._waiting} diffs already waiting; try again shortly")
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.max_wait)
        except TimeoutError:
            raise Overloaded(f"no diff slot within {self.max_wait:g} s") from None
        finally:
            self._waiting -= 1
        try:
            yield
        finally:
            self._slots.release()

    async def _plan(self, d: dag.Dag, request: plan.Request) -> tuple[plan.Plan, str | None]:
        """Plan with the node records (from the cache, else one graph query that also
        returns the strategy's fingerprint), then look up who owns the names of new topics."""
        ids = [n.node_id for n in d.nodes]
        records = self.cache.get_many(ids)
        missing = [nid for nid in ids if nid not in records]
        read = await self.graph.read(missing, [], request.strategy_id)
        self.cache.put_many(read.records)
        records.update(read.records)
        owners: dict[str, NodeId] = {}
        looked_up: set[str] = set()
        for _ in range(MAX_RENAME_ROUNDS):
            p = plan.plan(d, request, records, owners, self.catalog, namespaces=self.namespaces)
            fresh = [c.topic for c in p.creates if c.topic not in looked_up]
            if not fresh:
                return p, read.fingerprint
            looked_up |= set(fresh)
            extra = await self.graph.read([], fresh)
            if not extra.owners:
                return p, read.fingerprint
            owners |= extra.owners
        raise Conflict(
            f"could not find free topic names for {request.strategy_id} after "
            f"{MAX_RENAME_ROUNDS} rounds"
        )

    async def _diff(
        self, request: plan.Request, dag_json: str | bytes, dry: bool, ids: dag.IdMode
    ) -> DiffOutcome:
        key = "" if dry else self.resubmissions.key(request, dag_json, ids, self.namespaces)
        seen = self.resubmissions.get(key)
        if seen is not None:
            # The same bytes in the same context were diffed and written before: if the
            # graph still records exactly that write for the strategy, the answer stands.
            read = await self.graph.read([], [], request.strategy_id)
            if seen.plan.unchanged(read.fingerprint):
                return seen
            self.resubmissions.drop(key)
        outcome = await self._diff_fresh(request, dag_json, dry, ids)
        if key and not outcome.dry_run and not outcome.plan.violations:
            self.resubmissions.put(key, outcome)
        return outcome

    async def _diff_fresh(
        self, request: plan.Request, dag_json: str | bytes, dry: bool, ids: dag.IdMode
    ) -> DiffOutcome:
        d = dag.parse(dag_json, limits=self.limits, ids=ids)
        attempt = 1
        while True:
            try:
                return await self._plan_and_write(d, request, dry)
            except QueueGone as e:  # GC dropped a reused queue after we read the graph
                self.cache.evict(n.node_id for n in d.nodes)
                if attempt >= PLAN_ATTEMPTS:
                    raise
                attempt += 1
                log.warning("diff %s: %s; planning again", request.strategy_id, e.message)

    async def _plan_and_write(self, d: dag.Dag, request: plan.Request, dry: bool) -> DiffOutcome:
        p, fingerprint = await self._plan(d, request)
        if p.violations:
            self.metrics.cross_context.inc(len(p.violations))
            p.raise_for_violations()
        for action, count in (
            ("reuse", p.counts["reused"]),
            ("buffer", p.counts["buffered"]),
            ("create", p.counts["new"]),
        ):
            if count:
                self.metrics.nodes_planned.labels(action).inc(count)
        if dry:
            return DiffOutcome(p, d, True)
        if p.unchanged(fingerprint):
            return DiffOutcome(p, d, False)  # a resubmission: nothing to write or announce
        creates = p.creates
        results = await self.topics.ensure({c.topic: c.spec for c in creates if c.spec})
        self._raise_for_topics(results)
        now = self.clock.now()
        sentinel = d.sentinels[0] if d.sentinels else None
        try:
            reclaimed = await self.graph.apply(p, now, SentinelWrite.from_plan(p, sentinel))
        except DagManagerError:
            self.cache.evict(n.node_id for n in d.nodes)
            raise
        if reclaimed:
            await self._revive(request.strategy_id, reclaimed)
        self._remember(p)
        self._gaps[request.strategy_id] = sentinel is None
        self.metrics.sentinel_gap.set(sum(self._gaps.values()))
        if creates:
            log.info(
                "diff %s: %d new, %d reused, %d buffered",
                request.strategy_id,
                p.counts["new"],
                p.counts["reused"],
                p.counts["buffered"],
            )
            await self._publish(p)
            counts = await self.graph.counts()
            self.metrics.compute_nodes.set(counts.compute_nodes)
            self.metrics.queues.set(counts.queues)
        self.metrics.node_cache.set(len(self.cache))
        return DiffOutcome(p, d, False, results)

    def _remember(self, p: plan.Plan) -> None:
        """After a write: the graph now holds each node with its queue for this context."""
        known = self.cache.get_many(n.node.node_id for n in p.nodes)
        fresh: dict[NodeId, plan.NodeRecord] = {}
        for n in p.nodes:
            old = known.get(n.node.node_id)
            queues = old.queues if old else ()
            if not any(q.compute_key == n.compute_key for q in queues):
                queues = (*queues, plan.QueueRecord(n.topic, n.compute_key))
            fresh[n.node.node_id] = plan.NodeRecord(
                n.node.node_id, n.node.schema_hash, n.node.schema_compat_id, queues
            )
        self.cache.put_many(fresh)

    async def _revive(self, strategy_id: str, topics: tuple[str, ...]) -> None:
        """Queues this diff references that a GC run had claimed: their claim is released,
        and their topics exist again if the run deleted them already (it recreates them too,
        when it finds them referenced; creating a topic twice is harmless)."""
        results = await ensure_queue_topics(self.graph, self.topics, self.catalog, topics)
        created = sorted(t for t, r in results.items() if r.status is TopicStatus.CREATED)
        self.metrics.queues_revived.inc(len(topics))
        log.warning(
            "diff %s: %d queue(s) referenced again while GC was dropping them (claim released)%s",
            strategy_id,
            len(topics),
            f"; topics created again: {', '.join(created[:5])}" if created else "",
        )
        self._raise_for_topics(results)

    def _raise_for_topics(self, results: dict[str, TopicResult]) -> None:
        bad = {t: r for t, r in results.items() if not r.ok}
        if not bad:
            return
        self.metrics.queue_create_errors.inc(len(bad))
        detail = "; ".join(
            f"{t}: {r.status.value} {r.message}".strip() for t, r in sorted(bad.items())[:5]
        )
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        if all(r.status is TopicStatus.FAILED and r.retriable for r in bad.values()):
            raise Unavailable(
                f"Kafka could not create {len(bad)} topic(s): {detail}{more}",
                reason="KafkaUnavailable",
            )
        raise Conflict(
            f"{len(bad)} topic(s) cannot be created as planned: {detail}{more}",
            reason="TopicConflict",
        )

    async def _publish(self, p: plan.Plan) -> None:
        if self._events is None:
            self._events = QueueEvents(self.graph, self.controlbus, self.metrics)
        await self._events.publish(p.query_groups)
