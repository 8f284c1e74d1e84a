"""A VersionSentinel's status ↔ the core's rollout state (pure functions). The status is the
only place runtime state lives, so an operator restart continues from exactly it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qmtl_dagmanager.core.canary import GateState, Phase, State, Transition
from qmtl_dagmanager.core.conditions import conditions, epoch, iso

HISTORY_LIMIT = 50


def state_of(status: Mapping[str, Any] | None) -> State:
    st = status or {}
    try:
        phase = Phase(st.get("phase") or Phase.PENDING)
    except ValueError:
        phase = Phase.PENDING
    gates = {
        str(name): GateState(
            failures=int(g.get("failures") or 0),
            measured_at=epoch(g.get("measuredAt")),
            passed_at=epoch(g.get("passedAt")),
            last_value=None if g.get("lastValue") is None else float(g["lastValue"]),
        )
        for name, g in (st.get("gates") or {}).items()
        if isinstance(g, Mapping)
    }
    remaining = st.get("heldRemainingSeconds")
    return State(
        phase=phase,
        step=int(st.get("currentStep", -1)),
        weight=int(st.get("currentWeight") or 0),
        step_started=epoch(st.get("stepStartedAt")),
        pause_until=epoch(st.get("pauseUntil")),
        held=bool(st.get("held", False)),
        remaining=None if remaining is None else float(remaining),
        window_until=epoch(st.get("rollbackWindowEndsAt")),
        reason=str(st.get("reason") or "Created"),
        message=str(st.get("message") or ""),
        gates=gates,
    )


def render(
    old: Mapping[str, Any] | None,
    state: State,
    *,
    generation: int,
    sentinel_id: str,
    transitions: Sequence[Transition],
    now: float,
    last_action: str | None,
    held_by: str | None,
    aborted_by: str | None,
    error: tuple[str, str] | None = None,
    halted: str | None = None,
) -> dict[str, Any]:
    """The status for `state`; the history grows by one entry per transition."""
    before = dict(old or {})
    stamp = iso(now) or ""
    history = list(before.get("history") or [])
    for t in transitions:
        history.append(
            {
                "time": stamp,
                "weight": t.after.weight,
                "step": t.after.step,
                "phase": t.after.phase.value,
                "reason": t.after.reason,
            }
        )
    changed_weight = any(t.weight_changed for t in transitions)
    running = state.phase in (Phase.PENDING, Phase.PROGRESSING, Phase.PAUSED)
    failed = state.phase in (Phase.ABORTED, Phase.ROLLED_BACK)
    if error is not None:
        degraded = (True, error[0], error[1])
    else:
        degraded = (failed, state.reason if failed else "AsExpected", state.message)
    kinds = {
        "Progressing": (running, state.reason, state.message),
        "Promoted": (state.phase is Phase.PROMOTED, state.reason, state.message),
        "Degraded": degraded,
        "Halted": (
            halted is not None,
            "CrossContextHit" if halted is not None else "AsExpected",
            halted or "no cross-context hit within the analysis window",
        ),
    }
    out: dict[str, Any] = {
        "observedGeneration": generation,
        "phase": state.phase.value,
        "reason": state.reason,
        "currentStep": state.step,
        "currentWeight": state.weight,
        "stableWeight": 100 - state.weight,
        "conditions": conditions(before, stamp, generation, kinds),
        "sentinelId": sentinel_id,
        "message": state.message,
        "stepStartedAt": iso(state.step_started),
        "pauseUntil": iso(state.pause_until),
        "heldRemainingSeconds": state.remaining,
        "held": state.held,
        "heldBy": held_by if state.held else None,
        "abortedBy": aborted_by if state.phase is Phase.ABORTED else None,
        "rollbackWindowEndsAt": iso(state.window_until),
        "gates": {
            name: {
                "failures": g.failures,
                "measuredAt": iso(g.measured_at),
                "passedAt": iso(g.passed_at),
                "lastValue": g.last_value,
            }
            for name, g in sorted(state.gates.items())
        },
        "lastAction": last_action,
        "lastWeightChangeTime": stamp if changed_weight else before.get("lastWeightChangeTime"),
        "history": history[-HISTORY_LIMIT:],
    }
    return out
