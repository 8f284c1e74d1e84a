"""Archive of a queue's messages before garbage collection drops it.

A real dump: every message from the low to the high watermark of every partition, as gzip'd
JSON lines (partition, offset, timestamp, key, headers, value; bytes as base64), written to an
object store behind a small port. The default store is a local directory.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import io
import os
import time
import uuid
from pathlib import Path
from typing import Protocol

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.ports import ArchiveResult


class ObjectStore(Protocol):
    def put(self, key: str, data: bytes) -> str:
        """Store `data` under `key`; return where it went."""
        ...


class DirectoryStore:
    """Objects as files under a root directory, written atomically (temp file + rename)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def put(self, key: str, data: bytes) -> str:
        path = self.root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)


def _b64(data: str | bytes | None) -> str | None:
    if data is None:
        return None
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _headers(headers: object) -> list[list[str | None]]:
    """Kafka headers as [name, base64 value] pairs."""
    if not isinstance(headers, list):
        return []
    return [[str(h[0]), _b64(h[1])] for h in headers if isinstance(h, tuple) and len(h) == 2]


class KafkaArchive:
    def __init__(self, bootstrap: str, store: ObjectStore, *, timeout: float = 30.0) -> None:
        self._bootstrap = bootstrap
        self._store = store
        self._timeout = timeout

    async def archive(self, topic: str) -> ArchiveResult:
        return await asyncio.to_thread(self._archive, topic)

    def _archive(self, topic: str) -> ArchiveResult:
        consumer = Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                "group.id": f"qmtl-archive-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )
        buf = io.BytesIO()
        count = 0
        try:
            md = consumer.list_topics(topic, timeout=self._timeout)
            meta = md.topics.get(topic)
            if meta is None or meta.error is not None:
                raise Unavailable(
                    f"cannot archive {topic}: it is not in the cluster metadata",
                    reason="KafkaUnavailable",
                )
            ranges = {}
            for p in meta.partitions:
                low, high = consumer.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=self._timeout
                )
                if high > low:
                    ranges[p] = (low, high)
            consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in ranges.items()])
            deadline = time.monotonic() + self._timeout
            with gzip.GzipFile(fileobj=buf, mode="wb") as gz:
                while ranges:
                    if time.monotonic() > deadline:
                        raise Unavailable(
                            f"archive of {topic} timed out with partitions {sorted(ranges)} unread",
                            reason="KafkaUnavailable",
                        )
                    msg = consumer.poll(0.2)
                    if msg is None:
                        continue
                    err = msg.error()
                    if err is not None:
                        if err.code() != KafkaError._PARTITION_EOF:
                            raise Unavailable(
                                f"archive of {topic}: {err.str()}", reason="KafkaUnavailable"
                            )
                        continue
                    part, off = msg.partition(), msg.offset() or 0
                    _, ts = msg.timestamp()
                    gz.write(
                        orjson.dumps(
                            {
                                "partition": part,
                                "offset": off,
                                "timestamp": ts,
                                "key": _b64(msg.key()),
                                "value": _b64(msg.value()),
                                "headers": _headers(msg.headers()),
                            }
                        )
                        + b"\n"
                    )
                    count += 1
                    if part in ranges and off + 1 >= ranges[part][1]:
                        del ranges[part]
        except KafkaException as e:
            raise Unavailable(f"archive of {topic}: {e}", reason="KafkaUnavailable") from e
        finally:
            consumer.close()
        data = buf.getvalue()
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        location = self._store.put(f"{topic}/{stamp}-{uuid.uuid4().hex[:8]}.jsonl.gz", data)
        return ArchiveResult(topic, location, count, len(data))


class MemoryArchive:
    """The embedded archive: records which topics were archived (message contents live only
    in the embedded topic admin's counters)."""

    def __init__(self) -> None:
        self.archived: list[str] = []

    async def archive(self, topic: str) -> ArchiveResult:
        self.archived.append(topic)
        return ArchiveResult(topic, f"memory://{topic}", 0, 0)
