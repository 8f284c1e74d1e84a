"""Splitting a plan into DiffChunks (contract §6): every chunk carries the same sentinel_id,
version and an explicitly set crc32; at most 100 buffer nodes and 1 MiB per chunk; the
queue_map is split across chunks when large (the Gateway takes the union)."""

from __future__ import annotations

from collections.abc import Iterator

from qmtl_dagmanager.core.plan import Buffer, Plan
from qmtl_dagmanager.pb import dagmanager_pb2 as pb

MAX_BUFFERS = 100
MAX_BYTES = 1024 * 1024
HEADROOM = 8 * 1024  # for the fixed fields and protobuf framing estimates


def _entry_size(key: str, value: str) -> int:
    # a map entry: tag + length + (tag + len + key) + (tag + len + value), lengths ≤ 3 bytes
    return len(key.encode()) + len(value.encode()) + 12


def buffer_message(b: Buffer) -> pb.BufferInstruction:
    n = b.node
    return pb.BufferInstruction(
        node_id=n.node_id,
        node_type=n.node_type,
        code_hash=n.code_hash,
        schema_hash=n.schema_hash,
        interval=n.interval,
        period=n.period,
        tags=list(n.tags),
        lag=b.lag,
        schema_compat_id=n.schema_compat_id,
    )


def build(plan: Plan, max_bytes: int = MAX_BYTES) -> Iterator[pb.DiffChunk]:
    """Yield the chunks of a plan; always at least one (an empty DAG still answers)."""
    budget = max_bytes - HEADROOM
    buffers = [buffer_message(b) for b in plan.buffers]
    entries = list(plan.queue_map.items())
    bi = ei = 0
    while True:
        chunk = pb.DiffChunk(sentinel_id=plan.sentinel_id, version=plan.version, crc32=plan.crc32)
        size = 0
        taken = 0
        while bi < len(buffers) and taken < MAX_BUFFERS:
            bsize = buffers[bi].ByteSize() + 4
            if size + bsize > budget and taken:
                break
            chunk.buffer_nodes.append(buffers[bi])
            size += bsize
            bi += 1
            taken += 1
        while ei < len(entries):
            key, value = entries[ei]
            esize = _entry_size(key, value)
            if size + esize > budget and (taken or size):
                break
            chunk.queue_map[key] = value
            size += esize
            ei += 1
        yield chunk
        if bi >= len(buffers) and ei >= len(entries):
            return
