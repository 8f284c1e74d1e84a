"""Archives of a queue's messages, written before garbage collection drops the queue, and
restored into a topic on demand (docs/archive-format.md describes the objects).

An archive is two objects under `<prefix><topic>/<stamp>-<id>`: `.jsonl.gz`, every message
from the low to the high watermark of every partition (partition, offset, timestamp and its
type, key, headers, value; bytes as base64), then `.manifest.json` (message count per
partition, watermarks, SHA-256 and size of the data). The manifest is written last, after the
data object was read back and checked and the topic was found unchanged: an archive without
a manifest is partial and never counts. Any failure raises `ArchiveFailed`, and GC keeps the
topic.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import io
import os
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

from qmtl_dagmanager.core.errors import DagManagerError, InvalidSpec, Unavailable
from qmtl_dagmanager.ports import ArchiveEntry, ArchiveResult

FORMAT = "qmtl-archive/1"
MANIFEST = ".manifest.json"
DATA = ".jsonl.gz"


class ArchiveFailed(DagManagerError):
    """An archive could not be written completely or did not verify: nothing was deleted."""

    reason = "ArchiveFailed"
    retryable = True


class ObjectStore(Protocol):
    """Where archives go: a directory (local development) or an S3 bucket."""

    def put(self, key: str, data: bytes) -> str:
        """Store `data` under `key`; return where it went (a path or s3:// URL)."""
        ...

    def get(self, key: str) -> bytes:
        """The object's bytes; raises Unavailable when it cannot be read."""
        ...

    def keys(self, prefix: str) -> list[str]:
        """Keys under `prefix`, sorted."""
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

    def get(self, key: str) -> bytes:
        try:
            return (self.root / key).read_bytes()
        except OSError as e:
            raise Unavailable(f"archive object {key}: {e}", reason="ArchiveUnavailable") from e

    def keys(self, prefix: str) -> list[str]:
        if not self.root.exists():
            return []
        found = (
            str(p.relative_to(self.root))
            for p in self.root.rglob("*")
            if p.is_file() and not p.name.startswith(".")
        )
        return sorted(k for k in found if k.startswith(prefix))


def _b64(data: str | bytes | None) -> str | None:
    if data is None:
        return None
    return base64.b64encode(data.encode() if isinstance(data, str) else data).decode()


def _unb64(text: object) -> bytes | None:
    return None if text is None else base64.b64decode(str(text))


def _headers(headers: object) -> list[list[str | None]]:
    """Kafka headers as [name, base64 value] pairs."""
    if not isinstance(headers, list):
        return []
    return [[str(h[0]), _b64(h[1])] for h in headers if isinstance(h, tuple) and len(h) == 2]


@dataclass(frozen=True, slots=True)
class _Dump:
    data: bytes
    messages: int
    partitions: dict[int, dict[str, int]]  # partition → low, high, messages


class KafkaArchive:
    def __init__(
        self,
        bootstrap: str,
        store: ObjectStore,
        *,
        timeout: float = 30.0,
        prefix: str = "",
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        self._bootstrap = bootstrap
        self._extra = dict(extra or {})  # security settings, as for every client
        self._store = store
        self._timeout = timeout
        self._prefix = prefix

    async def archive(self, topic: str) -> ArchiveResult:
        return await asyncio.to_thread(self._archive, topic)

    async def entries(self, queue: str | None = None) -> list[ArchiveEntry]:
        return await asyncio.to_thread(self._entries, queue)

    async def restore(self, manifest: str, to_topic: str) -> int:
        return await asyncio.to_thread(self._restore, manifest, to_topic)

    # -- writing ---------------------------------------------------------------------------

    def _consumer(self) -> Consumer:
        return Consumer(
            {
                "bootstrap.servers": self._bootstrap,
                **self._extra,
                "group.id": f"qmtl-archive-{uuid.uuid4().hex}",
                "enable.auto.commit": False,
            }
        )

    def _watermarks(self, consumer: Consumer, topic: str) -> dict[int, tuple[int, int]]:
        md = consumer.list_topics(topic, timeout=self._timeout)
        meta = md.topics.get(topic)
        if meta is None or meta.error is not None:
            raise Unavailable(
                f"cannot archive {topic}: it is not in the cluster metadata",
                reason="KafkaUnavailable",
            )
        marks: dict[int, tuple[int, int]] = {}
        for p in meta.partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=self._timeout
            )
            marks[p] = (low, high)
        return marks

    def _dump(self, consumer: Consumer, topic: str, marks: Mapping[int, tuple[int, int]]) -> _Dump:
        ranges = {p: lh for p, lh in marks.items() if lh[1] > lh[0]}
        counts = dict.fromkeys(marks, 0)
        consumer.assign([TopicPartition(topic, p, lo) for p, (lo, _) in ranges.items()])
        deadline = time.monotonic() + self._timeout
        buf = io.BytesIO()
        with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as gz:
            while ranges:
                if time.monotonic() > deadline:
                    raise ArchiveFailed(
                        f"archive of {topic} timed out with partitions {sorted(ranges)} unread"
                    )
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise ArchiveFailed(f"archive of {topic}: {err.str()}")
                    continue
                part, off = msg.partition() or 0, msg.offset() or 0
                ts_type, ts = msg.timestamp()
                line = {
                    "partition": part,
                    "offset": off,
                    "timestamp": ts,
                    "timestamp_type": ts_type,
                    "key": _b64(msg.key()),
                    "value": _b64(msg.value()),
                    "headers": _headers(msg.headers()),
                }
                gz.write(orjson.dumps(line) + b"\n")
                counts[part] = counts.get(part, 0) + 1
                if part in ranges and off + 1 >= ranges[part][1]:
                    del ranges[part]
        partitions = {
            p: {"low": lo, "high": hi, "messages": counts.get(p, 0)}
            for p, (lo, hi) in sorted(marks.items())
        }
        return _Dump(buf.getvalue(), sum(counts.values()), partitions)

    def _archive(self, topic: str) -> ArchiveResult:
        consumer = self._consumer()
        try:
            marks = self._watermarks(consumer, topic)
            dump = self._dump(consumer, topic, marks)
            digest = hashlib.sha256(dump.data).hexdigest()
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            base = f"{self._prefix}{topic}/{stamp}-{uuid.uuid4().hex[:8]}"
            try:
                self._store.put(base + DATA, dump.data)
                back = self._store.get(base + DATA)
            except DagManagerError as e:
                raise ArchiveFailed(f"archive of {topic}: upload failed: {e.message}") from e
            _verify(topic, back, digest, dump.messages)
            after = self._watermarks(consumer, topic)
            changed = sorted(p for p in marks if after.get(p, marks[p])[1] != marks[p][1])
            if changed or set(after) != set(marks):
                raise ArchiveFailed(
                    f"archive of {topic}: the topic changed while it was archived "
                    f"(partitions {changed or sorted(set(after) ^ set(marks))}); kept"
                )
        except KafkaException as e:
            raise ArchiveFailed(f"archive of {topic}: {e}") from e
        finally:
            consumer.close()
        manifest = {
            "format": FORMAT,
            "topic": topic,
            "created_at": time.time(),
            "messages": dump.messages,
            "bytes": len(dump.data),
            "sha256": digest,
            "data": base + DATA,
            "partitions": {str(p): v for p, v in dump.partitions.items()},
        }
        try:
            location = self._store.put(base + MANIFEST, orjson.dumps(manifest))
        except DagManagerError as e:
            raise ArchiveFailed(f"archive of {topic}: manifest upload failed: {e.message}") from e
        return ArchiveResult(topic, location, dump.messages, len(dump.data))

    # -- reading ---------------------------------------------------------------------------

    def _manifest(self, key: str) -> dict[str, Any]:
        try:
            doc = orjson.loads(self._store.get(key))
        except orjson.JSONDecodeError as e:
            raise InvalidSpec(f"{key}: not an archive manifest ({e})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InvalidSpec(f"{key}: not a {FORMAT} manifest")
        return doc

    def _entries(self, queue: str | None) -> list[ArchiveEntry]:
        prefix = f"{self._prefix}{queue}/" if queue else self._prefix
        out = []
        for key in self._store.keys(prefix):
            if not key.endswith(MANIFEST):
                continue
            m = self._manifest(key)
            out.append(
                ArchiveEntry(
                    str(m["topic"]),
                    key,
                    int(m["messages"]),
                    int(m["bytes"]),
                    float(m["created_at"]),
                    len(m.get("partitions") or {}),
                )
            )
        return out

    def _restore(self, manifest_key: str, to_topic: str) -> int:
        m = self._manifest(manifest_key)
        data = self._store.get(str(m["data"]))
        _verify(str(m["topic"]), data, str(m["sha256"]), int(m["messages"]))
        producer = Producer(
            {"bootstrap.servers": self._bootstrap, **self._extra, "enable.idempotence": True}
        )
        consumer = self._consumer()
        try:
            partitions = len(self._watermarks(consumer, to_topic))
        finally:
            consumer.close()
        failures: list[str] = []

        def delivered(err: object, _msg: object) -> None:
            if err is not None:
                failures.append(str(err))

        sent = 0
        for raw in gzip.decompress(data).splitlines():
            line = orjson.loads(raw)
            extra: dict[str, Any] = {}
            stamp = line.get("timestamp")
            if isinstance(stamp, int) and stamp > 0:
                extra["timestamp"] = stamp
            producer.produce(
                to_topic,
                value=_unb64(line.get("value")),
                key=_unb64(line.get("key")),
                partition=int(line["partition"]) % max(partitions, 1),
                headers=[(str(h[0]), _unb64(h[1])) for h in line.get("headers") or []],
                on_delivery=delivered,
                **extra,
            )
            sent += 1
            if sent % 10_000 == 0:
                producer.poll(0)
        left = producer.flush(self._timeout)
        if left or failures:
            raise Unavailable(
                f"restore into {to_topic}: {left} message(s) undelivered, "
                f"{len(failures)} failed ({failures[:1]})",
                reason="KafkaUnavailable",
            )
        return sent


def _verify(topic: str, data: bytes, sha256: str, messages: int) -> None:
    """The stored data is what was dumped: same digest, same number of messages."""
    if hashlib.sha256(data).hexdigest() != sha256:
        raise ArchiveFailed(f"archive of {topic}: the stored data does not match its checksum")
    try:
        lines = gzip.decompress(data).count(b"\n")
    except (OSError, EOFError) as e:
        raise ArchiveFailed(f"archive of {topic}: the stored data is not gzip ({e})") from e
    if lines != messages:
        raise ArchiveFailed(
            f"archive of {topic}: {lines} message(s) stored, {messages} read from the topic"
        )


class MemoryArchive:
    """The embedded archive: records which topics were archived (message contents live only
    in the embedded topic admin's counters)."""

    def __init__(self) -> None:
        self.archived: list[str] = []

    async def archive(self, topic: str) -> ArchiveResult:
        self.archived.append(topic)
        return ArchiveResult(topic, f"memory://{topic}", 0, 0)

    async def entries(self, queue: str | None = None) -> list[ArchiveEntry]:
        return [
            ArchiveEntry(t, f"memory://{t}", 0, 0, 0.0)
            for t in self.archived
            if queue is None or t == queue
        ]

    async def restore(self, manifest: str, to_topic: str) -> int:
        raise InvalidSpec("the embedded archive keeps no messages to restore")
