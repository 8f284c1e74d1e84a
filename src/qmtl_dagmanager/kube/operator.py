"""The kopf operator: the registry of handlers (StrategyDAG reconcile and deletion), the
resync loop, the timed garbage collection, probes, and leader election around kopf's runner."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import functools
import logging
import urllib.parse
from typing import Any

import kopf
import orjson
from aiohttp import web

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.adapters.kube import (
    ConfigMaps,
    KubeApi,
    StrategyObjects,
    StrategyReadinessApi,
    bearer_token,
    namespace_terminating,
)
from qmtl_dagmanager.adapters.kube_lease import LeaderElection, LeadershipLost
from qmtl_dagmanager.api.v1alpha1 import strategydag, versionsentinel
from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.kube.pending_releases import (
    FINALIZER,
    PENDING_CONFIGMAP,
    PendingReleases,
    PendingStore,
    annotated,
    may_release,
)
from qmtl_dagmanager.kube.resync import Resync
from qmtl_dagmanager.kube.sentinel_reconciler import SentinelReconciler
from qmtl_dagmanager.kube.strategy_reconciler import KopfSink, Reconciler
from qmtl_dagmanager.services.garbage import GcRun
from qmtl_dagmanager.services.strategies import StrategyService

log = logging.getLogger(__name__)
RESOURCE = (strategydag.GROUP, strategydag.VERSION, strategydag.PLURAL)
SENTINELS = (strategydag.GROUP, strategydag.VERSION, versionsentinel.PLURAL)


GC_REPORT = "qmtl-dagmanager-gc-report"


async def gc_timer(container: bootstrap.Container, config_maps: ConfigMaps) -> None:
    """Timed garbage collection by the (single) active operator: decide with the core's
    policy, archive and drop, and record each run's report in a ConfigMap of its namespace."""
    namespace = container.settings.pod_namespace or "default"

    async def record(run: GcRun) -> None:
        data = {"report.json": orjson.dumps(run.as_json()).decode()}
        try:
            await asyncio.to_thread(config_maps.upsert, namespace, GC_REPORT, data)
        except DagManagerError as e:
            log.warning("could not record the GC report in %s/%s: %s", namespace, GC_REPORT, e)

    await container.garbage().every(
        container.settings.gc_interval_seconds, dry_run=container.settings.gc_dry_run, after=record
    )


def for_kopf(e: DagManagerError) -> kopf.TemporaryError | kopf.PermanentError:
    """The one mapping of typed errors to kopf's: retryable ones are retried after the
    error's `retry_after`, any other is permanent (the spec must change)."""
    if e.retryable:
        return kopf.TemporaryError(e.message, delay=e.retry_after)
    return kopf.PermanentError(e.message)


async def delete_or_record(
    rec: Reconciler,
    pending: PendingReleases,
    kube: KubeApi,
    settings: Settings,
    body: kopf.Body,
    spec: kopf.Spec,
    meta: kopf.Meta,
    runtime: datetime.timedelta,
) -> None:
    """Delete a StrategyDAG's references; if the backends have been unreachable too long
    while its namespace terminates (or it asks so), record the work and let it go."""
    try:
        await rec.delete(body, spec)
        return
    except DagManagerError as e:
        if not e.retryable:
            raise for_kopf(e) from e
        error = e
    terminating = await asyncio.to_thread(namespace_terminating, kube, str(meta.get("namespace")))
    if not may_release(
        terminating=terminating,
        annotated=annotated(meta),
        unreachable_for=runtime.total_seconds(),
        timeout=float(settings.finalizer_timeout_seconds),
    ):
        raise for_kopf(error) from error
    # a namespace must never wedge on us: record the graph work, let the finalizer go
    await pending.record(await rec.pending_release(body, spec, error.message))
    kopf.warn(
        body,
        reason="ReleasePending",
        message=f"backends unreachable for {runtime.total_seconds():.0f} s ({error.message}): "
        f"the release is recorded in {PENDING_CONFIGMAP} and completed when they return",
    )


async def _stop(
    container: bootstrap.Container,
    timers: list[asyncio.Task[None]],
    background: list[asyncio.Task[None]],
) -> None:
    """Shutdown: the outbox publisher and vitals (`timers`) return at their next pause; the
    rest is cancelled."""
    await container.stop_background(timers)
    for task in background:
        task.cancel()
    await asyncio.gather(*background, return_exceptions=True)
    await container.close()


def build_registry(
    container: bootstrap.Container,
    resync_seconds: float = 300.0,
    sentinel_tick: float = 1.0,
    namespaces: list[str] | None = None,
    kube: KubeApi | None = None,
) -> kopf.OperatorRegistry:
    """The handlers, wired once: the use cases from the container, Kubernetes through one
    API client (`kube`, else one from the `kubeconfig` setting)."""
    registry = kopf.OperatorRegistry()
    kube = kube or KubeApi(container.settings.kubeconfig)
    config_maps = ConfigMaps(kube)
    strategies = StrategyService(container.diffs(shed_load=False), container.graph)
    rec = Reconciler(strategies, config_maps)
    settings_ = container.settings
    pending = PendingReleases(
        PendingStore(config_maps, settings_.pod_namespace or "default"),
        strategies,
        container.metrics,
    )
    objects = StrategyObjects(
        strategydag.GROUP, strategydag.VERSION, strategydag.PLURAL, strategydag.KIND, kube
    )
    sentinels = SentinelReconciler(container.rollout(StrategyReadinessApi(objects)))

    background: list[asyncio.Task[None]] = []
    timers: list[asyncio.Task[None]] = []  # of container.background(): they stop on request

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = FINALIZER
        settings.posting.level = logging.INFO
        settings.watching.server_timeout = 60
        # a watch that delivers nothing for this long is re-established (a stalled stream)
        settings.watching.inactivity_timeout = 600
        await container.start()
        timers.extend(asyncio.create_task(t) for t in container.background())
        background.extend(timers)
        if container.settings.gc_interval_seconds > 0:
            background.append(asyncio.create_task(gc_timer(container, config_maps)))
        if resync_seconds > 0:
            resync = Resync(rec, objects, namespaces, resync_seconds)
            background.append(asyncio.create_task(resync.run()))
        every = float(settings_.pending_release_interval_seconds)
        background.append(asyncio.create_task(pending.run(every)))

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        cfg = kube.configuration()
        token = bearer_token(cfg)
        return kopf.ConnectionInfo(
            server=cfg.host,
            ca_path=cfg.ssl_ca_cert,
            insecure=not cfg.verify_ssl,
            certificate_path=cfg.cert_file,
            private_key_path=cfg.key_file,
            scheme="Bearer" if token else None,
            token=token,
        )

    @kopf.on.probe(id="graph", registry=registry)
    async def graph_probe(**_: Any) -> str:
        # the liveness endpoint reports this; an exception marks the operator unhealthy
        if not await container.graph.ping():
            raise kopf.TemporaryError("the graph store does not answer")
        return "ok"

    @kopf.on.cleanup(registry=registry)
    async def shutdown(**_: Any) -> None:
        await _stop(container, timers, background)

    @kopf.on.resume(*RESOURCE, registry=registry)
    @kopf.on.create(*RESOURCE, registry=registry)
    @kopf.on.update(*RESOURCE, field="spec", registry=registry)
    async def on_change(body: kopf.Body, patch: kopf.Patch, reason: str, **_: Any) -> None:
        try:
            await rec.reconcile(body, KopfSink(body, patch), str(getattr(reason, "value", reason)))
        except DagManagerError as e:  # Degraded is recorded; kopf retries with the error's delay
            raise for_kopf(e) from e

    @kopf.timer(*SENTINELS, interval=sentinel_tick, registry=registry)
    async def sentinel_tick_(
        body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch, **_: Any
    ) -> None:
        try:
            await sentinels.reconcile(body, spec, meta, patch)
        except DagManagerError as e:
            kopf.warn(body, reason=e.reason, message=f"{e.message} (retrying)")
            raise for_kopf(e) from e

    @kopf.on.delete(*SENTINELS, optional=True, registry=registry)
    async def sentinel_deleted(meta: kopf.Meta, **_: Any) -> None:
        sentinels.forget(str(meta.get("uid")))

    @kopf.on.delete(*RESOURCE, registry=registry)
    async def on_delete(
        body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, runtime: datetime.timedelta, **_: Any
    ) -> None:
        await delete_or_record(rec, pending, kube, settings_, body, spec, meta, runtime)

    return registry


async def _standby_probe(liveness: str) -> web.AppRunner:
    """While standing by for the lease, answer the liveness URL (kopf serves it once leading)."""
    url = urllib.parse.urlsplit(liveness)

    async def alive(_: web.Request) -> web.Response:
        return web.json_response({"leader": False, "state": "standby"})

    app = web.Application()
    app.router.add_get(url.path or "/", alive)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    host = url.hostname or "0.0.0.0"  # noqa: S104 - a probe URL without a host: the pod IP
    await web.TCPSite(runner, host, url.port or 80).start()
    return runner


async def run(
    container: bootstrap.Container,
    *,
    namespaces: list[str] | None,
    resync_seconds: float = 300.0,
    sentinel_tick: float = 1.0,
    liveness: str | None = None,
    stop: asyncio.Event | None = None,
    ready: asyncio.Event | None = None,
    election: LeaderElection | None = None,
    kube: KubeApi | None = None,
) -> None:
    """Run the operator until stopped: one namespace list, or all namespaces. With an
    election, stand by until this instance holds the lease, act while it renews it, and
    raise LeadershipLost (after stopping kopf) if it is lost."""
    stop = stop or asyncio.Event()
    registry = build_registry(container, resync_seconds, sentinel_tick, namespaces, kube)
    operator = functools.partial(
        kopf.operator,
        registry=registry,
        standalone=True,
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        liveness_endpoint=liveness,
        stop_flag=stop,
        ready_flag=ready,
    )
    if election is None:
        await operator()
        return
    standby = await _standby_probe(liveness) if liveness else None
    try:
        acquired = asyncio.create_task(election.acquire())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({acquired, stopped}, return_when=asyncio.FIRST_COMPLETED)
        for t in (acquired, stopped):
            t.cancel()
        if not acquired.done() or acquired.cancelled():
            return  # stopped while standing by
        acquired.result()
    finally:
        if standby is not None:
            await standby.cleanup()
    container.metrics.leader.set(1)
    kopf_task = asyncio.create_task(operator())
    holder = asyncio.create_task(election.hold())
    try:
        await asyncio.wait({kopf_task, holder}, return_when=asyncio.FIRST_COMPLETED)
        if holder.done():
            log.error("%s: stopping the operator", holder.exception() or "lease renewal ended")
            stop.set()
            with contextlib.suppress(asyncio.CancelledError):
                await kopf_task
            holder.result()  # raises LeadershipLost
        kopf_task.result()
    finally:
        holder.cancel()
        with contextlib.suppress(asyncio.CancelledError, LeadershipLost):
            await holder
        container.metrics.leader.set(0)
        await election.release()
