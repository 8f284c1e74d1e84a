"""The VersionSentinel rollout use case: from the spec, the last status and the time, decide
and perform one reconcile of a canary rollout, and return the status and events to record.

Order within a reconcile: manual actions (annotation, then spec fields); the start, once
the version's StrategyDAG is Ready (its sentinel node linked to its nodes, again after a
spec change); the analysis gates that are due; at most one step of time; then the effects
of any weight change (graph, ControlBus, metrics). The status is written by the caller
after the effects, so a crash in between repeats effects, which are idempotent."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from qmtl_dagmanager.core import canary, sentinel_status
from qmtl_dagmanager.core.canary import Event, Phase
from qmtl_dagmanager.core.conditions import same
from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.core.rollout import Notice, Run, SentinelSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Clock, StrategyReadiness
from qmtl_dagmanager.services.canary import CanaryService, Versions

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RolloutOutcome:
    """What to record: the new status (None: unchanged, write nothing) and the events, the
    transitions' first."""

    status: dict[str, Any] | None
    notices: list[Notice] = field(default_factory=list)
    transitions: list[canary.Transition] = field(default_factory=list)


@dataclass
class RolloutService:
    effects: CanaryService  # weights, links and gate measurements
    readiness: StrategyReadiness
    clock: Clock
    metrics: Metrics

    async def reconcile(
        self,
        spec: SentinelSpec,
        old: Mapping[str, Any],
        generation: int,
        namespace: str,
        action: tuple[str, str] | None = None,
        name: str = "",
    ) -> RolloutOutcome:
        """One reconcile. An `InvalidSpec` found on the way is reported in the status (no
        traffic moves); other errors (a dependency down) are raised for a retry."""
        before = dict(old)
        run = Run.start(spec, sentinel_status.state_of(before), self.clock.now(), before)
        if run.state.phase in (Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED):
            run.halt(await self.effects.cross_context_hits(spec.rollout.analysis_window))
            self._note_halt(run, before, namespace, name)
        run.manual(action)
        try:
            await self._advance(run, namespace, generation)
        except InvalidSpec as e:
            return self.refuse(before, generation, e)
        for t in run.transitions:
            self.metrics.canary_transitions.labels(t.event.value, t.after.phase.value).inc()
        new = sentinel_status.render(
            before,
            run.state,
            generation=generation,
            sentinel_id=spec.sentinel_id,
            transitions=run.transitions,
            now=run.now,
            last_action=run.last_action,
            held_by=run.held_by,
            aborted_by=run.aborted_by,
            halted=run.halted,
        )
        notices = [*(self._announce(t, namespace, name) for t in run.transitions), *run.notices]
        return RolloutOutcome(None if same(before, new) else new, notices, run.transitions)

    def refuse(
        self, old: Mapping[str, Any], generation: int, error: DagManagerError
    ) -> RolloutOutcome:
        """A spec the operator cannot follow: say so in the status, change nothing else."""
        before = dict(old)
        new = sentinel_status.render(
            before,
            sentinel_status.state_of(before),
            generation=generation,
            sentinel_id=str(before.get("sentinelId") or ""),
            transitions=[],
            now=self.clock.now(),
            last_action=before.get("lastAction"),
            held_by=before.get("heldBy"),
            aborted_by=before.get("abortedBy"),
            error=(error.reason, error.message),
        )
        if same(before, new):
            return RolloutOutcome(None)
        return RolloutOutcome(new, [Notice(True, error.reason, error.message)])

    async def _advance(self, run: Run, namespace: str, generation: int) -> None:
        vs, r = run.spec, run.spec.rollout
        versions = Versions(vs.sentinel_id, vs.world_id, vs.version, vs.stable_version)
        if run.needs_start(generation):
            strategy = (
                await self.readiness.ready(namespace, vs.strategy_ref) if vs.strategy_ref else ""
            )
            if strategy is not None:
                await self.effects.link(versions, strategy, vs.commit_hash, vs.release_tag)
                run.do(Event.START)
        due = canary.gates_due(r, run.state, run.now)
        if due:
            measured = await self.effects.measure(due, vs.prometheus_url)
            run.state = canary.record(r, run.state, measured, run.now)
            if canary.gates_failed(r, run.state):
                run.do(Event.GATE_FAILED)
        run.tick()
        weight = run.weight_to_publish()
        if weight is not None:
            await self.effects.shift(versions, weight)
        for version, retired in run.retirements():
            topics = await self.effects.retire(versions, version, retired)
            if retired:
                run.notices.append(
                    Notice(
                        False,
                        "VersionRetired",
                        f"version {version} retired: {len(topics)} queue(s) only it used are "
                        "kept as sentinel queues for a rollback",
                    )
                )

    def _note_halt(self, run: Run, before: Mapping[str, Any], namespace: str, name: str) -> None:
        """An event, a log line and a metric when a halt starts or ends."""
        was = any(
            c.get("type") == "Halted" and c.get("status") == "True"
            for c in before.get("conditions") or []
        )
        if (run.halted is not None) == was:
            return
        if run.halted is not None:
            log.warning("%s/%s halted: %s", namespace, name, run.halted)
            run.notices.append(Notice(True, "CrossContextHit", f"halted: {run.halted}"))
        else:
            message = "no cross-context hit within the analysis window: the rollout goes on"
            log.info("%s/%s %s", namespace, name, message)
            run.notices.append(Notice(False, "CrossContextClear", message))
        self.metrics.canary_halts.labels("halted" if run.halted else "cleared").inc()

    @staticmethod
    def _announce(t: canary.Transition, namespace: str, name: str) -> Notice:
        message = (
            f"{t.event.value}: {t.before.phase.value} → {t.after.phase.value}, "
            f"weight {t.before.weight} → {t.after.weight}. {t.after.message}"
        )
        log.info("%s/%s %s", namespace, name, message)
        failed = t.after.phase in (Phase.ABORTED, Phase.ROLLED_BACK)
        return Notice(failed, t.after.reason, message)
