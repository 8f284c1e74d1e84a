"""The dashboard and the alert rules against the code: every metric they query is one the
processes export (or a recording rule's), every alert links an existing runbook and the
dashboard, and every runbook is linked from the dashboard."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import yaml

from qmtl_dagmanager.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "charts" / "qmtl-dagmanager" / "files" / "rules" / "qmtl-dagmanager.rules.yaml"
DASHBOARD = ROOT / "charts" / "qmtl-dagmanager" / "files" / "dashboards" / "qmtl-dagmanager.json"
RUNBOOKS = ROOT / "docs" / "runbooks"
# PromQL words that look like names: aggregations, functions, keywords, label names in `by`
_IDENT = re.compile(r"(?<![\w.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(\s*\()?")
_WORDS = {"by", "without", "and", "or", "unless", "bool", "on", "ignoring", "offset", "inf"}


def exported() -> set[str]:
    names: set[str] = set()
    for family in Metrics().registry.collect():
        if family.type == "counter":
            names |= {family.name + "_total", family.name + "_created"}
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_count", "_sum", "_created")}
        else:
            names.add(family.name)
    return names


def rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(RULES.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def metric_names(expr: str) -> set[str]:
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # ranges and subqueries
    expr = re.sub(r'"[^"]*"', "", expr)
    return {
        name
        for name, call in _IDENT.findall(expr)
        if not call and name.lower() not in _WORDS  # a name followed by ( is a function
    }


def dashboard_panels() -> list[dict[str, Any]]:
    doc = orjson.loads(DASHBOARD.read_bytes())
    return [p for p in doc["panels"] if p.get("type") != "row"]


def test_rules_and_dashboard_query_only_exported_metrics() -> None:
    known = exported() | {r["record"] for r in rules() if "record" in r}
    queried: dict[str, set[str]] = {}
    for r in rules():
        queried[r.get("alert") or r["record"]] = metric_names(r["expr"])
    for p in dashboard_panels():
        for t in p.get("targets", []):
            queried[f"panel {p['title']!r}"] = metric_names(t["expr"])
    unknown = {where: names - known for where, names in queried.items() if names - known}
    assert not unknown, f"queries of metrics nobody exports: {unknown}"


def test_the_check_catches_a_metric_nobody_exports() -> None:
    assert metric_names('sum(rate(diff_requestz_total{a="b"}[5m])) by (le)') == {
        "diff_requestz_total"
    }
    assert "diff_requestz_total" not in exported()


def test_every_alert_links_a_runbook_that_exists_and_the_dashboard() -> None:
    alerts = [r for r in rules() if "alert" in r]
    assert len(alerts) >= 15
    for a in alerts:
        ann = a["annotations"]
        assert ann["dashboard_url"] == "@DASHBOARD@", a["alert"]
        m = re.fullmatch(r"@RUNBOOKS@/(\w+)\.md", ann["runbook_url"])
        assert m, f"{a['alert']}: runbook_url {ann['runbook_url']!r}"
        assert (RUNBOOKS / f"{m.group(1)}.md").is_file(), f"{a['alert']}: no runbook {m.group(1)}"
        assert a["labels"]["severity"] in ("critical", "warning", "info"), a["alert"]


def test_the_design_alert_table_is_there_as_specified() -> None:
    by_name = {r["alert"]: r for r in rules() if "alert" in r}
    expect = {  # name: (severity, for)
        "DiffDurationHigh": ("warning", "5m"),
        "QueueCreateErrors": ("critical", None),
        "SentinelGap": ("warning", None),
        "NodeCacheMemoryHigh": ("warning", "5m"),
        "ComputeNodesHigh": ("warning", "10m"),
        "QueuesHigh": ("warning", "10m"),
        "CrossContextCacheHit": ("critical", None),
    }
    for name, (severity, wait) in expect.items():
        assert by_name[name]["labels"]["severity"] == severity, name
        assert by_name[name].get("for") == wait, name
    assert "[15m]" in by_name["QueueCreateErrors"]["expr"]
    assert "> 200" in by_name["DiffDurationHigh"]["expr"]
    assert "> 50000" in by_name["ComputeNodesHigh"]["expr"]
    assert "> 100000" in by_name["QueuesHigh"]["expr"]
    assert "> 5e9" in by_name["NodeCacheMemoryHigh"]["expr"]
    assert "[3h" in by_name["OrphanQueuesGrowing"]["expr"]


def test_dashboard_panels_link_their_runbooks() -> None:
    linked = {
        link["url"].rsplit("/", 1)[-1].removesuffix(".md")
        for p in dashboard_panels()
        for link in p.get("links", [])
        if link.get("url", "").startswith("@RUNBOOKS@/")
    }
    runbooks = {p.stem for p in RUNBOOKS.glob("*.md") if p.stem != "README"}
    assert runbooks and runbooks <= linked, f"runbooks no panel links: {runbooks - linked}"
