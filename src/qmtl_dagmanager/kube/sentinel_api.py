"""API model of the VersionSentinel custom resource: a canary rollout between two versions of a
strategy, and its CRD (written to crds/ by `make crds`)."""

from __future__ import annotations

from typing import Any

from qmtl_dagmanager.core import canary
from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.core.rollout import ACTION_EVENTS, SentinelSpec
from qmtl_dagmanager.kube.schema import INT_OR_STRING, F, conditions, crd_document, obj, s

KIND = "VersionSentinel"
PLURAL = "versionsentinels"
ACTION_ANNOTATION = "qmtl.io/action"
ACTIONS = tuple(ACTION_EVENTS)  # promote, abort, retry, pause, resume, rollback

BOOL = {"type": "boolean", "default": False}

SPEC = obj(
    "A version of a strategy and how traffic moves to it from the stable version.",
    {
        "strategyId": s(
            "The strategy (the Gateway's strategy_id): events carry `<strategyId>-sentinel`.",
            True,
            minLength=1,
            maxLength=253,
        ),
        "strategyRef": obj(
            "The StrategyDAG (same namespace) that runs this version: the rollout starts once "
            "it is Ready, and the version's sentinel node gets HAS edges to its nodes.",
            {"name": s("StrategyDAG name.", True)},
        ),
        "worldId": s("World id carried by the weight events."),
        "version": s("This (canary) version's label.", True, minLength=1, maxLength=128),
        "commitHash": s("Commit the version was built from (recorded on the sentinel node)."),
        "releaseTag": s("Release tag of the version (recorded on the sentinel node)."),
        "stableVersion": s(
            "The previous version, which gets the traffic the canary does not "
            "(empty: no stable version, only the canary's weight is published)."
        ),
        "steps": F(
            {
                "type": "array",
                "minItems": 1,
                "maxItems": canary.MAX_STEPS,
                "items": {
                    "type": "object",
                    "required": ["weight"],
                    "properties": {
                        "weight": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": 100,
                            "description": "Percent of traffic for this version.",
                        },
                        "pause": {
                            **INT_OR_STRING,
                            "description": "How long to stay at this weight: seconds or "
                            "30s / 5m / 1h30m; `indefinite` waits for promote or resume. "
                            "Default 0.",
                        },
                    },
                },
            },
            "The rollout: weights in order, each with its pause.",
            True,
        ),
        "analysis": F(
            {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["name", "query", "threshold"],
                    "properties": {
                        "name": {"type": "string", "description": "Gate name (unique)."},
                        "query": {"type": "string", "description": "PromQL; largest sample."},
                        "threshold": {"type": "number", "description": "The limit."},
                        "pass": {
                            "type": "string",
                            "enum": ["below", "above"],
                            "default": "below",
                            "description": "Pass when the value is at or below (or above) it.",
                        },
                        "interval": {
                            **INT_OR_STRING,
                            "description": "Time between measurements (default 30s).",
                        },
                        "failureLimit": {
                            "type": "integer",
                            "minimum": 0,
                            "default": 0,
                            "description": "Consecutive failed (or unreadable) measurements "
                            "tolerated; one more rolls back.",
                        },
                    },
                },
            },
            "Analysis gates: each must pass during a step before the next; a failing gate "
            "rolls all traffic back to the stable version.",
        ),
        "prometheusUrl": s("Prometheus-compatible HTTP API for the gates (default: setting)."),
        "rollbackWindow": F(
            INT_OR_STRING,
            "After promotion, how long the stable version stays warm at weight 0 and a "
            "rollback is possible (default 0).",
        ),
        "paused": F(BOOL, "Hold the rollout at its step (the pause left is kept)."),
        "promote": F(BOOL, "Promote now: the version takes all traffic."),
        "abort": F(BOOL, "Abort: all traffic back to stable; setting it false again starts over."),
    },
    required=True,
)

HISTORY = {
    "type": "array",
    "items": {
        "type": "object",
        "properties": {
            "time": {"type": "string", "format": "date-time"},
            "weight": {"type": "integer"},
            "step": {"type": "integer"},
            "phase": {"type": "string"},
            "reason": {"type": "string"},
        },
    },
}

STATUS = obj(
    "The rollout's runtime state, written by the operator only (Git owns the spec).",
    {
        "observedGeneration": F({"type": "integer", "format": "int64"}, "Spec generation seen."),
        "phase": s("Pending, Progressing, Paused, Promoted, Aborted or RolledBack."),
        "reason": s("Why the rollout is in its phase (CamelCase), e.g. AnalysisFailed."),
        "heldBy": s("spec (spec.paused) or annotation (a pause action)."),
        "abortedBy": s("spec (spec.abort) or annotation (an abort action)."),
        "currentStep": F({"type": "integer"}, "Index of the current step (-1 before start)."),
        "currentWeight": F({"type": "integer"}, "The canary's percent of traffic."),
        "stableWeight": F({"type": "integer"}, "The stable version's percent of traffic."),
        "conditions": conditions("Progressing, Promoted and Degraded."),
        "sentinelId": s("The sentinel id the weight events carry."),
        "message": s("What the rollout is doing or waiting for."),
        "stepStartedAt": s("When the current step began.", format="date-time"),
        "pauseUntil": s("When the current step's pause ends.", format="date-time"),
        "heldRemainingSeconds": F({"type": "number"}, "Pause left when held by hand."),
        "held": F({"type": "boolean"}, "Held by hand (spec.paused or a pause action)."),
        "rollbackWindowEndsAt": s("End of the rollback window.", format="date-time"),
        "gates": F(
            {"type": "object", "x-kubernetes-preserve-unknown-fields": True},
            "Per gate: consecutive failures, last value, when measured and last passed.",
        ),
        "lastAction": s("The last action annotation handled."),
        "lastWeightChangeTime": s("When the weight last changed.", format="date-time"),
        "history": F(HISTORY, "Weight changes, oldest first (the last 50)."),
    },
)


def crd() -> dict[str, Any]:
    return crd_document(
        kind=KIND,
        plural=PLURAL,
        short_names=["vsn"],
        description="A canary rollout of a strategy version, traffic moved by the DAG Manager.",
        spec=SPEC,
        status=STATUS,
        columns=[
            {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
            {"name": "Weight", "type": "integer", "jsonPath": ".status.currentWeight"},
            {"name": "Step", "type": "integer", "jsonPath": ".status.currentStep"},
            {"name": "Version", "type": "string", "jsonPath": ".spec.version"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
    )


def parse_spec(spec: dict[str, Any]) -> SentinelSpec:
    """The spec, checked beyond what the schema can say; errors name the field."""
    strategy = str(spec.get("strategyId") or "").strip()
    version = str(spec.get("version") or "").strip()
    if not strategy:
        raise InvalidSpec("spec.strategyId is required", reason="MissingField")
    if not version:
        raise InvalidSpec("spec.version is required", reason="MissingField")
    stable = str(spec.get("stableVersion") or "").strip()
    if stable == version:
        raise InvalidSpec(
            f"spec.stableVersion: {stable!r} is the canary's own version", reason="InvalidSpec"
        )
    ref = spec.get("strategyRef")
    url = str(spec.get("prometheusUrl") or "").strip()
    if url and not url.startswith(("http://", "https://")):
        raise InvalidSpec(f"spec.prometheusUrl: {url!r} is not an http(s) URL")
    steps, gates = spec.get("steps") or [], spec.get("analysis") or []
    for name, value in (("steps", steps), ("analysis", gates)):
        if not isinstance(value, list):
            raise InvalidSpec(f"spec.{name}: expected a list", reason="InvalidField")
    rollout = canary.Rollout(
        canary.steps_from(steps),
        canary.gates_from(gates),
        canary.parse_duration(spec.get("rollbackWindow", 0), "spec.rollbackWindow"),
    )
    return SentinelSpec(
        strategy_id=strategy,
        version=version,
        rollout=rollout,
        strategy_ref=str(ref.get("name", "")) if isinstance(ref, dict) else "",
        world_id=str(spec.get("worldId") or ""),
        commit_hash=str(spec.get("commitHash") or ""),
        release_tag=str(spec.get("releaseTag") or ""),
        stable_version=stable,
        prometheus_url=url,
        paused=bool(spec.get("paused", False)),
        promote=bool(spec.get("promote", False)),
        abort=bool(spec.get("abort", False)),
    )


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
