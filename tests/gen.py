"""Generated SDK-shaped DAGs of any size (valid NodeIDs, ~5 % TagQueryNodes, fan-in ≤ 3)."""

from __future__ import annotations

import random
from typing import Any

import orjson

from qmtl_dagmanager.core import identity

ASSETS = ["BTC", "ETH", "SOL", "AAPL", "MSFT", "SPX"]
COMPAT = "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"


def _finish(n: dict[str, Any]) -> dict[str, Any]:
    n["node_id"] = identity.node_id(n)
    return n


def generate(
    size: int,
    *,
    seed: int = 0,
    salt: str = "",
    namespace: str | None = "w1.live",
    version: str | None = None,
) -> dict[str, Any]:
    """A DAG document; `salt` makes every node new (it feeds each code_hash)."""
    rnd = random.Random(seed)
    nodes: list[dict[str, Any]] = []
    for i in range(size):
        asset = rnd.choice(ASSETS)
        base = {
            "interval": 60,
            "period": rnd.randint(1, 200),
            "schema_compat_id": COMPAT,
            "schema_hash": COMPAT,
            "config_hash": COMPAT,
            "pre_warmup": True,
            "expected_schema": {},
            "code_hash": f"{salt}{i:08d}".ljust(64, "0")[:64],
        }
        if i < max(1, size // 20) or not nodes:
            n = {
                **base,
                "node_type": "StreamInput",
                "name": f"src_{i}",
                "tags": [asset, "price"],
                "params": {},
                "inputs": [],
                "dependencies": [],
            }
        elif rnd.random() < 0.05:
            q = sorted({asset, rnd.choice(ASSETS)})
            n = {
                **base,
                "node_type": "TagQueryNode",
                "name": f"tq_{i}",
                "tags": q,
                "params": {"query_tags": q, "match_mode": "any", "interval": 60},
                "inputs": [],
                "dependencies": [],
                "match_mode": "any",
            }
        else:
            ins = sorted({rnd.choice(nodes)["node_id"] for _ in range(rnd.randint(1, 3))})
            kind = rnd.choice(["ProcessingNode"] * 8 + ["TradeOrderNode", "PortfolioNode"])
            n = {
                **base,
                "node_type": kind,
                "name": f"n_{i}",
                "tags": [asset],
                "params": {"window": rnd.randint(2, 50), "alpha": round(rnd.random(), 3)},
                "inputs": ins,
                "dependencies": ins,
            }
        nodes.append(_finish(n))
    doc: dict[str, Any] = {"schema_version": "v1", "nodes": nodes, "meta": {}}
    if namespace:
        doc["meta"]["topic_namespace"] = namespace
    if version:
        doc["meta"]["version"] = version
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return orjson.dumps(doc).decode()
