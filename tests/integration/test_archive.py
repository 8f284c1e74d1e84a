"""Archives of real topics in the stack's S3 server (and the development directory store):
every message with keys, headers, timestamps and partitions, a manifest written last, a
restore that brings the same messages back, and failures that delete nothing."""

from __future__ import annotations

import asyncio
import base64
import gzip
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from qmtl_dagmanager.adapters.archive import (
    DATA,
    MANIFEST,
    ArchiveFailed,
    DirectoryStore,
    KafkaArchive,
    ObjectStore,
)
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.s3_store import S3Store
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.core.gc import DAY, GcAction, GcLimits, GcPolicy
from qmtl_dagmanager.core.plan import Request
from qmtl_dagmanager.core.topics import TopicSpec, TopicType
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.garbage import GcService
from qmtl_dagmanager.services.queues import QueueService
from tests.conftest import Stack
from tests.unit.dags import encode, node


def s3(stack: Stack) -> S3Store:
    return S3Store(
        stack.s3_bucket,
        endpoint=stack.s3_endpoint,
        access_key=stack.s3_access_key,
        secret_key=stack.s3_secret_key,
    )


@pytest.fixture(params=["s3", "directory"])
def store(request: pytest.FixtureRequest, stack: Stack, tmp_path: Path) -> Iterator[ObjectStore]:
    if request.param == "s3":
        yield s3(stack)
    else:
        yield DirectoryStore(tmp_path)


@pytest.fixture
async def admin(stack: Stack) -> AsyncIterator[KafkaTopicAdmin]:
    a = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
    yield a
    await a.close()


async def make_topic(admin: KafkaTopicAdmin, partitions: int = 2) -> str:
    topic = f"archive-{uuid.uuid4().hex[:8]}"
    spec = TopicSpec(TopicType.RAW, partitions, 1, (("retention.ms", "604800000"),))
    assert (await admin.ensure({topic: spec}))[topic].ok
    return topic


def produce(stack: Stack, topic: str, count: int, partitions: int = 2) -> None:
    producer = Producer(stack.kafka_client())
    for i in range(count):
        producer.produce(
            topic,
            key=f"k{i}".encode() if i % 3 else None,  # some messages without a key
            value=f"v{i}".encode(),
            partition=i % partitions,
            headers=[("h", f"x{i}".encode()), ("empty", None)],
            timestamp=1_700_000_000_000 + i,
        )
    assert producer.flush(30) == 0


def consume_all(stack: Stack, topic: str, partitions: int = 2) -> list[tuple[Any, ...]]:
    """(partition, key, value, headers, timestamp) of every message, in order."""
    c = Consumer(
        {**stack.kafka_client(), "group.id": uuid.uuid4().hex,
         "enable.auto.commit": False}
    )  # fmt: skip
    try:
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                for p in range(partitions)}  # fmt: skip
        c.assign([TopicPartition(topic, p, lo) for p, (lo, _) in ends.items()])
        want = sum(hi - lo for lo, hi in ends.values())
        out: list[tuple[Any, ...]] = []
        deadline = time.monotonic() + 30
        while len(out) < want and time.monotonic() < deadline:
            m = c.poll(0.5)
            if m is None or m.error():
                continue
            out.append((m.partition(), m.key(), m.value(), m.headers(), m.timestamp()[1]))
        return sorted(out, key=lambda r: (r[0], r[4]))
    finally:
        c.close()


async def test_an_archive_restored_into_a_new_topic_holds_the_same_messages(
    stack: Stack, store: ObjectStore, admin: KafkaTopicAdmin
) -> None:
    topic = await make_topic(admin)
    target = await make_topic(admin)
    try:
        produce(stack, topic, 25)
        archive = KafkaArchive(
            stack.kafka_bootstrap,
            extra=stack.kafka_security,
            store=store,
            prefix=f"t-{uuid.uuid4().hex[:6]}/",
        )
        result = await archive.archive(topic)
        assert result.messages == 25 and result.bytes > 0
        (entry,) = await archive.entries(topic)
        assert entry.manifest.endswith(MANIFEST) and entry.messages == 25
        assert entry.partitions == 2
        manifest = orjson.loads(store.get(entry.manifest))
        assert manifest["format"] == "qmtl-archive/1" and manifest["topic"] == topic
        assert {p: v["messages"] for p, v in manifest["partitions"].items()} == {"0": 13, "1": 12}
        rows = [orjson.loads(x) for x in gzip.decompress(store.get(manifest["data"])).splitlines()]
        assert sorted((r["partition"], r["offset"]) for r in rows) == sorted(
            [(0, o) for o in range(13)] + [(1, o) for o in range(12)]
        )
        assert {base64.b64decode(r["headers"][0][1]).decode()[:1] for r in rows} == {"x"}
        assert await archive.restore(entry.manifest, target) == 25
        assert consume_all(stack, target) == consume_all(stack, topic)
    finally:
        await admin.delete([topic, target])


async def test_a_tampered_archive_is_refused_on_restore(
    stack: Stack, store: ObjectStore, admin: KafkaTopicAdmin
) -> None:
    """Stored data altered after the archive was written (same size, other bytes): a restore
    checks the manifest's digest first and writes nothing."""
    topic = await make_topic(admin)
    target = await make_topic(admin)
    try:
        produce(stack, topic, 10)
        archive = KafkaArchive(
            stack.kafka_bootstrap,
            extra=stack.kafka_security,
            store=store,
            prefix=f"tamper-{uuid.uuid4().hex[:6]}/",
        )
        await archive.archive(topic)
        (entry,) = await archive.entries(topic)
        manifest = orjson.loads(store.get(entry.manifest))
        data = store.get(manifest["data"])
        store.put(manifest["data"], data[:-8] + bytes(b ^ 0xFF for b in data[-8:]))
        with pytest.raises(ArchiveFailed, match="does not match its checksum"):
            await archive.restore(entry.manifest, target)
        assert consume_all(stack, target) == []
    finally:
        await admin.delete([topic, target])


class FailingAfterData:
    """A store whose second upload (the manifest) fails: a partial archive."""

    def __init__(self, inner: ObjectStore) -> None:
        self.inner, self.puts = inner, 0

    def put(self, key: str, data: bytes) -> str:
        self.puts += 1
        if self.puts > 1:
            raise Unavailable("connection reset by peer", reason="ArchiveUnavailable")
        return self.inner.put(key, data)

    def get(self, key: str) -> bytes:
        return self.inner.get(key)

    def keys(self, prefix: str) -> list[str]:
        return self.inner.keys(prefix)


class Corrupting(FailingAfterData):
    """A store that stores something other than what it was given."""

    def put(self, key: str, data: bytes) -> str:
        return self.inner.put(key, data[:-8] + b"\0" * 8)


async def gc_world(
    stack: Stack, store: ObjectStore, prefix: str
) -> tuple[GcService, str, MemoryEventBus]:
    """A trade_exec queue (archive policy), orphaned long enough to be due."""
    graph, clock, metrics = MemoryGraphStore(), ManualClock(time.time()), Metrics()
    topics = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
    events = MemoryEventBus(history=100)
    bus = ControlBus(events, clock)
    n = node("TradeOrderPublisherNode", tags=["BTC"], code=f"arch-{uuid.uuid4().hex[:8]}")
    done = await DiffService(graph, topics, bus, clock, metrics).diff(
        Request("arch", world_id="w1"), encode([n])
    )
    (queue,) = [p.topic for p in done.plan.nodes]
    produce(stack, queue, 6, partitions=1)
    await QueueService(graph, topics, metrics, clock).cleanup("arch")
    clock.advance(DAY)
    policy = {"trade_exec": GcPolicy(60, 1, GcAction.ARCHIVE)}
    archive = KafkaArchive(
        stack.kafka_bootstrap, extra=stack.kafka_security, store=store, prefix=prefix
    )
    gc = GcService(graph, topics, archive, bus, clock, metrics, policies=policy,
                   limits=GcLimits(max_count=10, max_fraction=1.0))  # fmt: skip
    return gc, queue, events


@pytest.mark.parametrize("broken", [FailingAfterData, Corrupting])
async def test_an_archive_that_fails_part_way_deletes_nothing(
    stack: Stack, broken: type[FailingAfterData]
) -> None:
    prefix = f"fail-{uuid.uuid4().hex[:6]}/"
    store = broken(s3(stack))
    gc, queue, bus = await gc_world(stack, store, prefix)
    assert gc.topics is not None
    try:
        run = await gc.collect()
        assert run.processed == []
        (failed,) = run.failed
        assert failed["queue"] == queue and failed["reason"] == "ArchiveFailed"
        assert await gc.topics.message_counts([queue]) == {queue: 6}  # the topic is intact
        assert [q.topic for q in await gc.graph.queues([queue])] == [queue]  # and its queue
        assert gc.metrics.gc_archive_failures._value.get() == 1
        events = [e.value for e in bus.read("queue")]
        assert [(e["data"]["queue"], e["data"]["action"]) for e in events
                if e["type"] == "queue_lifecycle"] == [(queue, "archive_failed")]  # fmt: skip
        assert (
            await KafkaArchive(
                stack.kafka_bootstrap, extra=stack.kafka_security, store=s3(stack), prefix=prefix
            ).entries()
            == []
        )
        # the store works again: the next run archives, verifies, and only then deletes
        gc.archive = KafkaArchive(
            stack.kafka_bootstrap, extra=stack.kafka_security, store=s3(stack), prefix=prefix
        )
        again = await gc.collect()
        assert [p["queue"] for p in again.processed] == [queue]
        assert again.processed[0]["archived"]["messages"] == 6
        (entry,) = await gc.archive.entries(queue)
        assert entry.messages == 6
    finally:
        await gc.topics.delete([queue])
        await gc.topics.close()


async def test_a_topic_written_while_it_is_archived_is_kept(
    stack: Stack, admin: KafkaTopicAdmin
) -> None:
    topic = await make_topic(admin, partitions=1)
    try:
        produce(stack, topic, 3, partitions=1)

        class WritesDuringUpload(FailingAfterData):
            def put(self, key: str, data: bytes) -> str:
                if key.endswith(DATA):
                    produce(stack, topic, 1, partitions=1)  # a late message arrives
                return self.inner.put(key, data)

        archive = KafkaArchive(
            stack.kafka_bootstrap,
            extra=stack.kafka_security,
            store=WritesDuringUpload(s3(stack)),
            prefix=f"late-{uuid.uuid4().hex[:6]}/",
        )
        with pytest.raises(ArchiveFailed, match="changed while it was archived"):
            await archive.archive(topic)
        assert await archive.entries(topic) == []
    finally:
        await admin.delete([topic])


def test_archive_list_and_restore_from_the_command_line(stack: Stack, tmp_path: Path) -> None:
    """`dagmanager archive list|restore` on the configured bucket, as an operator runs them."""
    admin_topic = f"cli-archive-{uuid.uuid4().hex[:8]}"
    target = f"{admin_topic}-restored"
    prefix = f"cli-{uuid.uuid4().hex[:6]}"

    async def prepare() -> None:
        a = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
        try:
            await make_named(a, admin_topic)
            produce(stack, admin_topic, 8)
            archive = KafkaArchive(
                stack.kafka_bootstrap,
                extra=stack.kafka_security,
                store=s3(stack),
                prefix=f"{prefix}/",
            )
            await archive.archive(admin_topic)
        finally:
            await a.close()

    asyncio.run(prepare())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))}
    env |= {**stack.kafka_process_env(), **stack.s3_settings(prefix)}
    cli = [sys.executable, "-m", "qmtl_dagmanager.cli", "archive"]
    listed = subprocess.run([*cli, "list", "--queue", admin_topic], capture_output=True,
                            text=True, env=env, check=False, timeout=120)  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    (row,) = listed.stdout.splitlines()
    assert row.split("\t")[:2] == [admin_topic, "8"]
    done = subprocess.run([*cli, "restore", admin_topic, "--to", target], capture_output=True,
                          text=True, env=env, check=False, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert orjson.loads(done.stdout.splitlines()[-1])["messages"] == 8
    try:
        assert consume_all(stack, target) == consume_all(stack, admin_topic)
    finally:

        async def cleanup() -> None:
            a = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
            await a.delete([admin_topic, target])
            await a.close()

        asyncio.run(cleanup())
    missing = subprocess.run(
        [*cli, "restore", "no-such-queue", "--to", target],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=120,
    )
    assert missing.returncode == 2 and "no complete archive" in missing.stderr


async def make_named(admin: KafkaTopicAdmin, topic: str, partitions: int = 2) -> None:
    spec = TopicSpec(TopicType.RAW, partitions, 1, (("retention.ms", "604800000"),))
    assert (await admin.ensure({topic: spec}))[topic].ok
