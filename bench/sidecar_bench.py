"""Benchmark of the sidecar over loopback gRPC, with the Gateway-like client, on the stack.

    python bench/sidecar_bench.py [--load-seconds 60] [--rate 50]

Starts `dagmanager server` as its own process (so its memory is its own), against the local
stack's Neo4j and Kafka. Cases: resubmitting a known 1k-node and 100-node DAG; the first
submission of a new 1k-node DAG (1k topics created in one batch); an open-loop load of 1k-node
resubmissions at a fixed rate, with the sidecar's RSS sampled every second.

With --tracing the sidecar exports its spans and audit records to a real OpenTelemetry
Collector (hack/otel/build-otelcol.sh) started for the run: the same cases then measure the
overhead of tracing, and the spans the collector received are counted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.client import GatewayClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gen import dumps, generate  # noqa: E402
from tests.otel_collector import Collector  # noqa: E402

from bench.common import kafka_extra, open_loop, stack_env, start_sidecar  # noqa: E402


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))]


def row(case: str, t: list[float], extra: str = "") -> None:
    ms = [x * 1e3 for x in t]
    print(
        f"{case:<46} {statistics.median(ms):>8.1f} {pct(ms, 0.95):>8.1f} {len(ms):>6} {extra}",
        flush=True,
    )


async def wait_serving(port: int, proc: subprocess.Popen[bytes]) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        for _ in range(300):
            if proc.poll() is not None:
                raise SystemExit("the sidecar exited during start-up")
            try:
                # types-grpcio-health-checking's HealthStub declares no RPCs
                r = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)  # type: ignore[attr-defined]
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                await asyncio.sleep(0.2)
    raise SystemExit("the sidecar did not become SERVING")


async def timed(client: GatewayClient, strategy: str, text: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        await client.diff(strategy, text, world_id="w1")
        out.append(time.perf_counter() - t0)
    return out


async def load(
    client: GatewayClient, text: str, rate: float, seconds: float, pid: int
) -> tuple[list[float], int, list[float]]:
    latencies: list[float] = []
    errors = 0
    rss: list[float] = []

    async def one(i: int) -> None:
        nonlocal errors
        t0 = time.perf_counter()
        try:
            await client.diff(f"load-{i % 20}", text, world_id="w1")
            latencies.append(time.perf_counter() - t0)
        except grpc.aio.AioRpcError:
            errors += 1

    await open_loop(rate, seconds, one, lambda _: rss.append(rss_mb(pid)))
    return latencies, errors, rss


async def full_paths(client: GatewayClient, run: str, created: list[str]) -> None:
    """Requests that take the full path: new bytes for known nodes, and new DAGs."""
    # Same nodes, different bytes each time (a display name changes): no resubmission-cache
    # hit, so every request is parsed, validated and planned in full.
    varied = generate(1000, seed=1, salt=f"b{run}")
    misses = []
    for i in range(50):
        varied["nodes"][0]["name"] = f"src-{i}"
        text = dumps(varied)
        t0 = time.perf_counter()
        await client.diff(f"known-1k-{run}", text, world_id="w1")
        misses.append(time.perf_counter() - t0)
    row("known 1k-node DAG, new bytes each time", misses)
    firsts = []
    for i in range(3):
        fresh = dumps(generate(1000, seed=10 + i, salt=f"f{run}{i}"))
        t0 = time.perf_counter()
        reply = await client.diff(f"first-{run}-{i}", fresh, world_id="w1")
        firsts.append(time.perf_counter() - t0)
        assert len(reply.queue_map) == 1000
        created.extend(reply.queue_map.values())
        await client.cleanup(f"first-{run}-{i}")
    row("first submission of a new 1k-node DAG", firsts, "(1k topics each)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--load-seconds", type=float, default=60)
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--tracing", action="store_true", help="export to a real OTLP collector")
    args = ap.parse_args()
    e = stack_env()
    collector = Collector(ROOT / ".stack", verbosity="basic") if args.tracing else None
    otlp = f"otlp_endpoint: {json.dumps(collector.endpoint)}\n" if collector else ""
    proc, port = start_sidecar(e, "bench-sidecar", "node_ids: trust\n" + otlp)
    client = GatewayClient(f"127.0.0.1:{port}")
    created: list[str] = []
    try:
        await wait_serving(port, proc)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
            f"{platform.python_version()}; sidecar pid {proc.pid}, node ids trusted; "
            f"tracing {'on (OTLP to a local collector)' if collector else 'off'}"
        )
        print(f"{'case':<46} {'p50 ms':>8} {'p95 ms':>8} {'runs':>6}")
        run = uuid.uuid4().hex[:6]
        big = dumps(generate(1000, seed=1, salt=f"b{run}"))
        small = dumps(generate(100, seed=2, salt=f"s{run}"))
        await client.diff(f"known-1k-{run}", big, world_id="w1")
        await client.diff(f"known-100-{run}", small, world_id="w1")
        row("resubmit a known 1k-node DAG", await timed(client, f"known-1k-{run}", big, 100))
        row("resubmit a known 100-node DAG", await timed(client, f"known-100-{run}", small, 200))
        await full_paths(client, run, created)
        for i in range(20):  # the load's strategies exist before the clock starts
            await client.diff(f"load-{i}", big, world_id="w1")
        lat, errors, rss = await load(client, big, args.rate, args.load_seconds, proc.pid)
        achieved = len(lat) / args.load_seconds
        row(
            f"load: 1k-node diffs at {args.rate:g}/s for {args.load_seconds:g} s",
            lat,
            f"errors={errors} completed/s={achieved:.1f}",
        )
        print(
            f"sidecar RSS during load (MB, 1 s samples): min {min(rss):.0f} "
            f"max {max(rss):.0f} first {rss[0]:.0f} last {rss[-1]:.0f}"
        )
    finally:
        await client.close()
        proc.terminate()
        proc.wait(30)
        if collector is not None:
            await asyncio.sleep(2)  # the sidecar flushed on exit; let the collector print it
            collector.stop()
            spans, records = collector.received()
            print(f"the collector received {spans} spans and {records} audit log records")
    # remove what the first submissions created, so repeated runs do not pile up topics
    admin = KafkaTopicAdmin(e["KAFKA_BOOTSTRAP_SERVERS"], timeout=60, extra=kafka_extra(e))
    await admin.delete(sorted(set(created)))


if __name__ == "__main__":
    asyncio.run(main())
