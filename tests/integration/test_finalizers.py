"""Finalizers never wedge a namespace. A StrategyDAG deleted with its namespace while Neo4j
is down records its release in the operator's namespace and lets its finalizer go once
`finalizer_timeout_seconds` have passed; with no operator at all, `dagmanager
release-finalizers` does the same by hand. Either way the operator completes the recorded
release when it can, and no reference is leaked."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import orjson
from kubernetes import client

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.kube.pending_releases import PENDING_CONFIGMAP
from tests.conftest import Stack
from tests.integration.kube_harness import Cluster, spec_of, until

ROOT = Path(__file__).resolve().parent.parent.parent


def sample(salt: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((ROOT / "tests" / "data" / "sample-dag.json").read_text())
    for n in doc["nodes"]:
        n["name"] = f"{n['name']}-{salt}"
    return doc


def graph_of(stack: Stack) -> Neo4jGraphStore:
    return Neo4jGraphStore(
        stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca
    )


def pending(core: client.CoreV1Api, namespace: str) -> dict[str, str]:
    try:
        cm = core.read_namespaced_config_map(PENDING_CONFIGMAP, namespace)
    except client.ApiException as e:
        if e.status == 404:
            return {}
        raise
    return dict(cm.data or {})


def recorded(core: client.CoreV1Api, namespace: str, strategy: str) -> list[dict[str, Any]]:
    """The pending releases recorded in the operator's namespace for `strategy`."""
    records = [orjson.loads(v) for v in pending(core, namespace).values()]
    return [r for r in records if r["strategyId"] == strategy]


def gone(core: client.CoreV1Api, namespace: str) -> bool:
    try:
        core.read_namespace(namespace)
    except client.ApiException as e:
        return bool(e.status == 404)
    return False


async def app_namespace(cluster: Cluster, **settings: Any) -> Cluster:
    """A second namespace for the StrategyDAG, watched by an operator whose Lease and
    pending releases live in the fixture's namespace (the operator's own)."""
    await cluster.stop_operator()
    ns = f"app-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    s = dataclasses.replace(cluster.settings, pod_namespace=cluster.namespace, **settings)
    app = Cluster(
        cluster.custom,
        cluster.core,
        ns,
        bootstrap.build(s),
        settings=s,
        lease_namespace=cluster.namespace,
    )
    await app.start_operator()
    return app


async def test_a_namespace_deleted_while_neo4j_is_down_is_not_wedged(
    cluster: Cluster, stack: Stack
) -> None:
    app = await app_namespace(
        cluster, finalizer_timeout_seconds=3, pending_release_interval_seconds=1
    )
    salt = uuid.uuid4().hex[:6]
    strategy = f"fin-{salt}"
    app.create("doomed", spec_of(sample(salt), strategy))
    obj = await app.ready("doomed")
    graph = graph_of(stack)
    try:
        assert await graph.strategy_nodes(strategy) == set(obj["status"]["topics"])
        await asyncio.to_thread(stack.stop_server, "neo4j")
        try:
            app.core.delete_namespace(app.namespace)
            await until(lambda: gone(app.core, app.namespace), 150, "the namespace deleted")
            (record,) = recorded(app.core, cluster.namespace, strategy)
            assert record["namespace"] == app.namespace and record["name"] == "doomed"
            assert "Neo4j" in record["reason"]
        finally:
            await asyncio.to_thread(stack.start_server, "neo4j")

        # the backends are back: the operator completes the release, then forgets it
        await until(
            lambda: not recorded(app.core, cluster.namespace, strategy),
            90,
            "the recorded release completed",
        )
        assert await graph.strategy_nodes(strategy) == set()
        reg = app.container.metrics.registry
        assert (reg.get_sample_value("operator_pending_releases_recorded_total") or 0) >= 1
        assert (reg.get_sample_value("operator_pending_releases_completed_total") or 0) >= 1
    finally:
        await app.stop_operator()
        await graph.close()


async def test_with_no_operator_the_manual_path_releases_and_nothing_leaks(
    cluster: Cluster, stack: Stack
) -> None:
    app = await app_namespace(cluster, pending_release_interval_seconds=1)
    salt = uuid.uuid4().hex[:6]
    strategy = f"man-{salt}"
    app.create("orphaned", spec_of(sample(salt), strategy))
    await app.ready("orphaned")
    await app.stop_operator()  # the operator is uninstalled
    graph = graph_of(stack)
    try:
        app.core.delete_namespace(app.namespace)
        stuck = await until(
            lambda: (
                app.get("orphaned")["metadata"].get("deletionTimestamp") and app.get("orphaned")
            ),
            30,
            "the StrategyDAG being deleted",
        )
        assert "qmtl.io/strategy-cleanup" in stuck["metadata"]["finalizers"]
        assert not gone(app.core, app.namespace)  # wedged on the finalizer, as expected
        env = {**os.environ, "KUBECONFIG": stack.kubeconfig}
        r = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable, "-m", "qmtl_dagmanager.cli", "release-finalizers",
                "--namespace", app.namespace, "--operator-namespace", cluster.namespace,
            ],
            env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["released"] == ["orphaned"]
        assert f"released {app.namespace}/orphaned" in r.stderr
        await until(lambda: gone(app.core, app.namespace), 150, "the namespace deleted")
        assert await graph.strategy_nodes(strategy) != set()  # not yet: no operator
        # the operator comes back and completes the release
        cluster.settings = dataclasses.replace(
            cluster.settings, pod_namespace=cluster.namespace, pending_release_interval_seconds=1
        )
        await cluster.start_operator()
        await until(
            lambda: not recorded(app.core, cluster.namespace, strategy),
            60,
            "the recorded release completed",
        )
        assert await graph.strategy_nodes(strategy) == set()
    finally:
        await graph.close()
