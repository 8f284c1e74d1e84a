"""The sidecar process: gRPC server, HTTP admin, the GC timer and the QueueUpdated publisher,
wired from one container."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.config import Settings, loopback
from qmtl_dagmanager.core import native
from qmtl_dagmanager.heap import FullCollections
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc
from qmtl_dagmanager.sidecar import http_admin, servicers
from qmtl_dagmanager.sidecar.errors import Guard
from qmtl_dagmanager.sidecar.security import (
    RateLimit,
    ReloadingCredentials,
    SecurityInterceptor,
    redact,
)
from qmtl_dagmanager.sidecar.tokens import TokenConfig, TokenVerifier

log = logging.getLogger(__name__)
SERVICES = (
    "qmtl.services.dagmanager.DiffService",
    "qmtl.services.dagmanager.TagQuery",
    "qmtl.services.dagmanager.AdminService",
    "qmtl.services.dagmanager.HealthCheck",
)
MAX_MESSAGE = 64 * 1024 * 1024


@dataclass
class Sidecar:
    container: bootstrap.Container
    grpc_server: grpc.aio.Server
    http_runner: web.AppRunner
    grpc_port: int
    http_port: int
    gc_task: asyncio.Task[None] | None = None
    events_task: asyncio.Task[None] | None = None  # the outbox publisher and the vitals
    heap_task: asyncio.Task[None] | None = None
    probe_grpc: grpc.aio.Server | None = None
    probe_http: web.AppRunner | None = None
    tokens: TokenVerifier | None = None

    async def stop(self, grace: float = 5.0) -> None:
        await self.container.stop_background([self.events_task] if self.events_task else [])
        for task in (self.gc_task, self.events_task, self.heap_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.probe_grpc is not None:
            await self.probe_grpc.stop(0)
        if self.probe_http is not None:
            await self.probe_http.cleanup()
        await self.grpc_server.stop(grace)
        await self.http_runner.cleanup()
        if self.tokens is not None:
            await self.tokens.close()
        await self.container.close()


async def start(settings: Settings) -> Sidecar:
    """Build everything, bind the ports and start serving; returns the running sidecar."""
    container = bootstrap.build(settings)
    try:
        await container.start()
    except BaseException:
        await container.close()  # nothing left open by a start that failed
        raise
    guard = Guard(container.metrics, settings.grpc_answer_deadline_seconds)
    diffs, queues = container.diffs(), container.queues()
    tokens = TokenVerifier(TokenConfig.of(settings), container.metrics)
    await tokens.start()
    server = grpc.aio.server(
        interceptors=[SecurityInterceptor(tokens, container.metrics)],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ],
    )
    pb_grpc.add_DiffServiceServicer_to_server(servicers.DiffServicer(diffs, guard, queues), server)
    pb_grpc.add_TagQueryServicer_to_server(servicers.TagQueryServicer(queues, guard), server)
    pb_grpc.add_AdminServiceServicer_to_server(
        servicers.AdminServicer(
            diffs, queues, guard, RateLimit(float(settings.queue_stats_per_second))
        ),
        server,
    )
    pb_grpc.add_HealthCheckServicer_to_server(servicers.HealthServicer(container.graph), server)
    std_health = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(std_health, server)
    address = f"{settings.grpc_host}:{settings.grpc_port}"
    if settings.grpc_tls_cert:
        tls = ReloadingCredentials(
            settings.grpc_tls_cert, settings.grpc_tls_key, settings.grpc_tls_client_ca
        )
        grpc_port = server.add_secure_port(address, tls.credentials())
    else:
        grpc_port = server.add_insecure_port(address)
        if not loopback(settings.grpc_host):
            log.warning("gRPC on %s without TLS: use it only inside a trusted network", address)
    await server.start()
    for name in ("", *SERVICES):
        await std_health.set(name, health_pb2.HealthCheckResponse.SERVING)
    runner = web.AppRunner(
        http_admin.make_app(
            container.graph,
            container.garbage(),
            container.metrics,
            token=settings.http_admin_token,
            open_mutations=loopback(settings.http_host),
            gc_limit=RateLimit(1.0 / max(settings.gc_trigger_interval_seconds, 1e-3)),
            canary=container.canary(),
        ),
        access_log=None,
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.http_host, settings.http_port)
    await site.start()
    http_port = settings.http_port or _bound_port(runner)
    sidecar = Sidecar(container, server, runner, grpc_port, http_port, tokens=tokens)
    await _start_probes(settings, sidecar, std_health)
    sidecar.events_task = asyncio.create_task(_all(container.background()))
    if settings.heap_full_collection_seconds > 0:
        collections = FullCollections(
            lambda: diffs.busy,
            container.metrics.heap_pause,
            every=settings.heap_full_collection_seconds,
        )
        sidecar.heap_task = asyncio.create_task(collections.run())
    if settings.gc_interval_seconds > 0:
        sidecar.gc_task = asyncio.create_task(
            container.garbage().every(settings.gc_interval_seconds, dry_run=settings.gc_dry_run)
        )
    log.info(
        "sidecar serving gRPC on %s:%d and HTTP on %s:%d (graph: %s, kafka: %s, parser: %s)",
        settings.grpc_host,
        grpc_port,
        settings.http_host,
        http_port,
        "embedded" if settings.embedded_graph else redact(settings.neo4j_uri),
        "embedded" if settings.embedded_kafka else redact(settings.kafka_bootstrap),
        native.path(),
    )
    return sidecar


async def _start_probes(
    settings: Settings, sidecar: Sidecar, std_health: health.aio.HealthServicer
) -> None:
    """The probe listeners (off by default): the Gateway calls the sidecar on loopback, but a
    kubelet probes the pod's IP. They serve the standard gRPC health service and GET /livez
    and /status, nothing that reads a DAG or changes anything."""
    if settings.probe_grpc_port:
        probe = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(std_health, probe)
        probe.add_insecure_port(f"{settings.probe_host}:{settings.probe_grpc_port}")
        await probe.start()
        sidecar.probe_grpc = probe
    if settings.probe_http_port:
        c = sidecar.container
        runner = web.AppRunner(http_admin.make_probe_app(c.graph, c.metrics), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, settings.probe_host, settings.probe_http_port).start()
        sidecar.probe_http = runner
    if settings.probe_grpc_port or settings.probe_http_port:
        log.info(
            "probes on %s: gRPC health %s, HTTP %s",
            settings.probe_host,
            settings.probe_grpc_port or "off",
            settings.probe_http_port or "off",
        )


async def _all(timers: list[Coroutine[Any, Any, None]]) -> None:
    await asyncio.gather(*timers)


def _bound_port(runner: web.AppRunner) -> int:
    for addr in runner.addresses:
        if isinstance(addr, tuple) and len(addr) >= 2:
            return int(addr[1])
    return 0


async def serve(settings: Settings) -> None:
    """Run until SIGINT or SIGTERM."""
    sidecar = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down")
    await sidecar.stop()
