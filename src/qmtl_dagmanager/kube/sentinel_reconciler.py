"""The VersionSentinel driver: a per-resource tick timer hands the body to the rollout use
case (`services/rollout.py`) and records what it returns as kopf's status patch and events.
It is the only writer of the resource's status, so ticks never race."""

from __future__ import annotations

from typing import Any

import kopf

from qmtl_dagmanager.api.v1alpha1.versionsentinel import action_of, parse_spec
from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.services.rollout import RolloutOutcome, RolloutService


class SentinelReconciler:
    def __init__(self, rollout: RolloutService) -> None:
        self.rollout = rollout
        # the status each resource was last given: a tick may come before the watch has
        # delivered our own patch, and must not act on the older status again
        self._written: dict[str, dict[str, Any]] = {}

    def forget(self, uid: str) -> None:
        self._written.pop(uid, None)

    async def reconcile(
        self, body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch
    ) -> None:
        """One tick; a dependency that is down raises (the caller maps it for kopf)."""
        uid = str(meta.get("uid"))
        old = self._written.get(uid, dict(body.get("status") or {}))
        generation = int(meta.get("generation") or 0)
        try:
            vs = parse_spec(dict(spec))
            action = action_of(dict(meta.get("annotations") or {}))
        except InvalidSpec as e:
            self._record(body, patch, uid, self.rollout.refuse(old, generation, e))
            return
        outcome = await self.rollout.reconcile(
            vs, old, generation, str(meta.get("namespace")), action, str(meta.get("name"))
        )
        self._record(body, patch, uid, outcome)

    def _record(self, body: kopf.Body, patch: kopf.Patch, uid: str, o: RolloutOutcome) -> None:
        if o.status is not None:
            patch.status.update(o.status)
            self._written[uid] = o.status
        for n in o.notices:
            (kopf.warn if n.warning else kopf.info)(body, reason=n.reason, message=n.message)
