"""A StrategyDAG's status rendered from a plan or an error (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmtl_dagmanager.core.conditions import conditions
from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.core.plan import Plan

INLINE_TOPICS = 200  # larger node → topic maps go to an owned ConfigMap


def topics_config_map(resource: str) -> str:
    """The owned ConfigMap that holds the node → topic map of a large DAG."""
    return f"{resource}-topics"


def _conditions(
    old: Mapping[str, Any] | None,
    now: str,
    generation: int,
    ready: tuple[bool, str, str],
    progressing: tuple[bool, str, str],
    degraded: tuple[bool, str, str],
) -> list[dict[str, Any]]:
    kinds = {"Ready": ready, "Progressing": progressing, "Degraded": degraded}
    return conditions(old, now, generation, kinds)


def for_plan(
    old: Mapping[str, Any] | None,
    p: Plan,
    dry_run: bool,
    now: str,
    generation: int,
    name: str = "",
) -> dict[str, Any]:
    """Ready with the node counts and the topics (inline, or the ConfigMap's name); a dry
    run is Planned, with the first nodes' actions."""
    topics = {n.node.node_id: n.topic for n in p.nodes}
    inline = len(topics) <= INLINE_TOPICS
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
        "topics": topics if inline else None,
        "topicsConfigMap": None if inline else topics_config_map(name),
    }
    if dry_run:
        message = f"dry run: {p.counts['new']} new, {p.counts['reused']} reused"
        status["phase"] = "Planned"
        status["plan"] = {
            "counts": dict(p.counts),
            "namespace": p.namespace,
            "nodes": [
                {"nodeId": n.node.node_id, "action": n.action.value, "topic": n.topic}
                for n in p.nodes[:INLINE_TOPICS]
            ],
        }
        status["conditions"] = _conditions(
            old,
            now,
            generation,
            (False, "DryRun", message),
            (False, "DryRun", message),
            (False, "DryRun", ""),
        )
        return status
    message = (
        f"{p.counts['total']} nodes: {p.counts['new']} new, {p.counts['reused']} "
        f"reused, {p.counts['buffered']} buffered"
    )
    status["phase"] = "Ready"
    status["plan"] = None
    status["conditions"] = _conditions(
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
    """A retryable error keeps the last good state and says Degraded; any other is Failed
    (the spec must change before anything else happens)."""
    keep = {k: v for k, v in (old or {}).items() if k not in ("conditions", "phase")}
    if error.retryable:
        was_ready = any(
            c.get("type") == "Ready" and c.get("status") == "True"
            for c in (old or {}).get("conditions") or []
        )
        conds = _conditions(
            old,
            now,
            generation,
            (
                was_ready,
                "Reconciled" if was_ready else error.reason,
                "last reconcile succeeded" if was_ready else error.message,
            ),
            (True, error.reason, "retrying with backoff"),
            (True, error.reason, error.message),
        )
        return {**keep, "phase": "Degraded", "conditions": conds}
    conds = _conditions(
        old,
        now,
        generation,
        (False, error.reason, error.message),
        (False, error.reason, "fix the spec to continue"),
        (False, error.reason, ""),
    )
    return {**keep, "observedGeneration": generation, "phase": "Failed", "conditions": conds}


def paused(old: Mapping[str, Any] | None, generation: int) -> dict[str, Any]:
    """Reconciling is paused by the spec: the rest of the status stands."""
    return {**(old or {}), "phase": "Paused", "observedGeneration": generation}
