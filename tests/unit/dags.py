"""Builders of valid SDK-shaped DAGs for tests (node ids computed, not hard-coded)."""

from __future__ import annotations

from typing import Any

import orjson

from qmtl_dagmanager.core import identity


def node(
    node_type: str = "ProcessingNode",
    *,
    inputs: list[str] | None = None,
    tags: list[str] | None = None,
    params: Any = None,
    interval: int = 60,
    period: int = 5,
    code: str = "c0",
    schema_hash: str = "h0",
    **extra: Any,
) -> dict[str, Any]:
    n: dict[str, Any] = {
        "node_type": node_type,
        "interval": interval,
        "period": period,
        "inputs": list(inputs or []),
        "dependencies": list(inputs or []),
        "code_hash": code,
        "schema_hash": schema_hash,
        "schema_compat_id": "compat0",
        "config_hash": "k",
        "params": {} if params is None else params,
        "name": node_type.lower(),
        "tags": list(tags or []),
        **extra,
    }
    n["node_id"] = identity.node_id(n)
    return n


def chain(length: int, *, tags: list[str] | None = None) -> list[dict[str, Any]]:
    nodes = [node("StreamInput", tags=tags or ["BTC", "price"], code="src")]
    for i in range(1, length):
        nodes.append(node(inputs=[nodes[-1]["node_id"]], params={"i": i}, code=f"c{i}", tags=tags))
    return nodes


def document(nodes: list[dict[str, Any]], **top: Any) -> dict[str, Any]:
    return {"schema_version": "v1", "nodes": nodes, **top}


def encode(nodes: list[dict[str, Any]], **top: Any) -> bytes:
    return orjson.dumps(document(nodes, **top))
