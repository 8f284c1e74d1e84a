"""Benchmark of the pure core: parse + validate + plan on the shared benchmark DAGs.

    python bench/core_bench.py [--repeat N] [--json OUT]

Cases: a DAG whose nodes are all already known to the graph (every node reused: the common
resubmission), a brand-new DAG (every node created), and a known DAG with one node renamed each
run, parsed with the node memo (a changed resubmission in the sidecar), each with node ids
verified (recomputed) and trusted, on the native path (src/native) and on the Python one.
Reports the median and p90 of wall time per run. By default the heap is run as the sidecar
runs it (`--heap sidecar`: no automatic full collection during a run, one between runs).
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import time
from pathlib import Path

import orjson

from qmtl_dagmanager.core import dag as dagmod
from qmtl_dagmanager.core import native
from qmtl_dagmanager.core import plan as planmod
from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.heap import NEVER

# the native extension (src/native) when it is installed, then the Python reference path
PATHS = ("native", "python") if native.available else ("python",)
DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


HEAP = {"policy": "sidecar"}


def between_runs() -> None:
    """What the sidecar does between diffs (heap.FullCollections): a full collection while
    idle, none automatic during a diff. With `--heap automatic`, nothing."""
    if HEAP["policy"] == "sidecar":
        gc.collect()


def known_records(raw: bytes, request: planmod.Request) -> dict[str, planmod.NodeRecord]:
    """Plan once as new, then describe the result as what the graph holds."""
    d = dagmod.parse(raw, ids=dagmod.IdMode.TRUST)
    first = planmod.plan(d, request, {}, {}, TopicCatalog())
    return {
        p.node.node_id: planmod.NodeRecord(
            p.node.node_id,
            p.node.schema_hash,
            p.node.schema_compat_id,
            (planmod.QueueRecord(p.topic, p.compute_key),),
        )
        for p in first.nodes
    }


def measure(
    raw: bytes, records: dict[str, planmod.NodeRecord], ids: dagmod.IdMode, repeat: int
) -> list[float]:
    request = planmod.Request("bench", world_id="w1", execution_domain="live")
    catalog = TopicCatalog()
    times = []
    for _ in range(repeat):
        between_runs()
        t0 = time.perf_counter()
        d = dagmod.parse(raw, ids=ids)
        planmod.plan(d, request, records, {}, catalog)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
    return times


def measure_memo(
    raw: bytes, records: dict[str, planmod.NodeRecord], ids: dagmod.IdMode, repeat: int
) -> list[float]:
    """A known DAG whose bytes change every run (one node renamed), parsed with a node memo
    that has seen the DAG before: what the sidecar does for a changed resubmission."""
    request = planmod.Request("bench", world_id="w1", execution_domain="live")
    catalog = TopicCatalog()
    memo = dagmod.NodeMemo()
    dagmod.parse(raw, ids=ids, memo=memo)
    doc = orjson.loads(raw)
    variants = []
    for i in range(repeat):
        doc["nodes"][0]["name"] = f"renamed-{i}"
        variants.append(orjson.dumps(doc))
    times = []
    for variant in variants:
        between_runs()
        t0 = time.perf_counter()
        d = dagmod.parse(variant, ids=ids, memo=memo)
        planmod.plan(d, request, records, {}, catalog)  # type: ignore[arg-type]
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=0, help="runs per case (default: 200 / 20)")
    ap.add_argument("--json", type=Path)
    ap.add_argument(
        "--heap",
        choices=("sidecar", "automatic"),
        default="sidecar",
        help="full collections between runs and none automatic (as the sidecar), or CPython's",
    )
    args = ap.parse_args()
    HEAP["policy"] = args.heap
    if args.heap == "sidecar":
        gc.set_threshold(*gc.get_threshold()[:2], NEVER)
    request = planmod.Request("bench", world_id="w1", execution_domain="live")
    results = []
    print(
        f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}"
        f", heap: {args.heap}"
    )
    print(f"{'case':<46} {'median ms':>10} {'p90 ms':>8} {'per node µs':>12}")
    for size, file in (("1k", "bench-dag-1k.json"), ("10k", "bench-dag-10k.json")):
        raw = (DATA / file).read_bytes()
        n = len(dagmod.parse(raw, ids=dagmod.IdMode.TRUST).nodes)
        repeat = args.repeat or (200 if size == "1k" else 20)
        known = known_records(raw, request)
        decode = []
        for _ in range(repeat):
            between_runs()
            t0 = time.perf_counter()
            orjson.loads(raw)
            decode.append(time.perf_counter() - t0)
        med = statistics.median(decode) * 1e3
        case = f"{size} nodes, JSON decode alone"
        print(
            f"{case:<46} {med:>10.2f} {sorted(decode)[int(repeat * 0.9) - 1] * 1e3:>8.2f} "
            f"{med * 1e3 / n:>12.2f}"
        )
        for path in PATHS:
            native.enabled = path == "native"
            for label, records in (("known", known), ("new", {}), ("changed, memo", known)):
                for ids in (dagmod.IdMode.TRUST, dagmod.IdMode.VERIFY):
                    run = measure_memo if label == "changed, memo" else measure
                    run(raw, records, ids, 3)  # warm-up
                    t = run(raw, records, ids, repeat)
                    med = statistics.median(t) * 1e3
                    p90 = sorted(t)[int(len(t) * 0.9) - 1] * 1e3
                    case = f"{size} nodes, {path}, {label}, ids {ids.value}"
                    print(f"{case:<46} {med:>10.2f} {p90:>8.2f} {med * 1e3 / n:>12.2f}")
                    results.append(
                        {
                            "case": case,
                            "nodes": n,
                            "median_ms": round(med, 3),
                            "p90_ms": round(p90, 3),
                            "runs": repeat,
                        }
                    )
        native.enabled = native.available
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
