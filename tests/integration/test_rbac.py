"""Least privilege, proven: the operator runs as the chart's ServiceAccount (a token from the
TokenRequest API, RBAC authorisation on in the local kube-apiserver) and does its work, while
actions the chart does not grant are refused."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client, config, utils

from qmtl_dagmanager.api.v1alpha1 import strategydag
from tests.conftest import Stack, free_port
from tests.gen import generate
from tests.integration.kube_harness import spec_of, until
from tests.integration.test_chart import CHART, docs, helm, run

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent / "dagmanager"
__all__ = ["helm"]  # the fixture, shared with test_chart


@pytest.fixture
def installed(helm: str, stack: Stack, tmp_path: Path) -> Iterator[tuple[str, str, Path]]:
    """The chart's ServiceAccount and RBAC in a fresh namespace; a kubeconfig with its token."""
    admin = config.new_client_from_config(config_file=stack.kubeconfig)
    ns, release = f"rbac-{uuid.uuid4().hex[:6]}", f"r{uuid.uuid4().hex[:6]}"
    core = client.CoreV1Api(admin)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    for path in sorted((ROOT / "crds").glob("*.yaml")):  # as an admin would install them
        crd = yaml.safe_load(path.read_text())
        try:
            client.ApiextensionsV1Api(admin).create_custom_resource_definition(crd)
        except client.ApiException as e:
            assert e.status == 409, e
    rendered = run(
        helm, "template", release, str(CHART), "--namespace", ns, "--set", "neo4j.password=x",
        "--set", "crds.install=false", "--set", "operator.watchNamespaces={" + ns + "}",
    )  # fmt: skip
    rbac = {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
    objs = [o for o in docs(rendered) if o["kind"] in rbac]
    for obj in objs:
        utils.create_from_dict(admin, obj, namespace=ns)
    sa = next(o for o in objs if o["kind"] == "ServiceAccount")["metadata"]["name"]
    granted = core.create_namespaced_service_account_token(
        sa, ns, client.AuthenticationV1TokenRequest(spec=client.V1TokenRequestSpec(audiences=[]))
    ).status
    assert granted is not None
    token = granted.token
    kc = yaml.safe_load(Path(stack.kubeconfig).read_text())
    cluster = kc["clusters"][0]["cluster"]
    scoped = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "local", "cluster": cluster}],
        "users": [{"name": sa, "user": {"token": token}}],
        "contexts": [{"name": "sa", "context": {"cluster": "local", "user": sa}}],
        "current-context": "sa",
    }
    path = tmp_path / "sa-kubeconfig"
    path.write_text(yaml.safe_dump(scoped))
    yield ns, sa, path
    rbac_api = client.RbacAuthorizationV1Api(admin)
    for obj in objs:
        if obj["kind"] == "ClusterRole":
            rbac_api.delete_cluster_role(obj["metadata"]["name"])
        elif obj["kind"] == "ClusterRoleBinding":
            rbac_api.delete_cluster_role_binding(obj["metadata"]["name"])
    core.delete_namespace(ns)
    admin.close()


async def test_the_operator_works_under_the_charts_rbac_and_nothing_more(
    installed: tuple[str, str, Path], stack: Stack, tmp_path: Path
) -> None:
    ns, _, kubeconfig = installed
    env = {
        **os.environ,
        "KUBECONFIG": str(kubeconfig),
        "POD_NAMESPACE": ns,
        **stack.neo4j_env,
        "NEO4J_USER": stack.neo4j_user,
        "NEO4J_PASSWORD": stack.neo4j_password,
        **stack.kafka_process_env(),
        "QMTL_ARCHIVE_DIR": str(tmp_path / "archive"),
        "QMTL_GC_INTERVAL_SECONDS": "0",
    }
    log = tmp_path / "operator.log"
    with log.open("wb") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [str(BIN), "operator", f"--namespace={ns}", f"--lease-namespace={ns}",
             f"--liveness=http://127.0.0.1:{free_port()}/healthz", "--metrics-port=0"],
            env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    admin = config.new_client_from_config(config_file=stack.kubeconfig)
    custom = client.CustomObjectsApi(admin)
    where = (strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL)
    try:
        strategy = f"rbac-{uuid.uuid4().hex[:6]}"
        body = {
            "apiVersion": f"{strategydag.GROUP}/{strategydag.VERSION}",
            "kind": strategydag.KIND,
            "metadata": {"name": "rbac"},
            "spec": spec_of(generate(3, salt=strategy), strategy),
        }
        custom.create_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL, body
        )

        def ready() -> dict[str, Any] | None:
            obj = cast(
                dict[str, Any],
                custom.get_namespaced_custom_object(
                    strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL, "rbac"
                ),
            )
            conds = (obj.get("status") or {}).get("conditions") or []
            ok = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
            return dict(obj) if ok else None

        try:
            obj = await until(ready, 90, "Ready under the ServiceAccount")
        except AssertionError:
            raise AssertionError(log.read_text()[-4000:]) from None
        assert obj["metadata"]["finalizers"] == ["qmtl.io/strategy-cleanup"]
        events = client.CoreV1Api(admin).list_namespaced_event(ns).items
        assert any(e.reason == "Reconciled" for e in events)  # events were allowed
        lease = client.CoordinationV1Api(admin).read_namespaced_lease(
            "qmtl-dagmanager-operator", ns
        )
        assert lease.spec is not None and lease.spec.holder_identity  # the Lease was allowed
        # deletion: the finalizer runs with the granted verbs
        custom.delete_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL, "rbac"
        )
        await until(
            lambda: (
                not cast(
                    dict[str, Any],
                    custom.list_namespaced_custom_object(
                        strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL
                    ),
                )["items"]
            ),
            60,
            "the finalizer under the ServiceAccount",
        )
    finally:
        proc.terminate()
        proc.wait(30)
        admin.close()
    # what the chart does not grant is refused for the same identity
    scoped = config.new_client_from_config(config_file=str(kubeconfig))
    crs = client.CustomObjectsApi(scoped)
    forbidden = {
        "read secrets": lambda: client.CoreV1Api(scoped).list_namespaced_secret(ns),
        "create pods": lambda: client.CoreV1Api(scoped).create_namespaced_pod(
            ns,
            client.V1Pod(
                metadata=client.V1ObjectMeta(name="x"),
                spec=client.V1PodSpec(containers=[client.V1Container(name="x", image="x")]),
            ),
        ),
        "delete a StrategyDAG": lambda: crs.delete_namespaced_custom_object(*where, "any"),
        "act in another namespace": lambda: crs.list_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, "default", strategydag.PLURAL
        ),
    }  # fmt: skip
    for what, call in forbidden.items():
        with pytest.raises(client.ApiException) as e:
            await asyncio.to_thread(call)
        assert e.value.status == 403, what
    scoped.close()
