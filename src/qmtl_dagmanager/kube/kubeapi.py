"""The Kubernetes client, built once per use from the in-cluster account or $KUBECONFIG, and
the few ConfigMap and Lease calls the operator makes."""

from __future__ import annotations

import os

import kubernetes


def kube_configuration() -> kubernetes.client.Configuration:
    """The in-cluster service account, else the kubeconfig named by $KUBECONFIG (read now,
    not at import) or the default one."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=cfg
        )
    return cfg


def core() -> kubernetes.client.CoreV1Api:
    return kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(kube_configuration()))


def upsert_config_map(namespace: str, name: str, cm: kubernetes.client.V1ConfigMap) -> None:
    api = core()
    try:
        api.replace_namespaced_config_map(name, namespace, cm)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise
        api.create_namespaced_config_map(namespace, cm)


def read_config_map(namespace: str, name: str, key: str) -> str | None:
    try:
        cm = core().read_namespaced_config_map(name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise
    data = cm.data or {}
    value = data.get(key)
    return str(value) if value is not None else None


def coordination() -> kubernetes.client.CoordinationV1Api:
    return kubernetes.client.CoordinationV1Api(kubernetes.client.ApiClient(kube_configuration()))
