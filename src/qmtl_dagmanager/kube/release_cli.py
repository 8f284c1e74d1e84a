"""What `dagmanager release-finalizers` does: the manual path for a namespace stuck on StrategyDAG
finalizers while no operator runs (uninstalled, or scaled to zero). For every StrategyDAG of
the namespace that is being deleted and still carries the operator's finalizer, it records
the release the operator would have done (the same ConfigMap as the operator's own bounded
timeout), then removes the finalizer. The operator completes the recorded releases when it
runs again, so no reference is leaked."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from qmtl_dagmanager.adapters.kube import ConfigMaps, KubeApi, StrategyObjects
from qmtl_dagmanager.api.v1alpha1 import strategydag
from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.kube.pending_releases import (
    FINALIZER,
    PENDING_CONFIGMAP,
    PendingRelease,
    PendingStore,
)


def _record_of(obj: dict[str, Any]) -> PendingRelease:
    meta, st = obj.get("metadata") or {}, obj.get("status") or {}
    try:
        spec = strategydag.parse_spec(obj.get("spec") or {})
    except InvalidSpec as e:
        raise InvalidSpec(f"StrategyDAG {meta.get('namespace')}/{meta.get('name')}: {e}") from e
    return PendingRelease.of(
        spec,
        meta,
        (st.get("topics") or {}).values(),
        "released by hand (dagmanager release-finalizers): no operator was running",
    )


def release(
    settings: Settings,
    namespace: str,
    operator_namespace: str,
    progress: Callable[[str], None],
) -> list[str]:
    """Record and release every stuck StrategyDAG of `namespace`; returns their names."""
    kube = KubeApi(settings.kubeconfig)
    objects = StrategyObjects(
        strategydag.GROUP, strategydag.VERSION, strategydag.PLURAL, strategydag.KIND, kube
    )
    store = PendingStore(ConfigMaps(kube), operator_namespace)
    released: list[str] = []
    token: str | None = None
    while True:
        items, token = objects.page(namespace, 200, token)
        for obj in items:
            meta = obj.get("metadata") or {}
            finalizers = list(meta.get("finalizers") or [])
            if not meta.get("deletionTimestamp") or FINALIZER not in finalizers:
                continue
            record = _record_of(obj)
            store.put(record)  # first the record: a crash between leaks nothing
            if objects.remove_finalizer(meta, FINALIZER):
                released.append(str(meta["name"]))
                progress(
                    f"released {namespace}/{meta['name']} (strategy {record.strategy_id}); its "
                    f"references are recorded in {operator_namespace}/{PENDING_CONFIGMAP}"
                )
        if not token:
            return released
