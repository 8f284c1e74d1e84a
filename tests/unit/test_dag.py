"""Parsing and validation: every rejection is a typed InvalidDag naming node and field."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qmtl_dagmanager.core import dag, identity
from qmtl_dagmanager.core.errors import InvalidDag
from tests.unit.dags import chain, document, encode, node

DATA = Path(__file__).parent.parent / "data"


def reject(payload: bytes | str | dict[str, Any], **kw: Any) -> InvalidDag:
    raw = orjson.dumps(payload) if isinstance(payload, dict) else payload
    with pytest.raises(InvalidDag) as info:
        dag.parse(raw, **kw)
    return info.value


def test_sample_dag_parses_with_verified_ids() -> None:
    d = dag.parse((DATA / "sample-dag.json").read_bytes())
    assert [n.node_type for n in d.nodes] == ["StreamInput", "ProcessingNode", "TagQueryNode"]
    assert d.topic_namespace == "w1.dryrun"
    assert d.version == "v1"
    tq = d.nodes[2]
    assert (tq.query_tags, tq.match_mode, tq.interval) == (("BTC", "ETH"), "all", 60)
    assert d.nodes[1].inputs == (d.nodes[0].node_id,)
    assert [d.nodes[i].node_id for i in d.order].index(d.nodes[0].node_id) < [
        d.nodes[i].node_id for i in d.order
    ].index(d.nodes[1].node_id)


def test_bench_dags_parse_and_verify() -> None:
    d = dag.parse((DATA / "bench-dag-1k.json").read_bytes())
    assert len(d.nodes) == 1000
    pos = {n.node_id: i for i, n in enumerate(d.nodes)}
    rank = {idx: r for r, idx in enumerate(d.order)}
    for n in d.nodes:
        for dep in n.inputs:
            assert rank[pos[dep]] < rank[pos[n.node_id]]


MALFORMED = [
    b"",
    b"{",
    b"[]",
    b"null",
    b'{"nodes": 1}',
    b"\xff\xfe",
    b'{"nodes": [NaN]}',
    b'{"nodes": [], "x": Infinity}',
]


@pytest.mark.parametrize("payload", MALFORMED)
def test_malformed_documents(payload: bytes) -> None:
    err = reject(payload)
    assert err.reason in {"InvalidJson", "MissingField"}


def test_unsupported_schema_version() -> None:
    err = reject(document([], schema_version="v2"))
    assert err.reason == "UnsupportedSchemaVersion" and "schema_version" in str(err)
    for ok in ("v1", "1", "1.0"):
        dag.parse(encode(chain(1), schema_version=ok) if ok != "v1" else encode(chain(1)))


@pytest.mark.parametrize("field", ["node_type", "code_hash", "schema_hash", "schema_compat_id"])
def test_missing_required_fields_name_node_and_field(field: str) -> None:
    n = node()
    del n[field]
    err = reject(document([n]), ids=dag.IdMode.TRUST)
    assert err.reason == "MissingField"
    assert err.field == field and err.node == n["node_id"]
    assert n["node_id"] in str(err) and field in str(err)


def test_schema_id_alias_accepted_and_conflict_rejected() -> None:
    n = node()
    n["schema_id"] = n.pop("schema_compat_id")
    assert dag.parse(encode([n])).nodes[0].schema_compat_id == "compat0"
    n2 = node()
    n2["schema_id"] = "other"
    err = reject(document([n2]))
    assert err.reason == "SchemaIdConflict" and err.node == n2["node_id"]


@pytest.mark.parametrize("bad", ["sha256:" + "a" * 64, "blake3:" + "A" * 64, "blake3:abc", 7, None])
def test_malformed_node_id(bad: object) -> None:
    n = {**node(), "node_id": bad}
    err = reject(document([n]))
    assert err.reason == "InvalidNodeId" and err.field == "node_id"


def test_node_id_mismatch_verify_versus_trust() -> None:
    n = node()
    n["period"] = 99  # content changed, id kept
    err = reject(document([n]))
    assert err.reason == "NodeIdMismatch" and identity.node_id(n) in str(err)
    trusted = dag.parse(encode([n]), ids=dag.IdMode.TRUST)
    assert trusted.nodes[0].node_id == n["node_id"]  # never repaired


def test_tag_query_needs_tags_and_interval() -> None:
    no_tags = node("TagQueryNode", params={"query_tags": []})
    assert reject(document([no_tags])).reason == "InvalidTagQuery"
    no_interval = node("TagQueryNode", tags=["BTC"], interval=0)
    err = reject(document([no_interval]))
    assert err.reason == "InvalidTagQuery" and err.field == "interval"


def test_duplicate_ids() -> None:
    n = node()
    d = dag.parse(encode([n, dict(n)]))
    assert len(d.nodes) == 1
    assert d.crc32 == identity.crc32([n["node_id"], n["node_id"]])
    other = {**n, "name": "renamed"}
    assert reject(document([n, other])).reason == "DuplicateNode"


def test_unknown_input() -> None:
    missing = "blake3:" + "9" * 64
    n = node(inputs=[missing])
    err = reject(document([n]))
    assert err.reason == "UnknownInput" and missing in str(err) and err.node == n["node_id"]


def test_cycle_reports_its_node_ids() -> None:
    # Ids are trusted here: a real cycle cannot have consistent content hashes.
    ids = ["blake3:" + f"{i:064x}" for i in range(4)]
    nodes = [node(code=f"x{i}") for i in range(4)]
    for i, n in enumerate(nodes):
        n["node_id"] = ids[i]
    nodes[1]["inputs"] = [ids[0], ids[3]]
    nodes[2]["inputs"] = [ids[1]]
    nodes[3]["inputs"] = [ids[2]]
    err = reject(document(nodes), ids=dag.IdMode.TRUST)
    assert err.reason == "Cycle"
    path = str(err).split(": ", 1)[1].split(" -> ")
    assert set(path) == {ids[1], ids[2], ids[3]} and path[0] == path[-1] and len(path) == 4


def test_size_limits() -> None:
    raw = encode(chain(5))
    assert reject(raw, limits=dag.Limits(max_bytes=len(raw) - 1)).reason == "DagTooLarge"
    assert reject(raw, limits=dag.Limits(max_nodes=4)).reason == "DagTooLarge"
    tags = [f"t{i}" for i in range(100)]
    assert reject(document([node(tags=tags)])).reason == "TooManyTags"
    assert reject(document([node(name="x" * 5000)])).reason == "FieldTooLong"


def test_interval_forms() -> None:
    n = node()
    n["interval"] = "60"
    assert dag.parse(encode([n]), ids=dag.IdMode.TRUST).nodes[0].interval == 60
    n["interval"] = "1m"
    err = reject(document([n]), ids=dag.IdMode.TRUST)
    assert err.reason == "InvalidField" and err.field == "interval"
    n["interval"] = -5
    assert reject(document([n]), ids=dag.IdMode.TRUST).field == "interval"


def test_version_label_precedence_and_normalisation() -> None:
    base = chain(1)
    sentinel = {
        "node_type": "VersionSentinel",
        "node_id": "blake3:" + "e" * 64,
        "version": " release/2.1 ",
        "traffic_weight": 0.25,
    }
    d = dag.parse(encode([*base, sentinel], version="top", meta={"version": "meta"}))
    assert d.version == "release-2.1"
    assert d.sentinels[0].weight == 0.25 and len(d.nodes) == 1
    assert dag.parse(encode(base, strategy_version="top!", meta={"version": "m"})).version == "top"
    assert dag.parse(encode(base, meta={"build_version": "b-7"})).version == "b-7"
    assert dag.parse(encode(base)).version == "v1"
    bad = {**sentinel, "traffic_weight": 1.5}
    assert reject(document([*base, bad])).reason == "InvalidWeight"


def test_namespace_forms() -> None:
    base = chain(1)
    assert dag.parse(encode(base, meta={"topic_namespace": "W1.Live"})).topic_namespace == "w1.live"
    ns = {"world_id": "w 2", "execution_domain": "dryrun"}
    assert dag.parse(encode(base, meta={"topic_namespace": ns})).topic_namespace == "w-2.dryrun"
    assert dag.parse(encode(base, meta={"topic_namespace": {"world": "w"}})).topic_namespace is None
    assert reject(document(base, meta={"topic_namespace": 5})).field == "meta.topic_namespace"


def test_compute_context_layers_are_kept() -> None:
    d = dag.parse(
        encode(
            chain(1),
            compute_context={"world_id": "top"},
            meta={"compute_context": {"world_id": "meta", "as_of": "x"}},
        )
    )
    assert [dict(layer) for layer in d.context_layers] == [
        {"world_id": "top"},
        {"world_id": "meta", "as_of": "x"},
    ]


# --- properties: hostile input never raises anything but InvalidDag ---------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(
            st.sampled_from(
                [
                    "nodes",
                    "node_id",
                    "node_type",
                    "inputs",
                    "interval",
                    "params",
                    "tags",
                    "meta",
                    "schema_version",
                    "code_hash",
                    "schema_hash",
                    "schema_compat_id",
                    "period",
                    "bucket",
                    "topic_namespace",
                    "x",
                ]
            ),
            inner,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_invalid_dag(data: bytes) -> None:
    with contextlib.suppress(InvalidDag):
        dag.parse(data)


@settings(max_examples=300, deadline=None)
@given(json_values, st.sampled_from(list(dag.IdMode)))
def test_random_json_raises_only_invalid_dag(doc: Any, ids: dag.IdMode) -> None:
    with contextlib.suppress(InvalidDag):
        dag.parse(json.dumps(doc), ids=ids)


@settings(max_examples=200, deadline=None)
@given(st.lists(json_values, min_size=1, max_size=4), st.sampled_from(list(dag.IdMode)))
def test_random_nodes_raise_only_invalid_dag(nodes: list[Any], ids: dag.IdMode) -> None:
    valid = chain(2)
    with contextlib.suppress(InvalidDag):
        dag.parse(json.dumps({"schema_version": "v1", "nodes": [*valid, *nodes]}), ids=ids)
