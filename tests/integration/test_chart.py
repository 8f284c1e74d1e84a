"""The Helm chart: lints, renders in its variants, matches manifests/install.yaml, and every
rendered object is accepted by the real kube-apiserver (server-side apply, dry run)."""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client, config, utils

from qmtl_dagmanager.config import SettingsError, load
from qmtl_dagmanager.core.gc import DEFAULT_POLICIES, GcAction, GcPolicy
from tests.conftest import Stack

ROOT = Path(__file__).resolve().parent.parent.parent
CHART = ROOT / "charts" / "qmtl-dagmanager"
INSTALL_ARGS = [
    "template",
    "qmtl-dagmanager",
    str(CHART),
    "--namespace",
    "qmtl-system",
    "--set",
    "neo4j.existingSecret=qmtl-dagmanager-neo4j",
]


@pytest.fixture(scope="module")
def helm() -> str:
    """helm, built from the Go module proxy once and cached (hack/stack/build-helm.sh)."""
    proc = subprocess.run(
        ["bash", str(ROOT / "hack" / "stack" / "build-helm.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, f"helm could not be built:\n{proc.stderr[-3000:]}"
    return proc.stdout.strip().splitlines()[-1]


def run(helm: str, *args: str) -> str:
    proc = subprocess.run([helm, *args], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stdout}{proc.stderr}"
    return proc.stdout


def docs(text: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(text) if d]


def test_lint_is_clean_in_every_variant(helm: str) -> None:
    for extra in (
        ["--set", "neo4j.password=x"],
        ["--set", "neo4j.existingSecret=s", "--set", "operator.watchNamespaces={a,b}"],
        [
            "--set",
            "neo4j.password=x",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "metrics.prometheusRule.enabled=true",
            "--set",
            "metrics.prometheusRule.runbookBaseUrl=https://git.example/qmtl/docs/runbooks",
            "--set",
            "crds.install=false",
        ],
    ):
        out = run(helm, "lint", "--strict", str(CHART), *extra)
        assert "0 chart(s) failed" in out


def test_a_missing_password_is_a_clear_error(helm: str) -> None:
    proc = subprocess.run(
        [helm, "template", "x", str(CHART)], capture_output=True, text=True, check=False
    )
    assert proc.returncode != 0 and "neo4j.password (or neo4j.existingSecret)" in proc.stderr


def test_install_yaml_is_the_current_rendering(helm: str) -> None:
    rendered = run(helm, *INSTALL_ARGS)
    committed = (ROOT / "manifests" / "install.yaml").read_text()
    assert committed.split("\n", 2)[2] == rendered, "run `make manifests` and commit"


def test_rendering_is_least_privilege_and_hardened(helm: str) -> None:
    objs = docs(run(helm, *INSTALL_ARGS))
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
    assert ("Deployment", "qmtl-dagmanager") in kinds
    crds = [o for o in objs if o["kind"] == "CustomResourceDefinition"]
    assert {c["metadata"]["annotations"]["helm.sh/resource-policy"] for c in crds} == {"keep"}
    verbs = {
        (g, r, v)
        for o in objs
        if o["kind"] in ("ClusterRole", "Role")
        for rule in o["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert not any(v in ("*", "delete", "deletecollection") or r == "*" for _, r, v in verbs)
    assert ("", "secrets", "get") not in verbs  # the password arrives as an env var
    pod = next(o for o in objs if o["kind"] == "Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert "--leader-election=lease" in c["args"]


@pytest.fixture
def namespace(stack: Stack) -> Iterator[tuple[client.ApiClient, str]]:
    api = config.new_client_from_config(config_file=stack.kubeconfig)
    ns = f"chart-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api).create_namespace(
        client.V1Namespace(metadata=client.V1ObjectMeta(name=ns))
    )
    yield api, ns
    client.CoreV1Api(api).delete_namespace(ns)
    api.close()


def test_the_api_server_accepts_every_object(
    helm: str, namespace: tuple[client.ApiClient, str]
) -> None:
    api, ns = namespace
    rendered = run(
        helm,
        "template",
        "qmtl-dagmanager",
        str(CHART),
        "--namespace",
        ns,
        "--set",
        "neo4j.password=x",
        "--set",
        "operator.watchNamespaces={" + ns + "}",
    )
    objs = docs(rendered)
    assert len(objs) >= 12
    for obj in objs:  # kubectl apply --server-side --dry-run=server, one object at a time
        utils.create_from_dict(api, obj, namespace=ns, apply=True, dry_run="All")


def test_gc_policies_reach_both_processes_and_are_valid(helm: str, tmp_path: Path) -> None:
    """gc.policies renders into the operator's environment and the sidecar's settings file,
    and both load as the processes would load them; a bad policy is refused by name."""
    values = tmp_path / "gc.yaml"
    values.write_text(
        "neo4j: {password: x}\n"
        "gc:\n  policies:\n    raw: {ttl_seconds: 60, grace_seconds: 5, action: drop}\n"
    )
    rendered = docs(run(helm, *INSTALL_ARGS, "-f", str(values)))
    deploy = next(d for d in rendered if d["kind"] == "Deployment")
    env = {
        e["name"]: e["value"] for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]
        if "value" in e
    }  # fmt: skip
    settings = load(None, env)
    assert settings.gc_policies["raw"] == GcPolicy(60, 5, GcAction.DROP)
    assert settings.gc_policies["sentinel"] == DEFAULT_POLICIES["sentinel"]  # merged
    sidecar = next(
        d for d in rendered if d["kind"] == "ConfigMap" and "sidecar" in d["metadata"]["name"]
    )
    cfg = tmp_path / "sidecar.yaml"
    cfg.write_text(sidecar["data"]["dagmanager.yaml"])
    assert load(cfg, {}).gc_policies["raw"] == GcPolicy(60, 5, GcAction.DROP)
    with pytest.raises(SettingsError, match="raw"):
        load(
            None,
            {
                **env,
                "QMTL_GC_POLICIES": '{"raw": {"ttl_seconds": 1, "grace_seconds": 1, '
                '"action": "burn"}}',
            },
        )
