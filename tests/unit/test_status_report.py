"""`dagmanager status` rendering: figures and verdicts from a /metrics text."""

from __future__ import annotations

from qmtl_dagmanager.status_report import render

NOW = 1_800_000_000.0
HEALTHY = """
dependency_up{dependency="neo4j"} 1
dependency_up{dependency="kafka"} 1
dagmanager_slo_window_seconds 3600
dagmanager_slo_ratio{slo="SLO-1"} 0.99
dagmanager_slo_events{slo="SLO-1"} 1000
dagmanager_slo_ratio{slo="SLO-2"} 1
dagmanager_slo_events{slo="SLO-2"} 40
dagmanager_slo_ratio{slo="SLO-3"} 1
dagmanager_slo_events{slo="SLO-3"} 120
compute_nodes_total 1200
queues_total 1300
orphan_queue_total 4
gc_orphans_kept 4
gc_last_run_timestamp 1799999400
gc_next_run_timestamp 1800003000
"""


def test_a_healthy_process() -> None:
    r = render("127.0.0.1:8001", HEALTHY, {"status": "ok", "neo4j": "ok"}, NOW)
    assert r.healthy, r.problems
    assert "over the last 60 min" in r.text
    assert " 99.00 % of 1000" in r.text
    assert "compute nodes  1200 (limit 50000)" in r.text
    assert "last run        10 min ago" in r.text and "next run        in 50 min" in r.text
    assert r.text.endswith("verdict: healthy")


def test_every_problem_is_named() -> None:
    text = (
        HEALTHY.replace(
            'dependency_up{dependency="kafka"} 1', 'dependency_up{dependency="kafka"} 0'
        )
        .replace('ratio{slo="SLO-1"} 0.99', 'ratio{slo="SLO-1"} 0.90')
        .replace("compute_nodes_total 1200", "compute_nodes_total 60000")
        .replace("gc_next_run_timestamp 1800003000", "gc_next_run_timestamp 1799990000")
    )
    r = render("x", text, None, NOW)
    assert not r.healthy
    assert "kafka    DOWN" in r.text and "BREACHED" in r.text and "OVER" in r.text
    assert r.problems == [
        "kafka does not answer",
        "SLO-1 at 90.00 % (target 95 %)",
        "compute nodes: 60000 over the 50000 limit",
        "the timed GC run is 2.8 h overdue",
    ]


def test_no_events_is_not_a_breach() -> None:
    r = render("x", 'dagmanager_slo_ratio{slo="SLO-1"} NaN\n', None, NOW)
    assert "no events" in r.text and "dependencies" in r.text
    assert "unknown (no probe yet)" in r.text


def test_topics_pending_and_failing_to_settle() -> None:
    calm = render("x", HEALTHY + "topics_pending 3\ntopic_settle_failures_total 0\n", None, NOW)
    assert calm.healthy, calm.problems
    assert "pending         3 (acknowledged, not yet described by a broker)" in calm.text
    stuck = render("x", HEALTHY + "topics_pending 2\ntopic_settle_failures_total 5\n", None, NOW)
    assert stuck.problems == ["5 topic creation(s) failed to settle; 2 pending"]
