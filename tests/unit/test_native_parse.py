"""The native extension reads nodes exactly as the Python core does, or leaves them to it.

Each generated document is parsed twice, with the extension on and off: the two give equal
DAGs, or raise the same error (same message, reason, node and field). The documents mix the
common shape with every odd value the Python rules know about.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmtl_dagmanager.core import dag, identity, native
from qmtl_dagmanager.core.errors import InvalidDag
from tests.unit.dags import node

if not native.available:
    if os.environ.get("CI") == "true":
        pytest.fail("the native extension (src/native) is not installed", pytrace=False)
    pytest.skip("the native extension is not built (make venv builds it)", allow_module_level=True)

ABSENT = object()
DEEP: Any = 1
for _ in range(70):
    DEEP = [DEEP]

FIELDS: dict[str, list[Any]] = {
    "node_type": ["ProcessingNode", "TagQueryNode", "TagQueryNode", "VersionSentinel", "", " P", 5],
    "interval": [60, 60, 0, -1, True, 1.5, "60", None, 2**70, ABSENT],
    "period": [5, 5, 0, -3, "7", None, ABSENT],
    "bucket": [ABSENT, ABSENT, 0, 3, -2, "x"],
    "code_hash": ["c0", "c0", " c", "", 7, None, "é", "x" * 1100],
    "schema_hash": ["h0", "h0", "h1", " h", "", None],
    "schema_compat_id": ["compat0", "compat0", " compat0 ", "", None, 3, "é"],
    "schema_id": [ABSENT, ABSENT, ABSENT, "compat0", "other", None],
    "params": [
        {},
        {},
        None,
        {"a": 1, "seed": 2, "Env_X": 3, "k": {"WORLD": 1, "x": [1.5, 1e-7, '\n\x01"\\']}},
        [1, 2.0, {"b": False, "a": None}],
        "text",
        {"é": 1},
        {"big": 2**80, "neg": -(2**70), "f": 1e300, "z": -0.0},
        {"deep": DEEP},
        {"query_tags": ["BTC", "ETH", "BTC"], "match_mode": "all", "interval": 30},
        {"query_tags": "BTC, ETH"},
        {"tags": ["A"], "match_mode": "ALL"},
        {"match_mode": "any"},
        ABSENT,
    ],
    "config": [ABSENT, ABSENT, {"c": 1}, {"query_tags": ["Q"]}, [1]],
    "tags": [
        ["BTC"],
        ["BTC", "price"],
        [],
        None,
        "BTC,ETH",
        [" BTC"],
        ["BTC", 1],
        ["é"],
        ["x"] * 70,
    ],
    "name": ["n", None, 5, "x" * 2000, ABSENT],
    "config_hash": ["k", None, 3, ABSENT],
    "match_mode": [ABSENT, ABSENT, "all", "any", "Any", 3],
}
QUERIES: list[Any] = [
    {"query_tags": ["BTC", "ETH", "BTC"], "match_mode": "all"},
    {"query_tags": ["ETH"], "interval": 30},
    {"tags": ["A", "B"]},
    {},
    {"query_tags": ["é"]},
]
IDS = ["ok"] * 12 + ["bogus", "malformed", "missing", "int"]


@st.composite
def documents(draw: st.DrawFn) -> dict[str, Any]:
    nodes: list[Any] = []
    for _ in range(draw(st.integers(1, 5))):
        if nodes and isinstance(nodes[-1], dict) and draw(st.integers(0, 9)) == 0:
            copy = dict(nodes[-1])  # the same id again: equal content, or not
            if draw(st.booleans()):
                copy["name"] = "changed"
            nodes.append(draw(st.sampled_from([copy, "not an object", None])))
            continue
        # mostly the common value (the first), sometimes an odd one: most nodes are read
        # natively, and each odd value is met next to otherwise ordinary nodes
        n = {
            k: v[0] if draw(st.integers(0, 40)) else draw(st.sampled_from(v))
            for k, v in FIELDS.items()
        }
        if n["node_type"] == "ProcessingNode" and draw(st.integers(0, 3)) == 0:
            n["node_type"] = "TagQueryNode"
        if n["node_type"] == "TagQueryNode" and draw(st.booleans()):
            n["params"] = draw(st.sampled_from(QUERIES))
        n = {k: v for k, v in n.items() if v is not ABSENT}
        earlier = [p["node_id"] for p in nodes if isinstance(p, dict) and "node_id" in p]
        deps: list[Any] = [
            [],
            None,
            earlier[-1:],
            earlier[:2],
            [""],
            [None],
            "x",
            ["blake3:" + "0" * 64],
            [7],
        ]
        n["inputs"] = deps[2] if draw(st.integers(0, 5)) else draw(st.sampled_from(deps))
        n["dependencies"] = draw(
            st.sampled_from([n["inputs"], n["inputs"], [], None, earlier[-1:]])
        )
        how = draw(st.sampled_from(IDS))
        if how == "ok":
            try:
                n["node_id"] = identity.node_id(n)
            except (identity.IdentityError, TypeError, ValueError, RecursionError):
                n["node_id"] = "blake3:" + "1" * 64
        elif how == "bogus":
            n["node_id"] = "blake3:" + "2" * 64
        elif how == "malformed":
            n["node_id"] = "blake3:XYZ"
        elif how == "int":
            n["node_id"] = 12
        nodes.append(n)
    return {"schema_version": "v1", "nodes": nodes}


def _parse(doc: dict[str, Any], ids: dag.IdMode, on: bool) -> Any:
    saved = native.enabled
    native.enabled = on
    try:
        return dag.from_document(doc, ids=ids)
    except InvalidDag as e:
        return ("error", str(e), e.reason, e.node, e.field)
    finally:
        native.enabled = saved


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents(), st.sampled_from(list(dag.IdMode)))
def test_native_and_python_agree(doc: dict[str, Any], ids: dag.IdMode) -> None:
    assert _parse(doc, ids, True) == _parse(doc, ids, False)


def test_the_common_shape_is_read_natively() -> None:
    """The benchmark DAG (1k nodes, TagQueryNodes among them) is read with no node declined."""
    raw = (Path(__file__).parent.parent / "data" / "bench-dag-1k.json").read_bytes()
    doc = orjson.loads(raw)
    read = native.read_nodes(doc["nodes"], True, 64, 64, dag.MAX_TEXT, dag.Node)
    assert read is not None and read[1] == 0
    assert _parse(doc, dag.IdMode.VERIFY, True) == _parse(doc, dag.IdMode.VERIFY, False)


def test_a_wrong_node_id_is_declined_and_reported_by_python() -> None:
    n = node(tags=["BTC"])
    n["node_id"] = "blake3:" + "3" * 64
    read = native.read_nodes([n], True, 64, 64, dag.MAX_TEXT, dag.Node)
    assert read is not None and read[0] == [None] and read[1] == 1
    with pytest.raises(InvalidDag) as info:
        dag.from_document({"nodes": [n]})
    assert info.value.reason == "NodeIdMismatch"


def test_compute_keys_match_the_python_rule() -> None:
    ids = [identity.node_id({"node_type": f"T{i}"}) for i in range(5)]
    suffix = identity.compute_key_suffix("w1", "live", "2026", "p")
    want = [identity.compute_key(i, "w1", "live", "2026", "p") for i in ids]
    assert native.compute_keys(ids, suffix) == want
