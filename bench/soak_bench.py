"""Soak: the sidecar under sustained load on the real stack, memory sampled over time.

    python bench/soak_bench.py [--minutes 10] [--rate 50] [--streams 200]

`dagmanager server` runs as its own process (node ids trusted, as behind the Gateway). The
load is open-loop at a fixed rate over 20 strategies, alternating a known 1k-node DAG (the
Gateway resubmitting) and 100-node DAGs whose bytes change every time (a display name), so
every second request is parsed and planned in full. RSS is sampled every second and reported
per minute; then 200 streams are opened at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
import orjson

from qmtl_dagmanager.client import GatewayClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gen import dumps, generate  # noqa: E402

from bench.common import backend_env, free_port, open_loop, stack_env  # noqa: E402
from bench.sidecar_bench import pct, rss_mb, wait_serving  # noqa: E402


async def soak(
    client: GatewayClient, pid: int, rate: float, seconds: float, run: str
) -> tuple[list[float], dict[str, int], list[tuple[float, float]]]:
    big = dumps(generate(1000, seed=1, salt=f"soak-big-{run}"))
    small = generate(100, seed=2, salt=f"soak-small-{run}")
    for i in range(20):  # the strategies exist before the clock starts
        await client.diff(f"soak-{run}-{i}", big if i % 2 == 0 else dumps(small), world_id="w1")
    latencies: list[float] = []
    errors: dict[str, int] = {}
    samples: list[tuple[float, float]] = []

    async def one(i: int) -> None:
        strategy = f"soak-{run}-{i % 20}"
        if i % 2 == 0:
            text = big
        else:  # same nodes, new bytes: parsed and planned in full, nothing to write
            small["meta"]["note"] = f"request {i}"
            text = orjson.dumps(small).decode()
        t0 = time.perf_counter()
        try:
            await client.diff(strategy, text, world_id="w1", timeout=30)
            latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] = errors.get(e.code().name, 0) + 1

    def sample(elapsed: float) -> None:
        samples.append((elapsed, rss_mb(pid)))
        if int(elapsed) % 60 == 0 and elapsed >= 60:
            print(
                f"  {elapsed / 60:4.1f} min: {len(latencies)} done, errors {errors}, "
                f"RSS {samples[-1][1]:.0f} MB",
                flush=True,
            )

    await open_loop(rate, seconds, one, sample)
    return latencies, errors, samples


async def streams(client: GatewayClient, n: int, run: str) -> tuple[list[float], dict[str, int]]:
    text = dumps(generate(100, seed=3, salt=f"streams-{run}"))
    await client.diff(f"streams-{run}", text, world_id="w1")
    latencies: list[float] = []
    errors: dict[str, int] = {}

    async def one() -> None:
        t0 = time.perf_counter()
        try:
            await client.diff(f"streams-{run}", text, world_id="w1", timeout=30)
            latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError as e:
            errors[e.code().name] = errors.get(e.code().name, 0) + 1

    await asyncio.gather(*(one() for _ in range(n)))
    return latencies, errors


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--streams", type=int, default=200)
    args = ap.parse_args()
    e = stack_env()
    port, http = free_port(), free_port()
    env = {
        **os.environ,
        **backend_env(e),
        "QMTL_GRPC_PORT": str(port),
        "QMTL_HTTP_PORT": str(http),
        "QMTL_GC_INTERVAL_SECONDS": "0",
        "QMTL_LOG_LEVEL": "warning",
        "QMTL_NODE_IDS": "trust",
    }
    proc = subprocess.Popen([sys.executable, "-m", "qmtl_dagmanager.cli", "server"], env=env)
    client = GatewayClient(f"127.0.0.1:{port}")
    run = uuid.uuid4().hex[:6]
    try:
        await wait_serving(port, proc)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
            f"{platform.python_version()}; sidecar pid {proc.pid}; {args.rate:g} diffs/s for "
            f"{args.minutes:g} min",
            flush=True,
        )
        lat, errors, samples = await soak(client, proc.pid, args.rate, args.minutes * 60, run)
        ms = [x * 1e3 for x in lat]
        print(
            f"soak: {len(lat)} diffs ({len(lat) / (args.minutes * 60):.1f}/s), errors {errors}, "
            f"p50 {pct(ms, 0.5):.1f} ms, p95 {pct(ms, 0.95):.1f} ms, p99 {pct(ms, 0.99):.1f} ms"
        )
        print("RSS per minute (MB, mean of 1 s samples):")
        per_minute: list[float] = []
        for m in range(int(args.minutes)):
            window = [r for t, r in samples if m * 60 <= t < (m + 1) * 60]
            if window:
                per_minute.append(sum(window) / len(window))
                print(f"  minute {m + 1:>2}: {per_minute[-1]:.1f}  (max {max(window):.1f})")
        if len(per_minute) >= 2:
            tail = per_minute[len(per_minute) // 2 :]
            print(
                f"growth over the second half: {tail[-1] - tail[0]:+.1f} MB "
                f"({(tail[-1] - tail[0]) / max(len(tail) - 1, 1):+.2f} MB/min)"
            )
        lat2, errors2 = await streams(client, args.streams, run)
        ms2 = [x * 1e3 for x in lat2]
        print(
            f"{args.streams} concurrent streams: {len(lat2)} completed, errors {errors2}, "
            f"p50 {pct(ms2, 0.5):.1f} ms, max {max(ms2):.1f} ms"
        )
    finally:
        await client.close()
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    asyncio.run(main())
