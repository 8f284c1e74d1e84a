"""API models of the StrategyDAG custom resource, and its CRD generated from them.

Each field is declared once, with its OpenAPI type and the documentation `kubectl explain`
shows; `crd()` turns the models into a structural CRD (`make crds` writes it to crds/).
"""

from __future__ import annotations

from typing import Any

from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.core.strategy_spec import DeletionPolicy, StrategySpec
from qmtl_dagmanager.kube.schema import (
    CONDITION,
    FREE,
    GROUP,
    VERSION,
    F,
    crd_document,
    obj,
    s,
)

__all__ = ["CONDITION", "GROUP", "KIND", "PLURAL", "VERSION", "StrategySpec", "crd"]

KIND = "StrategyDAG"
PLURAL = "strategydags"


SPEC = obj(
    "The desired state: a strategy's DAG and the context it runs in.",
    {
        "strategyId": s(
            "The strategy's id (the Gateway's strategy_id); the sentinel is "
            "`<strategyId>-sentinel`.",
            True,
            minLength=1,
            maxLength=253,
        ),
        "dag": obj(
            "The DAG inline, as the QMTL SDK serialises it (contract §4).",
            {
                "schemaVersion": s("DAG schema version: v1, 1 or 1.0.", enum=["v1", "1", "1.0"]),
                "nodes": F({"type": "array", "items": FREE}, "The node objects, in order."),
                "meta": F(FREE, "meta: topic_namespace, compute_context, version labels."),
            },
        ),
        "dagConfigMapRef": obj(
            "A ConfigMap key holding the DAG as JSON (for large DAGs).",
            {
                "name": s("ConfigMap name (same namespace).", True),
                "key": s("Key holding the DAG JSON.", True),
            },
        ),
        "worldId": s("World the strategy runs in (part of the compute context and namespace)."),
        "executionDomain": s("backtest, dryrun, live or shadow (aliases accepted)."),
        "asOf": s("As-of timestamp of the data (backtests, dry runs)."),
        "partition": s("Data partition."),
        "version": s("Version label; overrides the DAG's own labels when set."),
        "deletionPolicy": s(
            "On deletion: Delete drops the strategy's references (queues left "
            "to GC); Retain also keeps its topics, marked unmanaged.",
            enum=[p.value for p in DeletionPolicy],
            default=DeletionPolicy.DELETE.value,
        ),
        "paused": F(
            {"type": "boolean", "default": False},
            "Stop reconciling until unpaused (nothing is changed).",
        ),
        "dryRun": F(
            {"type": "boolean", "default": False},
            "Compute the plan into status.plan without changing anything.",
        ),
    },
    required=True,
)

COUNTS = obj(
    "Node counts of the last diff.",
    {
        k: F({"type": "integer"}, d)
        for k, d in (
            ("total", "Compute nodes."),
            ("reused", "Reused as they are."),
            ("buffered", "Reused with a new schema."),
            ("new", "Created."),
        )
    },
)

STATUS = obj(
    "The observed state, written by the operator only.",
    {
        "observedGeneration": F(
            {"type": "integer", "format": "int64"}, "The spec generation last reconciled."
        ),
        "phase": s("Pending, Ready, Failed, Degraded, Paused or Planned (dry run)."),
        "conditions": F(
            {"type": "array", "items": {k: v for k, v in CONDITION.schema.items()}},
            "Ready, Progressing and Degraded.",
        ),
        "sentinelId": s("The strategy's sentinel id."),
        "version": s("The normalised version label."),
        "nodes": COUNTS,
        "topics": F(
            {"type": "object", "additionalProperties": {"type": "string"}},
            "node id → topic, when at most 200 nodes.",
        ),
        "topicsConfigMap": s("ConfigMap holding the full node → topic map (large DAGs)."),
        "topicCount": F({"type": "integer"}, "How many topics the DAG uses."),
        "lastReconcileTime": s("When the spec was last reconciled.", format="date-time"),
        "plan": F(FREE, "The plan of a dry run: counts and per-node decisions."),
    },
)


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition of StrategyDAG."""
    return crd_document(
        kind=KIND,
        plural=PLURAL,
        short_names=["sdag"],
        description="A strategy's DAG, kept in the graph and in Kafka by the DAG Manager.",
        spec=SPEC,
        status=STATUS,
        columns=[
            {
                "name": "Ready",
                "type": "string",
                "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
            },
            {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes.total"},
            {"name": "New", "type": "integer", "jsonPath": ".status.nodes.new"},
            {"name": "Version", "type": "string", "jsonPath": ".status.version"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ],
        validations=[
            {
                "rule": "has(self.dag) != has(self.dagConfigMapRef)",
                "message": "set exactly one of dag and dagConfigMapRef",
            }
        ],
    )


def parse_spec(spec: dict[str, Any]) -> StrategySpec:
    """The spec of a body the CRD schema has validated; what the schema cannot say (an
    unknown deletion policy from an older CRD) is an InvalidSpec naming the field."""
    ref = spec.get("dagConfigMapRef")
    policy = str(spec.get("deletionPolicy") or DeletionPolicy.DELETE.value)
    try:
        deletion = DeletionPolicy(policy)
    except ValueError:
        allowed = ", ".join(p.value for p in DeletionPolicy)
        raise InvalidSpec(
            f"spec.deletionPolicy: {policy!r} is not one of {allowed}", reason="InvalidField"
        ) from None
    return StrategySpec(
        strategy_id=str(spec.get("strategyId", "")),
        dag=dict(spec["dag"]) if isinstance(spec.get("dag"), dict) else None,
        config_map=(str(ref["name"]), str(ref["key"])) if isinstance(ref, dict) else None,
        world_id=str(spec.get("worldId", "")),
        execution_domain=str(spec.get("executionDomain", "")),
        as_of=str(spec.get("asOf", "")),
        partition=str(spec.get("partition", "")),
        version=str(spec.get("version", "")),
        deletion_policy=deletion,
        paused=bool(spec.get("paused", False)),
        dry_run=bool(spec.get("dryRun", False)),
    )
