"""`dagmanager status`: one process's health for a person at a terminal, from its `/metrics`
(and `/status` where served): each dependency, the SLO figures of the last hour, the graph's
size against the capacity limits, and the GC backlog. Pure: text in, text out."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

# (id, what, target good fraction)
SLOS = (
    ("SLO-1", "diffs answered within 100 ms", 0.95),
    ("SLO-2", "topic creations that succeeded", 0.999),
    ("SLO-3", "time without a sentinel gap", 1.0),
)
LIMITS = {"compute_nodes_total": 50_000, "queues_total": 100_000}


@dataclass
class Report:
    text: str
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems


def samples(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append((dict(s.labels), float(s.value)))
    return out


def _one(m: dict[str, list[tuple[dict[str, str], float]]], name: str, **labels: str) -> float:
    for got, value in m.get(name, []):
        if all(got.get(k) == v for k, v in labels.items()):
            return value
    return math.nan


def _ago(seconds: float) -> str:
    seconds = abs(seconds)
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _gc(
    m: dict[str, list[tuple[dict[str, str], float]]], now: float, problems: list[str]
) -> list[str]:
    lines = ["GC"]
    orphans, kept = _one(m, "orphan_queue_total"), _one(m, "gc_orphans_kept")
    lines.append(f"  orphaned queues {orphans:.0f} (not yet due at the last run: {kept:.0f})")
    last, due = _one(m, "gc_last_run_timestamp"), _one(m, "gc_next_run_timestamp")
    lines.append(f"  last run        {_ago(now - last) + ' ago' if last > 0 else 'never here'}")
    if due > 0:
        late = now - due
        if late > 600:
            problems.append(f"the timed GC run is {_ago(late)} overdue")
        lines.append(
            f"  next run        {'overdue by ' + _ago(late) if late > 0 else 'in ' + _ago(late)}"
        )
    else:
        lines.append("  next run        no timed GC in this process")
    return lines


def _topics(m: dict[str, list[tuple[dict[str, str], float]]], problems: list[str]) -> list[str]:
    """Topics answered on Kafka's acknowledgement, not yet described by a broker."""
    pending, failures = _one(m, "topics_pending"), _one(m, "topic_settle_failures_total")
    if math.isnan(pending):
        return []
    if failures > 0 and pending > 0:
        problems.append(f"{failures:.0f} topic creation(s) failed to settle; {pending:.0f} pending")
    return [
        "topics",
        f"  pending         {pending:.0f} (acknowledged, not yet described by a broker)",
        f"  settle failures {0 if math.isnan(failures) else failures:.0f}",
    ]


def render(
    target: str, metrics_text: str, status: dict[str, Any] | None, now: float | None = None
) -> Report:
    now = time.time() if now is None else now
    m = samples(metrics_text)
    lines, problems = [f"DAG Manager at {target}"], []

    lines.append("dependencies")
    for dep in ("neo4j", "kafka"):
        up = _one(m, "dependency_up", dependency=dep)
        state = "unknown (no probe yet)" if math.isnan(up) else ("up" if up == 1 else "DOWN")
        if up == 0:
            problems.append(f"{dep} does not answer")
        lines.append(f"  {dep:<8} {state}")
    if status is not None:
        lines.append(f"  /status  {status.get('status', '?')} (neo4j: {status.get('neo4j', '?')})")

    window = _one(m, "dagmanager_slo_window_seconds")
    span = "no window yet" if math.isnan(window) else f"over the last {_ago(window)}"
    lines.append(f"SLOs ({span})")
    for slo, what, target_ratio in SLOS:
        ratio = _one(m, "dagmanager_slo_ratio", slo=slo)
        events = _one(m, "dagmanager_slo_events", slo=slo)
        if math.isnan(ratio):
            figure, verdict = "     -", "no events"
        else:
            figure = f"{ratio * 100:6.2f} %"
            verdict = "ok" if ratio >= target_ratio else "BREACHED"
            if ratio < target_ratio:
                problems.append(f"{slo} at {ratio * 100:.2f} % (target {target_ratio * 100:g} %)")
        count = "" if math.isnan(events) else f" of {events:.0f}"
        lines.append(
            f"  {slo} {what:<32} {figure}{count:<10} target {target_ratio * 100:g} %  {verdict}"
        )

    lines.append("graph")
    for name, limit in LIMITS.items():
        value = _one(m, name)
        label = name.removesuffix("_total").replace("_", " ")
        if math.isnan(value):
            lines.append(f"  {label:<14} not exported")
            continue
        over = value > limit
        if over:
            problems.append(f"{label}: {value:.0f} over the {limit} limit")
        lines.append(f"  {label:<14} {value:.0f} (limit {limit}{': OVER' if over else ''})")
    cache = _one(m, "nodecache_resident_bytes", scope="total")
    if not math.isnan(cache):
        entries = _one(m, "node_cache_entries")
        lines.append(f"  node cache     {cache / 2**20:.1f} MiB, {entries:.0f} records")

    lines += _topics(m, problems)
    lines += _gc(m, now, problems)
    lines.append("verdict: " + ("healthy" if not problems else "; ".join(problems)))
    return Report("\n".join(lines), problems)
