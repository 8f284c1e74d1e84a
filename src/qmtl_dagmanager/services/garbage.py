"""Garbage collection of orphaned queues: decide with the core's policy, archive sentinel
queues, delete the topic, forget the queue in the graph, announce it on the ControlBus. Also
sweeps topics the product created that no queue ever came to own (creation intents).

Every step that a diff in another process could race is decided in the graph: a claim (one
run per queue), then a deletion mark taken only while the queue is still unreferenced (from
then on diffs wait instead of answering with a topic about to vanish), then the topic's
deletion, then forgetting the queue."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qmtl_dagmanager.core import gc
from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import (
    TOMBSTONE_TTL,
    Archive,
    Clock,
    Forgot,
    GraphStore,
    Intent,
    LoadGauge,
    TopicAdmin,
)
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.node_cache import NodeCache
from qmtl_dagmanager.services.queue_topics import ensure_queue_topics
from qmtl_dagmanager.tracing import Tracer

log = logging.getLogger(__name__)
CLAIM_TTL = 3600.0  # a claim older than this was left by a crashed run: another may take it
INTENT_GRACE = 600.0  # a creation intent this old with no queue: the topic is nobody's
# kept orphans a report lists (soonest due first): the operator writes the report into a
# ConfigMap, which holds at most 1 MiB
KEPT_LISTED = 1000


@dataclass(frozen=True, slots=True)
class GcRun:
    report: gc.GcReport
    processed: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    dry_run: bool
    ran_at: float
    load: float | None = None  # the broker load metric read for this run, if configured
    run_id: str = ""
    scope: str | None = None  # the retired version a scoped run was limited to

    def as_json(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "kept": [
                {
                    "queue": o.topic,
                    "tag": o.tag,
                    "orphaned_at": o.orphaned_at,
                    "due": o.due,
                    "why": o.why,
                }
                for o in self.report.kept[:KEPT_LISTED]
            ],
            "report": {
                "run_id": self.run_id,
                "scope": self.scope,
                "dry_run": self.dry_run,
                "ran_at": self.ran_at,
                "cap": self.report.cap,
                "loaded": self.report.loaded,
                "load": self.load,
                "managed": self.report.managed,
                "selected": len(self.report.decisions),
                "skipped": dict(self.report.skipped),
                "kept": len(self.report.kept),  # all of them; `kept` lists the first
                "kept_listed": min(len(self.report.kept), KEPT_LISTED),
                "orphan_times_recorded": len(self.report.stamp),
                "failed": self.failed,
            },
        }


@dataclass(frozen=True, slots=True)
class CompactRun:
    """One compaction: the compute nodes found removable and how many were removed."""

    candidates: list[str]
    removed: int
    dry_run: bool
    created_before: float

    def as_json(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run,
            "created_before": self.created_before,
            "candidates": len(self.candidates),
            "removed": self.removed,
            "nodes": self.candidates[:200],
        }


@dataclass
class GcService:
    graph: GraphStore
    topics: TopicAdmin
    archive: Archive
    controlbus: ControlBus
    clock: Clock
    metrics: Metrics
    policies: Mapping[str, gc.GcPolicy] = field(default_factory=lambda: dict(gc.DEFAULT_POLICIES))
    limits: gc.GcLimits = field(default_factory=gc.GcLimits)
    cache: NodeCache | None = None
    catalog: TopicCatalog = field(default_factory=TopicCatalog)  # specs of revived queues
    load: LoadGauge | None = None  # the broker load metric; None: never throttled
    load_threshold: float = 0.8
    intent_grace: float = INTENT_GRACE  # see INTENT_GRACE
    compact_max_nodes: int = 1000  # compute nodes a timed run may compact (0: never)
    tracer: Tracer = field(default_factory=Tracer)

    async def _loaded(self) -> tuple[bool, float | None]:
        """Whether the broker is too loaded for a full batch. A metric that cannot be read
        counts as loaded: dropping topics is never urgent."""
        if self.load is None:
            return False, None
        try:
            value = await self.load.value()
        except DagManagerError as e:
            log.warning("gc: the broker load metric is unreadable, halving the batch: %s", e)
            return True, None
        return value > self.load_threshold, value

    async def collect(
        self,
        *,
        dry_run: bool = False,
        scope: str | None = None,
        force: bool = False,
        run_id: str | None = None,
        name: str | None = None,
    ) -> GcRun:
        """One run, in a span (see `_collect`)."""
        with self.tracer.span("gc.run", {"dry_run": dry_run, "scope": scope or ""}) as span:
            run = await self._collect(
                dry_run=dry_run, scope=scope, force=force, run_id=run_id, name=name
            )
            span.set("collected", len(run.processed))
            span.set("failed", len(run.failed))
            return run

    async def _collect(
        self,
        *,
        dry_run: bool = False,
        scope: str | None = None,
        force: bool = False,
        run_id: str | None = None,
        name: str | None = None,
    ) -> GcRun:
        """One run. `scope`: only the queues of one retired version (`<sentinel id>@<version>`
        or a version label); `force` (with a scope) collects them now, TTL or not, still
        never a referenced or kept one. `run_id` names the run in claims and the report.
        `name` (a trigger's id) is the scope when it names a retired version some queue
        belongs to, else the run id: decided on the run's one read of the queues."""
        now = self.clock.now()
        loaded, load = await self._loaded()
        queues = await self.graph.queues()
        if name is not None:
            if any(gc.in_scope(q.retired, name) for q in queues):
                scope = name
            else:
                run_id = run_id or name
        if force and not scope:
            raise InvalidSpec(
                f"a forced GC run needs a retired version with queues as its scope: {name!r}",
                reason="NotARetiredVersion",
            )
        self.metrics.orphan_queues.set(sum(1 for q in queues if q.ref_count == 0 and q.managed))
        report = gc.select(
            [q.as_gc_queue() for q in queues],
            now,
            self.policies,
            self.limits,
            loaded=loaded,
            scope=scope,
            force=force,
        )
        if loaded:
            self.metrics.gc_throttled.inc()
            log.info(
                "gc: broker load %s over %s: per-run cap halved to %d",
                load,
                self.load_threshold,
                report.cap,
            )
        if report.stamp and not dry_run:
            # unreferenced queues of a graph older than orphan times: their grace starts now
            stamped = await self.graph.mark_orphaned(report.stamp, now)
            log.info("gc: recorded the orphan time of %d unreferenced queue(s)", stamped)
        self.metrics.gc_kept.set(len(report.kept))
        for o in report.kept:
            log.debug("gc: kept %s (%s), due %s", o.topic, o.why, o.due)
        processed: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        existing = await self.topics.list_topics() if report.decisions and not dry_run else set()
        run_id = run_id or uuid.uuid4().hex
        sweep_cap = max(1, self.limits.max_count // (2 if loaded else 1))
        unowned = (
            0
            if scope is not None  # a scoped run collects one version's queues, nothing else
            else await self._sweep_intents(run_id, now, sweep_cap, dry_run, processed, failed)
        )
        raced = await self._act(report, run_id, now, dry_run, existing, processed, failed)
        if raced:
            report = dataclasses.replace(
                report, skipped={**report.skipped, "ReferencedOrClaimed": raced}
            )
        self.metrics.gc_last_run.set(now)
        if processed and not dry_run:
            log.info(
                "gc collected %d queue(s) and %d unowned topic(s); skipped %s",
                len(processed) - unowned,
                unowned,
                dict(report.skipped),
            )
        return GcRun(report, processed, failed, dry_run, now, load, run_id, scope)

    async def _act(
        self,
        report: gc.GcReport,
        run_id: str,
        now: float,
        dry_run: bool,
        existing: set[str],
        processed: list[dict[str, Any]],
        failed: list[dict[str, Any]],
    ) -> int:
        """Claim and collect each decided queue; returns how many were raced away."""
        raced = 0
        for d in report.decisions:
            entry: dict[str, Any] = {"queue": d.topic, "action": d.action.value, "reason": d.reason}
            if dry_run:
                processed.append(entry)
                continue
            # Claim just before acting: a diff may have referenced the queue meanwhile, or
            # another GC run (another process) may be dropping it.
            if not await self.graph.claim_queue(d.topic, run_id, now, CLAIM_TTL, d.orphaned_by):
                raced += 1
                continue
            try:
                collected = await self._collect_one(d, entry, d.topic in existing, run_id)
            except DagManagerError as e:
                log.warning("gc of %s failed: %s", d.topic, e.message)
                failed.append({**entry, "error": e.message, "reason": e.reason})
                if d.action is gc.GcAction.ARCHIVE:
                    # the topic stays; say why where operators look
                    self.metrics.gc_archive_failures.inc()
                    await self._announce_failure(d.topic, e)
                continue
            if not collected:
                raced += 1
                continue
            processed.append(entry)
        return raced

    async def compact(self, *, dry_run: bool = False, limit: int | None = None) -> CompactRun:
        """Remove compute nodes nothing needs: no queue, no strategy, no live sentinel
        version, created longer ago than the sentinel policy's TTL (so a retired version's
        sentinel queues, and their nodes, are gone first). At most `limit` per call."""
        sentinel = self.policies.get(gc.SENTINEL_TAG, gc.DEFAULT_POLICIES[gc.SENTINEL_TAG])
        before = self.clock.now() - sentinel.ttl
        cap = self.compact_max_nodes if limit is None else limit
        found = await self.graph.compactable(before, cap) if cap > 0 else []
        removed = 0 if dry_run or not found else await self.graph.compact(found, before)
        if removed:
            self.metrics.compacted_nodes.inc(removed)
            log.info("compaction removed %d compute node(s) created before %s", removed, before)
        return CompactRun([str(n) for n in found], removed, dry_run, before)

    async def every(
        self,
        interval: float,
        *,
        dry_run: bool = False,
        after: Callable[[GcRun], Awaitable[None]] | None = None,
    ) -> None:
        """Timed GC until cancelled: a run every `interval` seconds; a failed run is logged
        and the timer goes on; `after` receives each finished run (a report, a log line)."""
        while True:
            self.metrics.gc_next_run.set(self.clock.now() + interval)
            await asyncio.sleep(interval)
            try:
                run = await self.collect(dry_run=dry_run)
            except DagManagerError as e:
                log.warning("timed GC failed: %s: %s", e.reason, e.message)
                continue
            log.info("timed GC: %d collected, %d failed", len(run.processed), len(run.failed))
            if self.compact_max_nodes > 0:
                try:
                    await self.compact(dry_run=dry_run)
                except DagManagerError as e:
                    log.warning("timed compaction failed: %s: %s", e.reason, e.message)
            if after is not None:
                await after(run)

    async def _collect_one(
        self, d: gc.GcDecision, entry: dict[str, Any], in_kafka: bool, run_id: str
    ) -> bool:
        """Drop one claimed queue: True when it is gone; False when a diff referenced it
        after the claim (the queue stays, with its topic)."""
        if d.action is gc.GcAction.ARCHIVE and in_kafka:
            try:
                result = await self.archive.archive(d.topic)
            except DagManagerError:
                # nothing was deleted: let the next run try at once (not after CLAIM_TTL)
                with contextlib.suppress(DagManagerError):
                    await self.graph.release_claim(d.topic, run_id)
                raise
            entry["archived"] = {"location": result.location, "messages": result.messages}
        if not await self.graph.mark_deleting(d.topic, run_id, self.clock.now()):
            return False  # referenced since the claim: nothing deleted
        # Deleted even when the listing did not show it: the listing may be older than the
        # topic (deleting a missing topic is no error).
        error = (await self.topics.delete([d.topic])).get(d.topic)
        if error:
            raise _Skip(f"Kafka refused to delete {d.topic}: {error}")
        forgot = await self.graph.forget_queue(d.topic)
        if forgot is Forgot.REFERENCED:  # a diff took it over (this run looked dead)
            await self._revive(d.topic)
            return False
        if forgot is Forgot.ABSENT:  # another run dropped it first: not ours to announce
            return False
        if self.cache is not None:
            self.cache.evict_topic(d.topic)
        log.info("gc: %s %s (%s)", d.action.value, d.topic, d.reason)
        await self.controlbus.queue_lifecycle(d.topic, d.action.value, d.reason)
        self.metrics.gc_collected.labels(d.action.value).inc()
        self.metrics.events_published.labels("queue_lifecycle").inc()
        return True

    async def _announce_failure(self, topic: str, e: DagManagerError) -> None:
        try:
            await self.controlbus.queue_lifecycle(topic, "archive_failed", e.message)
        except DagManagerError as bus:
            log.warning("gc: could not announce the failed archive of %s: %s", topic, bus)

    async def _sweep_intents(
        self,
        run_id: str,
        now: float,
        cap: int,
        dry_run: bool,
        processed: list[dict[str, Any]],
        failed: list[dict[str, Any]],
    ) -> int:
        """Delete topics whose creation intent is older than `intent_grace` and that no queue
        owns: a diff created them, then crashed, planned other names or lost a race. Returns
        how many were deleted (or, in a dry run, would be)."""
        if not dry_run:
            await self.graph.purge_tombstones(now - TOMBSTONE_TTL)
        stale = await self.graph.stale_intents(now - self.intent_grace, cap)
        swept = 0
        for topic in stale:
            entry = {
                "queue": topic,
                "action": gc.GcAction.DROP.value,
                "reason": f"topic created by a diff that no queue owns after "
                f"{self.intent_grace:g} s (creation intent)",
            }
            if dry_run:
                processed.append(entry)
                swept += 1
                continue
            outcome = await self.graph.claim_intent(topic, run_id, now, now - self.intent_grace)
            if outcome is not Intent.CLAIMED:
                continue  # a queue owns it now, or a diff is creating it again
            error = (await self.topics.delete([topic])).get(topic)
            if error:
                failed.append({**entry, "error": f"Kafka refused to delete {topic}: {error}"})
                continue  # the sweep claim expires; a later run tries again
            await self.graph.drop_intent(topic, run_id, self.clock.now())
            self.metrics.gc_unowned_topics.inc()
            log.warning("gc: deleted unowned topic %s (%s)", topic, entry["reason"])
            processed.append(entry)
            swept += 1
        return swept

    async def _revive(self, topic: str) -> None:
        """A diff took the queue over after this run's deletion mark aged (`DELETING_TTL`)
        and ensured its topic, possibly before this run deleted it: ensure it again."""
        results = await ensure_queue_topics(self.graph, self.topics, self.catalog, [topic])
        result = results.get(topic)
        if result is None or not result.ok:
            why = result.message if result is not None else "no longer in the graph"
            raise _Skip(
                f"{topic} was referenced again while being dropped; ensuring its topic "
                f"failed: {why}"
            )
        log.warning(
            "gc: %s was referenced again while being dropped: kept (topic %s)",
            topic,
            result.status.value,
        )


class _Skip(DagManagerError):
    reason = "GcSkipped"
