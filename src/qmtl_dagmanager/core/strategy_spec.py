"""What a StrategyDAG asks for, as a value (the CRD model parses bodies into this)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class DeletionPolicy(StrEnum):
    DELETE = "Delete"  # drop the strategy's references; GC removes unreferenced queues
    RETAIN = "Retain"  # keep the references (and so the topics) after the resource is gone


@dataclass(frozen=True)
class StrategySpec:
    strategy_id: str
    dag: dict[str, Any] | None  # inline DAG, or None when it comes from a ConfigMap
    config_map: tuple[str, str] | None  # (ConfigMap name, key)
    world_id: str = ""
    execution_domain: str = ""
    as_of: str = ""
    partition: str = ""
    version: str = ""
    deletion_policy: DeletionPolicy = DeletionPolicy.DELETE
    paused: bool = False
    dry_run: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
