"""Identity fields cannot change under a resource (the API server's CEL rules), whether edited
with a patch or re-applied by a GitOps pipeline with `kubectl apply --server-side`; a re-apply
of the same objects changes nothing."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from qmtl_dagmanager.api.v1alpha1 import strategydag
from tests.conftest import Stack
from tests.integration.kube_harness import Cluster, spec_of

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def sample_dag() -> dict[str, Any]:
    dag: dict[str, Any] = json.loads((ROOT / "tests" / "data" / "sample-dag.json").read_text())
    return dag


def uid() -> str:
    return uuid.uuid4().hex[:6]


def refused(call: Any) -> str:
    with pytest.raises(client.ApiException) as e:
        call()
    assert e.value.status == 422, e.value.body
    return str(e.value.body)


async def test_strategy_id_is_immutable(cluster: Cluster) -> None:
    name = f"idm-{uid()}"
    cluster.create(name, spec_of(sample_dag(), f"s-{uid()}"))
    await cluster.ready(name)
    body = refused(lambda: cluster.patch_spec(name, {"strategyId": f"other-{uid()}"}))
    assert "strategyId is immutable: delete the resource and create a new one" in body
    cluster.patch_spec(name, {"worldId": "w2"})  # other fields stay editable


async def test_sentinel_identity_is_immutable(cluster: Cluster) -> None:
    name = f"vsn-{uid()}"
    cluster.create_sentinel(
        name, {"strategyId": f"s-{uid()}", "version": "v2", "steps": [{"weight": 10}]}
    )
    for field, value in (("strategyId", f"other-{uid()}"), ("version", "v3")):
        body = refused(lambda f=field, v=value: cluster.patch_sentinel(name, {"spec": {f: v}}))
        assert f"{field} is immutable" in body
    cluster.patch_sentinel(name, {"spec": {"commitHash": "abc123"}})
    assert cluster.sentinel(name)["spec"]["commitHash"] == "abc123"


def kubectl(stack: Stack, *args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kubectl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "KUBECONFIG": stack.kubeconfig},
        timeout=60,
    )


async def test_server_side_reapply_changes_nothing_and_cannot_move_identity(
    cluster: Cluster, stack: Stack
) -> None:
    name, strategy = f"ssa-{uid()}", f"s-{uid()}"
    spec: dict[str, Any] = spec_of(sample_dag(), strategy)
    manifest: dict[str, Any] = {
        "apiVersion": f"{strategydag.GROUP}/{strategydag.VERSION}",
        "kind": strategydag.KIND,
        "metadata": {"name": name, "namespace": cluster.namespace},
        "spec": spec,
    }
    text = yaml.safe_dump(manifest)
    args = ("apply", "--server-side", "--field-manager=gitops", "-f", "-")
    first = kubectl(stack, *args, stdin=text)
    assert first.returncode == 0, first.stderr
    await cluster.ready(name)
    before = cluster.get(name)
    again = kubectl(stack, *args, stdin=text)  # the pipeline's next sync: same objects
    assert again.returncode == 0, again.stderr
    await asyncio.sleep(2)  # a reconcile it triggered would have written by now
    after = cluster.get(name)
    assert after["metadata"]["generation"] == before["metadata"]["generation"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    moved = yaml.safe_dump({**manifest, "spec": {**spec, "strategyId": "moved"}})
    refusal = kubectl(stack, *args, stdin=moved)
    assert refusal.returncode != 0
    assert "strategyId is immutable" in refusal.stderr
    assert cluster.get(name)["spec"]["strategyId"] == strategy
