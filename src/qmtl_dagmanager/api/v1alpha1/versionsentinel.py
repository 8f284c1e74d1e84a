"""VersionSentinel (qmtl.io/v1alpha1): a canary rollout between two versions of a strategy.

The models below are the single declaration of the kind's fields: `make crds` generates the
CRD from them and `parse_spec` reads a body into the core's SentinelSpec with them; the
checks no schema can state (durations, unique gate names, the stable version differing from
the canary) are made here too, each naming its field.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from qmtl_dagmanager.api import fields
from qmtl_dagmanager.api.crd import Condition, Kind
from qmtl_dagmanager.api.fields import Free, IntOrString, field
from qmtl_dagmanager.api.v1alpha1 import API_VERSION, GROUP, VERSION
from qmtl_dagmanager.core import canary
from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.core.rollout import ACTION_EVENTS, SentinelSpec

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "crd", "parse_spec"]

KIND = "VersionSentinel"
PLURAL = "versionsentinels"
ACTION_ANNOTATION = "qmtl.io/action"
ACTIONS = tuple(ACTION_EVENTS)  # promote, abort, retry, pause, resume, rollback
INDEFINITE = "indefinite"


class Pass(StrEnum):
    BELOW = "below"  # pass when the value is at or below the threshold
    ABOVE = "above"


@dataclass(frozen=True, kw_only=True)
class Step:
    weight: int = field(
        "Percent of traffic for this version.", required=True, minimum=0, maximum=100
    )
    pause: IntOrString = field(
        "How long to stay at this weight: seconds or 30s / 5m / 1h30m; `indefinite` waits for "
        "promote or resume. Default 0.",
        default=0,
    )

    def to_core(self, where: str) -> canary.Step:
        if isinstance(self.pause, str) and self.pause.strip().lower() == INDEFINITE:
            return canary.Step(self.weight, None)
        return canary.Step(self.weight, canary.parse_duration(self.pause, f"{where}.pause"))


@dataclass(frozen=True, kw_only=True)
class Gate:
    name: str = field("Gate name (unique).", required=True, minLength=1)
    query: str = field("PromQL; largest sample.", required=True, minLength=1)
    threshold: float = field("The limit.", required=True)
    pass_: Pass = field(
        "Pass when the value is at or below (or above) it.",
        name="pass",
        default=Pass.BELOW,
        publish_default=True,
    )
    interval: IntOrString = field("Time between measurements (default 30s).", default="30s")
    failure_limit: int = field(
        "Consecutive failed (or unreadable) measurements tolerated; one more rolls back.",
        default=0,
        publish_default=True,
        minimum=0,
    )

    def to_core(self, where: str) -> canary.Gate:
        interval = canary.parse_duration(self.interval, f"{where}.interval")
        if interval < 1:
            raise InvalidSpec(f"{where}.interval: at least 1s", reason="InvalidGate")
        return canary.Gate(
            self.name.strip(),
            self.query.strip(),
            self.threshold,
            self.pass_ is Pass.BELOW,
            interval,
            self.failure_limit,
        )


@dataclass(frozen=True, kw_only=True)
class StrategyRef:
    name: str = field("StrategyDAG name.", required=True)


@dataclass(frozen=True, kw_only=True)
class Spec:
    strategy_id: str = field(
        "The strategy (the Gateway's strategy_id): events carry `<strategyId>-sentinel`. "
        "Immutable: a rollout of another strategy is another VersionSentinel.",
        required=True,
        minLength=1,
        maxLength=253,
        extra=fields.immutable("strategyId"),
    )
    strategy_ref: StrategyRef | None = field(
        "The StrategyDAG (same namespace) that runs this version: the rollout starts once it "
        "is Ready, and the version's sentinel node gets HAS edges to its nodes."
    )
    world_id: str = field("World id carried by the weight events.", default="")
    version: str = field(
        "This (canary) version's label. Immutable: a new version is a new VersionSentinel.",
        required=True,
        minLength=1,
        maxLength=128,
        extra=fields.immutable("version"),
    )
    commit_hash: str = field(
        "Commit the version was built from (recorded on the sentinel node).", default=""
    )
    release_tag: str = field(
        "Release tag of the version (recorded on the sentinel node).", default=""
    )
    stable_version: str = field(
        "The previous version, which gets the traffic the canary does not (empty: no stable "
        "version, only the canary's weight is published).",
        default="",
    )
    steps: tuple[Step, ...] = field(
        "The rollout: weights in order, each with its pause.",
        required=True,
        minItems=1,
        maxItems=canary.MAX_STEPS,
    )
    analysis: tuple[Gate, ...] = field(
        "Analysis gates: each must pass during a step before the next; a failing gate rolls "
        "all traffic back to the stable version.",
        default=(),
    )
    prometheus_url: str = field(
        "Prometheus-compatible HTTP API for the gates (default: setting).", default=""
    )
    analysis_window: IntOrString = field(
        "While a DAG was refused as a cross-context reuse (by any sidecar or the operator) "
        "within this window, the rollout neither steps nor promotes; condition Halted "
        "(default 10m).",
        default="10m",
    )
    rollback_window: IntOrString = field(
        "After promotion, how long the stable version stays warm at weight 0 and a rollback is "
        "possible (default 0).",
        default=0,
    )
    paused: bool = field(
        "Hold the rollout at its step (the pause left is kept).",
        default=False,
        publish_default=True,
    )
    promote: bool = field(
        "Promote now: the version takes all traffic.", default=False, publish_default=True
    )
    abort: bool = field(
        "Abort: all traffic back to stable; setting it false again starts over.",
        default=False,
        publish_default=True,
    )

    def to_core(self) -> SentinelSpec:
        strategy, version = self.strategy_id.strip(), self.version.strip()
        if not strategy:
            raise InvalidSpec("spec.strategyId: is required", reason="MissingField")
        if not version:
            raise InvalidSpec("spec.version: is required", reason="MissingField")
        stable = self.stable_version.strip()
        if stable == version:
            raise InvalidSpec(f"spec.stableVersion: {stable!r} is the canary's own version")
        url = self.prometheus_url.strip()
        if url and not url.startswith(("http://", "https://")):
            raise InvalidSpec(f"spec.prometheusUrl: {url!r} is not an http(s) URL")
        gates: list[canary.Gate] = []
        for i, g in enumerate(self.analysis):
            gate = g.to_core(f"spec.analysis[{i}]")
            if any(other.name == gate.name for other in gates):
                raise InvalidSpec(
                    f"spec.analysis[{i}].name: {gate.name!r} is used twice", reason="DuplicateGate"
                )
            gates.append(gate)
        rollout = canary.Rollout(
            tuple(s.to_core(f"spec.steps[{i}]") for i, s in enumerate(self.steps)),
            tuple(gates),
            canary.parse_duration(self.rollback_window, "spec.rollbackWindow"),
            canary.parse_duration(self.analysis_window, "spec.analysisWindow"),
        )
        return SentinelSpec(
            strategy_id=strategy,
            version=version,
            rollout=rollout,
            strategy_ref=self.strategy_ref.name if self.strategy_ref else "",
            world_id=self.world_id,
            commit_hash=self.commit_hash,
            release_tag=self.release_tag,
            stable_version=stable,
            prometheus_url=url,
            paused=self.paused,
            promote=self.promote,
            abort=self.abort,
        )


@dataclass(frozen=True, kw_only=True)
class HistoryEntry:
    time: str = field("When the weight changed.", default="", format="date-time")
    weight: int = field("The canary's new percent.", default=0)
    step: int = field("The step it belongs to.", default=0)
    phase: str = field("The phase after the change.", default="")
    reason: str = field("Why it changed.", default="")


@dataclass(frozen=True, kw_only=True)
class Status:
    observed_generation: int = field("Spec generation seen.", default=0, format="int64")
    phase: str = field("Pending, Progressing, Paused, Promoted, Aborted or RolledBack.", default="")
    reason: str = field(
        "Why the rollout is in its phase (CamelCase), e.g. AnalysisFailed.", default=""
    )
    held_by: str = field("spec (spec.paused) or annotation (a pause action).", default="")
    aborted_by: str = field("spec (spec.abort) or annotation (an abort action).", default="")
    current_step: int = field("Index of the current step (-1 before start).", default=-1)
    current_weight: int = field("The canary's percent of traffic.", default=0)
    stable_weight: int = field("The stable version's percent of traffic.", default=0)
    conditions: tuple[Condition, ...] = field("Progressing, Promoted and Degraded.", default=())
    sentinel_id: str = field("The sentinel id the weight events carry.", default="")
    message: str = field("What the rollout is doing or waiting for.", default="")
    step_started_at: str = field("When the current step began.", default="", format="date-time")
    pause_until: str = field("When the current step's pause ends.", default="", format="date-time")
    held_remaining_seconds: float = field("Pause left when held by hand.", default=0.0)
    held: bool = field("Held by hand (spec.paused or a pause action).", default=False)
    rollback_window_ends_at: str = field(
        "End of the rollback window.", default="", format="date-time"
    )
    gates: Free | None = field(
        "Per gate: consecutive failures, last value, when measured and last passed."
    )
    last_action: str = field("The last action annotation handled.", default="")
    last_weight_change_time: str = field(
        "When the weight last changed.", default="", format="date-time"
    )
    history: tuple[HistoryEntry, ...] = field(
        "Weight changes, oldest first (the last 50).", default=()
    )


VERSION_SENTINEL = Kind(
    group=GROUP,
    version=VERSION,
    kind=KIND,
    plural=PLURAL,
    short_names=("vsn",),
    description="A canary rollout of a strategy version, traffic moved by the DAG Manager.",
    spec=Spec,
    spec_doc="A version of a strategy and how traffic moves to it from the stable version.",
    status=Status,
    status_doc="The rollout's runtime state, written by the operator only (Git owns the spec).",
    columns=(
        {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
        {"name": "Weight", "type": "integer", "jsonPath": ".status.currentWeight"},
        {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep"},
        {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ),
)


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition of VersionSentinel."""
    return VERSION_SENTINEL.document()


def parse_spec(spec: object) -> SentinelSpec:
    """A body's spec as the core's value; errors name the field."""
    return fields.parse(Spec, spec).to_core()


def action_of(annotations: dict[str, str] | None) -> tuple[str, str] | None:
    """The action annotation as (action, raw value); `promote` or `promote:<anything>` (the
    suffix makes a repeated action a new value). Unknown actions raise InvalidSpec."""
    raw = (annotations or {}).get(ACTION_ANNOTATION, "").strip()
    if not raw:
        return None
    action = raw.partition(":")[0].strip().lower()
    if action not in ACTIONS:
        raise InvalidSpec(
            f"annotation {ACTION_ANNOTATION}: {raw!r} is not one of {', '.join(ACTIONS)}",
            reason="UnknownAction",
        )
    return action, raw
