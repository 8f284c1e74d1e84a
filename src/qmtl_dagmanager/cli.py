"""The `dagmanager` command line.

Exit codes: 0 success; 2 bad input (an invalid DAG, a bad flag or setting); 3 a dependency is
unavailable (Neo4j, Kafka, the target server); 4 a conflict (cross-context reuse, a topic that
exists with another configuration); 1 anything else.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import orjson

from qmtl_dagmanager import bootstrap, logs, render, status_report
from qmtl_dagmanager.client import ContractViolation, GatewayClient
from qmtl_dagmanager.config import Settings, SettingsError, load
from qmtl_dagmanager.core import dag
from qmtl_dagmanager.core.errors import Conflict, DagManagerError, InvalidSpec, Unavailable
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.core.topics import TopicSpec, TopicType
from qmtl_dagmanager.kube import main as operator_main
from qmtl_dagmanager.kube import release_cli
from qmtl_dagmanager.sidecar import app

log = logging.getLogger("qmtl_dagmanager")
EXIT_OK, EXIT_OTHER, EXIT_INPUT, EXIT_UNAVAILABLE, EXIT_CONFLICT = 0, 1, 2, 3, 4
GRPC_EXIT = {
    grpc.StatusCode.INVALID_ARGUMENT: EXIT_INPUT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_UNAVAILABLE,
    grpc.StatusCode.FAILED_PRECONDITION: EXIT_CONFLICT,
}


class UsageError(Exception):
    pass


def _exit_for(error: BaseException) -> int:
    if isinstance(error, InvalidSpec | SettingsError | UsageError):
        return EXIT_INPUT
    if isinstance(error, Unavailable):
        return EXIT_UNAVAILABLE
    if isinstance(error, Conflict):
        return EXIT_CONFLICT
    if isinstance(error, grpc.aio.AioRpcError):
        return GRPC_EXIT.get(error.code(), EXIT_OTHER)
    if isinstance(error, aiohttp.ClientError | OSError):
        return EXIT_UNAVAILABLE
    return EXIT_OTHER


def _message(error: BaseException) -> str:
    if isinstance(error, grpc.aio.AioRpcError):
        return f"{error.code().name}: {error.details()}"
    if isinstance(error, DagManagerError):
        return f"{error.reason}: {error.message}"
    return str(error) or type(error).__name__


# --------------------------------------------------------------------------- commands


async def cmd_neo4j(settings: Settings, action: str, out: Path | None) -> int:
    if settings.embedded_graph and action != "export":
        raise UsageError("NEO4J_URI (or neo4j_dsn) is not set: the embedded graph has no schema")
    if settings.embedded_graph:  # the schema does not depend on a server: export it anyway
        settings = Settings(neo4j_uri="bolt://127.0.0.1:7687")
    graph = bootstrap.graph_store(settings)
    try:
        if action == "init":
            await graph.init_schema()
            print(f"schema ready on {settings.neo4j_uri}")
        elif action == "rollback":
            await graph.rollback_schema()
            print(f"schema removed from {settings.neo4j_uri}")
        else:
            text = ";\n".join(graph.schema_statements()) + ";\n"
            if out is None:
                sys.stdout.write(text)
            else:
                out.write_text(text)  # noqa: ASYNC240 - one small file before exit
                print(f"wrote {len(graph.schema_statements())} statements to {out}")
    finally:
        await graph.close()
    return EXIT_OK


async def cmd_server(settings: Settings) -> int:
    await app.serve(settings)
    return EXIT_OK


def _emit(
    args: argparse.Namespace,
    d: dag.Dag,
    summary: dict[str, Any],
    actions: dict[str, str],
    topics: dict[str, str],
) -> None:
    fmt = args.output
    if fmt == "json":
        sys.stdout.write(render.as_json(summary, d, actions, topics))
    elif fmt == "table":
        print(" ".join(f"{k}={v}" for k, v in summary.items() if not isinstance(v, dict)))
        sys.stdout.write(render.table(d, actions, topics))
    elif fmt == "mermaid":
        sys.stdout.write(render.mermaid(d, actions))
    elif fmt == "dot":
        sys.stdout.write(render.dot(d, actions))
    elif fmt == "svg":
        exe = shutil.which("dot")
        if exe is None:
            raise UsageError("--output svg needs Graphviz's `dot` on PATH (or use --output dot)")
        svg = subprocess.run(
            [exe, "-Tsvg"], input=render.dot(d, actions), text=True, capture_output=True, check=True
        ).stdout
        sys.stdout.write(svg)


def _read_dag(path: Path) -> str:
    try:
        return path.read_text()
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from None


async def cmd_diff(settings: Settings, args: argparse.Namespace) -> int:
    text = _read_dag(args.file)
    request = Request(
        args.strategy,
        world_id=args.world,
        execution_domain=args.domain,
        as_of=args.as_of,
        partition=args.partition,
    )
    d = dag.parse(text, limits=settings.limits, ids=settings.node_ids)
    if args.target:
        client = GatewayClient(args.target)
        try:
            reply = await client.diff(
                args.strategy,
                text,
                world_id=args.world,
                execution_domain=args.domain,
                as_of=args.as_of,
                partition=args.partition,
                timeout=args.timeout,
            )
        finally:
            await client.close()
        topics = reply.topics_by_node()
        actions = {b.node_id: "buffer" for b in reply.buffers}
        summary = {
            "sentinel_id": reply.sentinel_id,
            "version": reply.version,
            "crc32": reply.crc32,
            "chunks": reply.chunks,
            "queues": len(topics),
        }
        _emit(args, d, summary, actions, topics)
        return EXIT_OK
    container = bootstrap.build(settings)
    try:
        outcome = await container.diffs().diff(request, text, dry_run=True)
    finally:
        await container.close()
    p = outcome.plan
    actions = {x.node.node_id: x.action.value for x in p.nodes}
    topics = {x.node.node_id: x.topic for x in p.nodes}
    summary = {
        "sentinel_id": p.sentinel_id,
        "version": p.version,
        "crc32": p.crc32,
        "namespace": p.namespace,
        "counts": dict(p.counts),
        "dry_run": True,
    }
    _emit(args, d, summary, actions, topics)
    return EXIT_OK


async def cmd_queue_stats(args: argparse.Namespace) -> int:
    parts = []
    if args.tag:
        parts.append(f"tag={args.tag}")
    if args.interval:
        parts.append(f"interval={args.interval}")
    client = GatewayClient(args.target)
    try:
        sizes = await client.queue_stats(";".join(parts))
    finally:
        await client.close()
    for topic, size in sorted(sizes.items()):
        print(f"{size:>12}  {topic}")
    return EXIT_OK


async def _gc_trigger(url: str, payload: dict[str, Any]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.post(url, json=payload) as r:
        return r.status, await r.text()


async def cmd_gc(args: argparse.Namespace) -> int:
    """A GC run on a running sidecar; with --sentinel, the queues of one retired version:
    first a preview, then (unless --dry-run) the collection, archives included."""
    url = f"http://{args.target}/admin/gc-trigger"
    if not args.sentinel:
        status, body = await _gc_trigger(url, {"id": f"cli-{os.getpid()}", "dry_run": args.dry_run})
        if status != 202:
            print(f"error: {url} answered {status}: {body}", file=sys.stderr)
            return EXIT_UNAVAILABLE if status >= 500 else EXIT_OTHER
        print(body)
        return EXIT_OK
    payload = {"id": args.sentinel, "force": True}
    status, body = await _gc_trigger(url, {**payload, "dry_run": True})
    if status == 422:
        raise UsageError(f"{args.sentinel!r} is not a retired version with queues: {body}")
    if status != 202:
        print(f"error: {url} answered {status}: {body}", file=sys.stderr)
        return EXIT_UNAVAILABLE if status >= 500 else EXIT_OTHER
    preview = json.loads(body)
    print(f"preview: {len(preview['processed'])} queue(s) of retired version {args.sentinel}")
    for p in preview["processed"]:
        print(f"  {p['action']:8} {p['queue']}")
    if args.dry_run:
        return EXIT_OK
    status, body = await _gc_trigger(url, payload)
    if status != 202:
        print(f"error: {url} answered {status}: {body}", file=sys.stderr)
        return EXIT_UNAVAILABLE if status >= 500 else EXIT_OTHER
    run = json.loads(body)
    print(f"collected: {len(run['processed'])}, failed: {len(run['report']['failed'])}")
    for p in run["processed"]:
        print(f"  {p['action']:8} {p['queue']}")
    for f in run["report"]["failed"]:
        print(f"  failed   {f['queue']}: {f['error']}")
    return EXIT_OK if not run["report"]["failed"] else EXIT_UNAVAILABLE


async def cmd_compact(settings: Settings, args: argparse.Namespace) -> int:
    """Offline compaction of the configured graph, in batches, with progress."""
    container = bootstrap.build(settings)
    service = container.garbage()
    total = found = 0
    try:
        while True:
            run = await service.compact(dry_run=args.dry_run, limit=args.batch)
            found += len(run.candidates)
            total += run.removed
            print(
                f"[compact] {len(run.candidates)} candidate(s), {run.removed} removed "
                f"(created before {run.created_before:.0f})",
                file=sys.stderr,
            )
            if args.dry_run or not run.candidates or run.removed == 0:
                if args.dry_run:
                    for nid in run.candidates:
                        print(nid)
                break
    finally:
        await container.close()
    print(json.dumps({"dry_run": args.dry_run, "candidates": found, "removed": total}))
    return EXIT_OK


async def cmd_archive(settings: Settings, args: argparse.Namespace) -> int:
    """`archive list [--queue Q]` and `archive restore QUEUE --to TOPIC [--manifest KEY]`,
    on the configured archive store and Kafka."""
    if settings.embedded_kafka:
        raise UsageError("KAFKA_BOOTSTRAP_SERVERS (or kafka_dsn) is not set: no archives")
    archive = bootstrap.archive_of(settings)
    if args.action == "list":
        for e in await archive.entries(args.queue):
            print(f"{e.topic}\t{e.messages}\t{e.bytes}\t{e.created_at:.0f}\t{e.manifest}")
        return EXIT_OK
    entries = await archive.entries(args.queue)
    if args.manifest:
        chosen = next((e for e in entries if e.manifest == args.manifest), None)
    else:
        chosen = max(entries, key=lambda e: e.created_at, default=None)
    if chosen is None:
        raise UsageError(f"no complete archive of {args.queue!r} (see `archive list`)")
    container = bootstrap.build(settings)
    try:
        have = await container.topics.describe([args.to])
        if args.to not in have:
            made = await container.topics.ensure(
                {args.to: TopicSpec(TopicType.RAW, max(1, chosen.partitions), 1)}
            )
            if not made[args.to].ok:
                raise Unavailable(f"cannot create {args.to}: {made[args.to].message}")
    finally:
        await container.close()
    print(f"[archive] restoring {chosen.messages} message(s) of {chosen.topic} into {args.to}",
          file=sys.stderr)  # fmt: skip
    sent = await archive.restore(chosen.manifest, args.to)
    print(json.dumps({"queue": chosen.topic, "manifest": chosen.manifest, "to": args.to,
                      "messages": sent}))  # fmt: skip
    return EXIT_OK


async def cmd_status(args: argparse.Namespace) -> int:
    """The health of one process (a sidecar or the operator) from its HTTP endpoints."""
    base = f"http://{args.target}"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:
        async with http.get(f"{base}/metrics") as r:
            if r.status != 200:
                print(f"error: {base}/metrics answered {r.status}", file=sys.stderr)
                return EXIT_UNAVAILABLE
            text = await r.text()
        status = None
        async with http.get(f"{base}/status") as r:
            if r.status == 200:  # the operator's metrics port serves only /metrics
                status = await r.json()
    report = status_report.render(args.target, text, status)
    print(report.text)
    return EXIT_OK if report.healthy else EXIT_OTHER


async def cmd_gc_keep(args: argparse.Namespace) -> int:
    url = f"http://{args.target}/admin/gc-keep"
    payload = {"topics": args.topics, "keep": not args.remove, "by": args.by}
    async with aiohttp.ClientSession() as http, http.post(url, json=payload) as r:
        body = await r.text()
        if r.status != 200:
            print(f"error: {url} answered {r.status}: {body}", file=sys.stderr)
            return EXIT_UNAVAILABLE if r.status >= 500 else EXIT_INPUT
    print(body)
    return EXIT_OK


async def cmd_redo(args: argparse.Namespace) -> int:
    if args.rollback:
        url = f"http://{args.admin}/admin/rollback"
        payload = {"sentinel_id": args.sentinel, "world_id": args.world}
        async with aiohttp.ClientSession() as http, http.post(url, json=payload) as r:
            body = await r.text()
            if r.status == 409:
                raise Conflict(body)
            if r.status != 200:
                print(f"error: {url} answered {r.status}: {body}", file=sys.stderr)
                return EXIT_UNAVAILABLE if r.status >= 500 else EXIT_INPUT
        done = json.loads(body)
        print(
            f"sentinel_id={done['sentinel_id']} rolled back from {done['from']} to "
            f"{done['to']}; {done['retired_queues']} queue(s) of {done['from']} kept as "
            "sentinel queues"
        )
        return EXIT_OK
    if args.file is None:
        raise UsageError("redo-diff needs --file (or --rollback)")
    client = GatewayClient(args.target)
    try:
        result = await client.redo_diff(args.sentinel, _read_dag(args.file))
    finally:
        await client.close()
    print(
        f"sentinel_id={result.sentinel_id} version={result.version} queues={len(result.queue_map)}"
    )
    for key, topic in sorted(result.queue_map.items()):
        print(f"{key.partition('#')[0]}  {topic}")
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def _gc_parsers(sub: Any) -> None:
    """compact, archive and gc-keep."""
    compact = sub.add_parser(
        "compact",
        help="remove compute nodes with no queue, reference or live sentinel, older than the "
        "sentinel TTL, from the configured graph",
    )
    compact.add_argument("--dry-run", action="store_true", help="list them, remove nothing")
    compact.add_argument("--batch", type=int, default=1000, help="nodes per transaction")
    arc = sub.add_parser("archive", help="list archives, or restore one into a topic")
    arc_sub = arc.add_subparsers(dest="action", required=True)
    arc_list = arc_sub.add_parser("list", help="complete archives: queue, messages, bytes, when")
    arc_list.add_argument("--queue", help="only this queue's archives")
    arc_restore = arc_sub.add_parser(
        "restore", help="produce an archived queue's messages into a topic (created if absent)"
    )
    arc_restore.add_argument("queue", help="the archived queue (topic name)")
    arc_restore.add_argument("--to", required=True, help="the topic to restore into")
    arc_restore.add_argument("--manifest", help="which archive (default: the newest)")
    rel = sub.add_parser(
        "release-finalizers",
        help="no operator running: record the releases of a namespace's deleted StrategyDAGs "
        "and remove their finalizers (the operator completes them when it runs again)",
    )
    rel.add_argument("--namespace", required=True, help="the namespace stuck terminating")
    rel.add_argument(
        "--operator-namespace", help="where the operator runs (default: POD_NAMESPACE)"
    )
    keep = sub.add_parser(
        "gc-keep", help="mark queues keep on a running sidecar (GC never collects them)"
    )
    keep.add_argument("topics", nargs="+", help="queue topic names")
    keep.add_argument("--remove", action="store_true", help="remove this marker instead")
    keep.add_argument("--by", default="operator", help="the marker's name (default operator)")
    keep.add_argument("--target", default="127.0.0.1:8001", help="HOST:PORT of the HTTP admin")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dagmanager",
        description="QMTL DAG Manager",
        epilog="exit codes: 0 ok, 2 bad input, 3 unavailable, 4 conflict, 1 other",
    )
    ap.add_argument("--config", type=Path, help="YAML settings (environment overrides it)")
    ap.add_argument("--log-level", help="override log_level")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("server", help="run the sidecar: gRPC, HTTP admin, timed GC")
    op = sub.add_parser("operator", help="run the StrategyDAG operator (KUBECONFIG or in-cluster)")
    operator_main.add_arguments(op)
    sub.add_parser("neo4j-init", help="create the graph's constraints and indexes (idempotent)")
    sub.add_parser("neo4j-rollback", help="drop the graph's constraints and indexes")
    exp = sub.add_parser("export-schema", help="write the graph schema as Cypher")
    exp.add_argument("--out", type=Path, help="file to write (default: standard output)")
    diff = sub.add_parser("diff", help="diff a DAG file: locally (--dry-run) or on a server")
    diff.add_argument("--file", type=Path, required=True)
    mode = diff.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--dry-run",
        action="store_true",
        help="plan against the configured graph without writing anything",
    )
    mode.add_argument("--target", help="HOST:PORT of a running sidecar (writes, like the Gateway)")
    diff.add_argument("--strategy", default="cli")
    diff.add_argument("--world", default="")
    diff.add_argument("--domain", default="")
    diff.add_argument("--as-of", default="")
    diff.add_argument("--partition", default="")
    diff.add_argument("--timeout", type=float, default=30.0)
    diff.add_argument(
        "--output", choices=("table", "json", "mermaid", "dot", "svg"), default="table"
    )
    qs = sub.add_parser("queue-stats", help="message counts per topic")
    qs.add_argument("--tag", default="")
    qs.add_argument("--interval", default="")
    qs.add_argument("--target", default="127.0.0.1:50051")
    st = sub.add_parser(
        "status",
        help="a process's health: dependencies, SLOs of the last hour, graph size, GC backlog "
        "(exit 1 when something needs attention)",
    )
    st.add_argument(
        "--target",
        default="127.0.0.1:8001",
        help="HOST:PORT serving /metrics: the sidecar's HTTP admin or probe port, or the "
        "operator's metrics port (8081)",
    )
    gc = sub.add_parser("gc", help="trigger garbage collection on a running sidecar")
    gc.add_argument("--dry-run", action="store_true")
    gc.add_argument(
        "--sentinel",
        metavar="VERSION",
        help="collect the queues of one retired version (SENTINEL_ID@VERSION or a version "
        "label): preview, then collect with archives; not referenced or kept ones",
    )
    gc.add_argument("--target", default="127.0.0.1:8001", help="HOST:PORT of the HTTP admin")
    _gc_parsers(sub)
    redo = sub.add_parser(
        "redo-diff",
        help="re-run a diff for a hotfix under a new version, or (--rollback) point traffic back",
    )
    redo.add_argument("--sentinel", required=True)
    redo.add_argument("--file", type=Path)
    redo.add_argument("--target", default="127.0.0.1:50051")
    redo.add_argument(
        "--rollback",
        action="store_true",
        help="instead of a diff: all traffic of the sentinel back to its previous version",
    )
    redo.add_argument("--world", default="", help="world id carried by the weight events")
    redo.add_argument("--admin", default="127.0.0.1:8001", help="HOST:PORT of the HTTP admin")
    return ap


async def cmd_release_finalizers(settings: Settings, args: argparse.Namespace) -> int:
    operator_ns = args.operator_namespace or settings.pod_namespace or "default"

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    names = await asyncio.to_thread(
        release_cli.release, settings, args.namespace, operator_ns, progress
    )
    summary = {"released": names, "namespace": args.namespace, "operatorNamespace": operator_ns}
    print(orjson.dumps(summary).decode())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        settings = load(args.config, os.environ)
        level = (args.log_level or settings.log_level).upper()
        logs.configure(level, settings.log_format)
        commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
            "server": lambda: cmd_server(settings),
            "operator": lambda: operator_main.run(settings, args),
            "neo4j-init": lambda: cmd_neo4j(settings, "init", None),
            "neo4j-rollback": lambda: cmd_neo4j(settings, "rollback", None),
            "export-schema": lambda: cmd_neo4j(settings, "export", args.out),
            "diff": lambda: cmd_diff(settings, args),
            "queue-stats": lambda: cmd_queue_stats(args),
            "gc": lambda: cmd_gc(args),
            "gc-keep": lambda: cmd_gc_keep(args),
            "status": lambda: cmd_status(args),
            "compact": lambda: cmd_compact(settings, args),
            "archive": lambda: cmd_archive(settings, args),
            "redo-diff": lambda: cmd_redo(args),
            "release-finalizers": lambda: cmd_release_finalizers(settings, args),
        }
        return asyncio.run(commands[args.cmd]())
    except KeyboardInterrupt:
        return EXIT_OTHER
    except (
        DagManagerError,
        SettingsError,
        UsageError,
        ContractViolation,
        grpc.aio.AioRpcError,
        aiohttp.ClientError,
        OSError,
        subprocess.CalledProcessError,
    ) as e:
        print(f"error: {_message(e)}", file=sys.stderr)
        return _exit_for(e)


if __name__ == "__main__":
    sys.exit(main())
