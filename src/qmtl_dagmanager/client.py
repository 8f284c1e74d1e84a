"""A client that talks to a DAG Manager exactly as the QMTL Gateway does (contract sections 1 to 8).

Diff: reads the stream chunk by chunk; for each chunk requires crc32 to be present and equal
to the CRC of the submitted node order, takes the union of queue_map, then acks it with
chunk_id 0 before reading the next. Node ids come from keys with
`key.partition("#")[0].rsplit(":", 2)[0]`; values get the Gateway's namespace prefix unless
already prefixed with exactly it. Used by the CLI, the compatibility tests and the benchmarks.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson

from qmtl_dagmanager.core import identity
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc

MAX_MESSAGE = 64 * 1024 * 1024


class ContractViolation(AssertionError):
    """The server answered in a way the Gateway would reject."""


@dataclass
class DiffReply:
    sentinel_id: str
    version: str
    crc32: int
    queue_map: dict[str, str]
    buffers: list[pb.BufferInstruction] = field(default_factory=list)
    chunks: int = 0

    def topics_by_node(self, namespace: str | None = None) -> dict[str, str]:
        """node id → topic, as the Gateway derives them (namespace prefix applied)."""
        out = {}
        for key, value in self.queue_map.items():
            nid = key.partition("#")[0].rsplit(":", 2)[0]
            prefixed = namespace and not value.startswith(namespace + ".")
            out[nid] = f"{namespace}.{value}" if prefixed else value
        return out


def expected_crc(dag_json: str | bytes) -> int | None:
    """What the Gateway expects: CRC-32 over every node object's id, in submitted order
    (None for a document that is not a DAG: the server must reject it anyway)."""
    try:
        doc = orjson.loads(dag_json)
    except orjson.JSONDecodeError:
        return None
    nodes = doc.get("nodes") if isinstance(doc, dict) else None
    if not isinstance(nodes, list):
        return None
    return identity.crc32([n.get("node_id") if isinstance(n, dict) else None for n in nodes])


class GatewayClient:
    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE),
                ("grpc.max_send_message_length", MAX_MESSAGE),
            ],
        )
        self.diff_stub = pb_grpc.DiffServiceStub(self.channel)
        self.tags = pb_grpc.TagQueryStub(self.channel)
        self.admin = pb_grpc.AdminServiceStub(self.channel)
        self.health = pb_grpc.HealthCheckStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def diff(
        self,
        strategy_id: str,
        dag_json: str | bytes,
        *,
        world_id: str = "",
        execution_domain: str = "",
        as_of: str = "",
        partition: str = "",
        dataset_fingerprint: str = "",
        timeout: float | None = None,
    ) -> DiffReply:
        text = dag_json.decode() if isinstance(dag_json, bytes) else dag_json
        request = pb.DiffRequest(
            strategy_id=strategy_id,
            dag_json=text,
            world_id=world_id,
            execution_domain=execution_domain,
            as_of=as_of,
            partition=partition,
            dataset_fingerprint=dataset_fingerprint,
        )
        want_crc = expected_crc(text)
        reply: DiffReply | None = None
        call = self.diff_stub.Diff(request, timeout=timeout)
        async for chunk in call:
            if not chunk.HasField("crc32"):
                raise ContractViolation("DiffChunk.crc32 is not set")
            if want_crc is not None and chunk.crc32 != want_crc:
                raise ContractViolation(f"crc32 {chunk.crc32} != expected {want_crc}")
            if reply is None:
                reply = DiffReply(chunk.sentinel_id, chunk.version, chunk.crc32, {})
            elif (chunk.sentinel_id, chunk.version) != (reply.sentinel_id, reply.version):
                raise ContractViolation("sentinel_id or version changed between chunks")
            reply.queue_map.update(chunk.queue_map)
            reply.buffers.extend(chunk.buffer_nodes)
            reply.chunks += 1
            await self.diff_stub.AckChunk(
                pb.ChunkAck(sentinel_id=chunk.sentinel_id, chunk_id=0), timeout=timeout
            )
        if reply is None:
            raise ContractViolation("Diff returned no chunk")
        return reply

    async def get_queues(
        self, tags: Iterable[str], interval: int, match_mode: str = "any"
    ) -> list[tuple[str, bool]]:
        r = await self.tags.GetQueues(
            pb.TagQueryRequest(tags=list(tags), interval=interval, match_mode=match_mode)
        )
        return [(q.queue, getattr(q, "global")) for q in r.queues]

    async def cleanup(self, strategy_id: str) -> None:
        await self.admin.Cleanup(pb.CleanupRequest(strategy_id=strategy_id))

    async def queue_stats(self, filter_text: str) -> dict[str, int]:
        return dict(
            (await self.admin.GetQueueStats(pb.QueueStatsRequest(filter=filter_text))).sizes
        )

    async def redo_diff(self, sentinel_id: str, dag_json: str) -> pb.DiffResult:
        return await self.admin.RedoDiff(
            pb.RedoDiffRequest(sentinel_id=sentinel_id, dag_json=dag_json)
        )

    async def status(self) -> dict[str, Any]:
        r = await self.health.Status(pb.StatusRequest())
        return {"neo4j": r.neo4j, "state": r.state}
