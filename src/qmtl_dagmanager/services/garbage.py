"""Garbage collection of orphaned queues: decide with the core's policy, archive sentinel
queues, delete the topic, forget the queue in the graph, announce it on the ControlBus."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from qmtl_dagmanager.core import gc
from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Archive, Clock, Forgot, GraphStore, LoadGauge, TopicAdmin
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.node_cache import NodeCache
from qmtl_dagmanager.services.queue_topics import ensure_queue_topics

log = logging.getLogger(__name__)
CLAIM_TTL = 3600.0  # a claim older than this was left by a crashed run: another may take it


@dataclass(frozen=True, slots=True)
class GcRun:
    report: gc.GcReport
    processed: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    dry_run: bool
    ran_at: float
    load: float | None = None  # the broker load metric read for this run, if configured

    def as_json(self) -> dict[str, Any]:
        return {
            "processed": self.processed,
            "report": {
                "dry_run": self.dry_run,
                "ran_at": self.ran_at,
                "cap": self.report.cap,
                "loaded": self.report.loaded,
                "load": self.load,
                "managed": self.report.managed,
                "selected": len(self.report.decisions),
                "skipped": dict(self.report.skipped),
                "failed": self.failed,
            },
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

    async def collect(self, *, dry_run: bool = False) -> GcRun:
        now = self.clock.now()
        loaded, load = await self._loaded()
        queues = await self.graph.queues()
        self.metrics.orphan_queues.set(sum(1 for q in queues if q.ref_count == 0 and q.managed))
        report = gc.select(
            [q.as_gc_queue() for q in queues], now, self.policies, self.limits, loaded=loaded
        )
        if loaded:
            self.metrics.gc_throttled.inc()
            log.info(
                "gc: broker load %s over %s: per-run cap halved to %d",
                load,
                self.load_threshold,
                report.cap,
            )
        processed: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        existing = await self.topics.list_topics() if report.decisions and not dry_run else set()
        run_id = uuid.uuid4().hex
        raced = 0
        for d in report.decisions:
            entry: dict[str, Any] = {"queue": d.topic, "action": d.action.value, "reason": d.reason}
            if dry_run:
                processed.append(entry)
                continue
            # Claim just before acting: a diff may have referenced the queue meanwhile, or
            # another GC run (another process) may be dropping it.
            if not await self.graph.claim_queue(d.topic, run_id, now, CLAIM_TTL):
                raced += 1
                continue
            try:
                collected = await self._collect_one(d, entry, d.topic in existing)
            except DagManagerError as e:
                log.warning("gc of %s failed: %s", d.topic, e.message)
                failed.append({**entry, "error": e.message})
                continue
            if not collected:
                raced += 1
                continue
            processed.append(entry)
        if raced:
            report = dataclasses.replace(
                report, skipped={**report.skipped, "ReferencedOrClaimed": raced}
            )
        self.metrics.gc_last_run.set(now)
        if processed and not dry_run:
            log.info("gc collected %d queue(s); skipped %s", len(processed), dict(report.skipped))
        return GcRun(report, processed, failed, dry_run, now, load)

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
            await asyncio.sleep(interval)
            try:
                run = await self.collect(dry_run=dry_run)
            except DagManagerError as e:
                log.warning("timed GC failed: %s: %s", e.reason, e.message)
                continue
            log.info("timed GC: %d collected, %d failed", len(run.processed), len(run.failed))
            if after is not None:
                await after(run)

    async def _collect_one(self, d: gc.GcDecision, entry: dict[str, Any], in_kafka: bool) -> bool:
        """Drop one claimed queue: True when it is gone; False when a diff referenced it
        after the claim (the queue stays, and its topic is created again if it was deleted)."""
        if d.action is gc.GcAction.ARCHIVE and in_kafka:
            result = await self.archive.archive(d.topic)
            entry["archived"] = {"location": result.location, "messages": result.messages}
        if in_kafka:
            error = (await self.topics.delete([d.topic])).get(d.topic)
            if error:
                raise _Skip(f"Kafka refused to delete {d.topic}: {error}")
        forgot = await self.graph.forget_queue(d.topic)
        if forgot is Forgot.REFERENCED:
            await self._revive(d.topic)
            return False
        if forgot is Forgot.ABSENT:  # another run dropped it first: not ours to announce
            return False
        if self.cache is not None:
            self.cache.evict_topic(d.topic)
        await self.controlbus.queue_lifecycle(d.topic, d.action.value, d.reason)
        self.metrics.gc_collected.labels(d.action.value).inc()
        self.metrics.events_published.labels("queue_lifecycle").inc()
        return True

    async def _revive(self, topic: str) -> None:
        """The diff that took the queue back counted it (`queues_revived_total`) and ensured
        its topic, possibly before this run deleted it: ensure it again."""
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
