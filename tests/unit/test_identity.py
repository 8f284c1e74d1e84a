"""NodeID, CRC32 and ComputeKey against the shared vectors, plus identity invariants."""

from __future__ import annotations

import json
import random
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qmtl_dagmanager.core import context, dag, identity
from qmtl_dagmanager.core.errors import InvalidDag

VECTORS = json.loads((Path(__file__).parent.parent / "data" / "nodeid-vectors.json").read_text())


@pytest.mark.parametrize("case", VECTORS["node_id_cases"], ids=lambda c: c["description"])
def test_node_id_vectors(case: dict[str, Any]) -> None:
    assert identity.preimage(case["node"]) == case["preimage"]
    assert identity.node_id(case["node"]) == case["node_id"]


@pytest.mark.parametrize("case", VECTORS["invalid_cases"], ids=lambda c: c["description"])
def test_invalid_vectors_are_rejected_by_validation(case: dict[str, Any]) -> None:
    node = {**case["node"], "schema_hash": "h", "node_id": "blake3:" + "0" * 64}
    with pytest.raises(InvalidDag) as info:
        dag.from_document({"schema_version": "v1", "nodes": [node]})
    expected_reason = {
        "schema compat conflict": "SchemaIdConflict",
        "invalid interval": "InvalidField",
    }[case["error"]]
    assert info.value.reason == expected_reason
    assert "blake3:" + "0" * 64 in str(info.value)


@pytest.mark.parametrize("case", VECTORS["crc32_cases"], ids=str)
def test_crc32_vectors(case: dict[str, Any]) -> None:
    assert identity.crc32(case["node_ids"]) == case["crc32"]


def test_crc32_is_the_running_crc_over_submitted_order() -> None:
    ids = ["blake3:" + "%064x" % i for i in range(50)] + [None, ""]  # noqa: UP031
    running = 0
    for i in ids:
        running = zlib.crc32(str(i or "").encode(), running)
    assert identity.crc32(ids) == running
    assert identity.crc32(list(reversed(ids))) != running


@pytest.mark.parametrize("case", VECTORS["compute_key_cases"], ids=str)
def test_compute_key_vectors(case: dict[str, Any]) -> None:
    ctx = context.resolve(
        {
            "world_id": case["world_id"],
            "execution_domain": case["execution_domain"],
            "as_of": case["as_of"],
            "partition": case["partition"],
        }
    )
    assert ctx.key_for(case["node_id"]) == case["compute_key"]
    assert (
        identity.compute_key(
            case["node_id"],
            case["world_id"],
            ctx.execution_domain,
            case["as_of"],
            case["partition"],
        )
        == case["compute_key"]
    )


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("", "backtest"),
        ("default", "backtest"),
        ("paper", "dryrun"),
        ("sim", "dryrun"),
        ("PROD", "live"),
        ("production", "live"),
        (" live ", "live"),
        ("shadow", "shadow"),
        ("compute-only", "backtest"),
        ("Paper_Trading", "dryrun"),
        ("sandbox", "backtest"),
        ("world:paper", "dryrun"),
        ("moon", "moon"),
    ],
)
def test_domain_aliases(raw: str, expected: str) -> None:
    assert context.normalize_domain(raw) == expected


def test_safe_mode_downgrades_dryrun_without_as_of() -> None:
    down = context.resolve({"world_id": "w", "execution_domain": "paper"})
    assert down.execution_domain == "backtest" and down.safe_mode_downgraded
    kept = context.resolve({"world_id": "w", "execution_domain": "paper", "as_of": "2025"})
    assert kept.execution_domain == "dryrun" and not kept.safe_mode_downgraded
    live = context.resolve({"world_id": "w", "execution_domain": "live"})
    assert live.execution_domain == "live" and not live.safe_mode_downgraded
    missing = context.resolve({"world_id": "w"})
    assert missing.execution_domain == "backtest" and missing.safe_mode_downgraded


def test_context_layers_earliest_wins() -> None:
    ctx = context.resolve({"world_id": "", "as_of": "a"}, {"world_id": "w2", "as_of": "b"})
    assert (ctx.world_id, ctx.as_of) == ("w2", "a")


# --- properties ------------------------------------------------------------------------

json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.text(max_size=8)
    | (st.floats(allow_nan=False, allow_infinity=False))
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
dep_ids = st.lists(st.from_regex(r"blake3:[0-9a-f]{64}", fullmatch=True), max_size=5)


def _shuffled(value: Any, rnd: random.Random) -> Any:
    if isinstance(value, dict):
        items = list(value.items())
        rnd.shuffle(items)
        return {k: _shuffled(v, rnd) for k, v in items}
    if isinstance(value, list):
        return [_shuffled(v, rnd) for v in value]
    return value


@given(params=json_value, deps=dep_ids, seed=st.integers(0, 2**32))
def test_key_order_and_dependency_order_never_change_an_id(
    params: Any, deps: list[str], seed: int
) -> None:
    rnd = random.Random(seed)
    node = {
        "node_type": "N",
        "interval": 60,
        "period": 3,
        "code_hash": "c",
        "schema_compat_id": "s",
        "params": params,
        "inputs": deps,
    }
    shuffled_deps = list(deps)
    rnd.shuffle(shuffled_deps)
    other = _shuffled({**node, "params": params, "inputs": shuffled_deps}, rnd)
    assert identity.node_id(node) == identity.node_id(other)


@given(
    params=st.dictionaries(st.text(max_size=6), json_value, max_size=4),
    dropped=st.dictionaries(
        st.sampled_from([*sorted(identity.CONTEXT_KEYS), "ENV_X", "Env_y", "AS_OF", "Seed"]),
        json_value,
        min_size=1,
        max_size=4,
    ),
)
def test_dropped_context_keys_never_change_an_id(
    params: dict[str, Any], dropped: dict[str, Any]
) -> None:
    clean = {k: v for k, v in params.items() if not identity._dropped(k)}
    base = {"node_type": "N", "interval": 1, "code_hash": "c", "schema_compat_id": "s"}
    nested = {**clean, "inner": {**clean, **dropped}}
    assert identity.node_id({**base, "params": {**clean, **dropped}}) == identity.node_id(
        {**base, "params": clean}
    )
    assert identity.node_id({**base, "params": nested}) == identity.node_id(
        {**base, "params": {**clean, "inner": clean}}
    )


_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
_KEYS = st.sampled_from(["a", "B", "seed", "Env_x", "world_id", "é", "z\U0001f600"]) | st.text()
_JSONISH = st.recursive(
    _SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=25,
)


@given(_JSONISH)
def test_canonical_params_is_the_reference_encoding(params: Any) -> None:
    """The orjson fast path gives exactly json.dumps's text, or defers to it."""
    expected = identity.canonical_json(identity._strip_context(params))
    assert identity.canonical_params(params) == expected


@pytest.mark.parametrize(
    "params",
    [
        {"x": 1e-05, "y": 1e16, "z": 2**64, "w": -(2**63) - 1},
        {"lone": "\ud800"},
        {"deep": [[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]] * 2},
        {1: "int key"},
        {"t": (1, 2)},
        {"nested": {"seed": 3, "env_home": 1, "keep": [0.5, -0.0]}},
    ],
    ids=["exponent floats and big ints", "lone surrogate", "deep", "int key", "tuple", "ctx"],
)
def test_canonical_params_edge_cases(params: Any) -> None:
    try:
        expected = identity.canonical_json(identity._strip_context(params))
    except (TypeError, ValueError) as e:
        with pytest.raises(type(e)):
            identity.canonical_params(params)
        return
    assert identity.canonical_params(params) == expected


_NODE_FIELD = st.none() | st.integers(-3, 3) | st.text(max_size=3) | st.booleans() | st.floats(0, 9)
_DEPS = st.none() | st.lists(st.none() | st.text(max_size=2) | st.integers(0, 2), max_size=3)


@given(
    st.fixed_dictionaries(
        {},
        optional={
            "interval": _NODE_FIELD,
            "period": _NODE_FIELD,
            "inputs": _DEPS,
            "dependencies": _DEPS,
            "schema_compat_id": _NODE_FIELD,
            "schema_id": _NODE_FIELD,
            "code_hash": _NODE_FIELD,
        },
    )
)
def test_preimage_fast_paths_agree_with_the_field_rules(node: dict[str, Any]) -> None:
    def reference() -> str:
        return "|".join(
            (
                str(node.get("node_type")),
                str(identity.as_int(node.get("interval"), "interval")),
                str(identity.as_int(node.get("period"), "period")),
                identity.params_blob(node),
                ",".join(sorted(identity.dependency_ids(node))),
                identity.schema_compat_id(node),
                str(node.get("code_hash")),
            )
        )

    try:
        expected = reference()
    except identity.IdentityError as e:
        with pytest.raises(identity.IdentityError) as info:
            identity.preimage(node)
        assert str(info.value) == str(e)
        return
    assert identity.preimage(node) == expected
