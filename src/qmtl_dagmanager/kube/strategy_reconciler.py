"""The StrategyDAG reconcile: read the resource, call the strategy service, render status
and events into a `Sink` (kopf's patch in a handler, the API in the resync loop). An invalid
spec or a conflict is permanent (status says why, no retry); an unavailable dependency is
temporary (Degraded, then the `Unavailable` is raised for the caller to retry with backoff).
Create, update, resume and resync share one function, one StrategyDAG at a time."""

from __future__ import annotations

import asyncio
import datetime
import time
from collections.abc import Mapping
from typing import Any, Protocol

import kopf
import orjson

from qmtl_dagmanager.api.v1alpha1 import strategydag
from qmtl_dagmanager.core import strategy_status as status
from qmtl_dagmanager.core.conditions import same
from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.core.strategy_spec import StrategySpec
from qmtl_dagmanager.kube.pending_releases import PendingRelease
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import ConfigMapStore, Owner
from qmtl_dagmanager.services.strategies import Drift, StrategyService, dag_text


def now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


class Sink(Protocol):
    """Where a reconcile's effects on the resource go: a status merge patch and events."""

    def status(self, patch: Mapping[str, Any]) -> None: ...

    def event(self, warning: bool, reason: str, message: str) -> None: ...


class KopfSink:
    """Inside a kopf handler: kopf's patch and kopf's event poster."""

    def __init__(self, body: kopf.Body, patch: kopf.Patch) -> None:
        self.body, self.patch = body, patch

    def status(self, patch: Mapping[str, Any]) -> None:
        self.patch.status.update(patch)

    def event(self, warning: bool, reason: str, message: str) -> None:
        (kopf.warn if warning else kopf.info)(self.body, reason=reason, message=message)


class Reconciler:
    """One level-based reconcile for create, update, resume and resync; and deletion. Two
    reconciles of one StrategyDAG (a kopf handler and the resync loop) never overlap."""

    def __init__(
        self,
        strategies: StrategyService,
        config_maps: ConfigMapStore,
        metrics: Metrics | None = None,
    ) -> None:
        self.strategies = strategies
        self.config_maps = config_maps
        self.metrics = metrics or strategies.diffs.metrics
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    async def reconcile(self, body: Mapping[str, Any], sink: Sink, trigger: str) -> None:
        """Reconcile, counted and timed by trigger and result; raises `Unavailable` (after
        recording Degraded) when a dependency is down."""
        uid = str((body.get("metadata") or {}).get("uid") or "")
        lock, users = self._locks.get(uid) or (asyncio.Lock(), 0)
        self._locks[uid] = (lock, users + 1)
        started = time.perf_counter()
        result = "error"
        meta = body.get("metadata") or {}
        attrs = {
            "namespace": str(meta.get("namespace") or ""),
            "name": str(meta.get("name") or ""),
            "trigger": trigger,
        }
        try:
            with self.strategies.diffs.tracer.span("reconcile.strategydag", attrs) as span:
                async with lock:
                    result = await self._reconcile(body, sink, trigger)
                span.set("result", result)
        finally:
            lock, users = self._locks[uid]
            if users == 1:
                del self._locks[uid]
            else:
                self._locks[uid] = (lock, users - 1)
            self.metrics.reconciles.labels(trigger, result).inc()
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def _dag_json(self, s: StrategySpec, namespace: str) -> str:
        text = None
        if s.config_map is not None:
            name, key = s.config_map
            text = await asyncio.to_thread(self.config_maps.read, namespace, name, key)
        return dag_text(s, text)

    async def _reconcile(self, body: Mapping[str, Any], sink: Sink, trigger: str) -> str:
        meta: Mapping[str, Any] = body.get("metadata") or {}
        old: Mapping[str, Any] = dict(body.get("status") or {})
        generation = int(meta.get("generation") or 0)
        try:
            s = strategydag.parse_spec(dict(body.get("spec") or {}))
        except DagManagerError as e:
            self.metrics.reconcile_errors.labels(e.reason).inc()
            self._failed(sink, old, e, generation)
            return "failed"
        if s.paused:
            new = status.paused(old, generation)
            if not same(old, new):
                sink.status(new)
                sink.event(False, "Paused", "reconciling is paused")
            return "paused"
        try:
            outcome = await self.strategies.reconcile(
                s, await self._dag_json(s, str(meta.get("namespace")))
            )
        except DagManagerError as e:
            self.metrics.reconcile_errors.labels(e.reason).inc()
            self._failed(sink, old, e, generation)
            return "failed"
        drift = Drift()
        # a fresh create or update has just ensured the topics
        if trigger in ("resync", "resync-retry", "resume"):
            try:
                drift = await self.strategies.repair_drift(outcome)
            except DagManagerError as e:
                self.metrics.reconcile_errors.labels(e.reason).inc()
                self._failed(sink, old, e, generation)
                return "failed"
        if drift.recreated:
            sink.event(
                True,
                "DriftCorrected",
                f"recreated {len(drift.recreated)} topic(s) deleted out of band: "
                f"{', '.join(drift.recreated[:5])}",
            )
        if drift.altered:
            sink.event(
                True,
                "TopicDrift",
                "; ".join(f"{t}: {m}" for t, m in list(drift.altered.items())[:5]),
            )
        name = str(meta.get("name"))
        keep = gc_keep(meta)
        if not outcome.dry_run and (keep or old.get("gcKeep")):
            try:
                await self.strategies.protect(outcome.plan, keeper(meta), keep)
            except DagManagerError as e:
                self.metrics.reconcile_errors.labels(e.reason).inc()
                self._failed(sink, old, e, generation)
                return "failed"
        new = status.for_plan(old, outcome.plan, outcome.dry_run, now(), generation, name)
        new["gcKeep"] = keep and not outcome.dry_run
        if same(old, new):
            return "unchanged"  # level-based resync: nothing changed, nothing written
        if new.get("topicsConfigMap"):
            topics: dict[str, str] = {n.node.node_id: n.topic for n in outcome.plan.nodes}
            await asyncio.to_thread(
                _write_topics, self.config_maps, meta, new["topicsConfigMap"], topics
            )
        sink.status({**new, "lastReconcileTime": now()})
        p = outcome.plan
        sink.event(
            False,
            "Planned" if outcome.dry_run else "Reconciled",
            f"{trigger}: {p.counts['new']} new, {p.counts['reused']} reused, "
            f"{p.counts['buffered']} buffered",
        )
        return "planned" if outcome.dry_run else "reconciled"

    @staticmethod
    def _failed(sink: Sink, old: Mapping[str, Any], e: DagManagerError, generation: int) -> None:
        new = status.for_error(old, e, now(), generation)
        changed = not same(old, new)
        if changed:
            sink.status({**new, "lastReconcileTime": now()})
        if e.retryable:
            sink.event(True, e.reason, f"{e.message} (retrying)")
            raise e
        if changed:
            sink.event(True, e.reason, e.message)

    async def _topics(self, body: kopf.Body) -> list[str]:
        """The topics the resource's status records (inline, or in its topics ConfigMap)."""
        st = body.get("status") or {}
        topics = list((st.get("topics") or {}).values())
        if not topics and st.get("topicsConfigMap"):
            stored = await asyncio.to_thread(
                self.config_maps.read,
                str(body.metadata.namespace),
                str(st["topicsConfigMap"]),
                "topics.json",
            )
            topics = list(orjson.loads(stored).values()) if stored else []
        return topics

    async def pending_release(
        self, body: kopf.Body, spec: kopf.Spec, reason: str
    ) -> PendingRelease:
        """What deleting the resource still has to do in the graph, to record for later."""
        s = strategydag.parse_spec(dict(spec))
        return PendingRelease.of(s, body.metadata, await self._topics(body), reason)

    async def delete(self, body: kopf.Body, spec: kopf.Spec) -> None:
        s = strategydag.parse_spec(dict(spec))
        topics = await self._topics(body)
        dropped = await self.strategies.delete(s, topics)  # typed errors: the driver maps them
        kopf.info(
            body, reason="Deleted", message=f"{dropped} references dropped ({s.deletion_policy})"
        )


KEEP_ANNOTATION = "qmtl.io/gc-keep"


def gc_keep(meta: Mapping[str, Any]) -> bool:
    """Whether the StrategyDAG asks GC to keep its queues (annotation `qmtl.io/gc-keep`)."""
    value = str((meta.get("annotations") or {}).get(KEEP_ANNOTATION, "")).strip().lower()
    return value in ("true", "yes", "1")


def keeper(meta: Mapping[str, Any]) -> str:
    """The marker a StrategyDAG leaves on the queues it keeps."""
    return f"strategydag/{meta.get('namespace')}/{meta.get('name')}"


def _write_topics(
    config_maps: ConfigMapStore, meta: Mapping[str, Any], name: str, topics: Mapping[str, str]
) -> None:
    """The full node → topic map of a large DAG, in a ConfigMap the resource owns (deleted
    with it by the garbage collector)."""
    owner = Owner(strategydag.API_VERSION, strategydag.KIND, str(meta["name"]), str(meta["uid"]))
    data = {"topics.json": orjson.dumps(dict(topics), option=orjson.OPT_SORT_KEYS).decode()}
    config_maps.upsert(str(meta["namespace"]), name, data, owner)
