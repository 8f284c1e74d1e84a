"""The composition root's shared part: adapters from settings (`build`) or twins
(`build_fake`), and the use cases on them, each built once per process (a second call
returns the same service, so the GC timer and the admin endpoint share one GcService and
its lock). The process roots (`sidecar.app`, `kube.main`) take it from here and add their
drivers."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from qmtl_dagmanager.adapters.archive import DirectoryStore, KafkaArchive, MemoryArchive
from qmtl_dagmanager.adapters.clock import ManualClock, SystemClock
from qmtl_dagmanager.adapters.kafka_events import KafkaEventBus
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.adapters.otlp import OtlpExporter, OtlpLogHandler
from qmtl_dagmanager.adapters.prometheus import Prometheus, PrometheusQuery
from qmtl_dagmanager.adapters.s3_store import S3Store, parse_url
from qmtl_dagmanager.config import Settings, kafka_security
from qmtl_dagmanager.core.dag import NodeMemo
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import (
    Archive,
    Clock,
    EventBus,
    GraphStore,
    StrategyReadiness,
    TopicAdmin,
)
from qmtl_dagmanager.services.canary import CanaryService
from qmtl_dagmanager.services.controlbus import EVENT_TOPIC_SPEC, ControlBus, EventTopics
from qmtl_dagmanager.services.diff_journal import DiffJournal
from qmtl_dagmanager.services.diff_work import DiffWork
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.garbage import GcService
from qmtl_dagmanager.services.node_cache import NodeCache, ResubmissionCache
from qmtl_dagmanager.services.queue_events import QueueEvents
from qmtl_dagmanager.services.queues import QueueService
from qmtl_dagmanager.services.rollout import RolloutService
from qmtl_dagmanager.services.topic_settle import TopicSettler
from qmtl_dagmanager.services.vitals import Vitals
from qmtl_dagmanager.tracing import Tracer

T = TypeVar("T")
log = logging.getLogger(__name__)
BACKGROUND_STOP = 5.0  # seconds the outbox publisher and vitals get to reach a pause at stop
AUDIT_LOGGER = "qmtl_dagmanager.audit"  # sidecar/security.py writes the audit records there


@dataclass
class Container:
    settings: Settings
    graph: GraphStore
    topics: TopicAdmin
    bus: EventBus
    archive: Archive
    clock: Clock
    controlbus: ControlBus
    metrics: Metrics
    node_cache: NodeCache
    resubmissions: ResubmissionCache
    node_memo: NodeMemo | None  # validated nodes by content (None: disabled)
    events: QueueEvents  # the process's QueueUpdated publisher (the graph's outbox)
    prometheus: Prometheus  # one HTTP session for gates and the broker load
    tracer: Tracer = field(default_factory=Tracer)  # disabled unless otlp_endpoint is set
    exporter: OtlpExporter | None = None
    _audit_handler: logging.Handler | None = field(default=None, repr=False)
    _built: dict[str, Any] = field(default_factory=dict, repr=False)

    def trace_to(self, endpoint: str) -> None:
        """Export spans, and the audit logger's records, to an OTLP/HTTP collector."""
        self.exporter = OtlpExporter(
            endpoint,
            self.settings.otel_service_name,
            resource={"service.instance.id": socket.gethostname(), "process.pid": os.getpid()},
        )
        self.tracer = Tracer(self.exporter)
        self._audit_handler = OtlpLogHandler(self.exporter)
        audit = logging.getLogger(AUDIT_LOGGER)
        audit.addHandler(self._audit_handler)
        if not audit.isEnabledFor(logging.INFO):  # exported whatever the log level
            audit.setLevel(logging.INFO)

    def _once(self, key: str, make: Callable[[], T]) -> T:
        if key not in self._built:
            self._built[key] = make()
        value: T = self._built[key]
        return value

    async def start(self) -> None:
        """Prepare what the services need: the graph schema and the event topics."""
        await self.graph.init_schema()
        made = await self.topics.ensure(
            {
                self.controlbus.topics.queue: EVENT_TOPIC_SPEC,
                self.controlbus.topics.sentinel_weight: EVENT_TOPIC_SPEC,
            }
        )
        failed = {t: r.message for t, r in made.items() if not r.ok}
        if failed:
            detail = "; ".join(f"{t}: {m}" for t, m in sorted(failed.items()))
            raise RuntimeError(f"cannot prepare the ControlBus topics: {detail}")

    def diffs(self, *, shed_load: bool = True) -> DiffService:
        """The Diff use case. The sidecar sheds load it cannot serve in time; the operator
        (`shed_load=False`) queues its reconciles instead: kopf retries would only add work."""
        return self._once(f"diffs:{shed_load}", lambda: self._diffs(shed_load))

    def _diffs(self, shed_load: bool) -> DiffService:
        s = self.settings
        return DiffService(
            self.graph,
            self.topics,
            self.controlbus,
            self.clock,
            self.metrics,
            limits=s.limits,
            ids=s.node_ids,
            dry_run_strategy=s.dry_run_strategy,
            buffer_max_age=float(s.buffer_max_age_seconds),
            namespaces=s.enable_topic_namespace,
            cache=self.node_cache,
            resubmissions=self.resubmissions,
            memo=self.node_memo,
            events=self.events,
            max_inflight=s.diff_max_inflight,
            max_waiting=s.diff_max_waiting if shed_load else 1_000_000,
            max_wait=2.0 if shed_load else 24 * 3600.0,
            tracer=self.tracer,
            catalog=self.catalog,
            work=DiffWork(self.metrics, deadline=float(s.diff_deadline_seconds)),
            settler=self.settler() if shed_load else None,
            answer_early=shed_load and s.diff_answer_early,
        )

    def settler(self) -> TopicSettler:
        """Sees the sidecar's acknowledged topics through to describable (`background`)."""
        return self._once(
            "settler",
            lambda: TopicSettler(
                self.topics,
                self.graph,
                self.controlbus,
                self.metrics,
                bound=float(self.settings.topic_visible_bound_seconds),
            ),
        )

    def journal(self) -> DiffJournal:
        """Runs diffs the sidecar answered but did not write (`background`)."""
        return self._once(
            "journal",
            lambda: DiffJournal(
                self.graph,
                self.diffs(shed_load=False),
                self.clock,
                self.metrics,
                grace=float(self.settings.diff_journal_grace_seconds),
                every=float(self.settings.diff_journal_interval_seconds),
            ),
        )

    @property
    def catalog(self) -> TopicCatalog:
        """The topic specs as the topic profile creates them (the graph records these)."""
        return self._once(
            "catalog", lambda: TopicCatalog().for_profile(self.settings.topic_profile)
        )

    def canary(self) -> CanaryService:
        return self._once("canary", self._canary)

    def _canary(self) -> CanaryService:
        return CanaryService(
            self.graph,
            self.controlbus,
            self.clock,
            self.metrics,
            self.prometheus,
            self.settings.prometheus_url,
        )

    def rollout(self, readiness: StrategyReadiness) -> RolloutService:
        """The VersionSentinel use case, on the caller's view of StrategyDAG readiness."""
        return RolloutService(self.canary(), readiness, self.clock, self.metrics)

    def queues(self) -> QueueService:
        return self._once(
            "queues",
            lambda: QueueService(
                self.graph,
                self.topics,
                self.metrics,
                self.clock,
                settler=self.settler(),
                # the sidecar's diffs (built before this), whose early answers its reads wait
                # for; none in a process that does not answer early
                writes=sidecar.running() if (sidecar := self._built.get("diffs:True")) else None,
            ),
        )

    def garbage(self) -> GcService:
        return self._once("garbage", self._garbage)

    def vitals(self) -> Vitals:
        return self._once("vitals", lambda: Vitals(self.graph, self.topics, self.metrics))

    async def stop_background(
        self, tasks: Iterable[asyncio.Task[None]], timeout: float = BACKGROUND_STOP
    ) -> None:
        """Ask the timers of `background` to return at their next pause, never inside a
        graph call (one cancelled while it opens a connection can leave the socket open),
        and wait for their `tasks` up to `timeout` s; the caller cancels what is left."""
        self.events.stop()
        if "settler" in self._built:
            self.settler().stop()
        if "vitals" in self._built:
            self.vitals().stop()
        if "journal" in self._built:
            self.journal().stop()
        waiting = set(tasks)
        if waiting:
            await asyncio.wait(waiting, timeout=timeout)

    def background(self) -> list[Coroutine[Any, Any, None]]:
        """The timers every process runs beside its work: the outbox publisher, the topic
        settler, the diff journal and vitals."""
        out: list[Coroutine[Any, Any, None]] = [
            self.events.run(),
            self.settler().run(),
            self.journal().run(),
        ]
        if self.settings.vitals_interval_seconds > 0:
            out.append(self.vitals().every(self.settings.vitals_interval_seconds))
        return out

    def _garbage(self) -> GcService:
        return GcService(
            self.graph,
            self.topics,
            self.archive,
            self.controlbus,
            self.clock,
            self.metrics,
            cache=self.node_cache,
            catalog=self.catalog,
            policies=self.settings.gc_policies,
            intent_grace=float(self.settings.gc_intent_grace_seconds),
            compact_max_nodes=self.settings.compact_max_nodes,
            load=(
                PrometheusQuery(
                    self.settings.prometheus_url,
                    self.settings.gc_load_query,
                    client=self.prometheus,
                )
                if self.settings.gc_load_query
                else None
            ),
            load_threshold=self.settings.gc_load_threshold,
            tracer=self.tracer,
        )

    async def close(self, drain: float = 5.0) -> None:
        """Publish what this process marked in the outbox (bounded), then close; anything
        left is published by another process's poller. Diffs still running (their callers may
        have left) get the same bound to end first."""
        try:
            for built in list(self._built.values()):
                if isinstance(built, DiffService):
                    cut = await built.running().drain(drain)
                    if cut:
                        log.warning("%d diff(s) still running at shutdown were cut short", cut)
            await self.events.close(drain)
            await self.bus.close()
            await self.topics.close()
            await self.graph.close()
            await self.prometheus.close()
        finally:  # the spans and audit records of the shutdown itself go out last
            if self._audit_handler is not None:
                logging.getLogger(AUDIT_LOGGER).removeHandler(self._audit_handler)
            if self.exporter is not None:
                await asyncio.to_thread(self.exporter.close)


def graph_store(settings: Settings) -> GraphStore:
    if settings.embedded_graph:
        return MemoryGraphStore()
    return Neo4jGraphStore(
        settings.neo4j_uri,
        settings.neo4j_user,
        settings.neo4j_password,
        database=settings.neo4j_database,
        ca=settings.neo4j_ssl_ca,
    )


def build(settings: Settings) -> Container:
    """The adapters the settings name (the twins for an empty Neo4j URI or Kafka bootstrap)."""
    graph = graph_store(settings)
    if settings.embedded_kafka:
        return assemble(settings, graph, *_memory_kafka(settings), SystemClock())
    security = kafka_security(settings)
    if settings.profile == "prod" and settings.kafka_security_protocol == "plaintext":
        log.warning(
            "Kafka is reached in plaintext without an identity: set "
            "kafka_security_protocol sasl_ssl (README: Security)"
        )
    topics = KafkaTopicAdmin(
        settings.kafka_bootstrap, profile=settings.topic_profile, extra=security
    )
    bus = KafkaEventBus(settings.controlbus_bootstrap or settings.kafka_bootstrap, extra=security)
    archive = archive_of(settings)
    return assemble(settings, graph, topics, bus, archive, SystemClock())


def archive_of(settings: Settings) -> KafkaArchive:
    """The archive the settings name: an S3 bucket (with its prefix) or a directory."""
    if settings.archive_dir.startswith("s3://"):
        bucket, prefix = parse_url(settings.archive_dir)
        store = S3Store(
            bucket,
            endpoint=settings.s3_endpoint,
            access_key=settings.s3_access_key,
            secret_key=settings.s3_secret_key,
            region=settings.s3_region,
        )
        return KafkaArchive(
            settings.kafka_bootstrap, store, prefix=prefix, extra=kafka_security(settings)
        )
    return KafkaArchive(
        settings.kafka_bootstrap,
        DirectoryStore(settings.archive_dir),
        extra=kafka_security(settings),
    )


def build_fake(settings: Settings | None = None, clock: Clock | None = None) -> Container:
    """The same wiring on the twins (memory graph, topics, bus and archive) and a manual
    clock unless one is given: for tests and benchmarks."""
    settings = settings or Settings()
    return assemble(settings, MemoryGraphStore(), *_memory_kafka(settings), clock or ManualClock())


def _memory_kafka(settings: Settings) -> tuple[TopicAdmin, EventBus, Archive]:
    return (
        MemoryTopicAdmin(profile=settings.topic_profile),
        # nothing reads it but in-process inspection; one QueueUpdated of a big tag group
        # is megabytes (the whole set), so keep only the last few
        MemoryEventBus(history=4),
        MemoryArchive(),
    )


def assemble(
    settings: Settings,
    graph: GraphStore,
    topics: TopicAdmin,
    bus: EventBus,
    archive: Archive,
    clock: Clock,
) -> Container:
    """The parts every process shares, on the adapters given."""
    event_topics = EventTopics(settings.queue_topic, settings.sentinel_weight_topic)
    controlbus = ControlBus(bus, clock, event_topics)
    metrics = Metrics()
    cache = NodeCache(clock, ttl=settings.node_cache_ttl_seconds)
    metrics.nodecache_bytes.labels("total").set_function(cache.resident_bytes)
    container = Container(
        settings,
        graph,
        topics,
        bus,
        archive,
        clock,
        controlbus,
        metrics,
        cache,
        ResubmissionCache(settings.resubmission_cache_nodes),
        NodeMemo(settings.node_memo_nodes) if settings.node_memo_nodes else None,
        QueueEvents(graph, controlbus, metrics, clock),
        Prometheus(),
    )
    if settings.otlp_endpoint:
        container.trace_to(settings.otlp_endpoint)
        container.events.tracer = container.tracer
    return container
