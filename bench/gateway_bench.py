"""The Gateway's own pattern against the sidecar on Neo4j + Kafka (`make bench-gateway`).

    python bench/gateway_bench.py [--new 10] [--sizes 200,1000] [--rate 50] [--warm-seconds 20]

The QMTL Gateway calls Diff through its client inside `asyncio.wait_for(..., timeout=0.1)`:
past 100 ms the call is cancelled and the submission falls back to a TagQuery-only queue map.
This benchmark does exactly that with the Gateway-like client (`qmtl_dagmanager.client`), and
retries a missed submission every second, as a user resubmitting would. For new DAGs of each
size it records:

- the share of first submissions answered within the 0.1 s budget (and their latency);
- the time until the full queue map was received (first answer, or after retries);
- the time from the submission until Kafka describes every topic of the answer (polled every
  10 ms with a separate admin client);

then, for resubmissions of the known DAGs at `--rate` per second (each under the same 0.1 s
wait), p50 / p95 / p99 and how many missed the budget. The sidecar runs as its own process,
started here with the stack's settings.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from pathlib import Path

from confluent_kafka.admin import AdminClient

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.client import DiffReply, GatewayClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.gen import dumps, generate  # noqa: E402

from bench.common import (  # noqa: E402
    kafka_extra,
    open_loop,
    stack_env,
    start_sidecar,
    until_described,
)
from bench.sidecar_bench import pct, wait_serving  # noqa: E402

BUDGET = 0.1  # the Gateway's wait for a strategy submission's Diff
RETRY_EVERY = 1.0
# a new strategy arrives this long after the previous one's topics are describable, so that
# each first submission is measured beside the previous one's background work only as much
# as a steady stream of one new strategy every second or two would have it
NEXT_NEW_AFTER = 1.0
KNOWN = 3  # new DAGs of each size kept for the resubmissions; the others' topics go at once
SETTLE_BEFORE_WARM = 5.0  # the new DAGs' graph writes end before the resubmissions start
GIVE_UP = 30.0
VISIBLE_BOUND = 10.0  # topic_visible_bound_seconds' default: describable within this


async def within_budget(client: GatewayClient, strategy: str, text: str) -> DiffReply | None:
    try:
        return await asyncio.wait_for(client.diff(strategy, text, world_id="w1"), BUDGET)
    except TimeoutError:
        return None


def drop(admin: AdminClient, topics: list[str]) -> None:
    for f in admin.delete_topics(topics, operation_timeout=30).values():
        f.result()


async def new_dags(
    client: GatewayClient, admin: AdminClient, size: int, count: int, run: str, made: list[str]
) -> None:
    first: list[float] = []
    answered: list[float] = []
    visible: list[float] = []
    never = 0
    for i in range(count):
        strategy = f"gw-{run}-{size}-{i}"
        text = dumps(generate(size, seed=100 + i, salt=f"{run}-{size}-{i}"))
        t0 = time.perf_counter()
        reply = await within_budget(client, strategy, text)
        if reply is not None:
            first.append(time.perf_counter() - t0)
        while reply is None and time.perf_counter() - t0 < GIVE_UP:
            await asyncio.sleep(RETRY_EVERY)
            reply = await within_budget(client, strategy, text)
        if reply is None:
            never += 1
            continue
        answered.append(time.perf_counter() - t0)
        print(f"  {strategy}: answered after {answered[-1] * 1e3:.0f} ms", flush=True)
        topics = sorted(set(reply.topics_by_node("w1.live").values()))
        assert len(reply.queue_map) == size, (len(reply.queue_map), size)
        made.extend(topics)
        seen = await asyncio.to_thread(until_described, admin, topics, t0 + GIVE_UP, 0.01)
        visible.append(float("nan") if seen is None else seen - t0)
        if i >= KNOWN:  # open files: a 1k-node DAG is 1,000 partitions (see hack/stack)
            await asyncio.to_thread(drop, admin, topics)
        await asyncio.sleep(NEXT_NEW_AFTER)
    ms = [x * 1e3 for x in first]
    print(
        f"new {size}-node DAGs: {len(first)} of {count} first submissions answered within "
        f"{BUDGET * 1e3:.0f} ms"
        + (f" (p50 {pct(ms, 0.5):.1f}, max {max(ms):.1f} ms)" if ms else "")
        + (f"; {never} never answered within {GIVE_UP:g} s" if never else ""),
        flush=True,
    )
    if answered:
        print(
            f"  full queue map received after: p50 {pct(answered, 0.5) * 1e3:.0f} ms, "
            f"max {max(answered) * 1e3:.0f} ms",
            flush=True,
        )
    if visible:
        within = sum(1 for v in visible if v <= VISIBLE_BOUND)
        print(
            f"  every topic describable after: p50 {pct(visible, 0.5) * 1e3:.0f} ms, "
            f"max {max(visible) * 1e3:.0f} ms; within the stated {VISIBLE_BOUND:g} s bound: "
            f"{within} of {len(visible)}",
            flush=True,
        )


async def warm(
    client: GatewayClient, strategies: list[tuple[str, str]], rate: float, secs: float
) -> None:
    lat: list[float] = []
    missed = 0

    async def one(i: int) -> None:
        nonlocal missed
        strategy, text = strategies[i % len(strategies)]
        t0 = time.perf_counter()
        if await within_budget(client, strategy, text) is None:
            missed += 1
        else:
            lat.append(time.perf_counter() - t0)

    started = await open_loop(rate, secs, one)
    ms = [x * 1e3 for x in lat]
    print(
        f"resubmissions at {rate:g}/s for {secs:g} s ({started} calls): p50 {pct(ms, 0.5):.1f} "
        f"p95 {pct(ms, 0.95):.1f} p99 {pct(ms, 0.99):.1f} ms; {missed} missed the budget",
        flush=True,
    )


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--new", type=int, default=10, help="new DAGs per size")
    ap.add_argument("--sizes", default="200,1000")
    ap.add_argument("--rate", type=float, default=50)
    ap.add_argument("--warm-seconds", type=float, default=20)
    args = ap.parse_args()
    e = stack_env()
    proc, port = start_sidecar(e, "bench-gateway", "diff_answer_early: true\n")
    client = GatewayClient(f"127.0.0.1:{port}")
    admin = AdminClient({"bootstrap.servers": e["KAFKA_BOOTSTRAP_SERVERS"], **kafka_extra(e)})
    made: list[str] = []
    try:
        await wait_serving(port, proc)
        print(
            f"machine: {platform.machine()}, {os.cpu_count()} cores, python "
            f"{platform.python_version()}; sidecar pid {proc.pid} on Neo4j + Kafka; "
            f"budget {BUDGET * 1e3:.0f} ms, retry every {RETRY_EVERY:g} s",
            flush=True,
        )
        run = uuid.uuid4().hex[:6]
        # warm-up, as a sidecar that has served for a while is: connections, the topic
        # listing, Neo4j's query plans and both JVMs' compiled code for each DAG size (two
        # new DAGs of each, not counted)
        for size in (5, *(int(x) for x in args.sizes.split(","))):
            for k in range(2):
                text = dumps(generate(size, seed=k, salt=f"{run}-warm-{size}-{k}"))
                reply = await client.diff(f"gw-{run}-warm-{size}-{k}", text, world_id="w1")
                made.extend(set(reply.topics_by_node("w1.live").values()))
        await asyncio.sleep(SETTLE_BEFORE_WARM)
        for size in (int(x) for x in args.sizes.split(",")):
            await new_dags(client, admin, size, args.new, run, made)
        await asyncio.sleep(SETTLE_BEFORE_WARM)
        known = []
        for size in (int(x) for x in args.sizes.split(",")):
            for i in range(min(args.new, KNOWN)):
                text = dumps(generate(size, seed=100 + i, salt=f"{run}-{size}-{i}"))
                known.append((f"gw-{run}-{size}-{i}", text))
        await warm(client, known, args.rate, args.warm_seconds)
    finally:
        await client.close()
        proc.terminate()
        proc.wait(30)
    # remove what the run created, so repeated runs do not pile up topics
    topics = KafkaTopicAdmin(e["KAFKA_BOOTSTRAP_SERVERS"], timeout=60, extra=kafka_extra(e))
    await topics.delete(sorted(set(made)))


if __name__ == "__main__":
    asyncio.run(main())
