"""The operator's Kubernetes identity comes from settings (YAML or the environment the chart
sets from the downward API), read once at start, not deep inside the adapters."""

from __future__ import annotations

from pathlib import Path

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
