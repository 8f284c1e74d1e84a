"""Leader election on a coordination.k8s.io/v1 Lease, so that one operator instance acts at a
time. Expiry is judged on this process's own clock from the moment it last saw the lease
record change (as client-go does), never by comparing clocks across machines."""

from __future__ import annotations

import asyncio
import datetime
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import kubernetes

from qmtl_dagmanager.adapters.kube import API_ERRORS as TRANSIENT

log = logging.getLogger(__name__)


class LeadershipLost(RuntimeError):
    """The lease could not be renewed in time or was taken over: stop acting at once."""


def default_identity() -> str:
    """Without a pod name (the `pod_name` setting): this host and process."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _micro(t: float) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True, slots=True)
class _Seen:
    holder: str
    record: tuple[Any, ...]  # what identifies one renewal: holder, renew time, transitions
    at: float  # local monotonic time when this record was first seen
    # the first record this instance ever read: it has never seen the holder renew. Such a
    # newcomer (a replacement pod just started) waits two retry periods longer (a standby may
    # have seen the record up to one period late, and polls one period apart), so that after
    # a crash the replica that stood by takes over, not the pod that replaces the dead one.
    first: bool = False


class LeaderElection:
    """Acquire, renew and release one Lease. `acquire` waits until this instance holds it;
    `hold` renews until cancelled and raises LeadershipLost if it cannot."""

    def __init__(
        self,
        api: Callable[[], kubernetes.client.CoordinationV1Api],
        namespace: str,
        name: str = "qmtl-dagmanager-operator",
        identity: str | None = None,
        *,
        duration: float = 15.0,
        renew_every: float = 5.0,
        retry_every: float = 2.0,
    ) -> None:
        if not 0 < renew_every < duration:
            raise ValueError("renew_every must be positive and shorter than the lease duration")
        self._api = api
        self.namespace, self.name = namespace, name
        self.identity = identity or default_identity()
        self.duration, self.renew_every, self.retry_every = duration, renew_every, retry_every
        self._seen: _Seen | None = None
        self._renewed_at = 0.0  # monotonic time of our last successful write
        self.is_leader = False

    # ------------------------------------------------------------------ public

    async def acquire(self) -> None:
        last_holder = None
        while True:
            try:
                holder = await asyncio.to_thread(self._try_acquire)
            except TRANSIENT as e:
                log.warning("leader election: the API server did not answer: %s", e)
                holder = None
            if holder == self.identity:
                self.is_leader = True
                log.info("leader election: %s holds lease %s/%s", holder, self.namespace, self.name)
                return
            if holder != last_holder:
                log.info(
                    "leader election: lease %s/%s is held by %s; standing by",
                    self.namespace,
                    self.name,
                    holder,
                )
                last_holder = holder
            await asyncio.sleep(self.retry_every)

    async def hold(self) -> None:
        """Renew until cancelled. Raises LeadershipLost when another instance took the lease
        or no renewal succeeded within the lease duration."""
        while True:
            await asyncio.sleep(self.renew_every)
            try:
                holder = await asyncio.to_thread(self._try_acquire)
            except TRANSIENT as e:
                log.warning("leader election: renewing the lease failed: %s", e)
                holder = self.identity if self._in_time() else None
            if holder != self.identity or not self._in_time():
                self.is_leader = False
                raise LeadershipLost(
                    f"lease {self.namespace}/{self.name} lost (holder now: {holder or 'unknown'})"
                )

    async def release(self) -> None:
        """Give the lease up so that a standby takes over at once (best effort)."""
        if not self.is_leader:
            return
        self.is_leader = False
        try:
            await asyncio.to_thread(self._release)
        except TRANSIENT as e:
            log.warning("leader election: releasing the lease failed: %s", e)

    # ------------------------------------------------------------------ one round

    def _in_time(self) -> bool:
        return time.monotonic() - self._renewed_at < self.duration

    def _body(self, old: Any | None) -> dict[str, Any]:
        now = time.time()
        spec = old.spec if old is not None else None
        transitions = int((spec.lease_transitions if spec else 0) or 0)
        ours = spec is not None and spec.holder_identity == self.identity
        acquired = spec.acquire_time if ours and spec is not None else None
        body: dict[str, Any] = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "acquireTime": _micro(acquired.timestamp()) if acquired else _micro(now),
                "renewTime": _micro(now),
                "leaseTransitions": transitions if ours or spec is None else transitions + 1,
            },
        }
        if old is not None:
            body["metadata"]["resourceVersion"] = old.metadata.resource_version
        return body

    def _try_acquire(self) -> str | None:
        """One attempt: returns the holder after it (ours when we hold it now)."""
        api = self._api()
        try:
            old = api.read_namespaced_lease(self.name, self.namespace)
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise
            try:
                api.create_namespaced_lease(self.namespace, cast(Any, self._body(None)))
            except kubernetes.client.ApiException as ce:
                if ce.status == 409:
                    return None  # another instance created it first
                raise
            self._renewed_at = time.monotonic()
            return self.identity
        spec = old.spec or kubernetes.client.V1LeaseSpec()
        holder = str(spec.holder_identity or "")
        record = (holder, spec.renew_time, spec.lease_transitions)
        now = time.monotonic()
        if self._seen is None or self._seen.record != record:
            self._seen = _Seen(holder, record, now, first=self._seen is None)
        duration = float(spec.lease_duration_seconds or self.duration)
        if self._seen.first:
            duration += 2 * self.retry_every
        free = not holder or holder == self.identity or now - self._seen.at >= duration
        if not free:
            return holder
        try:
            api.replace_namespaced_lease(self.name, self.namespace, cast(Any, self._body(old)))
        except kubernetes.client.ApiException as e:
            if e.status == 409:
                return None  # someone else wrote it between our read and write
            raise
        self._renewed_at = time.monotonic()
        return self.identity

    def _release(self) -> None:
        api = self._api()
        old = api.read_namespaced_lease(self.name, self.namespace)
        if old.spec is None or old.spec.holder_identity != self.identity:
            return
        body = self._body(old)
        body["spec"]["holderIdentity"] = None
        body["spec"]["leaseDurationSeconds"] = 1
        api.replace_namespaced_lease(self.name, self.namespace, cast(Any, body))
        log.info("leader election: released lease %s/%s", self.namespace, self.name)
