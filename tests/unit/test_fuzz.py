"""Hostile input for the core and the services (embedded backends): whatever comes in, the
only errors are the typed InvalidSpec / Conflict family, each with a message, and nothing is
half-written."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.api.v1alpha1.strategydag import parse_spec as parse_strategy_spec
from qmtl_dagmanager.api.v1alpha1.versionsentinel import action_of, parse_spec
from qmtl_dagmanager.core import dag, topics
from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.strategies import StrategyService, dag_text
from tests.unit.dags import encode, node

CONFUSABLES = [
    "\u0412\u0422\u0421",  # Cyrillic letters that look like BTC
    "\u212a",  # Kelvin sign, lower-cases to an ASCII k
    "BTC\u200b",  # zero-width space
    "\uff42\uff54\uff43",  # full-width btc
    "e\u0301",  # combining accent
    "\u202eCTB",  # right-to-left override
    "\u00df",
    "\u0130",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(CONFUSABLES)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
FIELDS = [
    "node_id", "node_type", "interval", "period", "inputs", "dependencies", "params", "config",
    "code_hash", "schema_hash", "schema_compat_id", "schema_id", "tags", "name", "bucket",
    "match_mode", "config_hash", "traffic_weight", "version",
]  # fmt: skip


def valid_doc() -> dict[str, Any]:
    a = node("StreamInput", tags=["BTC", "price"], code="a")
    b = node("ProcessingNode", inputs=[a["node_id"]], code="b")
    return {"schema_version": "v1", "nodes": [a, b], "meta": {"topic_namespace": "w.live"}}


def planner() -> DiffService:
    clock = ManualClock(time.time())
    return DiffService(
        MemoryGraphStore(),
        MemoryTopicAdmin(),
        ControlBus(MemoryEventBus(), clock),
        clock,
        Metrics(),
    )


def typed_only(f: Any) -> None:
    try:
        f()
    except DagManagerError as e:
        assert e.message and e.reason, e


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_are_invalid_json_or_a_dag(data: bytes) -> None:
    typed_only(lambda: dag.parse(data))


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(json_values)
def test_any_json_document_is_handled(doc: Any) -> None:
    try:
        data = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return  # not representable (non-finite floats are tested separately)
    typed_only(lambda: dag.parse(data))


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.integers(0, 1), st.sampled_from(FIELDS), json_values, st.sampled_from(list(dag.IdMode)))
def test_a_mutated_node_is_refused_or_planned(
    index: int, field: str, value: Any, ids: dag.IdMode
) -> None:
    doc = valid_doc()
    doc["nodes"][index][field] = value
    try:
        data = orjson.dumps(doc)
    except (TypeError, orjson.JSONEncodeError):
        return
    service = planner()

    async def run() -> None:
        before = await service.graph.counts()
        try:
            await service.diff(Request("fuzz", world_id="w"), data, ids=ids)
        except DagManagerError as e:
            assert e.message and e.reason
            assert await service.graph.counts() == before  # nothing half-written

    asyncio.run(run())


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (b'{"nodes": [], "x": NaN}', "InvalidJson"),
        (b'{"nodes": [], "x": Infinity}', "InvalidJson"),
        (b'{"nodes": [], "x": -Infinity}', "InvalidJson"),
        (b"[" * 5000 + b"]" * 5000, "InvalidJson"),
        (b'{"nodes": [' + b"1," * 10 + b"1]}", "InvalidField"),
        (b'{"nodes": "x"}', "MissingField"),
        (b"\xff\xfe{}", "InvalidJson"),
    ],
)
def test_hostile_documents_name_their_problem(text: bytes, reason: str) -> None:
    with pytest.raises(InvalidSpec) as e:
        dag.parse(text)
    assert e.value.reason == reason, e.value.message


@pytest.mark.parametrize("tag", CONFUSABLES)
def test_confusable_tags_and_namespaces_give_valid_ascii_topics(tag: str) -> None:
    n = node("StreamInput", tags=[tag], code=f"conf-{tag}")
    doc = {"nodes": [n], "meta": {"topic_namespace": {"world": tag, "domain": "live"}}}
    outcome = asyncio.run(planner().diff(Request("conf", world_id="w"), orjson.dumps(doc)))
    topic = outcome.plan.nodes[0].topic
    assert topic.isascii() and topics.VALID_TOPIC.match(topic), topic


def test_size_limits_are_enforced_with_clear_errors() -> None:
    limits = dag.Limits(max_nodes=3, max_bytes=10_000, max_tags=4)
    nodes = [node("StreamInput", tags=["BTC"], code=f"c{i}") for i in range(4)]
    with pytest.raises(InvalidSpec, match="4 nodes, the limit is 3"):
        dag.parse(encode(nodes), limits=limits)
    with pytest.raises(InvalidSpec, match="the limit is 10000"):
        dag.parse(b" " * 10_001, limits=limits)
    many = node("StreamInput", tags=[f"t{i}" for i in range(5)], code="t")
    with pytest.raises(InvalidSpec, match="tags"):
        dag.parse(encode([many]), limits=limits)
    huge = node("StreamInput", tags=["BTC"], code="x" * 100_000)
    with pytest.raises(InvalidSpec, match="code_hash"):
        dag.parse(encode([huge]))
    nested = node("ProcessingNode", params={"x": 1}, code="n")
    head, tail = orjson.dumps({"nodes": [nested]}).decode().split('{"x":1}')
    deep = '{"a":' * 900 + "0" + "}" * 900  # under the JSON parser's own depth limit
    data = (head + deep + tail).encode()
    for ids in dag.IdMode:
        with pytest.raises(InvalidSpec, match=r"nested|NodeID|depth"):
            asyncio.run(planner().diff(Request("deep", world_id="w"), data, ids=ids))


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from([
    "strategyId", "version", "stableVersion", "steps", "analysis", "rollbackWindow",
    "prometheusUrl", "strategyRef", "paused", "promote", "abort", "worldId",
]), json_values, max_size=8))  # fmt: skip
def test_any_versionsentinel_spec_is_parsed_or_refused(spec: dict[str, Any]) -> None:
    typed_only(lambda: parse_spec(spec))


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30) | st.sampled_from(CONFUSABLES))
def test_any_action_annotation_is_parsed_or_refused(value: str) -> None:
    typed_only(lambda: action_of({"qmtl.io/action": value}))


text = st.text(max_size=30) | st.sampled_from(CONFUSABLES)
strategy_specs = st.fixed_dictionaries(
    {"strategyId": text},
    optional={
        "dag": st.fixed_dictionaries(
            {"nodes": st.lists(st.dictionaries(st.sampled_from(FIELDS), json_values), max_size=3)},
            optional={
                "schemaVersion": st.sampled_from(["v1", "1", "1.0"]),
                "meta": st.dictionaries(st.text(max_size=8), json_values, max_size=3),
            },
        ),
        "dagConfigMapRef": st.fixed_dictionaries({"name": text, "key": text}),
        "worldId": text,
        "executionDomain": text,
        "asOf": text,
        "partition": text,
        "version": text,
        "deletionPolicy": st.sampled_from(["Delete", "Retain"]),
        "paused": st.booleans(),
        "dryRun": st.booleans(),
    },
)


@settings(max_examples=300, deadline=None)
@given(strategy_specs)
def test_any_schema_valid_strategydag_spec_is_planned_or_refused(spec: dict[str, Any]) -> None:
    """Specs of the CRD's schema (the API server admits nothing else) with hostile values."""
    service = planner()

    async def run() -> None:
        try:
            s = parse_strategy_spec(spec)
            await StrategyService(service, service.graph).reconcile(s, dag_text(s, None))
        except DagManagerError as e:
            assert e.message and e.reason

    asyncio.run(run())
