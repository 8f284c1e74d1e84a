"""The growth chart of `bench/scale_bench.py`: p95 Diff latency (log scale) against stored
nodes, one line per case and store, the floors dashed. Plain SVG, no plotting library."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

W, H, LEFT, RIGHT, TOP, BOTTOM = 760, 420, 64, 230, 24, 48
CASES = [  # (key in a row, label, colour)
    ("new_200", "new 200-node DAG", "#d62728"),
    ("known_1k_new_bytes", "known 1k-node DAG, new bytes", "#1f77b4"),
    ("resubmission", "identical resubmission", "#2ca02c"),
    ("new_1k", "new 1k-node DAG", "#9467bd"),
]
FLOORS = [("floor_create_200", "plain create_topics, 200", "#d62728")]
STORES = [("embedded", "embedded", ""), ("neo4j", "Neo4j + Kafka", "")]


def _value(row: dict[str, Any], key: str) -> float | None:
    v = row.get(key)
    if isinstance(v, dict):
        v = v.get("p95", v.get("p50"))
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


def write_svg(results: dict[str, Any], path: Path) -> None:
    series: list[tuple[str, str, bool, list[tuple[float, float]]]] = []
    for store, store_label, _ in STORES:
        rows = results.get(store) or []
        marker = store == "embedded"
        for key, label, colour in CASES:
            pts = [(r["stored"], v) for r in rows if (v := _value(r, key)) is not None]
            if pts:
                series.append((f"{store_label}: {label}", colour, marker, pts))
        for key, label, colour in FLOORS:
            pts = [(r["stored"], v) for r in rows if (v := _value(r, key)) is not None]
            if pts:
                series.append((f"floor: {label}", colour + "|dash", False, pts))
    xs = [x for *_, pts in series for x, _ in pts] or [1]
    ys = [y for *_, pts in series for _, y in pts] or [1]
    x_max = max(xs) or 1
    y_lo = 10 ** math.floor(math.log10(max(min(ys), 0.1)))
    y_hi = 10 ** math.ceil(math.log10(max(ys)))
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(x: float) -> float:
        return LEFT + pw * x / x_max

    def sy(y: float) -> float:
        return TOP + ph * (1 - (math.log10(y) - math.log10(y_lo)) / math.log10(y_hi / y_lo))

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        'font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{LEFT}" y="15" font-size="13">p95 Diff latency (ms, log) against stored '
        f"nodes: {results.get('machine', '')}</text>",
    ]
    decade = y_lo
    while decade <= y_hi:
        y = sy(decade)
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{decade:g}</text>')
        decade *= 10
    for k in range(6):
        x = x_max * k / 5
        out.append(
            f'<text x="{sx(x):.1f}" y="{TOP + ph + 16}" text-anchor="middle">{x / 1000:g}k</text>'
        )
    out.append(
        f'<text x="{LEFT + pw / 2}" y="{H - 10}" text-anchor="middle">stored compute nodes</text>'
    )
    out.append(f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for i, (label, paint, marker, pts) in enumerate(series):
        colour, _, dash = paint.partition("|")
        style = ' stroke-dasharray="5,4"' if dash else ""
        width = "1.5" if marker else "2.5"
        path_d = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        out.append(
            f'<polyline points="{path_d}" fill="none" stroke="{colour}" '
            f'stroke-width="{width}"{style}/>'
        )
        for x, y in pts:
            shape = (
                f'<rect x="{sx(x) - 3:.1f}" y="{sy(y) - 3:.1f}" width="6" height="6" '
                if marker
                else f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" '
            )
            out.append(shape + f'fill="{colour}"/>')
        ly = TOP + 14 + i * 16
        lx = LEFT + pw + 12
        out.append(
            f'<line x1="{lx}" x2="{lx + 18}" y1="{ly - 4}" y2="{ly - 4}" stroke="{colour}" '
            f'stroke-width="{width}"{style}/>'
        )
        out.append(f'<text x="{lx + 24}" y="{ly}">{label}</text>')
    out.append("</svg>")
    path.write_text("\n".join(out) + "\n")
