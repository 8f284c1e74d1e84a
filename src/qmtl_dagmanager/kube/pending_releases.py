"""Finalizers that never wedge a namespace.

Deleting a StrategyDAG drops its references in the graph before kopf removes the finalizer.
When the backends stay unreachable, that would hold the resource, and a namespace being
deleted with it, for ever. So: while the namespace is terminating, or when the resource
carries the annotation `qmtl.io/release-when-unreachable: "true"`, a deletion that has failed
for `finalizer_timeout_seconds` records what it still has to do (a `PendingRelease`) under one
key of the ConfigMap `qmtl-dagmanager-pending-releases` in the operator's namespace, and lets
the finalizer go. The operator completes every recorded release once the graph answers again
(and at every start), then removes its key. The same record is what `dagmanager
release-finalizers` writes when no operator runs at all (README: Operations).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.core.strategy_spec import DeletionPolicy, StrategySpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.strategies import StrategyService

log = logging.getLogger(__name__)
FINALIZER = "qmtl.io/strategy-cleanup"  # the operator's finalizer on StrategyDAGs
PENDING_CONFIGMAP = "qmtl-dagmanager-pending-releases"
RELEASE_ANNOTATION = "qmtl.io/release-when-unreachable"


@dataclass(frozen=True)
class PendingRelease:
    """A StrategyDAG deletion whose graph work is still to be done."""

    strategy_id: str
    deletion_policy: DeletionPolicy
    topics: tuple[str, ...]  # the topics a Retain policy keeps as unmanaged
    namespace: str
    name: str
    uid: str
    recorded_at: float
    reason: str  # why it could not be done at deletion time

    @classmethod
    def of(
        cls, spec: StrategySpec, meta: Mapping[str, Any], topics: Iterable[str], reason: str
    ) -> PendingRelease:
        """The record for the StrategyDAG with this spec and metadata, made now."""
        return cls(
            strategy_id=spec.strategy_id,
            deletion_policy=spec.deletion_policy,
            topics=tuple(str(t) for t in topics),
            namespace=str(meta.get("namespace")),
            name=str(meta.get("name")),
            uid=str(meta.get("uid")),
            recorded_at=time.time(),
            reason=reason,
        )

    @property
    def key(self) -> str:
        """Its ConfigMap key (ConfigMap keys allow letters, digits, `-`, `_` and `.`)."""
        return f"{self.namespace}.{self.name}.{self.uid}"

    def to_json(self) -> str:
        return orjson.dumps(
            {
                "strategyId": self.strategy_id,
                "deletionPolicy": self.deletion_policy.value,
                "topics": list(self.topics),
                "namespace": self.namespace,
                "name": self.name,
                "uid": self.uid,
                "recordedAt": self.recorded_at,
                "reason": self.reason,
            }
        ).decode()

    @classmethod
    def from_json(cls, text: str) -> PendingRelease:
        try:
            d = orjson.loads(text)
            return cls(
                strategy_id=str(d["strategyId"]),
                deletion_policy=DeletionPolicy(d["deletionPolicy"]),
                topics=tuple(str(t) for t in d.get("topics") or ()),
                namespace=str(d["namespace"]),
                name=str(d["name"]),
                uid=str(d["uid"]),
                recorded_at=float(d["recordedAt"]),
                reason=str(d.get("reason", "")),
            )
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            raise InvalidSpec(f"a pending release is not readable: {e}") from e


def may_release(
    *, terminating: bool, annotated: bool, unreachable_for: float, timeout: float
) -> bool:
    """Whether a deletion failing on unreachable backends lets its finalizer go now."""
    return (terminating or annotated) and unreachable_for >= timeout


def annotated(meta: Mapping[str, Any]) -> bool:
    value = str((meta.get("annotations") or {}).get(RELEASE_ANNOTATION, "")).strip().lower()
    return value in ("true", "yes", "1")


class PendingStore:
    """The ConfigMap of pending releases (blocking calls; typed errors)."""

    def __init__(self, config_maps: Any, namespace: str) -> None:
        self.config_maps = config_maps
        self.namespace = namespace

    def put(self, p: PendingRelease) -> None:
        self.config_maps.set_key(self.namespace, PENDING_CONFIGMAP, p.key, p.to_json())

    def remove(self, key: str) -> None:
        self.config_maps.set_key(self.namespace, PENDING_CONFIGMAP, key, None)

    def all(self) -> dict[str, str]:
        return dict(self.config_maps.read_all(self.namespace, PENDING_CONFIGMAP))


class PendingReleases:
    """Records releases the backends could not take, and completes them when they can."""

    def __init__(self, store: PendingStore, strategies: StrategyService, metrics: Metrics) -> None:
        self.store = store
        self.strategies = strategies
        self.metrics = metrics

    async def record(self, p: PendingRelease) -> None:
        await asyncio.to_thread(self.store.put, p)
        self.metrics.pending_releases_recorded.inc()
        log.warning(
            "StrategyDAG %s/%s deleted while the backends were unreachable (%s): its release "
            "of strategy %s is recorded in %s/%s and will be completed when they return",
            p.namespace,
            p.name,
            p.reason,
            p.strategy_id,
            self.store.namespace,
            PENDING_CONFIGMAP,
        )

    async def complete(self) -> int:
        """Complete every recorded release the graph takes now; returns how many were done.
        Stops at the first one the backends refuse for now (the rest waits for the next
        call); an unreadable record is logged and left for a person."""
        entries = await asyncio.to_thread(self.store.all)
        self.metrics.pending_releases.set(len(entries))
        done = 0
        for key, text in sorted(entries.items()):
            try:
                p = PendingRelease.from_json(text)
            except InvalidSpec as e:
                log.error("pending release %s left in place: %s", key, e)
                continue
            try:
                dropped = await self.strategies.release(
                    p.strategy_id, p.deletion_policy, list(p.topics)
                )
            except DagManagerError as e:
                if e.retryable:
                    log.info("pending releases wait for the backends: %s", e.message)
                    break
                log.error("pending release %s failed: %s", key, e.message)
                continue
            await asyncio.to_thread(self.store.remove, key)
            done += 1
            self.metrics.pending_releases_completed.inc()
            self.metrics.pending_releases.set(len(entries) - done)
            log.info(
                "completed the recorded release of strategy %s (StrategyDAG %s/%s, recorded "
                "%.0f s ago): %d references dropped",
                p.strategy_id,
                p.namespace,
                p.name,
                time.time() - p.recorded_at,
                dropped,
            )
        return done

    async def run(self, every: float) -> None:
        while True:
            try:
                await self.complete()
            except DagManagerError as e:  # the API server itself did not answer
                log.warning("pending releases: %s", e.message)
            await asyncio.sleep(every)
