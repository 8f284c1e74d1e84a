"""Topic creation side by side: a plain `AdminClient.create_topics` batch against
`KafkaTopicAdmin.ensure` (CREATE → VERIFY → WAIT → BACKOFF) for the same count of new topics on
the same broker, in one run, alternating. Before each timed batch the broker has worked through
everything earlier (a probe topic created after the previous batch has become describable), so
both start from the same, idle broker.

    python bench/topics_bench.py [--counts 200,1000] [--rounds 3]

Also times `ensure` of topics that all exist already (the VERIFY path). Uses the local stack
(`make stack-up`); every topic it creates is deleted again.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from confluent_kafka.admin import AdminClient, NewTopic  # noqa: E402

from bench.common import kafka_extra, stack_env  # noqa: E402
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin  # noqa: E402
from qmtl_dagmanager.core.topics import TopicSpec, TopicType  # noqa: E402

SETTLE_DEADLINE = 120.0  # seconds the broker may take to show a batch created or deleted
SPEC = TopicSpec(TopicType.INDICATOR, 1, 1, (("retention.ms", "86400000"),))


def plain(admin: AdminClient, names: list[str]) -> float:
    t0 = time.perf_counter()
    futures = admin.create_topics(
        [
            NewTopic(n, num_partitions=1, replication_factor=1, config=dict(SPEC.config))
            for n in names
        ],
        operation_timeout=60,
        request_timeout=60,
    )
    for f in futures.values():
        f.result()
    return time.perf_counter() - t0


def settle(admin: AdminClient, names: list[str], *, present: bool) -> None:
    """Until the broker's metadata lists all of `names` (present) or none of them: the
    controller answers before the broker has created or removed the logs, and the next timed
    batch must not pay for that."""
    wanted = set(names)
    deadline = time.monotonic() + SETTLE_DEADLINE
    while True:
        listed = wanted & set(admin.list_topics(timeout=30).topics)
        if listed == (wanted if present else set()):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"[topics] the broker did not settle in {SETTLE_DEADLINE:g} s")
        time.sleep(0.1)


def barrier(admin: AdminClient) -> float:
    """Until the broker has worked through every earlier creation and deletion: it applies
    metadata in order, and shows a batch before it has created (or removed) the batch's logs,
    so a probe topic created now becomes describable only after all of that work. Returns
    the seconds waited (the backlog the previous batch left)."""
    probe = f"bench-barrier-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    plain(admin, [probe])
    settle(admin, [probe], present=True)
    for f in admin.delete_topics([probe], operation_timeout=60).values():
        f.result()
    return time.perf_counter() - t0


def drop(admin: AdminClient, names: list[str]) -> None:
    for f in admin.delete_topics(names, operation_timeout=60, request_timeout=60).values():
        f.result()
    settle(admin, names, present=False)
    barrier(admin)


def ms(xs: list[float]) -> str:
    return f"median {statistics.median(xs) * 1000:8.1f} ms  (min {min(xs) * 1000:.1f})"


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--counts", default="200,1000")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bootstrap = stack_env()["KAFKA_BOOTSTRAP_SERVERS"]
    print(
        f"[topics] machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}; broker {bootstrap}",
        flush=True,
    )
    extra = kafka_extra(stack_env())
    raw = AdminClient({"bootstrap.servers": bootstrap, **extra})
    ours = KafkaTopicAdmin(bootstrap, timeout=60, extra=extra)
    worst = 0.0
    for count in (int(c) for c in args.counts.split(",")):
        base, ensure, verify, backlog = [], [], [], []
        for r in range(args.rounds):
            run = uuid.uuid4().hex[:6]
            a = [f"bench-p{run}-{i}" for i in range(count)]
            b = [f"bench-e{run}-{i}" for i in range(count)]
            # alternate which goes first, and let the broker show one batch before timing
            # the other
            for which in ("plain", "ensure") if r % 2 == 0 else ("ensure", "plain"):
                if which == "plain":
                    base.append(await asyncio.to_thread(plain, raw, a))
                else:
                    t0 = time.perf_counter()
                    res = await ours.ensure(dict.fromkeys(b, SPEC))
                    ensure.append(time.perf_counter() - t0)
                    assert all(x.ok for x in res.values()), "ensure failed"
                batch = a if which == "plain" else b
                await asyncio.to_thread(settle, raw, batch, present=True)
                backlog.append(await asyncio.to_thread(barrier, raw))
            t0 = time.perf_counter()
            res = await ours.ensure(dict.fromkeys(b, SPEC))
            verify.append(time.perf_counter() - t0)
            assert all(x.ok for x in res.values()), "verify failed"
            print(f"[topics] {count} topics, round {r + 1}/{args.rounds} done", flush=True)
            await asyncio.to_thread(drop, raw, a + b)
        ratio = statistics.median(ensure) / statistics.median(base)
        worst = max(worst, ratio)
        print(f"[topics] {count:>5} new, plain create_topics : {ms(base)}")
        print(f"[topics] {count:>5} new, KafkaTopicAdmin     : {ms(ensure)}  = {ratio:.2f}x plain")
        print(f"[topics] {count:>5} existing, ensure (VERIFY): {ms(verify)}")
        print(
            f"[topics] {count:>5} logs created after a batch : {ms(backlog)}  (the broker's "
            "own work after it answered; neither timing above includes it)"
        )
    print(f"[topics] worst ratio {worst:.2f}x (target <= 2x)")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
