"""The kopf driver: thin handlers that read the StrategyDAG, call the strategy service, and
render status and events. Errors are mapped here, once: an invalid spec or a conflict is
permanent (status says why, no retry); an unavailable dependency is temporary (Degraded,
retried with backoff). Create, update, resume and the resync timer share one function."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import kopf
import kubernetes
import orjson

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.kube import api, status
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.garbage import GcRun
from qmtl_dagmanager.services.strategies import Drift, StrategyService, dag_document

log = logging.getLogger(__name__)
FINALIZER = "qmtl.io/strategy-cleanup"
RESOURCE = (api.GROUP, api.VERSION, api.PLURAL)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).replace(microsecond=0).isoformat()


def kube_configuration() -> kubernetes.client.Configuration:
    """The in-cluster service account, else the kubeconfig named by $KUBECONFIG (read now,
    not at import) or the default one."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg
        )
    return cfg


def _core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(kube_configuration()))


def _upsert_config_map(namespace: str, name: str, cm: kubernetes.client.V1ConfigMap) -> None:
    core = _core()
    try:
        core.replace_namespaced_config_map(name, namespace, cm)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise
        core.create_namespaced_config_map(namespace, cm)


def _read_config_map(namespace: str, name: str, key: str) -> str | None:
    try:
        cm = _core().read_namespaced_config_map(name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise
    data = cm.data or {}
    value = data.get(key)
    return str(value) if value is not None else None


class Reconciler:
    """One level-based reconcile for create, update, resume and resync; and deletion."""

    def __init__(self, strategies: StrategyService, metrics: Metrics | None = None) -> None:
        self.strategies = strategies
        self.metrics = metrics or strategies.diffs.metrics

    async def reconcile(
        self, body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, trigger: str
    ) -> None:
        """Reconcile, counted and timed by trigger and result."""
        started = time.perf_counter()
        result = "error"
        try:
            result = await self._reconcile(body, spec, meta, patch, trigger)
        finally:
            self.metrics.reconciles.labels(trigger, result).inc()
            self.metrics.reconcile_duration.observe(time.perf_counter() - started)

    async def _dag_json(self, s: api.StrategySpec, namespace: str) -> str:
        text = None
        if s.config_map is not None:
            name, key = s.config_map
            text = await asyncio.to_thread(_read_config_map, namespace, name, key)
        doc = dag_document(s, text)
        return doc if isinstance(doc, str) else _dumps(doc)

    async def _reconcile(
        self, body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, trigger: str
    ) -> str:
        s = api.StrategySpec.from_body(dict(spec))
        old: Mapping[str, Any] = dict(body.get("status") or {})
        generation = int(meta.get("generation") or 0)
        if s.paused:
            new = {**old, "phase": "Paused", "observedGeneration": generation}
            if not status.same(old, new):
                patch.status.update(new)
                kopf.info(body, reason="Paused", message="reconciling is paused")
            return "paused"
        try:
            outcome = await self.strategies.reconcile(
                s, await self._dag_json(s, str(meta.get("namespace")))
            )
        except DagManagerError as e:
            self.metrics.reconcile_errors.labels(e.reason).inc()
            self._failed(body, patch, old, e, generation)
            return "failed"
        drift = Drift()
        if trigger in ("resync", "resume"):  # a fresh create or update has just ensured them
            try:
                drift = await self.strategies.repair_drift(outcome)
            except DagManagerError as e:
                self.metrics.reconcile_errors.labels(e.reason).inc()
                self._failed(body, patch, old, e, generation)
                return "failed"
        if drift.recreated:
            kopf.warn(
                body,
                reason="DriftCorrected",
                message=f"recreated {len(drift.recreated)} topic(s) deleted out of band: "
                f"{', '.join(drift.recreated[:5])}",
            )
        if drift.altered:
            kopf.warn(
                body,
                reason="TopicDrift",
                message="; ".join(f"{t}: {m}" for t, m in list(drift.altered.items())[:5]),
            )
        name = str(meta.get("name"))
        new = status.for_outcome(old, outcome, _now(), generation, name)
        if status.same(old, new):
            return "unchanged"  # level-based resync: nothing changed, nothing written
        if new.get("topicsConfigMap"):
            topics: dict[str, str] = {n.node.node_id: n.topic for n in outcome.plan.nodes}
            await asyncio.to_thread(_write_topics, body, new["topicsConfigMap"], topics)
        patch.status.update({**new, "lastReconcileTime": _now()})
        p = outcome.plan
        kopf.info(
            body,
            reason="Planned" if outcome.dry_run else "Reconciled",
            message=f"{trigger}: {p.counts['new']} new, {p.counts['reused']} reused, "
            f"{p.counts['buffered']} buffered",
        )
        return "planned" if outcome.dry_run else "reconciled"

    @staticmethod
    def _failed(
        body: kopf.Body,
        patch: kopf.Patch,
        old: Mapping[str, Any],
        e: DagManagerError,
        generation: int,
    ) -> None:
        new = status.for_error(old, e, _now(), generation)
        changed = not status.same(old, new)
        if changed:
            patch.status.update({**new, "lastReconcileTime": _now()})
        if e.retryable:
            kopf.warn(body, reason=e.reason, message=f"{e.message} (retrying)")
            raise kopf.TemporaryError(e.message, delay=float(getattr(e, "retry_after", 5.0)))
        if changed:
            kopf.warn(body, reason=e.reason, message=e.message)

    async def delete(self, body: kopf.Body, spec: kopf.Spec) -> None:
        s = api.StrategySpec.from_body(dict(spec))
        st = body.get("status") or {}
        topics = list((st.get("topics") or {}).values())
        if not topics and st.get("topicsConfigMap"):
            stored = await asyncio.to_thread(
                _read_config_map,
                str(body.metadata.namespace),
                str(st["topicsConfigMap"]),
                "topics.json",
            )
            topics = list(orjson.loads(stored).values()) if stored else []
        try:
            dropped = await self.strategies.delete(s, topics)
        except DagManagerError as e:
            if e.retryable:
                raise kopf.TemporaryError(e.message, delay=5) from e
            raise kopf.PermanentError(e.message) from e
        kopf.info(
            body, reason="Deleted", message=f"{dropped} references dropped ({s.deletion_policy})"
        )


def _write_topics(body: kopf.Body, name: str, topics: Mapping[str, str]) -> None:
    """The full node → topic map of a large DAG, in a ConfigMap the resource owns (deleted
    with it by the garbage collector)."""
    meta = body.metadata
    cm = kubernetes.client.V1ConfigMap(
        metadata=kubernetes.client.V1ObjectMeta(
            name=name,
            labels={"app.kubernetes.io/name": "qmtl-dagmanager"},
            owner_references=[
                kubernetes.client.V1OwnerReference(
                    api_version=f"{api.GROUP}/{api.VERSION}",
                    kind=api.KIND,
                    name=str(meta.name),
                    uid=str(meta.uid),
                    controller=True,
                    block_owner_deletion=False,
                )
            ],
        ),
        data={"topics.json": orjson.dumps(dict(topics), option=orjson.OPT_SORT_KEYS).decode()},
    )
    _upsert_config_map(str(meta.namespace), name, cm)


GC_REPORT = "qmtl-dagmanager-gc-report"


async def gc_timer(container: bootstrap.Container) -> None:
    """Timed garbage collection by the (single) active operator: decide with the core's
    policy, archive and drop, and record each run's report in a ConfigMap."""
    namespace = os.environ.get("POD_NAMESPACE", "default")

    async def record(run: GcRun) -> None:
        report = kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(
                name=GC_REPORT, labels={"app.kubernetes.io/name": "qmtl-dagmanager"}
            ),
            data={"report.json": orjson.dumps(run.as_json()).decode()},
        )
        try:
            await asyncio.to_thread(_upsert_config_map, namespace, GC_REPORT, report)
        except (kubernetes.client.ApiException, OSError) as e:
            log.warning("could not record the GC report in %s/%s: %s", namespace, GC_REPORT, e)

    await container.garbage().every(
        container.settings.gc_interval_seconds, dry_run=container.settings.gc_dry_run, after=record
    )


def build_registry(
    container: bootstrap.Container, resync_seconds: float = 300.0
) -> kopf.OperatorRegistry:
    registry = kopf.OperatorRegistry()
    rec = Reconciler(StrategyService(container.diffs(shed_load=False), container.graph))

    background: list[asyncio.Task[None]] = []

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 60
        # a watch that delivers nothing for this long is re-established (a stalled stream)
        settings.watching.inactivity_timeout = 600
        await container.start()
        if container.settings.gc_interval_seconds > 0:
            background.append(asyncio.create_task(gc_timer(container)))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        cfg = kube_configuration()
        token = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            scheme="Bearer" if token else None,
            token=token.removeprefix("Bearer ").strip() if token else None,
        )

    @kopf.on.probe(id="graph", registry=registry)
    async def graph_probe(**_: Any) -> str:
        # the liveness endpoint reports this; an exception marks the operator unhealthy
        if not await container.graph.ping():
            raise kopf.TemporaryError("the graph store does not answer")
        return "ok"

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        for task in background:
            task.cancel()
        await asyncio.gather(*background, return_exceptions=True)
        await container.close()

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, field="spec", registry=registry)
    async def on_change(
        body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, reason: str, **_: Any
    ) -> None:
        await rec.reconcile(body, spec, meta, patch, str(getattr(reason, "value", reason)))

    @kopf.timer(*RESOURCE, interval=resync_seconds, initial_delay=resync_seconds, registry=registry)
    async def resync(
        body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, **_: Any
    ) -> None:
        await rec.reconcile(body, spec, meta, patch, "resync")

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def on_delete(body: kopf.Body, spec: kopf.Spec, **_: Any) -> None:
        await rec.delete(body, spec)

    return registry


def _dumps(doc: Mapping[str, Any]) -> str:
    return orjson.dumps(doc).decode()


async def run(
    container: bootstrap.Container,
    *,
    namespaces: list[str] | None,
    resync_seconds: float = 300.0,
    liveness: str | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
) -> None:
    """Run the operator until stopped: one namespace list, or all namespaces."""
    registry = build_registry(container, resync_seconds)
    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness,
        stop_flag=stop,
        ready_flag=ready,
    )
