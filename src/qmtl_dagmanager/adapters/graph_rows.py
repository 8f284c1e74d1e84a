"""A plan turned into the rows a graph write stores: shared by the Neo4j store and its twin,
so both write exactly the same properties."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmtl_dagmanager.core.plan import Action, Plan
from qmtl_dagmanager.core.topics import strip_namespace


@dataclass(frozen=True, slots=True)
class Rows:
    strategy_id: str
    nodes: list[dict[str, Any]]  # nodes to create or change (a plain reuse writes nothing)
    queues: list[dict[str, Any]]  # queues to create (action CREATE)
    refs: list[dict[str, Any]]  # {node_id, topic, slot, create}: what the strategy references
    context: dict[str, str]  # the compute context of this diff, kept on the Strategy
    fingerprint: str  # of the plan, kept on the Strategy


def slot(node_id: str, compute_key: str) -> str:
    """The key a queue is unique by: one queue per (node, compute key)."""
    return f"{node_id}|{compute_key}"


def rows(plan: Plan, now: float) -> Rows:
    nodes: list[dict[str, Any]] = []
    queues: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    # Rows in node-id order: concurrent writers then lock shared nodes in one order, which
    # keeps deadlocks (and the retries they cost) rare.
    for p in sorted(plan.nodes, key=lambda p: p.node.node_id):
        n = p.node
        refs.append(
            {
                "node_id": n.node_id,
                "topic": p.topic,
                "slot": slot(n.node_id, p.compute_key),
                "create": p.action is Action.CREATE,
            }
        )
        if p.action is Action.REUSE:
            continue
        nodes.append(
            {
                "node_id": n.node_id,
                "node_type": n.node_type,
                "interval": n.interval,
                "period": n.period,
                "code_hash": n.code_hash,
                "schema_compat_id": n.schema_compat_id,
                "schema_hash": n.schema_hash,
                "params_canon": n.params_canon() if p.action is Action.CREATE else None,
                "tags": list(n.tags),
                "query_tags": list(n.query_tags),
                "compute_key": p.compute_key,
                "buffer": p.action is Action.BUFFER,
                "recompute": p.recompute,
                "created_at": now,
                "owner": plan.strategy_id,
            }
        )
        if p.action is Action.CREATE and p.spec is not None:
            queues.append(
                {
                    "node_id": n.node_id,
                    "topic": p.topic,
                    "base": strip_namespace(p.topic, plan.namespace),
                    "namespace": plan.namespace or "",
                    "is_global": plan.namespace is None,
                    "created_at": now,
                    "tag": p.spec.topic_type.value,
                    "interval": n.interval,
                    "partitions": p.spec.partitions,
                    "replication": p.spec.replication_factor,
                    "retention_ms": p.spec.retention_ms,
                    "ttl": p.spec.retention_ms // 1000,
                    "compute_key": p.compute_key,
                    "slot": slot(n.node_id, p.compute_key),
                }
            )
    return Rows(plan.strategy_id, nodes, queues, refs, plan.context.as_dict(), plan.fingerprint())
