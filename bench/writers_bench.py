"""Many writers, the soak variant: the suite of `tests/integration/test_many_writers.py` run
for longer (default 5 minutes), with latency percentiles and the invariants checked at the end.

    python bench/writers_bench.py [--minutes 5] [--sidecars 3] [--clients 9]

Three `dagmanager server` processes and a `dagmanager operator` process on the local stack's
Neo4j and Kafka, node caches on at their default TTL, GC every second with policies of a few
seconds. Exits 1 when any invariant is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.writers import Shape, soak  # noqa: E402

from bench.common import stack_env, stack_of  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--sidecars", type=int, default=3)
    ap.add_argument("--clients", type=int, default=9)
    args = ap.parse_args()
    env = stack_env()
    stack = stack_of(env)
    shape = Shape(sidecars=args.sidecars, seconds=args.minutes * 60, clients=args.clients, pool=48)
    print(
        f"[writers] machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )
    tally, findings, _ = asyncio.run(soak(stack, shape))
    lat = sorted(tally.latencies)
    if lat:
        p = statistics.quantiles(lat, n=100)
        print(
            f"[writers] diff latency over {len(lat)} answers: p50 {p[49] * 1000:.1f} ms, "
            f"p95 {p[94] * 1000:.1f} ms, p99 {p[98] * 1000:.1f} ms"
        )
    print(
        f"[writers] {tally.answered_topics} answered topics checked in Kafka at answer time: "
        f"{len(tally.missing_at_answer)} missing"
    )
    problems = findings.violations()
    if tally.missing_at_answer:
        problems.append(f"topics missing at answer time: {tally.missing_at_answer[:5]}")
    if tally.errors:
        problems.append(f"failed calls: {dict(tally.errors)}")
    for problem in problems:
        print(f"[writers] VIOLATION {problem}")
    print("[writers] " + ("all invariants hold" if not problems else f"{len(problems)} broken"))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
