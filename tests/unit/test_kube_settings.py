"""The operator's Kubernetes identity comes from settings (YAML or the environment the chart
sets from the downward API), read once at start, not deep inside the adapters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import kubernetes

from qmtl_dagmanager import config
from qmtl_dagmanager.adapters.kube import bearer_token
from qmtl_dagmanager.config import load


def test_defaults_without_a_pod() -> None:
    s = load(None, {})
    assert (s.kubeconfig, s.pod_namespace, s.pod_name) == ("", "default", "")


def test_the_downward_api_environment_wins(tmp_path: Path) -> None:
    f = tmp_path / "s.yml"
    f.write_text("pod_namespace: from-file\nkubeconfig: /etc/kube/config\n")
    env = {"POD_NAMESPACE": "qmtl-system", "POD_NAME": "qmtl-dagmanager-7f9c-abcde"}
    s = load(f, env)
    assert s.pod_namespace == "qmtl-system"
    assert s.pod_name == "qmtl-dagmanager-7f9c-abcde"
    assert s.kubeconfig == "/etc/kube/config"


def test_every_setting_is_declared_once() -> None:
    keys = config.KEYS
    assert len({k.env for k in keys}) == len(keys)
    assert len({k.yaml for k in keys if k.yaml}) == len([k for k in keys if k.yaml])
    declared = {f.name for f in dataclasses.fields(config.Settings) if f.name != "limits"}
    assert declared <= {k.name for k in keys}
    assert set(config.SECRETS) == {
        "neo4j_password", "grpc_jwt_key", "http_admin_token", "s3_secret_key",
        "kafka_sasl_password",
    }  # fmt: skip
    assert all(k.doc for k in keys)
    table = config.table()
    assert "| `pod_namespace` | `POD_NAMESPACE` | `default` |" in table
    assert f"| {config.NONE} | `NEO4J_PASSWORD` |" in table  # secrets: environment only


def test_bearer_token_drops_the_scheme_in_any_case_and_refreshes() -> None:
    # the in-cluster loader stores "bearer <token>" in lower case; kopf wants the bare token
    cfg = kubernetes.client.Configuration()
    cfg.api_key = {"BearerToken": "bearer abc.def"}
    assert bearer_token(cfg) == "abc.def"
    cfg.api_key = {"authorization": "Bearer xyz"}
    assert bearer_token(cfg) == "xyz"
    cfg.api_key = {"BearerToken": "plain"}
    assert bearer_token(cfg) == "plain"
    cfg.api_key = {}
    assert bearer_token(cfg) is None

    def rotate(c: kubernetes.client.Configuration) -> None:
        c.api_key = {"BearerToken": "bearer rotated"}

    cfg.refresh_api_key_hook = rotate  # type: ignore[assignment]
    assert bearer_token(cfg) == "rotated"
