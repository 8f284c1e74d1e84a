"""Benchmark of the operator on the local stack: apply 100 StrategyDAGs of 100 nodes each at
once and time until all are Ready; then count the writes a resync of them makes.

    python bench/operator_bench.py [--count 100] [--nodes 100]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
import yaml
from kubernetes import client, config
from kubernetes.client.rest import RESTResponseType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gen import generate  # noqa: E402

from bench.common import backend_settings, stack_env  # noqa: E402
from qmtl_dagmanager import bootstrap  # noqa: E402
from qmtl_dagmanager.api.v1alpha1 import strategydag  # noqa: E402
from qmtl_dagmanager.kube import operator  # noqa: E402


def ready_count(custom: client.CustomObjectsApi, ns: str) -> int:
    # raw bytes and orjson: the bench's own polling must not compete with the operator for CPU
    raw = cast(  # not preloaded: the client answers with the HTTP response
        RESTResponseType,
        custom.list_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL, _preload_content=False
        ),
    )
    items = orjson.loads(raw.data)["items"]
    return sum(
        1
        for i in items
        for c in (i.get("status") or {}).get("conditions") or []
        if c["type"] == "Ready" and c["status"] == "True"
    )


def bodies_for(count: int, nodes: int, run: str) -> list[dict[str, Any]]:
    out = []
    for i in range(count):
        doc = generate(nodes, seed=i, salt=f"{run}{i}")
        out.append(
            {
                "apiVersion": f"{strategydag.GROUP}/{strategydag.VERSION}",
                "kind": strategydag.KIND,
                "metadata": {"name": f"s{i}"},
                "spec": {
                    "strategyId": f"bench-{run}-{i}",
                    "worldId": "w1",
                    "dag": {"schemaVersion": "v1", "nodes": doc["nodes"], "meta": doc["meta"]},
                },
            }
        )
    return out


def install_crds(api_client: client.ApiClient) -> None:
    """The project's CRDs, created where they are missing."""
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        with contextlib.suppress(client.ApiException):  # already there
            client.ApiextensionsV1Api(api_client).create_custom_resource_definition(
                yaml.safe_load(path.read_text())
            )


async def wait_for(predicate: Any, limit: float, what: str) -> None:
    start = time.perf_counter()
    while not await asyncio.to_thread(predicate):
        if time.perf_counter() - start > limit:
            raise SystemExit(f"timed out after {limit:.0f} s waiting for {what}")
        await asyncio.sleep(1.0)


async def start(
    container: bootstrap.Container, ns: str, resync: float, writes: list[int]
) -> tuple[asyncio.Event, asyncio.Task[None]]:
    """The operator in-process, its graph writes counted into `writes`."""
    original = container.graph.apply

    async def counted(*a: Any, **k: Any) -> tuple[str, ...]:
        writes[0] += 1
        return await original(*a, **k)

    container.graph.apply = counted  # type: ignore[method-assign]
    stop, ready = asyncio.Event(), asyncio.Event()
    task = asyncio.create_task(
        operator.run(container, namespaces=[ns], resync_seconds=resync, stop=stop, ready=ready)
    )
    await asyncio.wait_for(ready.wait(), 60)
    return stop, task


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--resync", type=float, default=10.0, help="resync period of phase 2")
    args = ap.parse_args()
    e = stack_env()
    os.environ["KUBECONFIG"] = e["KUBECONFIG"]
    api_client = config.new_client_from_config(config_file=e["KUBECONFIG"])
    install_crds(api_client)
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    container = bootstrap.build(dataclasses.replace(backend_settings(e), gc_interval_seconds=0))
    writes = [0]
    # phase 1 with the production resync period (300 s): only the creations are timed
    stop, task = await start(container, ns, 300, writes)
    bodies = bodies_for(args.count, args.nodes, uuid.uuid4().hex[:6])
    t0 = time.perf_counter()
    await asyncio.gather(
        *(
            asyncio.to_thread(
                custom.create_namespaced_custom_object,
                strategydag.GROUP,
                strategydag.VERSION,
                ns,
                strategydag.PLURAL,
                b,
            )
            for b in bodies
        )
    )
    applied = time.perf_counter() - t0
    await wait_for(lambda: ready_count(custom, ns) >= args.count, 900, "all Ready")
    print(
        f"{args.count} StrategyDAGs x {args.nodes} nodes: applied in {applied:.1f} s, all "
        f"Ready after {time.perf_counter() - t0:.1f} s ({args.count * args.nodes} topics, "
        f"{writes[0]} graph writes)",
        flush=True,
    )
    # phase 2: a restarted operator (resume) with a short resync period over unchanged DAGs
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    container = bootstrap.build(container.settings)
    stop, task = await start(container, ns, args.resync, writes)
    writes[0] = 0
    created = (
        container.metrics.registry.get_sample_value("diff_nodes_total", {"action": "create"}) or 0
    )
    diffs = container.metrics.registry.get_sample_value("diff_requests_total") or 0
    await asyncio.sleep(args.resync * 2.5)  # every DAG is resynced at least twice
    diffs = (container.metrics.registry.get_sample_value("diff_requests_total") or 0) - diffs
    created = (
        container.metrics.registry.get_sample_value("diff_nodes_total", {"action": "create"}) or 0
    ) - created
    print(
        f"restart + resync window of {args.resync * 2.5:.0f} s: {int(diffs)} diffs, "
        f"{writes[0]} graph writes, {int(created)} topics created"
    )
    await asyncio.gather(
        *(
            asyncio.to_thread(
                custom.delete_namespaced_custom_object,
                strategydag.GROUP,
                strategydag.VERSION,
                ns,
                strategydag.PLURAL,
                b["metadata"]["name"],
            )
            for b in bodies
        )
    )
    await wait_for(
        lambda: (
            not cast(
                dict[str, Any],
                custom.list_namespaced_custom_object(
                    strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL
                ),
            )["items"]
        ),
        300,
        "finalizers",
    )
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 60)
    core.delete_namespace(ns)


if __name__ == "__main__":
    asyncio.run(main())
