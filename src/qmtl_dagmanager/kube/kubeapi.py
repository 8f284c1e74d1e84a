"""The Kubernetes client, built from the in-cluster account or $KUBECONFIG, and the few
ConfigMap, Lease and StrategyDAG calls the operator makes outside kopf. ConfigMap and
StrategyDAG calls raise typed errors (`Unavailable` for a server that did not answer)."""

from __future__ import annotations

import asyncio
import datetime
import os
from collections.abc import Mapping
from typing import Any

import kubernetes
import orjson
import urllib3

from qmtl_dagmanager.core.errors import Conflict, DagManagerError, Unavailable

# what a call to the API server raises: a status, or a connection that failed
API_ERRORS = (kubernetes.client.ApiException, OSError, urllib3.exceptions.HTTPError)


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
    what = f"writing ConfigMap {namespace}/{name}"
    try:
        api.replace_namespaced_config_map(name, namespace, cm)
    except kubernetes.client.ApiException as e:
        if e.status != 404:
            raise _typed(what, e) from e
        try:
            api.create_namespaced_config_map(namespace, cm)
        except API_ERRORS as ce:
            raise _typed(what, ce) from ce
    except API_ERRORS as e:
        raise _typed(what, e) from e


def read_config_map(namespace: str, name: str, key: str) -> str | None:
    what = f"reading ConfigMap {namespace}/{name}"
    try:
        cm = core().read_namespaced_config_map(name, namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return None
        raise _typed(what, e) from e
    except API_ERRORS as e:
        raise _typed(what, e) from e
    data = cm.data or {}
    value = data.get(key)
    return str(value) if value is not None else None


def coordination() -> kubernetes.client.CoordinationV1Api:
    return kubernetes.client.CoordinationV1Api(kubernetes.client.ApiClient(kube_configuration()))


def _typed(what: str, e: Exception) -> DagManagerError:
    if isinstance(e, kubernetes.client.ApiException) and e.status == 409:
        return Conflict(f"{what}: {e.reason}")
    if isinstance(e, kubernetes.client.ApiException) and e.status in (400, 403, 404, 422):
        return DagManagerError(f"{what}: {e.status} {e.reason}")
    return Unavailable(f"{what}: the API server did not answer ({e})")


class StrategyObjects:
    """The StrategyDAG calls of the resync loop on one API client: pages of the list, a
    fresh read, the status merge patch and an event for one object. Failures are raised as
    typed errors (`Unavailable` for a server that did not answer)."""

    def __init__(self, group: str, version: str, plural: str, kind: str) -> None:
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self._apis: tuple[kubernetes.client.CustomObjectsApi, kubernetes.client.CoreV1Api] | None
        self._apis = None

    @property
    def _custom(self) -> kubernetes.client.CustomObjectsApi:
        return self._connect()[0]

    @property
    def _core(self) -> kubernetes.client.CoreV1Api:
        return self._connect()[1]

    def _connect(self) -> tuple[kubernetes.client.CustomObjectsApi, kubernetes.client.CoreV1Api]:
        """The API client, made on first use (the kubeconfig is read then, not at wiring)."""
        if self._apis is None:
            client = kubernetes.client.ApiClient(kube_configuration())
            self._apis = (
                kubernetes.client.CustomObjectsApi(client),
                kubernetes.client.CoreV1Api(client),
            )
        return self._apis

    def page(
        self, namespace: str | None, limit: int, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of the list (one namespace, or all with None) and the continue token."""
        extra: dict[str, Any] = {"limit": limit, "_preload_content": False}
        raw: Any
        if token:
            extra["_continue"] = token
        try:
            if namespace is None:
                raw = self._custom.list_cluster_custom_object(
                    self.group, self.version, self.plural, **extra
                )
            else:
                raw = self._custom.list_namespaced_custom_object(
                    self.group, self.version, namespace, self.plural, **extra
                )
        except API_ERRORS as e:
            raise _typed(f"listing {self.plural}", e) from e
        doc = orjson.loads(raw.data)
        return list(doc.get("items") or []), (doc.get("metadata") or {}).get("continue") or None

    def read(self, namespace: str, name: str) -> dict[str, Any] | None:
        raw: Any
        try:
            raw = self._custom.get_namespaced_custom_object(
                self.group, self.version, namespace, self.plural, name, _preload_content=False
            )
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise _typed(f"reading {self.kind} {namespace}/{name}", e) from e
        except API_ERRORS as e:
            raise _typed(f"reading {self.kind} {namespace}/{name}", e) from e
        return dict(orjson.loads(raw.data))

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        try:
            self._custom.patch_namespaced_custom_object_status(
                self.group, self.version, namespace, self.plural, name, {"status": dict(status)}
            )
        except API_ERRORS as e:
            raise _typed(f"writing the status of {self.kind} {namespace}/{name}", e) from e

    def event(self, obj: Mapping[str, Any], warning: bool, reason: str, message: str) -> None:
        meta = obj.get("metadata") or {}
        stamp = datetime.datetime.now(datetime.UTC)
        event = kubernetes.client.CoreV1Event(
            metadata=kubernetes.client.V1ObjectMeta(generate_name=f"{meta.get('name')}."),
            involved_object=kubernetes.client.V1ObjectReference(
                api_version=f"{self.group}/{self.version}",
                kind=self.kind,
                name=meta.get("name"),
                namespace=meta.get("namespace"),
                uid=meta.get("uid"),
            ),
            reason=reason,
            message=message[:1024],
            type="Warning" if warning else "Normal",
            source=kubernetes.client.V1EventSource(component="qmtl-dagmanager"),
            first_timestamp=stamp,
            last_timestamp=stamp,
            count=1,
        )
        try:
            self._core.create_namespaced_event(str(meta.get("namespace")), event)
        except API_ERRORS as e:
            raise _typed(f"posting event {reason}", e) from e


class StrategyReadinessApi:
    """The `StrategyReadiness` port on the API server: a fresh read of the StrategyDAG."""

    def __init__(self, objects: StrategyObjects) -> None:
        self.objects = objects

    async def ready(self, namespace: str, name: str) -> str | None:
        obj = await asyncio.to_thread(self.objects.read, namespace, name)
        if obj is None:
            return None
        for c in (obj.get("status") or {}).get("conditions") or []:
            if c.get("type") == "Ready" and c.get("status") == "True":
                return str((obj.get("spec") or {}).get("strategyId") or "")
        return None
