"""The StrategyDAG status renderer (pure): Ready with counts and topics, large maps moved to
a ConfigMap, dry runs, retryable errors that keep the last good state, permanent ones that
fail, and condition times that move only when a condition flips."""

from __future__ import annotations

from typing import Any

from qmtl_dagmanager.core import dag, plan, strategy_status
from qmtl_dagmanager.core.conditions import condition, epoch, iso, same
from qmtl_dagmanager.core.errors import InvalidSpec, Unavailable
from qmtl_dagmanager.core.topics import TopicCatalog
from tests.unit.dags import chain, encode

REQ = plan.Request("s1", world_id="w1", execution_domain="live")


def planned(length: int) -> plan.Plan:
    d = dag.parse(encode(chain(length)))
    return plan.plan(d, REQ, {}, {}, TopicCatalog())


def conds(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def test_ready_with_counts_and_inline_topics() -> None:
    p = planned(3)
    st = strategy_status.for_plan(None, p, False, "t1", 4, "alpha")
    assert st["phase"] == "Ready" and st["observedGeneration"] == 4
    assert st["nodes"] == {"total": 3, "reused": 0, "buffered": 0, "new": 3}
    assert st["topics"] == {n.node.node_id: n.topic for n in p.nodes}
    assert st["topicsConfigMap"] is None and st["plan"] is None
    assert conds(st) == {
        "Ready": ("True", "Reconciled"),
        "Progressing": ("False", "Reconciled"),
        "Degraded": ("False", "Reconciled"),
    }


def test_a_large_map_goes_to_the_owned_config_map() -> None:
    p = planned(strategy_status.INLINE_TOPICS + 1)
    st = strategy_status.for_plan(None, p, False, "t1", 1, "alpha")
    assert st["topics"] is None and st["topicsConfigMap"] == "alpha-topics"
    assert st["topicCount"] == strategy_status.INLINE_TOPICS + 1


def test_a_dry_run_is_planned_with_the_actions() -> None:
    st = strategy_status.for_plan(None, planned(2), True, "t1", 1)
    assert st["phase"] == "Planned"
    assert [n["action"] for n in st["plan"]["nodes"]] == ["create", "create"]
    assert conds(st)["Ready"] == ("False", "DryRun")


def test_an_outage_keeps_the_last_good_state_and_says_degraded() -> None:
    good = strategy_status.for_plan(None, planned(2), False, "t1", 1)
    st = strategy_status.for_error(good, Unavailable("Kafka is down"), "t2", 1)
    assert st["phase"] == "Degraded" and st["topics"] == good["topics"]
    assert conds(st)["Ready"] == ("True", "Reconciled")
    assert conds(st)["Degraded"] == ("True", "DependencyUnavailable")
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == "t1"  # still Ready: the time did not move


def test_a_bad_spec_fails_until_it_changes() -> None:
    st = strategy_status.for_error(None, InvalidSpec("spec.dag: not JSON"), "t1", 3)
    assert st["phase"] == "Failed" and st["observedGeneration"] == 3
    assert conds(st)["Ready"] == ("False", "InvalidSpec")
    assert "not JSON" in next(c for c in st["conditions"] if c["type"] == "Ready")["message"]


def test_rendering_the_same_plan_again_is_the_same_status() -> None:
    p = planned(3)
    first = strategy_status.for_plan(None, p, False, "t1", 1)
    # what the API server keeps after a merge patch: nulls are gone
    stored = {k: v for k, v in first.items() if v is not None}
    again = strategy_status.for_plan(stored, p, False, "t2", 1)
    assert same(stored, {**again, "lastReconcileTime": "t2"})


def test_paused_keeps_the_rest() -> None:
    good = strategy_status.for_plan(None, planned(1), False, "t1", 1)
    st = strategy_status.paused(good, 2)
    assert st["phase"] == "Paused" and st["topics"] == good["topics"]


def test_condition_time_moves_only_on_a_flip() -> None:
    first = condition("Ready", True, "Reconciled", "m", "t1", 1, None)
    kept = condition("Ready", True, "Reconciled", "other", "t2", 2, first)
    flipped = condition("Ready", False, "Failed", "x" * 2000, "t3", 2, kept)
    assert kept["lastTransitionTime"] == "t1" and flipped["lastTransitionTime"] == "t3"
    assert len(flipped["message"]) == 1000


def test_times_round_trip() -> None:
    assert epoch(iso(1_800_000_000.25)) == 1_800_000_000.25
    assert iso(None) is None and epoch("") is None
