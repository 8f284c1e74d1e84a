"""Growth benchmark: Diff latency against the size of the stored graph, with the floors beside.

    python bench/scale_bench.py [--stores embedded,neo4j] [--sizes 0,10000,25000,50000]
                                [--runs 20] [--out docs/scale]

For each store (the embedded default, and Neo4j + Kafka on the local stack) a `dagmanager
server` process is started with default settings (NodeIDs verified) and filled, through the
Gateway's Diff call, with 1k-node DAGs whose nodes all carry the tag BTC (one symbol's
strategies share tags), up to each size. At each size it times, through loopback gRPC:

- a new 200-node DAG (each run a new DAG: 200 topics created), back to back,
- on Neo4j + Kafka, the same on an idle broker: before each run a probe topic is created and
  waited for (`bench/topics_bench.py` barrier), so no earlier run's partitions are still being
  created; the cases below also start on an idle broker,
- a known 1k-node DAG with new bytes (a display name changes: parsed, validated, planned),
- an identical resubmission of a known 1k-node DAG,
- a new 1k-node DAG (Neo4j + Kafka only: 1k topics created),

and, in the same run, the floors: a plain `AdminClient.create_topics` of 200 (and 1k) new
topics (until the controller answers, and in brackets until the broker describes them all:
the broker applies creations after the controller, seconds later under a backlog, and a
Diff answers only once its topics are described), one Neo4j round trip (`RETURN 1`), and
`orjson.loads` of the same 1k-node bytes. The sidecar's RSS is read at each size. Results
go to `<out>.json` (merged per store) and the chart `<out>.svg`, which the README shows. The
Neo4j store is emptied first and the topics
the run created are deleted at the end.
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
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import orjson  # noqa: E402
from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402
from tests.gen import dumps, generate  # noqa: E402

from bench.common import (  # noqa: E402
    backend_env,
    free_port,
    kafka_extra,
    neo4j_driver,
    stack_env,
    until_described,
)
from bench.scale_chart import write_svg  # noqa: E402
from bench.sidecar_bench import rss_mb, wait_serving  # noqa: E402
from bench.topics_bench import barrier  # noqa: E402
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin  # noqa: E402
from qmtl_dagmanager.client import GatewayClient  # noqa: E402

FILL = 1000  # nodes per fill DAG


def btc(doc: dict[str, Any]) -> dict[str, Any]:
    """Every node also tagged BTC (tags are not part of the NodeID)."""
    for n in doc["nodes"]:
        n["tags"] = sorted({*n["tags"], "BTC"})
    return doc


def p(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * len(s)) - 1))] * 1000


class Store:
    def __init__(self, name: str, env: dict[str, str], run: str) -> None:
        self.name, self.env, self.run = name, env, run
        self.real = name == "neo4j"
        self.port = free_port()
        self.created: list[str] = []
        self.stored = 0

    def start(self) -> subprocess.Popen[bytes]:
        cfg = ROOT / ".stack" / f"scale-{self.name}.yml"
        cfg.parent.mkdir(exist_ok=True)
        lines = [
            f"grpc_port: {self.port}",
            f"http_port: {free_port()}",
            "gc_interval_seconds: 0",
            "log_level: warning",
        ]
        if self.real:
            lines += [
                f"neo4j_dsn: {self.env['NEO4J_URI']}",
                f"neo4j_user: {self.env['NEO4J_USER']}",
                f"kafka_dsn: {self.env['KAFKA_BOOTSTRAP_SERVERS']}",
            ]
        cfg.write_text("\n".join(lines) + "\n")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_"))}
        if self.real:  # secrets and TLS/SASL settings: from the environment
            env.update(backend_env(self.env))
        return subprocess.Popen(
            [sys.executable, "-m", "qmtl_dagmanager.cli", "--config", str(cfg), "server"],
            env=env,
        )

    async def diff(self, client: GatewayClient, sid: str, text: str) -> float:
        t0 = time.perf_counter()
        reply = await client.diff(sid, text, world_id="w1", timeout=300)
        took = time.perf_counter() - t0
        self.created.extend(reply.queue_map.values())
        return took


def empty_neo4j(env: dict[str, str]) -> None:
    with (
        neo4j_driver(env) as d,
        d.session() as session,
    ):  # IN TRANSACTIONS needs an auto-commit transaction
        session.run("MATCH (n) CALL (n) { DETACH DELETE n } IN TRANSACTIONS OF 5000 ROWS").consume()


def neo4j_round_trip(env: dict[str, str], runs: int) -> float:
    with neo4j_driver(env) as d:
        d.execute_query("RETURN 1")
        took = []
        for _ in range(runs):
            t0 = time.perf_counter()
            d.execute_query("RETURN 1")
            took.append(time.perf_counter() - t0)
    return statistics.median(took) * 1000


def plain_create(admin: AdminClient, count: int, run: str) -> tuple[float, float]:
    """A plain batch create_topics of `count` new one-partition topics: until the controller
    answers, and until the broker also describes them all; then deleted."""
    names = [f"floor-{run}-{uuid.uuid4().hex[:8]}-{i}" for i in range(count)]
    t0 = time.perf_counter()
    futures = admin.create_topics(
        [NewTopic(n, num_partitions=1, replication_factor=1) for n in names],
        operation_timeout=120,
        request_timeout=120,
    )
    for f in futures.values():
        f.result()
    answered = (time.perf_counter() - t0) * 1000
    until_described(admin, names, time.perf_counter() + 300)
    visible = (time.perf_counter() - t0) * 1000
    for f in admin.delete_topics(names, operation_timeout=120, request_timeout=120).values():
        f.result()
    barrier(admin)
    return answered, visible


async def measure(
    store: Store,
    client: GatewayClient,
    known: dict[str, Any],
    runs: int,
    size: int,
    admin: AdminClient | None,
) -> dict[str, Any]:
    run = store.run
    new200: list[float] = []
    for i in range(runs):
        doc = dumps(btc(generate(200, seed=100 + i, salt=f"n{run}{size}x{i}")))
        new200.append(await store.diff(client, f"new200-{run}-{size}-{i}", doc))
        store.stored += 200
    idle200: list[float] = []
    if admin is not None:  # each run on an idle broker: no earlier run's logs still pending
        for i in range(runs):
            barrier(admin)
            doc = dumps(btc(generate(200, seed=300 + i, salt=f"i{run}{size}x{i}")))
            idle200.append(await store.diff(client, f"idle200-{run}-{size}-{i}", doc))
            store.stored += 200
        barrier(admin)
    varied: list[float] = []
    for i in range(runs):
        known["nodes"][0]["name"] = f"src-{size}-{i}"
        varied.append(await store.diff(client, f"known-{run}", dumps(known)))
    same = dumps(known)
    await store.diff(client, f"known-{run}", same)
    resubmit = [await store.diff(client, f"known-{run}", same) for _ in range(runs)]
    out: dict[str, Any] = {
        "stored": size,
        "new_200": {"p50": p(new200, 0.5), "p95": p(new200, 0.95)},
        "known_1k_new_bytes": {"p50": p(varied, 0.5), "p95": p(varied, 0.95)},
        "resubmission": {"p50": p(resubmit, 0.5), "p95": p(resubmit, 0.95)},
    }
    if admin is not None:
        out["new_200_idle_broker"] = {"p50": p(idle200, 0.5), "p95": p(idle200, 0.95)}
        first = []
        for i in range(3):
            barrier(admin)
            doc = dumps(btc(generate(1000, seed=200 + i, salt=f"f{run}{size}x{i}")))
            first.append(await store.diff(client, f"first1k-{run}-{size}-{i}", doc))
            store.stored += 1000
        out["new_1k"] = {"p50": p(first, 0.5), "max": max(first) * 1000}
    t0 = time.perf_counter()
    for _ in range(20):
        orjson.loads(same)
    out["floor_orjson_1k"] = (time.perf_counter() - t0) / 20 * 1000
    return out


async def fill(store: Store, client: GatewayClient, size: int) -> None:
    started, i = time.monotonic(), 0
    while store.stored < size:
        doc = dumps(btc(generate(FILL, seed=1000 + store.stored, salt=f"fill{store.run}{i}")))
        await store.diff(client, f"fill-{store.run}-{store.stored}", doc)
        store.stored += FILL
        i += 1
        if i % 5 == 0 or store.stored >= size:
            print(
                f"[scale] {store.name}: filled to {store.stored} stored nodes "
                f"({time.monotonic() - started:.0f} s)",
                flush=True,
            )


async def bench_store(name: str, sizes: list[int], runs: int, env: dict[str, str]) -> list[Any]:
    store = Store(name, env, uuid.uuid4().hex[:6])
    if store.real:
        print("[scale] neo4j: emptying the graph", flush=True)
        empty_neo4j(env)
    proc = store.start()
    client = GatewayClient(f"127.0.0.1:{store.port}")
    rows: list[dict[str, Any]] = []
    try:
        admin = AdminClient(
            {"bootstrap.servers": env.get("KAFKA_BOOTSTRAP_SERVERS", ""), **kafka_extra(env)}
        )
        await wait_serving(store.port, proc)
        known = btc(generate(FILL, seed=1, salt=f"k{store.run}"))
        await store.diff(client, f"known-{store.run}", dumps(known))
        store.stored += FILL
        for size in sizes:
            await fill(store, client, size)
            if store.real:  # the broker has applied every creation before the clock starts
                until_described(admin, store.created, time.perf_counter() + 300)
            before = store.stored  # the size the cases are measured at
            row = await measure(store, client, known, runs, before, admin if store.real else None)
            row["stored"] = before
            row["rss_mb"] = rss_mb(proc.pid)
            if store.real:
                barrier(admin)
                row["floor_create_200"], row["floor_visible_200"] = plain_create(
                    admin, 200, store.run
                )
                row["floor_create_1k"], row["floor_visible_1k"] = plain_create(
                    admin, 1000, store.run
                )
                row["floor_neo4j_round_trip"] = neo4j_round_trip(env, 20)
            rows.append(row)
            print_row(name, row)
    finally:
        await client.close()
        proc.terminate()
        proc.wait(60)
        if store.real and store.created:
            print(f"[scale] deleting the {len(set(store.created))} topics of this run", flush=True)
            topics = KafkaTopicAdmin(
                env["KAFKA_BOOTSTRAP_SERVERS"], timeout=120, extra=kafka_extra(env)
            )
            names = sorted(set(store.created))
            for k in range(0, len(names), 2000):
                await topics.delete(names[k : k + 2000])
    return rows


def print_row(store: str, r: dict[str, Any]) -> None:
    cells = [
        f"{store:<8} {r['stored']:>7}",
        f"new200 {r['new_200']['p50']:7.1f}/{r['new_200']['p95']:7.1f}",
        f"known1k {r['known_1k_new_bytes']['p50']:6.1f}/{r['known_1k_new_bytes']['p95']:6.1f}",
        f"resubmit {r['resubmission']['p50']:5.1f}/{r['resubmission']['p95']:5.1f}",
    ]
    if "new_200_idle_broker" in r:
        i = r["new_200_idle_broker"]
        cells.append(f"new200-idle-broker {i['p50']:7.1f}/{i['p95']:7.1f}")
    if "new_1k" in r:
        cells.append(f"new1k {r['new_1k']['p50']:7.1f}")
    cells.append("| floors:")
    if "floor_create_1k" in r:
        cells.append(f"create200 {r['floor_create_200']:6.1f} ({r['floor_visible_200']:6.1f})")
        cells.append(f"create1k {r['floor_create_1k']:6.1f} ({r['floor_visible_1k']:6.1f})")
        cells.append(f"neo4j {r['floor_neo4j_round_trip']:4.2f}")
    cells.append(f"orjson1k {r['floor_orjson_1k']:4.2f} | RSS {r['rss_mb']:.0f} MB")
    print("  ".join(cells), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stores", default="embedded,neo4j")
    ap.add_argument("--sizes", default="0,10000,25000,50000")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--out", default=str(ROOT / "docs" / "scale"))
    args = ap.parse_args()
    env = stack_env()
    sizes = [int(s) for s in args.sizes.split(",")]
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    print(f"[scale] machine: {machine}; latencies p50/p95 ms through loopback gRPC", flush=True)
    out = Path(args.out)
    results: dict[str, Any] = {}
    if out.with_suffix(".json").exists():
        results = json.loads(out.with_suffix(".json").read_text())
    results["machine"] = machine
    for name in args.stores.split(","):
        results[name] = asyncio.run(bench_store(name, sizes, args.runs, env))
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
    write_svg(results, out.with_suffix(".svg"))
    print(f"[scale] wrote {out.with_suffix('.json').name} and {out.with_suffix('.svg').name}")


if __name__ == "__main__":
    main()
