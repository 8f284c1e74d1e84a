"""Pictures and tables of a diff: Mermaid, Graphviz DOT, a text table, JSON.

Reused, buffered and new nodes get different colours; a node whose fate the source did not
say (a remote diff reports only buffering) is drawn as "planned"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from qmtl_dagmanager.core.dag import Dag

COLOURS = {"create": "#2e7d32", "reuse": "#9e9e9e", "buffer": "#ef6c00", "planned": "#1565c0"}


def _label(n: Any) -> str:
    name = n.name or n.node_type
    return f"{name} ({n.node_type})" if n.name else name


def mermaid(d: Dag, actions: Mapping[str, str]) -> str:
    ids = {n.node_id: f"n{i}" for i, n in enumerate(d.nodes)}
    lines = ["flowchart LR"]
    for n in d.nodes:
        label = _label(n).replace('"', "'")
        lines.append(
            f'  {ids[n.node_id]}["{label}<br/>{n.node_id[7:15]}"]:::'
            f"{actions.get(n.node_id, 'planned')}"
        )
    for n in d.nodes:
        for dep in n.inputs:
            if dep in ids:
                lines.append(f"  {ids[dep]} --> {ids[n.node_id]}")
    for action, colour in COLOURS.items():
        lines.append(f"  classDef {action} fill:{colour},color:#fff,stroke:#333")
    return "\n".join(lines) + "\n"


def dot(d: Dag, actions: Mapping[str, str]) -> str:
    ids = {n.node_id: f"n{i}" for i, n in enumerate(d.nodes)}
    lines = [
        "digraph dag {",
        "  rankdir=LR;",
        '  node [shape=box, style="rounded,filled", fontcolor=white, fontname="Helvetica"];',
    ]
    for n in d.nodes:
        action = actions.get(n.node_id, "planned")
        label = _label(n).replace('"', "'")
        lines.append(
            f'  {ids[n.node_id]} [label="{label}\\n{n.node_id[7:15]} ({action})", '
            f'fillcolor="{COLOURS[action]}"];'
        )
    for n in d.nodes:
        for dep in n.inputs:
            if dep in ids:
                lines.append(f"  {ids[dep]} -> {ids[n.node_id]};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def table(d: Dag, actions: Mapping[str, str], topics: Mapping[str, str]) -> str:
    rows = [("NODE", "TYPE", "ACTION", "TOPIC")]
    rows += [
        (n.node_id[:19], n.node_type, actions.get(n.node_id, "planned"), topics.get(n.node_id, ""))
        for n in d.nodes
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return (
        "\n".join(
            f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}" for r in rows
        )
        + "\n"
    )


def as_json(
    summary: Mapping[str, Any], d: Dag, actions: Mapping[str, str], topics: Mapping[str, str]
) -> str:
    body = {
        **summary,
        "nodes": [
            {
                "node_id": n.node_id,
                "node_type": n.node_type,
                "name": n.name,
                "action": actions.get(n.node_id, "planned"),
                "topic": topics.get(n.node_id),
            }
            for n in d.nodes
        ],
    }
    return orjson.dumps(body, option=orjson.OPT_INDENT_2).decode() + "\n"
