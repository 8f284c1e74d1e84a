"""The archive dumps every message of a real topic to the directory store."""

from __future__ import annotations

import base64
import gzip
import uuid
from pathlib import Path

import orjson
from confluent_kafka import Producer

from qmtl_dagmanager.adapters.archive import DirectoryStore, KafkaArchive
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.core.topics import TopicSpec, TopicType
from tests.conftest import Stack


async def test_archive_dumps_all_partitions_with_keys_and_headers(
    stack: Stack, tmp_path: Path
) -> None:
    topic = f"archive-{uuid.uuid4().hex[:8]}"
    admin = KafkaTopicAdmin(stack.kafka_bootstrap)
    spec = TopicSpec(TopicType.RAW, 2, 1, (("retention.ms", "604800000"),))
    assert (await admin.ensure({topic: spec}))[topic].ok
    try:
        producer = Producer({"bootstrap.servers": stack.kafka_bootstrap})
        for i in range(10):
            producer.produce(
                topic,
                key=f"k{i}".encode(),
                value=f"v{i}".encode(),
                partition=i % 2,
                headers=[("h", f"x{i}".encode())],
            )
        assert producer.flush(30) == 0
        result = await KafkaArchive(stack.kafka_bootstrap, DirectoryStore(tmp_path)).archive(topic)
        assert result.messages == 10 and result.bytes > 0
        assert Path(result.location).is_relative_to(tmp_path / topic)
        lines = gzip.decompress(Path(result.location).read_bytes()).splitlines()
        rows = [orjson.loads(x) for x in lines]
        assert sorted(base64.b64decode(r["value"]).decode() for r in rows) == sorted(
            f"v{i}" for i in range(10)
        )
        assert {r["partition"] for r in rows} == {0, 1}
        assert all(base64.b64decode(r["headers"][0][1]).decode().startswith("x") for r in rows)
        assert sorted((r["partition"], r["offset"]) for r in rows) == sorted(
            [(0, o) for o in range(5)] + [(1, o) for o in range(5)]
        )
    finally:
        await admin.delete([topic])
