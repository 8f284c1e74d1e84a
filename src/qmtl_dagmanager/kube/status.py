"""Status of a StrategyDAG rendered from a diff outcome or an error (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.services.diffs import DiffOutcome

INLINE_TOPICS = 200


def condition(
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    now: str,
    generation: int,
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    status = "True" if ok else "False"
    changed = previous is None or previous.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": now
        if changed or previous is None
        else previous.get("lastTransitionTime", now),
        "observedGeneration": generation,
    }


def conditions(
    old: Mapping[str, Any] | None,
    now: str,
    generation: int,
    ready: tuple[bool, str, str],
    progressing: tuple[bool, str, str],
    degraded: tuple[bool, str, str],
) -> list[dict[str, Any]]:
    before = {c.get("type"): c for c in (old or {}).get("conditions", []) or []}
    return [
        condition(kind, *state, now, generation, before.get(kind))
        for kind, state in (("Ready", ready), ("Progressing", progressing), ("Degraded", degraded))
    ]


def topics_config_map(resource: str) -> str:
    """The owned ConfigMap that holds the node → topic map of a large DAG."""
    return f"{resource}-topics"


def for_outcome(
    old: Mapping[str, Any] | None,
    outcome: DiffOutcome,
    now: str,
    generation: int,
    name: str = "",
) -> dict[str, Any]:
    p = outcome.plan
    topics = {n.node.node_id: n.topic for n in p.nodes}
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "sentinelId": p.sentinel_id,
        "version": p.version,
        "nodes": {
            "total": p.counts["total"],
            "reused": p.counts["reused"],
            "buffered": p.counts["buffered"],
            "new": p.counts["new"],
        },
        "topicCount": len(topics),
        "topics": topics if len(topics) <= INLINE_TOPICS else None,
        "topicsConfigMap": None if len(topics) <= INLINE_TOPICS else topics_config_map(name),
    }
    if outcome.dry_run:
        status["phase"] = "Planned"
        status["plan"] = {
            "counts": dict(p.counts),
            "namespace": p.namespace,
            "nodes": [
                {"nodeId": n.node.node_id, "action": n.action.value, "topic": n.topic}
                for n in p.nodes[:INLINE_TOPICS]
            ],
        }
        message = f"dry run: {p.counts['new']} new, {p.counts['reused']} reused"
        status["conditions"] = conditions(
            old,
            now,
            generation,
            (False, "DryRun", message),
            (False, "DryRun", message),
            (False, "DryRun", ""),
        )
        return status
    status["phase"] = "Ready"
    status["plan"] = None
    message = (
        f"{p.counts['total']} nodes: {p.counts['new']} new, {p.counts['reused']} "
        f"reused, {p.counts['buffered']} buffered"
    )
    status["conditions"] = conditions(
        old,
        now,
        generation,
        (True, "Reconciled", message),
        (False, "Reconciled", ""),
        (False, "Reconciled", ""),
    )
    return status


def for_error(
    old: Mapping[str, Any] | None, error: DagManagerError, now: str, generation: int
) -> dict[str, Any]:
    keep = {k: v for k, v in (old or {}).items() if k not in ("conditions", "phase")}
    if error.retryable:
        # The last good state still stands; say why it cannot be refreshed.
        was_ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (old or {}).get("conditions", []) or []
        )
        conds = conditions(
            old,
            now,
            generation,
            (
                was_ready,
                "Reconciled" if was_ready else error.reason,
                error.message if not was_ready else "last reconcile succeeded",
            ),
            (True, error.reason, "retrying with backoff"),
            (True, error.reason, error.message),
        )
        return {**keep, "phase": "Degraded", "conditions": conds}
    conds = conditions(
        old,
        now,
        generation,
        (False, error.reason, error.message),
        (False, error.reason, "fix the spec to continue"),
        (False, error.reason, ""),
    )
    return {**keep, "observedGeneration": generation, "phase": "Failed", "conditions": conds}


def same(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Equal apart from timestamps: then the status is not written again."""

    def strip(st: Mapping[str, Any] | None) -> dict[str, Any]:
        out = {k: v for k, v in (st or {}).items() if k != "lastReconcileTime"}
        out["conditions"] = [
            {k: v for k, v in c.items() if k != "lastTransitionTime"}
            for c in out.get("conditions", []) or []
        ]
        return out

    return strip(old) == strip(new)
