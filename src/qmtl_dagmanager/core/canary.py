"""Canary rollouts between two versions of a strategy: a pure state machine.

The canary version's traffic weight (percent, always in [0, 100]; the stable version gets the
rest) moves through the rollout's steps. Each step applies its weight, then waits its pause
(or, for an indefinite pause, a promotion or resume) and for every analysis gate to have
passed during the step. A failing gate rolls all traffic back to the stable version; an abort
does the same; a promotion gives the canary 100 and keeps the stable version warm at 0 for the
rollback window. Time is passed in; nothing here reads a clock. One event advances at most one
step, so no step is skipped or repeated, and a state restored after a restart continues with
the same step and the same pause deadline.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

from qmtl_dagmanager.core.errors import InvalidSpec

MAX_STEPS = 50


class Phase(StrEnum):
    PENDING = "Pending"
    PROGRESSING = "Progressing"
    PAUSED = "Paused"
    PROMOTED = "Promoted"
    ABORTED = "Aborted"
    ROLLED_BACK = "RolledBack"


class Event(StrEnum):
    START = "Start"  # the version is ready to take traffic
    STEP_DONE = "StepDone"  # the step's pause elapsed and its gates passed
    GATE_FAILED = "GateFailed"
    PROMOTE = "Promote"
    ABORT = "Abort"
    RETRY = "Retry"
    PAUSE = "Pause"  # a manual hold
    RESUME = "Resume"  # end a hold, or leave an indefinite pause
    ROLLBACK = "Rollback"  # after promotion, within the rollback window
    WINDOW_CLOSED = "WindowClosed"


@dataclass(frozen=True, slots=True)
class Step:
    weight: int  # percent of traffic for the canary, 0..100
    pause: float | None  # seconds; None waits for a promotion or resume


@dataclass(frozen=True, slots=True)
class Gate:
    """A Prometheus query whose value must stay on the right side of a threshold."""

    name: str
    query: str
    threshold: float
    below: bool = True  # pass when value <= threshold (else when value >= threshold)
    interval: float = 30.0
    failure_limit: int = 0  # consecutive failed measurements tolerated

    def passes(self, value: float | None) -> bool:
        """An unreadable value (None) is a failed measurement."""
        if value is None or math.isnan(value):
            return False
        return value <= self.threshold if self.below else value >= self.threshold


@dataclass(frozen=True, slots=True)
class Rollout:
    steps: tuple[Step, ...]
    gates: tuple[Gate, ...] = ()
    rollback_window: float = 0.0
    # a cross-context hit recorded within this many seconds halts steps and promotion
    analysis_window: float = 600.0


@dataclass(frozen=True, slots=True)
class GateState:
    failures: int = 0  # consecutive
    measured_at: float | None = None
    passed_at: float | None = None
    last_value: float | None = None


@dataclass(frozen=True, slots=True)
class State:
    phase: Phase = Phase.PENDING
    step: int = -1  # index of the current step; -1 before the start
    weight: int = 0  # the canary's percent
    step_started: float | None = None
    pause_until: float | None = None  # deadline of the current step's pause
    held: bool = False  # paused by hand; `remaining` is the pause left when held
    remaining: float | None = None
    window_until: float | None = None  # end of the rollback window after promotion
    reason: str = "Created"
    message: str = "waiting for the version to be ready"
    gates: Mapping[str, GateState] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Transition:
    event: Event
    before: State
    after: State

    @property
    def weight_changed(self) -> bool:
        return self.before.weight != self.after.weight


# --------------------------------------------------------------------------- transitions


def _enter(r: Rollout, s: State, i: int, now: float, reason: str) -> State:
    step = r.steps[i]
    indefinite = step.pause is None
    return dataclasses.replace(
        s,
        phase=Phase.PAUSED if indefinite else Phase.PROGRESSING,
        step=i,
        weight=step.weight,
        step_started=now,
        pause_until=None if step.pause is None else now + step.pause,
        held=False,
        remaining=None,
        window_until=None,
        reason=reason,
        message=f"step {i + 1}/{len(r.steps)}: weight {step.weight}"
        + (", waiting for promotion or resume" if indefinite else f", pause {step.pause:g} s"),
    )


def _start(r: Rollout, s: State, now: float) -> State:
    return _enter(r, dataclasses.replace(s, gates={}), 0, now, "Started")


def _next(r: Rollout, s: State, now: float) -> State:
    if s.step + 1 < len(r.steps):
        return _enter(r, s, s.step + 1, now, "StepAdvanced")
    return _promote(r, s, now, "StepsCompleted")


def _promote(r: Rollout, s: State, now: float, reason: str = "Promoted") -> State:
    return dataclasses.replace(
        s,
        phase=Phase.PROMOTED,
        weight=100,
        pause_until=None,
        held=False,
        remaining=None,
        window_until=now + r.rollback_window if r.rollback_window > 0 else None,
        reason=reason,
        message="the canary takes all traffic"
        + (
            f"; the stable version stays warm at 0 for {r.rollback_window:g} s"
            if r.rollback_window > 0
            else ""
        ),
    )


def _to_stable(s: State, phase: Phase, reason: str, message: str) -> State:
    return dataclasses.replace(
        s,
        phase=phase,
        weight=0,
        pause_until=None,
        held=False,
        remaining=None,
        window_until=None,
        reason=reason,
        message=message,
    )


def _abort(r: Rollout, s: State, now: float) -> State:
    return _to_stable(s, Phase.ABORTED, "Aborted", "aborted: all traffic back to stable")


def _gate_failed(r: Rollout, s: State, now: float) -> State:
    failed = sorted(n for n, g in s.gates.items() if _over_limit(r, n, g))
    return _to_stable(
        s,
        Phase.ROLLED_BACK,
        "AnalysisFailed",
        f"analysis gate(s) {', '.join(failed) or '?'} failed: all traffic back to stable",
    )


def _rollback(r: Rollout, s: State, now: float) -> State:
    if s.window_until is None or now >= s.window_until:
        return s  # the window has closed: nothing to roll back to
    return _to_stable(s, Phase.ROLLED_BACK, "RolledBack", "rolled back to the stable version")


def _retry(r: Rollout, s: State, now: float) -> State:
    return _enter(r, dataclasses.replace(s, gates={}), 0, now, "Retried")


def _hold(r: Rollout, s: State, now: float) -> State:
    left = None if s.pause_until is None else max(0.0, s.pause_until - now)
    return dataclasses.replace(
        s,
        phase=Phase.PAUSED,
        held=True,
        remaining=left,
        pause_until=None,
        reason="PausedByUser",
        message=f"held at step {s.step + 1}"
        + (f" with {left:g} s of pause left" if left is not None else ""),
    )


def _resume(r: Rollout, s: State, now: float) -> State:
    if not s.held:  # an indefinite pause: go on to the next step
        return _next(r, s, now)
    if s.remaining is None:
        return dataclasses.replace(s, held=False, reason="Resumed")
    return dataclasses.replace(
        s,
        phase=Phase.PROGRESSING,
        held=False,
        pause_until=now + s.remaining,
        remaining=None,
        reason="Resumed",
        message=f"step {s.step + 1}/{len(r.steps)}: weight {s.weight}, "
        f"{s.remaining:g} s of pause left",
    )


def _window_closed(r: Rollout, s: State, now: float) -> State:
    return dataclasses.replace(
        s,
        window_until=None,
        reason="RollbackWindowClosed",
        message="promoted; the rollback window has closed",
    )


Handler = Callable[[Rollout, State, float], State]
P, E = Phase, Event
# (phase, event) → the transition; any pair not listed leaves the state as it is.
TABLE: Mapping[tuple[Phase, Event], Handler] = {
    (P.PENDING, E.START): _start,
    (P.PENDING, E.PROMOTE): _promote,
    (P.PENDING, E.ABORT): _abort,
    (P.PROGRESSING, E.STEP_DONE): _next,
    (P.PROGRESSING, E.GATE_FAILED): _gate_failed,
    (P.PROGRESSING, E.PROMOTE): _promote,
    (P.PROGRESSING, E.ABORT): _abort,
    (P.PROGRESSING, E.PAUSE): _hold,
    (P.PAUSED, E.RESUME): _resume,
    (P.PAUSED, E.GATE_FAILED): _gate_failed,
    (P.PAUSED, E.PROMOTE): _promote,
    (P.PAUSED, E.ABORT): _abort,
    (P.PROMOTED, E.ROLLBACK): _rollback,
    (P.PROMOTED, E.WINDOW_CLOSED): _window_closed,
    (P.ABORTED, E.RETRY): _retry,
    (P.ROLLED_BACK, E.RETRY): _retry,
}


def apply(r: Rollout, s: State, event: Event, now: float) -> Transition | None:
    """The transition `event` causes now, or None when the table has none for the phase."""
    handler = TABLE.get((s.phase, event))
    if handler is None:
        return None
    after = handler(r, s, now)
    return None if after == s else Transition(event, s, after)


# --------------------------------------------------------------------------- time and gates


def _over_limit(r: Rollout, name: str, g: GateState) -> bool:
    gate = next((x for x in r.gates if x.name == name), None)
    return gate is not None and g.failures > gate.failure_limit


def gates_due(r: Rollout, s: State, now: float) -> list[Gate]:
    """Gates to measure now: only while a step is running, each at its interval."""
    if s.phase not in (Phase.PROGRESSING, Phase.PAUSED):
        return []
    out = []
    for gate in r.gates:
        g = s.gates.get(gate.name, GateState())
        if g.measured_at is None or now - g.measured_at >= gate.interval:
            out.append(gate)
    return out


def record(r: Rollout, s: State, measured: Mapping[str, float | None], now: float) -> State:
    """Fold measurements (None: unreadable) into the gates' states."""
    gates = dict(s.gates)
    for gate in r.gates:
        if gate.name not in measured:
            continue
        value = measured[gate.name]
        g = gates.get(gate.name, GateState())
        ok = gate.passes(value)
        gates[gate.name] = GateState(
            failures=0 if ok else g.failures + 1,
            measured_at=now,
            passed_at=now if ok else g.passed_at,
            last_value=value,
        )
    return dataclasses.replace(s, gates=gates)


def gates_failed(r: Rollout, s: State) -> bool:
    return any(_over_limit(r, n, g) for n, g in s.gates.items())


def gates_passed(r: Rollout, s: State) -> bool:
    """Every gate passed at least once during the current step, and its last measurement."""
    start = s.step_started if s.step_started is not None else math.inf
    for gate in r.gates:
        g = s.gates.get(gate.name)
        if g is None or g.passed_at is None or g.passed_at < start or g.failures > 0:
            return False
    return True


def due(r: Rollout, s: State, now: float) -> Event | None:
    """The event time brings now: a finished step, or the end of the rollback window."""
    if s.phase is Phase.PROGRESSING and s.pause_until is not None and now >= s.pause_until:
        return Event.STEP_DONE if gates_passed(r, s) else None
    if s.phase is Phase.PROMOTED and s.window_until is not None and now >= s.window_until:
        return Event.WINDOW_CLOSED
    return None


def wake_at(r: Rollout, s: State) -> float | None:
    """When something will next be due (the driver may sleep until then)."""
    times = [t for t in (s.pause_until, s.window_until) if t is not None]
    if s.phase in (Phase.PROGRESSING, Phase.PAUSED):
        for gate in r.gates:
            g = s.gates.get(gate.name, GateState())
            times.append((g.measured_at or 0.0) + gate.interval)
    return min(times) if times else None


# --------------------------------------------------------------------------- parsing

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(value: object, where: str) -> float:
    """`90`, `"90"`, `"30s"`, `"5m"`, `"1h30m"`, `"250ms"` → seconds."""
    if isinstance(value, bool):
        raise InvalidSpec(f"{where}: {value!r} is not a duration", reason="InvalidDuration")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = str(value).strip()
        try:
            seconds = float(text)
        except ValueError:
            parts = _DURATION.findall(text)
            if not parts or "".join(n + u for n, u in parts) != text:
                raise InvalidSpec(
                    f"{where}: {value!r} is not a duration (e.g. 30s, 5m, 1h30m)",
                    reason="InvalidDuration",
                ) from None
            seconds = sum(float(n) * _UNIT[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise InvalidSpec(
            f"{where}: {value!r} must be a non-negative duration", reason="InvalidDuration"
        )
    return seconds
