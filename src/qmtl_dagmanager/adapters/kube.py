"""The Kubernetes adapters: one API client (the in-cluster account or the `kubeconfig`
setting) for the ConfigMap, Lease and StrategyDAG calls the operator makes outside kopf, and
StrategyDAG readiness for rollouts. Calls raise typed errors (`Unavailable` for a server that
did not answer, `Conflict` for 409)."""

from __future__ import annotations

import asyncio
import datetime
import functools
import logging
import os
from collections.abc import Mapping
from typing import Any

import kubernetes
import orjson
import urllib3

from qmtl_dagmanager.core.errors import Conflict, DagManagerError, Unavailable
from qmtl_dagmanager.ports import Owner

# what a call to the API server raises: a status, or a connection that failed
API_ERRORS = (kubernetes.client.ApiException, OSError, urllib3.exceptions.HTTPError)
log = logging.getLogger(__name__)


def kube_configuration(kubeconfig: str = "") -> kubernetes.client.Configuration:
    """The in-cluster service account, else the kubeconfig file given (the `kubeconfig`
    setting, else $KUBECONFIG) or the default one."""
    cfg = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=cfg)
    except kubernetes.config.ConfigException:
        # an empty setting means $KUBECONFIG as it is now (the client library reads it
        # only once, at import)
        path = kubeconfig or os.environ.get("KUBECONFIG") or None
        kubernetes.config.load_kube_config(config_file=path, client_configuration=cfg)
    return cfg


def bearer_token(cfg: kubernetes.client.Configuration) -> str | None:
    """The bearer token of a client configuration, without its scheme, as kopf wants it.
    The in-cluster loader stores it as "bearer <token>" (lower case); a kubeconfig as given.
    Its refresh hook runs first, so a rotated ServiceAccount token is read again."""
    hook = getattr(cfg, "refresh_api_key_hook", None)
    if hook is not None:
        hook(cfg)
    keys = cfg.api_key or {}
    raw = keys.get("BearerToken") or keys.get("authorization")
    if not raw:
        return None
    scheme, _, rest = str(raw).strip().partition(" ")
    return rest.strip() if rest and scheme.lower() == "bearer" else str(raw).strip()


class KubeApi:
    """The operator's one API client for its calls outside kopf (ConfigMaps, StrategyDAG
    pages, status and events, leases), made on first use from the `kubeconfig` setting."""

    def __init__(self, kubeconfig: str = "") -> None:
        self.kubeconfig = kubeconfig
        self._configuration: kubernetes.client.Configuration | None = None
        self._client: kubernetes.client.ApiClient | None = None

    def configuration(self) -> kubernetes.client.Configuration:
        if self._configuration is None:
            self._configuration = kube_configuration(self.kubeconfig)
        return self._configuration

    def client(self) -> kubernetes.client.ApiClient:
        if self._client is None:
            self._client = kubernetes.client.ApiClient(self.configuration())
        return self._client

    @functools.cache  # noqa: B019 - one per KubeApi, which lives as long as the process
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.client())

    @functools.cache  # noqa: B019 - as above
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.client())

    def coordination(self) -> kubernetes.client.CoordinationV1Api:
        return kubernetes.client.CoordinationV1Api(self.client())


def coordination() -> kubernetes.client.CoordinationV1Api:
    """A Lease client from the default kubeconfig (tests that hold a lease themselves)."""
    return KubeApi().coordination()


class ConfigMaps:
    """The ConfigMap calls: a DAG kept in a ConfigMap, the node → topic map of a large DAG,
    the GC report. Failures are typed errors."""

    def __init__(self, api: KubeApi) -> None:
        self.api = api

    def upsert(
        self,
        namespace: str,
        name: str,
        data: Mapping[str, str],
        owner: Owner | None = None,
    ) -> None:
        """Create or replace the ConfigMap with `data`, labelled as ours and, with an owner,
        deleted with it by the garbage collector."""
        cm = kubernetes.client.V1ConfigMap(
            metadata=kubernetes.client.V1ObjectMeta(
                name=name,
                labels={"app.kubernetes.io/name": "qmtl-dagmanager"},
                owner_references=None
                if owner is None
                else [
                    kubernetes.client.V1OwnerReference(
                        api_version=owner.api_version,
                        kind=owner.kind,
                        name=owner.name,
                        uid=owner.uid,
                        controller=True,
                        block_owner_deletion=False,
                    )
                ],
            ),
            data=dict(data),
        )
        core = self.api.core()
        what = f"writing ConfigMap {namespace}/{name}"
        try:
            core.replace_namespaced_config_map(name, namespace, cm)
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise _typed(what, e) from e
            try:
                core.create_namespaced_config_map(namespace, cm)
            except API_ERRORS as ce:
                raise _typed(what, ce) from ce
        except API_ERRORS as e:
            raise _typed(what, e) from e

    def read(self, namespace: str, name: str, key: str) -> str | None:
        """The key's value; None when the ConfigMap or the key does not exist."""
        what = f"reading ConfigMap {namespace}/{name}"
        try:
            cm = self.api.core().read_namespaced_config_map(name, namespace)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise _typed(what, e) from e
        except API_ERRORS as e:
            raise _typed(what, e) from e
        value = (cm.data or {}).get(key)
        return str(value) if value is not None else None

    def set_key(self, namespace: str, name: str, key: str, value: str | None) -> None:
        """Set one key of the ConfigMap (None removes it), creating the ConfigMap when
        missing; a concurrent writer makes it read and try again (resourceVersion)."""
        core = self.api.core()
        what = f"writing {key} of ConfigMap {namespace}/{name}"
        for _ in range(8):
            try:
                cm = core.read_namespaced_config_map(name, namespace)
            except kubernetes.client.ApiException as e:
                if e.status != 404:
                    raise _typed(what, e) from e
                if value is None:
                    return
                try:
                    self.upsert(namespace, name, {key: value})
                    return
                except Conflict:
                    continue  # created meanwhile: read it
            except API_ERRORS as e:
                raise _typed(what, e) from e
            data = dict(cm.data or {})
            if value is None:
                if key not in data:
                    return
                data.pop(key)
            else:
                data[key] = value
            cm.data = data
            try:
                core.replace_namespaced_config_map(name, namespace, cm)
                return
            except kubernetes.client.ApiException as e:
                if e.status != 409:
                    raise _typed(what, e) from e
            except API_ERRORS as e:
                raise _typed(what, e) from e
        raise Unavailable(f"{what}: other writers kept changing it")

    def read_all(self, namespace: str, name: str) -> dict[str, str]:
        """Every key of the ConfigMap; empty when it does not exist."""
        what = f"reading ConfigMap {namespace}/{name}"
        try:
            cm = self.api.core().read_namespaced_config_map(name, namespace)
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return {}
            raise _typed(what, e) from e
        except API_ERRORS as e:
            raise _typed(what, e) from e
        return {str(k): str(v) for k, v in (cm.data or {}).items()}


def namespace_terminating(api: KubeApi, namespace: str) -> bool:
    """Whether the namespace is being deleted (or is gone). A refused read counts as not."""
    try:
        ns = api.core().read_namespace(namespace)
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return True
        log.warning(
            "cannot read namespace %s (%s): treated as not terminating", namespace, e.status
        )
        return False
    except API_ERRORS as e:
        raise _typed(f"reading namespace {namespace}", e) from e
    deleting = ns.metadata is not None and ns.metadata.deletion_timestamp is not None
    return deleting or (ns.status is not None and ns.status.phase == "Terminating")


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

    def __init__(
        self, group: str, version: str, plural: str, kind: str, api: KubeApi | None = None
    ) -> None:
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self.api = api or KubeApi()

    @property
    def _custom(self) -> kubernetes.client.CustomObjectsApi:
        return self.api.custom()

    @property
    def _core(self) -> kubernetes.client.CoreV1Api:
        return self.api.core()

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

    def remove_finalizer(self, meta: Mapping[str, Any], finalizer: str) -> bool:
        """Remove one finalizer of the object `meta` describes (guarded by its
        resourceVersion); False when the object is already gone."""
        rest = [f for f in meta.get("finalizers") or [] if f != finalizer]
        patch = {"metadata": {"finalizers": rest, "resourceVersion": meta["resourceVersion"]}}
        name, namespace = str(meta["name"]), str(meta["namespace"])
        try:
            self._custom.patch_namespaced_custom_object(
                self.group, self.version, namespace, self.plural, name, patch
            )
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return False
            raise _typed(f"removing the finalizer of {namespace}/{name}", e) from e
        except API_ERRORS as e:
            raise _typed(f"removing the finalizer of {namespace}/{name}", e) from e
        return True

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
