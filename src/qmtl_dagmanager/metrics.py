"""Prometheus metrics, registered on a registry the composition root owns (no globals)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class _SinceWeightChange(Collector):
    """Seconds since each sentinel's weight last changed, computed when scraped."""

    def __init__(self) -> None:
        self.changed_at: dict[str, float] = {}

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "dagmanager_seconds_since_weight_change",
            "Seconds since the canary weight of a sentinel last changed",
            labels=["sentinel"],
        )
        now = time.time()
        for sentinel, at in sorted(self.changed_at.items()):
            g.add_metric([sentinel], max(0.0, now - at))
        yield g


@dataclass(frozen=True, slots=True)
class _Snapshot:
    at: float  # monotonic seconds
    diffs: float
    fast: float  # diffs answered within 100 ms (SLO-1)
    created: float
    failed: float  # topic creations (SLO-2)
    gap: bool  # a sentinel gap at this moment (SLO-3)


class SloWindow(Collector):
    """The SLO figures of the last `window` seconds (or of the process's life, if shorter),
    from snapshots of the counters the vitals timer takes: `dagmanager_slo_ratio{slo}` (the
    good fraction; NaN with no events), `dagmanager_slo_events{slo}` and
    `dagmanager_slo_window_seconds` (the span they cover). For a person at a terminal
    (`dagmanager status`); Prometheus computes the real SLOs from the raw counters."""

    def __init__(self, metrics: Metrics, window: float = 3600.0) -> None:
        self._m = metrics
        self.window = window
        self._snaps: deque[_Snapshot] = deque()

    def _now(self) -> _Snapshot:
        m = self._m
        diffs = _sum(m.diff_duration, "diff_duration_seconds_count")
        fast = _sum(m.diff_duration, "diff_duration_seconds_bucket", le="0.1")
        return _Snapshot(
            time.monotonic(),
            diffs,
            fast,
            _sum(m.queue_create_successes, "queue_create_success_total"),
            _sum(m.queue_create_errors, "queue_create_error_total"),
            _sum(m.sentinel_gap, "sentinel_gap_count") > 0,
        )

    def snapshot(self) -> None:
        snap = self._now()
        self._snaps.append(snap)
        while len(self._snaps) > 1 and snap.at - self._snaps[1].at >= self.window:
            self._snaps.popleft()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = self._now()
        first = self._snaps[0] if self._snaps else now
        snaps = [*self._snaps, now]
        ratio = GaugeMetricFamily(
            "dagmanager_slo_ratio", "Good fraction over the SLO window", labels=["slo"]
        )
        events = GaugeMetricFamily(
            "dagmanager_slo_events", "Events the SLO window holds", labels=["slo"]
        )
        diffs, created = (
            now.diffs - first.diffs,
            (now.created + now.failed) - (first.created + first.failed),
        )
        ratio.add_metric(["SLO-1"], _fraction(now.fast - first.fast, diffs))
        events.add_metric(["SLO-1"], diffs)
        ratio.add_metric(["SLO-2"], _fraction(now.created - first.created, created))
        events.add_metric(["SLO-2"], created)
        ratio.add_metric(["SLO-3"], sum(not s.gap for s in snaps) / len(snaps))
        events.add_metric(["SLO-3"], len(snaps))
        yield ratio
        yield events
        yield GaugeMetricFamily(
            "dagmanager_slo_window_seconds",
            "Seconds the SLO window covers (shorter than an hour after a start)",
            value=now.at - first.at,
        )


def _sum(metric: Collector, name: str, **labels: str) -> float:
    """The sum of one metric's samples called `name` whose labels include `labels` (read from
    the metric itself: reading through the registry would collect this collector too)."""
    return sum(
        s.value
        for family in metric.collect()
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def _fraction(good: float, total: float) -> float:
    return good / total if total > 0 else math.nan


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.diff_duration = Histogram(
            "diff_duration_seconds",
            "Time to answer a Diff, by outcome",
            ["outcome"],
            buckets=(0.002, 0.005, 0.01, 0.02, 0.04, 0.08, 0.1, 0.2, 0.5, 1, 2, 5),
            registry=r,
        )
        self.diff_requests = Counter("diff_requests_total", "Diff requests", registry=r)
        self.diff_failures = Counter(
            "diff_failures_total", "Failed diffs, by reason", ["reason"], registry=r
        )
        self.nodes_planned = Counter(
            "diff_nodes_total", "Nodes diffed, by decision", ["action"], registry=r
        )
        self.queue_create_errors = Counter(
            "queue_create_error_total", "Topics that could not be created", registry=r
        )
        self.queue_create_successes = Counter(
            "queue_create_success_total",
            "Topics a diff needed that exist as planned (created, or already there): SLO-2",
            registry=r,
        )
        self.dependency_up = Gauge(
            "dependency_up",
            "1 while the dependency answered the last probe (vitals timer), else 0",
            ["dependency"],
            registry=r,
        )
        self.nodecache_bytes = Gauge(
            "nodecache_resident_bytes",
            "Bytes held by the node cache's records (deep size of a sample, scaled; at scrape)",
            ["scope"],
            registry=r,
        )
        self.sentinel_gap = Gauge(
            "sentinel_gap_count", "Strategies whose last DAG carried no VersionSentinel", registry=r
        )
        self.orphan_queues = Gauge(
            "orphan_queue_total", "Managed queues that no strategy references", registry=r
        )
        self.compute_nodes = Gauge("compute_nodes_total", "ComputeNodes in the graph", registry=r)
        self.queues = Gauge("queues_total", "Queues in the graph", registry=r)
        self.cross_context = Counter(
            "cross_context_cache_hit_total",
            "Refused reuses of a queue across compute contexts",
            registry=r,
        )
        self.gc_last_run = Gauge(
            "gc_last_run_timestamp", "When GC last ran (epoch seconds)", registry=r
        )
        self.gc_next_run = Gauge(
            "gc_next_run_timestamp",
            "When the next timed GC run is due (epoch seconds; set by the process running it)",
            registry=r,
        )
        self.gc_collected = Counter(
            "gc_queues_collected_total", "Queues collected by GC", ["action"], registry=r
        )
        self.gc_archive_failures = Counter(
            "gc_archive_failures_total",
            "Archives that failed or did not verify (the topic was kept)",
            registry=r,
        )
        self.compacted_nodes = Counter(
            "compacted_compute_nodes_total",
            "Compute nodes removed by compaction (no queue, reference or live sentinel)",
            registry=r,
        )
        self.recomputes = Counter(
            "node_recomputes_total",
            "Buffered nodes fully recomputed (a new queue generation) after buffer_max_age",
            registry=r,
        )
        self.retired_queues = Counter(
            "queues_retired_total",
            "Queues marked as a retired version's (kept as sentinel queues) or restored",
            ["change"],
            registry=r,
        )
        self.gc_kept = Gauge(
            "gc_orphans_kept", "Unreferenced queues the last GC run kept (not yet due)", registry=r
        )
        self.queues_revived = Counter(
            "queues_revived_total",
            "Queues a diff took back from a GC run that had claimed them (kept, topic ensured)",
            registry=r,
        )
        self.diff_replans = Counter(
            "diff_replans_total",
            "Diffs planned again because another writer changed what they read "
            "(GraphChanged, QueueGone) or a GC run was deleting names they need (QueueBusy)",
            ["reason"],
            registry=r,
        )
        self.cache_refusals_avoided = Counter(
            "node_cache_refusals_avoided_total",
            "Plans that would have refused a cross-context reuse on cached node records and "
            "were made again from fresh graph data",
            registry=r,
        )
        self.gc_unowned_topics = Counter(
            "gc_unowned_topics_total",
            "Topics the product created that no queue ever owned (a crash, a re-plan, a lost "
            "race), deleted by GC's intent sweep",
            registry=r,
        )
        self.gc_throttled = Counter(
            "gc_throttled_total", "GC runs whose batch was halved for broker load", registry=r
        )
        self.events_published = Counter(
            "controlbus_events_total", "ControlBus events published", ["type"], registry=r
        )
        self.queue_events_pending = Gauge(
            "queue_events_pending",
            "QueueUpdated groups changed by a graph write and not yet published (the outbox)",
            registry=r,
        )
        self.queue_events_republished = Counter(
            "queue_events_republished_total",
            "QueueUpdated groups that changed while being published: published again",
            registry=r,
        )
        self.chunk_acks = Counter("diff_chunk_acks_total", "AckChunk calls received", registry=r)
        self.chunks_sent = Counter(
            "diff_chunks_sent_total", "DiffChunks streamed to the Gateway", registry=r
        )
        self.drift_detected = Counter(
            "topic_drift_detected_total",
            "Managed topics found deleted or altered out of band",
            registry=r,
        )
        self.drift_corrected = Counter(
            "topic_drift_corrected_total", "Managed topics created again after drift", registry=r
        )
        self.reconciles = Counter(
            "operator_reconcile_total",
            "StrategyDAG reconciles, by trigger and result",
            ["trigger", "result"],
            registry=r,
        )
        self.reconcile_errors = Counter(
            "operator_reconcile_errors_total",
            "Failed reconciles, by reason",
            ["reason"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "operator_reconcile_duration_seconds",
            "Time of a StrategyDAG reconcile",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.leader = Gauge(
            "operator_leader", "1 while this operator instance holds the leader lease", registry=r
        )
        self.heap_pause = Histogram(
            "heap_full_collection_seconds",
            "Pauses of the full garbage collections the sidecar runs between diffs",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.node_memo = Gauge(
            "node_memo_entries", "Validated nodes held to skip re-checking them", registry=r
        )
        self.node_cache = Gauge(
            "node_cache_entries", "Node records held in the sidecar's node cache", registry=r
        )
        self.version_weight = Gauge(
            "dagmanager_active_version_weight",
            "Traffic weight (0..1) of a strategy version",
            ["sentinel", "version"],
            registry=r,
        )
        self.since_weight_change = _SinceWeightChange()
        r.register(self.since_weight_change)
        self.canary_transitions = Counter(
            "canary_transitions_total",
            "VersionSentinel state transitions, by event and resulting phase",
            ["event", "phase"],
            registry=r,
        )
        self.canary_halts = Counter(
            "canary_halts_total",
            "Rollouts halted by a cross-context hit within their analysis window, or cleared",
            ["change"],
            registry=r,
        )
        self.gate_measurements = Counter(
            "canary_gate_measurements_total",
            "Analysis gate measurements, by result",
            ["result"],
            registry=r,
        )
        self._extras(r)
        self.slo_window = SloWindow(self)
        r.register(self.slo_window)

    def _work(self, r: CollectorRegistry) -> None:
        """Diff work that outlives its callers, and topics seen through after the answer."""
        self.diff_joined = Counter(
            "diff_joined_total",
            "Diff requests that joined an identical diff already running (one creation)",
            registry=r,
        )
        self.diff_callers_left = Counter(
            "diff_callers_left_total",
            "Callers that left (cancelled, disconnected) before their diff ended; the work "
            "went on ('started') or, having changed nothing, waited for a slot ('waiting')",
            ["stage"],
            registry=r,
        )
        self.diff_answered_early = Counter(
            "diff_answered_early_total",
            "Diffs answered once their names were journaled and Kafka validated the creation, "
            "before their topics were created and the graph written",
            registry=r,
        )
        self.diff_completion_failures = Counter(
            "diff_completion_failures_total",
            "Diffs answered early whose completion (topics, graph write) failed; their journal "
            "entry is replayed",
            ["reason"],
            registry=r,
        )
        self.diff_answers_superseded = Counter(
            "diff_answers_superseded_total",
            "Diffs answered early that completed with other topic names than the answer gave "
            "(another writer created the same node first under another name)",
            registry=r,
        )
        self.diff_journal_pending = Gauge(
            "diff_journal_pending",
            "Diffs answered but not yet written, old enough to be replayed (seen by the last "
            "journal round)",
            registry=r,
        )
        self.diff_journal_replays = Counter(
            "diff_journal_replays_total",
            "Journaled diffs run again by this process: completed, retried later, or dropped "
            "(their replay failed for good)",
            ["outcome"],
            registry=r,
        )

        self.rpc_deadline_exceeded = Counter(
            "rpc_deadline_exceeded_total",
            "Calls answered UNAVAILABLE because no answer came within "
            "grpc_answer_deadline_seconds (the work went on in the background)",
            ["method"],
            registry=r,
        )
        self.topics_pending = Gauge(
            "topics_pending",
            "Topics whose creation Kafka acknowledged that the broker does not describe yet "
            "(the sidecar answered; seen through in the background)",
            registry=r,
        )
        self.topic_visible_seconds = Histogram(
            "topic_visible_seconds",
            "From the controller's acknowledgement of a topic's creation until the broker "
            "describes it",
            buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30),
            registry=r,
        )
        self.topic_settle_failures = Counter(
            "topic_settle_failures_total",
            "Acknowledged topics still not describable past their bound whose creation, "
            "sent again, failed (retried with backoff)",
            registry=r,
        )

    def _extras(self, r: CollectorRegistry) -> None:
        self._work(r)
        self.pending_releases = Gauge(
            "operator_pending_releases",
            "StrategyDAG deletions recorded while the backends were down, not yet completed",
            registry=r,
        )
        self.pending_releases_recorded = Counter(
            "operator_pending_releases_recorded_total",
            "Finalizers released with the graph work recorded for later (backends down)",
            registry=r,
        )
        self.pending_releases_completed = Counter(
            "operator_pending_releases_completed_total",
            "Recorded StrategyDAG releases completed once the backends answered",
            registry=r,
        )
        self.grpc_errors = Counter(
            "grpc_errors_total", "gRPC calls that ended in an error", ["method", "code"], registry=r
        )
        self.unauthenticated = Counter(
            "grpc_unauthenticated_total",
            "gRPC calls refused for a missing or invalid bearer token",
            registry=r,
        )
        self.jwks_refreshes = Counter(
            "jwks_refresh_total", "JWKS fetches, by outcome (ok, failed)", ["outcome"], registry=r
        )
        self.jwks_keys = Gauge("jwks_keys", "Signing keys in the last JWKS fetched", registry=r)
