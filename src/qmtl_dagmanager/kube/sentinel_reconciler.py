"""The VersionSentinel reconcile: one level-based function run by a per-resource tick timer,
the only writer of the resource's status, so runs never race. It reads the rollout state from
status, applies manual actions (annotation or spec fields), starts the rollout once the
version's StrategyDAG is Ready, measures due analysis gates, lets time advance at most one
step, performs the effects of any weight change (graph, ControlBus, metrics) and only then
writes status and events. A crash between effects and status repeats the same effects, which
are idempotent."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

import kopf
import kubernetes

from qmtl_dagmanager.core import canary
from qmtl_dagmanager.core.canary import Event, Phase
from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.kube import api, sentinel_status
from qmtl_dagmanager.kube.kubeapi import kube_configuration
from qmtl_dagmanager.kube.sentinel_api import SentinelSpec, action_of
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Clock
from qmtl_dagmanager.services.canary import CanaryService, Versions

log = logging.getLogger(__name__)
ACTION_EVENTS = {
    "promote": Event.PROMOTE,
    "abort": Event.ABORT,
    "retry": Event.RETRY,
    "pause": Event.PAUSE,
    "resume": Event.RESUME,
    "rollback": Event.ROLLBACK,
}
# The strategy id of a Ready StrategyDAG, or None while it is not Ready.
StrategyProbe = Callable[[str, str], Awaitable[str | None]]


async def strategy_ready(namespace: str, name: str) -> str | None:
    def read() -> dict[str, Any] | None:
        custom = kubernetes.client.CustomObjectsApi(
            kubernetes.client.ApiClient(kube_configuration())
        )
        try:
            got = custom.get_namespaced_custom_object(
                api.GROUP, api.VERSION, namespace, api.PLURAL, name
            )
            return dict(cast(dict[str, Any], got))
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    obj = await asyncio.to_thread(read)
    if obj is None:
        return None
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == "Ready" and c.get("status") == "True":
            return str(obj["spec"]["strategyId"])
    return None


class SentinelReconciler:
    def __init__(
        self,
        service: CanaryService,
        clock: Clock,
        metrics: Metrics,
        probe: StrategyProbe = strategy_ready,
    ) -> None:
        self.service, self.clock, self.metrics, self.probe = service, clock, metrics, probe
        # the status each resource was last given: a tick may come before the watch has
        # delivered our own patch, and must not act on the older status again
        self._written: dict[str, dict[str, Any]] = {}

    def forget(self, uid: str) -> None:
        self._written.pop(uid, None)

    async def reconcile(
        self, body: kopf.Body, spec: kopf.Spec, meta: kopf.Meta, patch: kopf.Patch
    ) -> None:
        uid = str(meta.get("uid"))
        old = self._written.get(uid, dict(body.get("status") or {}))
        generation = int(meta.get("generation") or 0)
        try:
            vs = SentinelSpec.from_body(dict(spec))
            action = action_of(dict(meta.get("annotations") or {}))
        except InvalidSpec as e:
            self._invalid(body, patch, old, generation, e)
            return
        run = _Run(vs, sentinel_status.state_of(old), self.clock.now(), old, self.metrics)
        run.manual(body, action)
        try:
            await self._advance(run, str(meta.get("namespace")), generation)
        except InvalidSpec as e:
            self._invalid(body, patch, old, generation, e)
            return
        except DagManagerError as e:
            kopf.warn(body, reason=e.reason, message=f"{e.message} (retrying)")
            raise kopf.TemporaryError(e.message, delay=float(getattr(e, "retry_after", 5.0))) from e
        new = sentinel_status.render(
            old,
            run.state,
            generation=generation,
            sentinel_id=vs.sentinel_id,
            transitions=run.transitions,
            now=run.now,
            last_action=run.last_action,
            held_by=run.held_by,
            aborted_by=run.aborted_by,
        )
        if not sentinel_status.same(old, new):
            patch.status.update(new)
            self._written[uid] = new
        for t in run.transitions:
            message = (
                f"{t.event.value}: {t.before.phase.value} → {t.after.phase.value}, "
                f"weight {t.before.weight} → {t.after.weight}. {t.after.message}"
            )
            log.info("%s/%s %s", meta.get("namespace"), meta.get("name"), message)
            if t.after.phase in (Phase.ABORTED, Phase.ROLLED_BACK):
                kopf.warn(body, reason=t.after.reason, message=message)
            else:
                kopf.info(body, reason=t.after.reason, message=message)

    async def _advance(self, run: _Run, namespace: str, generation: int) -> None:
        vs, r = run.vs, run.vs.rollout
        versions = Versions(vs.sentinel_id, vs.world_id, vs.version, vs.stable_version)
        # start once the version runs; link its sentinel node to its nodes (again on a change)
        if run.state.phase is Phase.PENDING or generation != run.old.get("observedGeneration"):
            strategy = await self.probe(namespace, vs.strategy_ref) if vs.strategy_ref else ""
            if strategy is not None:
                await self.service.link(versions, strategy, vs.commit_hash, vs.release_tag)
                run.do(Event.START)
        # analysis gates that are due
        due = canary.gates_due(r, run.state, run.now)
        if due:
            measured = await self.service.measure(due, vs.prometheus_url)
            run.state = canary.record(r, run.state, measured, run.now)
            if canary.gates_failed(r, run.state):
                run.do(Event.GATE_FAILED)
        # time: at most one step
        event = canary.due(r, run.state, run.now)
        if event is not None:
            run.do(event)
        # effects before status: repeating them after a crash is harmless
        published = run.old.get("currentWeight")
        if run.state.phase is not Phase.PENDING and (
            published is None
            or int(published) != run.state.weight
            or run.old.get("phase") in (None, "Pending")
        ):
            await self.service.shift(versions, run.state.weight)

    def _invalid(
        self,
        body: kopf.Body,
        patch: kopf.Patch,
        old: dict[str, Any],
        generation: int,
        e: DagManagerError,
    ) -> None:
        """A spec the operator cannot follow: say so, change nothing else (no traffic moves)."""
        state = sentinel_status.state_of(old)
        new = sentinel_status.render(
            old,
            state,
            generation=generation,
            sentinel_id=str(old.get("sentinelId") or ""),
            transitions=[],
            now=self.clock.now(),
            last_action=old.get("lastAction"),
            held_by=old.get("heldBy"),
            aborted_by=old.get("abortedBy"),
            error=(e.reason, e.message),
        )
        if not sentinel_status.same(old, new):
            patch.status.update(new)
            self._written[str(body.metadata.uid)] = new
            kopf.warn(body, reason=e.reason, message=e.message)


class _Run:
    """One reconcile's working state: the rollout state and the transitions applied to it."""

    def __init__(
        self,
        vs: SentinelSpec,
        state: canary.State,
        now: float,
        old: dict[str, Any],
        metrics: Metrics,
    ) -> None:
        self.vs, self.state, self.now, self.old, self.metrics = vs, state, now, old, metrics
        self.transitions: list[canary.Transition] = []
        self.held_by: str | None = old.get("heldBy")
        self.aborted_by: str | None = old.get("abortedBy")
        self.last_action: str | None = old.get("lastAction")

    def do(self, event: Event) -> bool:
        t = canary.apply(self.vs.rollout, self.state, event, self.now)
        if t is None:
            return False
        self.transitions.append(t)
        self.state = t.after
        self.metrics.canary_transitions.labels(event.value, t.after.phase.value).inc()
        return True

    def manual(self, body: kopf.Body, action: tuple[str, str] | None) -> None:
        """An action annotation (once per distinct value), then the spec's fields."""
        if action is not None and action[1] != self.last_action:
            self.last_action = action[1]
            if self.do(ACTION_EVENTS[action[0]]):
                if action[0] == "pause":
                    self.held_by = "annotation"
                if action[0] == "abort":
                    self.aborted_by = "annotation"
            else:
                kopf.warn(
                    body,
                    reason="ActionIgnored",
                    message=f"{action[0]} does nothing in phase {self.state.phase.value}",
                )
        vs = self.vs
        if vs.abort:
            if self.do(Event.ABORT):
                self.aborted_by = "spec"
        elif self.state.phase is Phase.ABORTED and self.aborted_by == "spec":
            self.do(Event.RETRY)  # abort set back to false: start over
        if vs.promote:
            self.do(Event.PROMOTE)
        if vs.paused:
            if self.do(Event.PAUSE):
                self.held_by = "spec"
        elif self.state.held and self.held_by == "spec":
            self.do(Event.RESUME)
