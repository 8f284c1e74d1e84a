"""The node memo: a changed DAG re-checks only its changed nodes, and a memo hit is always
exactly an object that was checked before, in the same mode and under the same limits.
The memo serves the Python path (the native extension reads nodes faster than a memo lookup),
so these tests run with the extension off."""

from __future__ import annotations

import pytest

from qmtl_dagmanager.core import dag, native
from qmtl_dagmanager.core.errors import InvalidDag
from tests.unit.dags import chain, document, encode, node


@pytest.fixture(autouse=True)
def _python_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(native, "enabled", False)


def test_memo_gives_the_same_dag_and_skips_known_nodes() -> None:
    nodes = chain(20)
    memo = dag.NodeMemo()
    first = dag.parse(encode(nodes), memo=memo)
    assert (memo.hits, memo.misses, len(memo)) == (0, 20, 20)
    nodes[5]["name"] = "renamed"  # display field: same id, new bytes for one node
    second = dag.parse(encode(nodes), memo=memo)
    plain = dag.parse(encode(nodes))
    assert second == plain
    assert second.nodes[5].name == "renamed" and first.nodes[5].name != "renamed"
    assert (memo.hits, memo.misses) == (19, 21)


def test_memo_keeps_positions_of_the_new_order() -> None:
    a, b = node(code="a"), node(code="b")
    memo = dag.NodeMemo()
    dag.parse(encode([a, b]), memo=memo)
    again = dag.parse(encode([b, a]), memo=memo)
    assert [(n.node_id, n.position) for n in again.nodes] == [
        (b["node_id"], 0),
        (a["node_id"], 1),
    ]
    assert memo.hits == 2


@pytest.mark.parametrize("value", [1.0, True])
def test_values_equal_in_python_but_not_in_json_are_checked_again(value: object) -> None:
    # 1 == 1.0 == True in Python, yet each gives another NodeID: a hit must not hide that
    n = node(params={"x": 1})
    memo = dag.NodeMemo()
    dag.parse(encode([n]), memo=memo)
    n["params"] = {"x": value}  # id kept: it no longer matches
    with pytest.raises(InvalidDag) as err:
        dag.parse(encode([n]), memo=memo)
    assert err.value.reason == "NodeIdMismatch"


def test_trusted_entries_are_not_taken_as_verified() -> None:
    n = node()
    n["period"] = 99  # content changed, id kept
    memo = dag.NodeMemo()
    dag.parse(encode([n]), ids=dag.IdMode.TRUST, memo=memo)
    with pytest.raises(InvalidDag) as err:
        dag.parse(encode([n]), ids=dag.IdMode.VERIFY, memo=memo)
    assert err.value.reason == "NodeIdMismatch"
    ok = node(code="fine")
    dag.parse(encode([ok]), ids=dag.IdMode.VERIFY, memo=memo)
    dag.parse(encode([ok]), ids=dag.IdMode.TRUST, memo=memo)  # a verified entry serves both
    assert memo.hits == 1


def test_other_limits_start_an_empty_memo() -> None:
    n = node(tags=["a", "b", "c"])
    memo = dag.NodeMemo()
    dag.parse(encode([n]), memo=memo)
    with pytest.raises(InvalidDag) as err:
        dag.parse(encode([n]), limits=dag.Limits(max_tags=2), memo=memo)
    assert err.value.reason == "TooManyTags"


def test_memo_is_bounded() -> None:
    memo = dag.NodeMemo(capacity=10)
    for i in range(5):
        dag.parse(encode(chain(8, tags=[f"t{i}"])), memo=memo)
        assert len(memo) <= 10


def test_invalid_nodes_are_never_memoised() -> None:
    bad = node()
    del bad["code_hash"]
    memo = dag.NodeMemo()
    for _ in range(2):
        with pytest.raises(InvalidDag):
            dag.parse(encode([bad]), ids=dag.IdMode.TRUST, memo=memo)
    assert len(memo) == 0


def test_documents_that_are_not_plain_json_bypass_the_memo() -> None:
    n = node()
    n["extra"] = {1, 2}  # a set: orjson cannot encode it (a document built in code)
    memo = dag.NodeMemo()
    parsed = dag.from_document(document([n]), ids=dag.IdMode.TRUST, memo=memo)
    assert parsed.nodes[0].node_id == n["node_id"] and len(memo) == 0
