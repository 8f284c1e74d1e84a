"""HTTP admin (contract §10): GET /status, POST /admin/gc-trigger, GET /metrics; and
POST /admin/gc-keep (mark queues keep, or remove a marker) and POST /admin/rollback (all
traffic of a sentinel back to its previous version)."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import GraphStore
from qmtl_dagmanager.services.canary import CanaryService
from qmtl_dagmanager.services.garbage import GcService
from qmtl_dagmanager.sidecar.bounds import reachable
from qmtl_dagmanager.sidecar.security import RateLimit, audit_log

log = logging.getLogger(__name__)
PRECHECK = 1.5  # seconds Neo4j and Kafka get to answer a probe before a GC run or /status
Handler = Callable[[web.Request], Awaitable[web.Response]]
Refusal = Callable[[web.Request], web.Response | None]


def make_app(
    graph: GraphStore,
    gc: GcService,
    metrics: Metrics,
    *,
    token: str = "",
    open_mutations: bool = True,
    gc_limit: RateLimit | None = None,
    canary: CanaryService | None = None,
) -> web.Application:
    """`token`: required as `Authorization: Bearer <token>` by mutating endpoints; without
    one they are open only when the listener is on loopback (`open_mutations`)."""

    def refused(request: web.Request) -> web.Response | None:
        if not token:
            if open_mutations:
                return None
            return web.json_response(
                {"detail": "set http_admin_token: mutating endpoints off loopback need one"},
                status=403,
            )
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return web.json_response({"detail": "a valid bearer token is required"}, status=401)
        return None

    status = _status_handler(graph)

    async def gc_trigger(request: web.Request) -> web.Response:
        denied = refused(request)
        if denied is not None:
            return denied
        body = await _json_body(request)
        if body is None:
            return web.json_response(
                {"detail": "body must be a JSON object with an id"}, status=422
            )
        if not isinstance(body, dict) or not body.get("id"):
            return web.json_response(
                {"detail": [{"loc": ["body", "id"], "msg": "field required"}]}, status=422
            )
        down = await _unreachable(gc)
        if down:  # an outage answers at once, not after the drivers' retries
            return web.json_response(
                {"detail": f"{down} did not answer within {PRECHECK:g} s; GC not started"},
                status=503,
                headers={"Retry-After": "5"},
            )
        dry_run = bool(body.get("dry_run", False))
        force = bool(body.get("force", False))
        run_name = str(body["id"])
        if gc_limit is not None and not gc_limit.allow():
            wait = max(1, round(1 / gc_limit.rate))
            return web.json_response(
                {"detail": f"GC triggers are limited to one per {wait} s"},
                status=429,
                headers={"Retry-After": str(wait)},
            )
        try:
            # an id naming a retired version scopes the run to its queues; any other id
            # names the run (echoed in the report and the audit line)
            run = await gc.collect(dry_run=dry_run, force=force, name=run_name)
        except DagManagerError as e:
            return _failure(e)
        audit_log.info(
            "gc-trigger by %s: id=%s run=%s scope=%s force=%s dry_run=%s outcome=OK dropped=%d",
            request.remote,
            run_name,
            run.run_id,
            run.scope,
            force,
            dry_run,
            len(run.processed),
            extra={
                "audit": "gc-trigger",
                "who": str(request.remote),
                "outcome": "OK",
                "dry_run": dry_run,
                "run": run.run_id,
                "scope": run.scope,
                "queues": [p["queue"] for p in run.processed],
            },
        )
        return web.json_response({"id": body["id"], **run.as_json()}, status=202)

    app = web.Application()
    app.router.add_get("/status", status)
    app.router.add_post("/admin/gc-trigger", gc_trigger)
    app.router.add_post("/admin/gc-keep", _gc_keep_handler(graph, refused))
    app.router.add_post("/admin/rollback", _rollback_handler(canary, refused))
    app.router.add_get("/metrics", _metrics_handler(metrics))
    return app


def _metrics_handler(metrics: Metrics) -> Handler:
    async def prometheus(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(metrics.registry))
        resp.content_type = CONTENT_TYPE_LATEST.split(";")[0]
        return resp

    return prometheus


async def _unreachable(gc: GcService) -> str:
    """Which of Neo4j and Kafka (probed together) does not answer within PRECHECK s."""
    graph, kafka = await asyncio.gather(
        reachable(gc.graph.ping(), PRECHECK), reachable(gc.topics.broker_count(), PRECHECK)
    )
    return " and ".join(n for n, ok in (("Neo4j", graph), ("Kafka", kafka)) if not ok)


def _status_handler(graph: GraphStore) -> Handler:
    async def status(_: web.Request) -> web.Response:
        ok = await reachable(graph.ping(), PRECHECK)
        return web.json_response(
            {
                "status": "ok" if ok else "degraded",
                "neo4j": "ok" if ok else "error",
                "dagmanager": "running",
            }
        )

    return status


def make_probe_app(graph: GraphStore, metrics: Metrics) -> web.Application:
    """What a kubelet probes and Prometheus scrapes, on the pod's IP: `/livez` (the event loop
    answers; never the graph, so an outage of Neo4j does not restart the pod), the read-only
    `/status` and `/metrics`. Nothing that changes state."""

    async def livez(_: web.Request) -> web.Response:
        return web.json_response({"status": "alive"})

    app = web.Application()
    app.router.add_get("/livez", livez)
    app.router.add_get("/status", _status_handler(graph))
    app.router.add_get("/metrics", _metrics_handler(metrics))
    return app


def _gc_keep_handler(graph: GraphStore, refused: Refusal) -> Handler:
    async def gc_keep(request: web.Request) -> web.Response:
        denied = refused(request)
        if denied is not None:
            return denied
        parsed = _keep_request(await _json_body(request))
        if isinstance(parsed, web.Response):
            return parsed
        topics, keep, by = parsed
        try:
            changed = await graph.set_keep(topics, by, keep)
        except DagManagerError as e:
            return _failure(e)
        audit_log.info(
            "gc-keep by %s: by=%s keep=%s topics=%d changed=%d",
            request.remote,
            by,
            keep,
            len(topics),
            changed,
            extra={"audit": "gc-keep", "who": str(request.remote), "queues": topics},
        )
        return web.json_response({"keep": keep, "by": by, "changed": changed})

    return gc_keep


def _rollback_handler(canary: CanaryService | None, refused: Refusal) -> Handler:
    async def rollback(request: web.Request) -> web.Response:
        denied = refused(request)
        if denied is not None:
            return denied
        body = await _json_body(request)
        sid = body.get("sentinel_id") if isinstance(body, dict) else None
        world = body.get("world_id", "") if isinstance(body, dict) else ""
        if not isinstance(sid, str) or not sid.strip() or not isinstance(world, str):
            return web.json_response(
                {"detail": [{"loc": ["body", "sentinel_id"], "msg": "field required"}]},
                status=422,
            )
        if canary is None:
            return web.json_response({"detail": "rollbacks are not served here"}, status=404)
        try:
            old, new, retired = await canary.rollback(sid.strip(), world)
        except DagManagerError as e:
            return _failure(e)
        audit_log.info(
            "rollback by %s: sentinel=%s from=%s to=%s retired_queues=%d",
            request.remote,
            sid,
            old,
            new,
            retired,
            extra={"audit": "rollback", "who": str(request.remote), "sentinel": sid},
        )
        return web.json_response(
            {"sentinel_id": sid, "from": old, "to": new, "retired_queues": retired}
        )

    return rollback


async def _json_body(request: web.Request) -> object | None:
    """The request's JSON body; None when it is not JSON."""
    try:
        body: object = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return body


def _failure(e: DagManagerError) -> web.Response:
    """A typed error as the admin API answers it: bad input 422, retryable 503, else 409."""
    status = 422 if isinstance(e, InvalidSpec) else (503 if e.retryable else 409)
    return web.json_response({"detail": f"{e.reason}: {e.message}"}, status=status)


def _keep_request(body: object) -> tuple[list[str], bool, str] | web.Response:
    """The topics, keep flag and marker of a gc-keep body, or the 422 that names the field."""
    topics = body.get("topics") if isinstance(body, dict) else None
    if not isinstance(body, dict) or not isinstance(topics, list) or not topics:
        return web.json_response(
            {"detail": [{"loc": ["body", "topics"], "msg": "a list of topic names"}]}, status=422
        )
    if not all(isinstance(x, str) and x for x in topics):
        return web.json_response(
            {"detail": [{"loc": ["body", "topics"], "msg": "topic names are strings"}]},
            status=422,
        )
    keep, by = body.get("keep", True), body.get("by", "operator")
    if not isinstance(keep, bool) or not isinstance(by, str) or not by.strip():
        return web.json_response(
            {"detail": "keep must be true or false and by a non-empty marker name"}, status=422
        )
    return [str(x) for x in topics], keep, by.strip()
