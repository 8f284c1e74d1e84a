"""The periodic resync of every StrategyDAG, as one loop instead of a kopf timer per object.

A kopf timer keeps each object's last body alive for as long as the object exists (its
"live fresh body"), plus a task per object; with 1,000 StrategyDAGs that was most of the
operator's memory. This loop lists the watched StrategyDAGs a page at a time every period,
reconciles each (a few at once) with the same level-based reconcile as kopf's handlers, and
writes status and events through the API. A reconcile that finds a dependency down is retried
with backoff (from the error's `retry_after`, doubling, at most one period) on a fresh read of
the object, so an outage ends in Ready without waiting for the next period."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any, Protocol

from qmtl_dagmanager.core.errors import DagManagerError, Unavailable
from qmtl_dagmanager.kube.strategy_reconciler import Reconciler

log = logging.getLogger(__name__)


class Objects(Protocol):
    """The API calls the loop needs (`adapters.kube.StrategyObjects` in the operator); failures are
    raised as `DagManagerError`s."""

    def page(
        self, namespace: str | None, limit: int, token: str | None
    ) -> tuple[list[dict[str, Any]], str | None]: ...

    def read(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def event(self, obj: Mapping[str, Any], warning: bool, reason: str, message: str) -> None: ...


class Recorded:
    """A sink that keeps a reconcile's effects, applied through the API afterwards."""

    def __init__(self) -> None:
        self.patch: dict[str, Any] = {}
        self.events: list[tuple[bool, str, str]] = []

    def status(self, patch: Mapping[str, Any]) -> None:
        self.patch.update(patch)

    def event(self, warning: bool, reason: str, message: str) -> None:
        self.events.append((warning, reason, message))


class Resync:
    def __init__(
        self,
        rec: Reconciler,
        objects: Objects,
        namespaces: list[str] | None,
        every: float,
        *,
        concurrency: int = 4,
        page_size: int = 100,
    ) -> None:
        self.rec, self.objects, self.every = rec, objects, every
        self.namespaces: list[str | None] = list(namespaces) if namespaces else [None]
        self.page_size = page_size
        self._slots = asyncio.Semaphore(concurrency)
        self._retrying: dict[str, asyncio.Task[None]] = {}

    async def run(self) -> None:
        """Every period: resync all (the first after one period, as kopf's resume handler
        has just reconciled everything at start)."""
        try:
            while True:
                await asyncio.sleep(self.every)
                try:
                    n = await self.once()
                    log.info("resync: %d StrategyDAG(s) reconciled", n)
                except DagManagerError as e:  # an unreadable list: try again next period
                    log.warning("resync: could not list StrategyDAGs: %s", e)
        finally:
            for task in self._retrying.values():
                task.cancel()
            await asyncio.gather(*self._retrying.values(), return_exceptions=True)

    async def once(self) -> int:
        """One pass over every watched StrategyDAG; the number reconciled."""
        count = 0
        for namespace in self.namespaces:
            token: str | None = None
            while True:
                items, token = await asyncio.to_thread(
                    self.objects.page, namespace, self.page_size, token
                )
                live = [o for o in items if not (o.get("metadata") or {}).get("deletionTimestamp")]
                await asyncio.gather(*(self._one(o) for o in live))
                count += len(live)
                if not token:
                    break
        return count

    async def _one(self, obj: Mapping[str, Any], trigger: str = "resync") -> float | None:
        """Reconcile one object and apply its effects; the delay before a retry, if one is due."""
        meta = obj.get("metadata") or {}
        uid = str(meta.get("uid"))
        sink = Recorded()
        delay: float | None = None
        async with self._slots:
            try:
                await self.rec.reconcile(obj, sink, trigger)
            except Unavailable as e:  # Degraded is recorded in the sink
                delay = e.retry_after
            except DagManagerError as e:  # e.g. the topics ConfigMap refused: next period
                log.warning(
                    "resync of %s/%s failed: %s", meta.get("namespace"), meta.get("name"), e
                )
            await asyncio.to_thread(self._apply, obj, sink)
        if delay is not None and uid not in self._retrying and trigger == "resync":
            self._retrying[uid] = asyncio.create_task(self._retry(obj, delay))
        return delay

    def _apply(self, obj: Mapping[str, Any], sink: Recorded) -> None:
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        try:
            if sink.patch:
                self.objects.patch_status(namespace, name, sink.patch)
            for warning, reason, message in sink.events:
                self.objects.event(obj, warning, reason, message)
        except DagManagerError as e:  # the object may be gone; the next period writes again
            log.warning("resync: could not write the status of %s/%s: %s", namespace, name, e)

    async def _retry(self, obj: Mapping[str, Any], delay: float) -> None:
        meta = obj.get("metadata") or {}
        namespace, name = str(meta.get("namespace")), str(meta.get("name"))
        uid = str(meta.get("uid"))
        try:
            while True:
                await asyncio.sleep(delay)
                fresh = await asyncio.to_thread(self.objects.read, namespace, name)
                if fresh is None or (fresh.get("metadata") or {}).get("uid") != uid:
                    return  # deleted (or replaced) meanwhile
                again = await self._one(fresh, trigger="resync-retry")
                if again is None:
                    return
                delay = min(max(again, delay * 2), self.every)
        except DagManagerError as e:
            log.warning("resync retry of %s/%s stopped: %s", namespace, name, e)
        finally:
            self._retrying.pop(uid, None)
