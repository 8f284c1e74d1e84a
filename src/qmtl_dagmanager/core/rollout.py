"""A VersionSentinel's rollout decisions apart from their effects (pure): the spec as a
value, and one reconcile's working state, which applies manual actions (an annotation,
then the spec's fields) as events of the canary state machine and collects the
transitions and the notices to report."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmtl_dagmanager.core import canary
from qmtl_dagmanager.core.canary import Event, Phase
from qmtl_dagmanager.core.errors import Conflict
from qmtl_dagmanager.core.plan import sentinel_id

ACTION_EVENTS = {
    "promote": Event.PROMOTE,
    "abort": Event.ABORT,
    "retry": Event.RETRY,
    "pause": Event.PAUSE,
    "resume": Event.RESUME,
    "rollback": Event.ROLLBACK,
}


HALTED_EVENTS = frozenset({Event.STEP_DONE, Event.PROMOTE})


@dataclass(frozen=True)
class SentinelSpec:
    """What a VersionSentinel asks for, checked (the CRD model parses bodies into this)."""

    strategy_id: str
    version: str
    rollout: canary.Rollout
    strategy_ref: str = ""  # the StrategyDAG (same namespace) that runs this version
    world_id: str = ""
    commit_hash: str = ""
    release_tag: str = ""
    stable_version: str = ""
    prometheus_url: str = ""
    paused: bool = False
    promote: bool = False
    abort: bool = False

    @property
    def sentinel_id(self) -> str:
        return sentinel_id(self.strategy_id)


@dataclass(frozen=True, slots=True)
class Notice:
    """Something to tell the resource's readers (an event) beyond the transitions."""

    warning: bool
    reason: str
    message: str


@dataclass
class Run:
    """One reconcile's working state: the rollout state and what was applied to it."""

    spec: SentinelSpec
    state: canary.State
    now: float
    old: dict[str, Any]
    transitions: list[canary.Transition] = field(default_factory=list)
    notices: list[Notice] = field(default_factory=list)
    held_by: str | None = None
    aborted_by: str | None = None
    last_action: str | None = None
    halted: str | None = None  # why steps and promotion are held back (a cross-context hit)

    @classmethod
    def start(cls, spec: SentinelSpec, state: canary.State, now: float, old: dict[str, Any]) -> Run:
        return cls(
            spec,
            state,
            now,
            old,
            held_by=old.get("heldBy"),
            aborted_by=old.get("abortedBy"),
            last_action=old.get("lastAction"),
        )

    def halt(self, hits: int) -> None:
        """Hold steps and promotion back: `hits` nodes were refused as cross-context reuses
        within the analysis window (0: nothing to hold back)."""
        if hits <= 0:
            return
        window = self.spec.rollout.analysis_window
        self.halted = (
            f"{hits} node(s) refused as cross-context reuses in the last {window:g} s: "
            "no step or promotion until none is recorded within the analysis window"
        )

    def do(self, event: Event) -> bool:
        """Apply `event`; False when the state machine ignores it in this state, or when a
        halt holds a step or a promotion back."""
        if self.halted is not None and event in HALTED_EVENTS:
            return False
        t = canary.apply(self.spec.rollout, self.state, event, self.now)
        if t is None:
            return False
        self.transitions.append(t)
        self.state = t.after
        return True

    def manual(self, action: tuple[str, str] | None) -> None:
        """An action annotation (once per distinct value), then the spec's fields."""
        if action is not None and action[1] != self.last_action:
            self.last_action = action[1]
            if self.do(ACTION_EVENTS[action[0]]):
                if action[0] == "pause":
                    self.held_by = "annotation"
                if action[0] == "abort":
                    self.aborted_by = "annotation"
            elif self.halted is not None and ACTION_EVENTS[action[0]] in HALTED_EVENTS:
                self.notices.append(
                    Notice(True, "ActionHalted", f"{action[0]} refused: {self.halted}")
                )
            else:
                self.notices.append(
                    Notice(
                        True,
                        "ActionIgnored",
                        f"{action[0]} does nothing in phase {self.state.phase.value}",
                    )
                )
        vs = self.spec
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

    def tick(self) -> None:
        """Let time advance at most one step (after starts, actions and gates)."""
        event = canary.due(self.spec.rollout, self.state, self.now)
        if event is not None:
            self.do(event)

    def needs_start(self, generation: int) -> bool:
        """Whether to look for the version's StrategyDAG and link its sentinel node: before
        the rollout starts, and again after a spec change."""
        return self.state.phase is Phase.PENDING or generation != self.old.get("observedGeneration")

    def retirements(self) -> list[tuple[str, bool]]:
        """The versions this reconcile's transitions retire (True) or bring back (False),
        restores first: the canary when it is aborted or rolled back (back on a retry), the stable
        version once the canary is promoted and no rollback to it is possible any more (at
        promotion without a rollback window, else when the window closes)."""
        canary_v, stable_v = self.spec.version, self.spec.stable_version
        out: list[tuple[str, bool]] = []
        for t in self.transitions:
            after, before = t.after.phase, t.before.phase
            if after in (Phase.ABORTED, Phase.ROLLED_BACK) and before is not after:
                out.append((canary_v, True))
                if stable_v and before is Phase.PROMOTED:
                    out.append((stable_v, False))
            elif before in (Phase.ABORTED, Phase.ROLLED_BACK) and after is not before:
                out.append((canary_v, False))
            if stable_v and after is Phase.PROMOTED and t.after.window_until is None:
                out.append((stable_v, True))
        final = dict(out)  # the last change of each version wins
        # versions back in service first: a version retired next shares nothing with them
        return sorted(final.items(), key=lambda vr: vr[1])

    def weight_to_publish(self) -> int | None:
        """The weight whose effects (graph, ControlBus) are due: whenever it differs from
        the published one, and on the first step out of Pending. None: nothing to do."""
        if self.state.phase is Phase.PENDING:
            return None
        published = self.old.get("currentWeight")
        if (
            published is None
            or int(published) != self.state.weight
            or self.old.get("phase") in (None, "Pending")
        ):
            return self.state.weight
        return None


def rollback_target(
    weights: Mapping[str, float], histories: Mapping[str, Sequence[tuple[float, float]]]
) -> tuple[str, str]:
    """(current, previous) for a rollback of one sentinel: the version with the most traffic
    now, and the other version that took traffic most recently (its last positive weight).
    Conflict when no version takes traffic or none took it before."""
    live = {v: w for v, w in weights.items() if w > 0}
    if not live:
        raise Conflict("no version of this sentinel takes traffic: nothing to roll back from")
    current = max(live, key=lambda v: (live[v], v))
    last_positive = {
        v: max(when for when, w in h if w > 0)
        for v, h in histories.items()
        if v != current and any(w > 0 for _, w in h)
    }
    if not last_positive:
        raise Conflict(f"no version before {current} took traffic: nothing to roll back to")
    previous = max(last_positive, key=lambda v: (last_positive[v], v))
    return current, previous
