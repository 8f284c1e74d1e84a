"""StrategyDAG (qmtl.io/v1alpha1): a strategy's DAG, kept in the graph and in Kafka.

The models below are the single declaration of the kind's fields: `make crds` generates the
CRD and docs/crd-reference.md from them, and `parse_spec` reads a body into the core's
StrategySpec with them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from qmtl_dagmanager.api import fields
from qmtl_dagmanager.api.crd import Condition, Kind
from qmtl_dagmanager.api.fields import Free, field
from qmtl_dagmanager.api.v1alpha1 import API_VERSION, GROUP, VERSION
from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.core.strategy_spec import DeletionPolicy, StrategySpec

__all__ = ["API_VERSION", "GROUP", "KIND", "PLURAL", "VERSION", "crd", "parse_spec"]

KIND = "StrategyDAG"
PLURAL = "strategydags"


@dataclass(frozen=True, kw_only=True)
class Dag:
    schema_version: str = field(
        "DAG schema version: v1, 1 or 1.0.", default="v1", enum=["v1", "1", "1.0"]
    )
    nodes: tuple[Free, ...] = field("The node objects, in order.", default=())
    meta: Free = field("meta: topic_namespace, compute_context, version labels.", factory=dict)


@dataclass(frozen=True, kw_only=True)
class ConfigMapKey:
    name: str = field("ConfigMap name (same namespace).", required=True)
    key: str = field("Key holding the DAG JSON.", required=True)


@dataclass(frozen=True, kw_only=True)
class Spec:
    strategy_id: str = field(
        "The strategy's id (the Gateway's strategy_id); the sentinel is `<strategyId>-sentinel`. "
        "Immutable: a new id is a new StrategyDAG.",
        required=True,
        minLength=1,
        maxLength=253,
        extra=fields.immutable("strategyId"),
    )
    dag: Dag | None = field("The DAG inline, as the QMTL SDK serialises it (contract §4).")
    dag_config_map_ref: ConfigMapKey | None = field(
        "A ConfigMap key holding the DAG as JSON (for large DAGs)."
    )
    world_id: str = field(
        "World the strategy runs in (part of the compute context and namespace).", default=""
    )
    execution_domain: str = field(
        "backtest, dryrun, live or shadow (aliases accepted).", default=""
    )
    as_of: str = field("As-of timestamp of the data (backtests, dry runs).", default="")
    partition: str = field("Data partition.", default="")
    version: str = field("Version label; overrides the DAG's own labels when set.", default="")
    deletion_policy: DeletionPolicy = field(
        "On deletion: Delete drops the strategy's references (queues left to GC); Retain also "
        "keeps its topics, marked unmanaged.",
        default=DeletionPolicy.DELETE,
        publish_default=True,
    )
    paused: bool = field(
        "Stop reconciling until unpaused (nothing is changed).",
        default=False,
        publish_default=True,
    )
    dry_run: bool = field(
        "Compute the plan into status.plan without changing anything.",
        default=False,
        publish_default=True,
    )

    def to_core(self) -> StrategySpec:
        if (self.dag is None) == (self.dag_config_map_ref is None):
            raise InvalidSpec("spec: set exactly one of dag and dagConfigMapRef")
        ref = self.dag_config_map_ref
        dag = self.dag
        return StrategySpec(
            strategy_id=self.strategy_id,
            dag=(
                None
                if dag is None
                else {
                    "schemaVersion": dag.schema_version,
                    "nodes": list(dag.nodes),
                    "meta": dag.meta,
                }
            ),
            config_map=None if ref is None else (ref.name, ref.key),
            world_id=self.world_id,
            execution_domain=self.execution_domain,
            as_of=self.as_of,
            partition=self.partition,
            version=self.version,
            deletion_policy=self.deletion_policy,
            paused=self.paused,
            dry_run=self.dry_run,
        )


@dataclass(frozen=True, kw_only=True)
class NodeCounts:
    total: int = field("Compute nodes.", default=0)
    reused: int = field("Reused as they are.", default=0)
    buffered: int = field("Reused with a new schema.", default=0)
    new: int = field("Created.", default=0)


@dataclass(frozen=True, kw_only=True)
class Status:
    observed_generation: int = field(
        "The spec generation last reconciled.", default=0, format="int64"
    )
    phase: str = field("Pending, Ready, Failed, Degraded, Paused or Planned (dry run).", default="")
    conditions: tuple[Condition, ...] = field("Ready, Progressing and Degraded.", default=())
    sentinel_id: str = field("The strategy's sentinel id.", default="")
    version: str = field("The normalised version label.", default="")
    nodes: NodeCounts | None = field("Node counts of the last diff.")
    topics: dict[str, str] = field("node id → topic, when at most 200 nodes.", factory=dict)
    topics_config_map: str = field(
        "ConfigMap holding the full node → topic map (large DAGs).", default=""
    )
    topic_count: int = field("How many topics the DAG uses.", default=0)
    last_reconcile_time: str = field(
        "When the spec was last reconciled.", default="", format="date-time"
    )
    plan: Free | None = field("The plan of a dry run: counts and per-node decisions.")
    gc_keep: bool = field(
        'The queues are marked keep (annotation qmtl.io/gc-keep: "true"): GC never '
        "collects them, even after this resource is deleted, until the annotation is removed.",
        default=False,
    )


STRATEGY_DAG = Kind(
    group=GROUP,
    version=VERSION,
    kind=KIND,
    plural=PLURAL,
    short_names=("sdag",),
    description="A strategy's DAG, kept in the graph and in Kafka by the DAG Manager.",
    spec=Spec,
    spec_doc="The desired state: a strategy's DAG and the context it runs in.",
    status=Status,
    status_doc="The observed state, written by the operator only.",
    columns=(
        {
            "name": "Ready",
            "type": "string",
            "jsonPath": ".status.conditions[?(@.type=='Ready')].status",
        },
        {"name": "Nodes", "type": "integer", "jsonPath": ".status.nodes.total"},
        {"name": "New", "type": "integer", "jsonPath": ".status.nodes.new"},
        {"name": "Version", "type": "string", "jsonPath": ".status.version"},
        {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    ),
    validations=(
        {
            "rule": "has(self.dag) != has(self.dagConfigMapRef)",
            "message": "set exactly one of dag and dagConfigMapRef",
        },
    ),
)


def crd() -> dict[str, Any]:
    """The CustomResourceDefinition of StrategyDAG."""
    return STRATEGY_DAG.document()


def parse_spec(spec: object) -> StrategySpec:
    """A body's spec as the core's value; the first field that does not fit is an InvalidSpec
    naming it."""
    return fields.parse(Spec, spec).to_core()
