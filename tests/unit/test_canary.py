"""The canary state machine: scenarios with fast-forwarded time, and a Hypothesis state
machine over random events and clock jumps checking the rollout's invariants."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from qmtl_dagmanager.core import canary
from qmtl_dagmanager.core.canary import Event, Gate, Phase, Rollout, State, Step

R = Rollout((Step(10, 30.0), Step(50, 60.0), Step(100, 0.0)), rollback_window=600.0)


def run(r: Rollout, s: State, event: Event, now: float) -> State:
    t = canary.apply(r, s, event, now)
    assert t is not None, f"{event} did nothing in {s.phase}"
    return t.after


def tick(r: Rollout, s: State, now: float) -> State:
    event = canary.due(r, s, now)
    return s if event is None else run(r, s, event, now)


def test_steps_advance_after_their_pauses_then_promote() -> None:
    s = run(R, State(), Event.START, 0)
    assert (s.phase, s.step, s.weight, s.pause_until) == (Phase.PROGRESSING, 0, 10, 30)
    assert tick(R, s, 29.9) == s  # not yet
    s = tick(R, s, 30)
    assert (s.step, s.weight, s.pause_until) == (1, 50, 90)
    s = tick(R, s, 500)  # late: still exactly one step
    assert (s.step, s.weight) == (2, 100)
    s = tick(R, s, 500)  # the last step's pause (0) is over: promoted
    assert (s.phase, s.weight, s.window_until, s.reason) == (
        Phase.PROMOTED,
        100,
        1100,
        "StepsCompleted",
    )
    s = tick(R, s, 1100)
    assert s.window_until is None and s.reason == "RollbackWindowClosed"
    assert canary.apply(R, s, Event.ROLLBACK, 1200) is None  # too late


def test_abort_returns_traffic_to_stable_and_retry_starts_over() -> None:
    s = tick(R, run(R, State(), Event.START, 0), 30)
    assert s.weight == 50
    s = run(R, s, Event.ABORT, 40)
    assert (s.phase, s.weight, s.reason) == (Phase.ABORTED, 0, "Aborted")
    assert canary.apply(R, s, Event.PROMOTE, 41) is None  # promotion needs a retry first
    s = run(R, s, Event.RETRY, 50)
    assert (s.phase, s.step, s.weight, s.pause_until) == (Phase.PROGRESSING, 0, 10, 80)


def test_rollback_within_the_window() -> None:
    s = run(R, run(R, State(), Event.START, 0), Event.PROMOTE, 5)
    assert (s.phase, s.weight) == (Phase.PROMOTED, 100)
    s = run(R, s, Event.ROLLBACK, 10)
    assert (s.phase, s.weight, s.reason) == (Phase.ROLLED_BACK, 0, "RolledBack")


def test_hold_keeps_the_remaining_pause() -> None:
    s = run(R, run(R, State(), Event.START, 0), Event.PAUSE, 20)
    assert (s.phase, s.held, s.remaining, s.pause_until) == (Phase.PAUSED, True, 10, None)
    assert tick(R, s, 1000) == s  # a hold never advances by itself
    s = run(R, s, Event.RESUME, 1000)
    assert (s.phase, s.step, s.pause_until) == (Phase.PROGRESSING, 0, 1010)


def test_an_indefinite_pause_waits_for_resume() -> None:
    r = Rollout((Step(20, None), Step(100, 0)))
    s = run(r, State(), Event.START, 0)
    assert (s.phase, s.weight) == (Phase.PAUSED, 20)
    assert tick(r, s, 10**6) == s
    s = run(r, s, Event.RESUME, 10)
    assert (s.phase, s.step, s.weight) == (Phase.PROGRESSING, 1, 100)


def test_gates_hold_a_step_and_a_failure_rolls_back() -> None:
    gate = Gate("errors", "rate(errors[1m])", 0.05, below=True, interval=10, failure_limit=1)
    r = Rollout((Step(10, 5.0), Step(100, 0)), (gate,))
    s = run(r, State(), Event.START, 0)
    assert canary.gates_due(r, s, 0) == [gate]
    assert canary.due(r, s, 6) is None  # pause over, but the gate has not passed yet
    s = canary.record(r, s, {"errors": 0.01}, 6)
    assert canary.gates_due(r, s, 10) == [] and canary.gates_due(r, s, 16) == [gate]
    assert canary.due(r, s, 6) is Event.STEP_DONE
    s = run(r, s, Event.STEP_DONE, 6)
    s = canary.record(r, s, {"errors": 0.2}, 16)  # one failure is tolerated (limit 1)
    assert not canary.gates_failed(r, s)
    s = canary.record(r, s, {"errors": None}, 26)  # unreadable counts as a failure
    assert canary.gates_failed(r, s)
    s = run(r, s, Event.GATE_FAILED, 26)
    assert (s.phase, s.weight, s.reason) == (Phase.ROLLED_BACK, 0, "AnalysisFailed")
    assert "errors" in s.message


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(90, 90.0), ("90", 90.0), ("30s", 30.0), ("5m", 300.0), ("1h30m", 5400.0), ("250ms", 0.25)],
)
def test_durations(value: object, seconds: float) -> None:
    assert canary.parse_duration(value, "x") == seconds


class RolloutMachine(RuleBasedStateMachine):
    """Random events and clock jumps; after each, the rollout's invariants hold."""

    def __init__(self) -> None:
        super().__init__()
        gate = Gate("g", "q", 1.0, interval=5, failure_limit=1)
        self.r = Rollout((Step(5, 10), Step(25, None), Step(60, 3), Step(90, 0)), (gate,), 50)
        self.s = State()
        self.now = 0.0
        self.visited: list[int] = []

    def _do(self, event: Event) -> None:
        before = self.s
        t = canary.apply(self.r, self.s, event, self.now)
        if t is None:
            return
        self.s = t.after
        if self.s.step != before.step or event in (Event.START, Event.RETRY):
            self.visited.append(self.s.step)
        if event in (Event.ABORT, Event.GATE_FAILED):
            assert self.s.weight == 0
        if event is Event.PROMOTE:
            assert (self.s.phase, self.s.weight) == (Phase.PROMOTED, 100)

    @rule(dt=st.floats(0, 30))
    def time_passes(self, dt: float) -> None:
        self.now += dt
        event = canary.due(self.r, self.s, self.now)
        if event is not None:
            self._do(event)

    @rule(value=st.none() | st.floats(0, 2))
    def measure(self, value: float | None) -> None:
        due = canary.gates_due(self.r, self.s, self.now)
        if due:
            self.s = canary.record(self.r, self.s, {g.name: value for g in due}, self.now)
            if canary.gates_failed(self.r, self.s):
                self._do(Event.GATE_FAILED)

    @rule(event=st.sampled_from(list(Event)))
    def event(self, event: Event) -> None:
        if event is Event.GATE_FAILED and not canary.gates_failed(self.r, self.s):
            return
        if event is Event.STEP_DONE and canary.due(self.r, self.s, self.now) is not event:
            return
        self._do(event)

    @invariant()
    def weight_in_range(self) -> None:
        assert 0 <= self.s.weight <= 100

    @invariant()
    def weight_matches_the_phase(self) -> None:
        if self.s.phase in (Phase.ABORTED, Phase.ROLLED_BACK):
            assert self.s.weight == 0
        elif self.s.phase is Phase.PROMOTED:
            assert self.s.weight == 100
        elif self.s.phase in (Phase.PROGRESSING, Phase.PAUSED):
            assert self.s.weight == self.r.steps[self.s.step].weight

    @precondition(lambda self: len(self.visited) > 1)
    @invariant()
    def no_step_skipped_or_repeated(self) -> None:
        for a, b in zip(self.visited, self.visited[1:], strict=False):
            assert b == a + 1 or b == 0, self.visited  # forward by one, or a retry from 0


TestRolloutMachine = RolloutMachine.TestCase
TestRolloutMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
