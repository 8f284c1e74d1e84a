"""gRPC servicers: translate messages to service calls and back; errors go through Guard.

Acks (contract §6): the Gateway acks every chunk with chunk_id 0. Chunks are streamed under
gRPC's own flow control and the stream never waits for an ack, so concurrent streams with the
same sentinel_id cannot steal each other's acks and a silent client never stalls a stream.
AckChunk echoes its request and counts it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from qmtl_dagmanager.core import plan
from qmtl_dagmanager.core.errors import InvalidSpec, Overloaded
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc
from qmtl_dagmanager.ports import GraphStore
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.services.queues import QueueService
from qmtl_dagmanager.sidecar import bounds, chunks
from qmtl_dagmanager.sidecar.errors import Context, Guard
from qmtl_dagmanager.sidecar.security import RateLimit

SENTINEL_SUFFIX = "-sentinel"


def request_of(m: pb.DiffRequest) -> plan.Request:
    return plan.Request(
        strategy_id=m.strategy_id,
        world_id=m.world_id,
        execution_domain=m.execution_domain,
        as_of=m.as_of,
        partition=m.partition,
        dataset_fingerprint=m.dataset_fingerprint,
    )


PENDING_KEY = "qmtl-topics-pending"  # trailing metadata: how many topics are pending
PENDING_NAMES_KEY = "qmtl-topics-pending-names"  # and which (comma-separated, at most 2 KiB)


def tell_pending(context: Context, pending: list[str]) -> None:
    """Tell the caller which topics of its answer Kafka has acknowledged but no broker
    describes yet (they exist; see `topic_settle`), in trailing metadata: the messages are
    the Gateway's contract and stay as they are."""
    if not pending:
        return
    names = ",".join(sorted(pending))
    if len(names) > 2048:
        names = names[: names.rfind(",", 0, 2048)] + ",..."
    context.set_trailing_metadata(((PENDING_KEY, str(len(pending))), (PENDING_NAMES_KEY, names)))


class DiffServicer(pb_grpc.DiffServiceServicer):
    def __init__(
        self, diffs: DiffService, guard: Guard, queues: QueueService | None = None
    ) -> None:
        self._diffs = diffs
        self._guard = guard
        self._queues = queues or QueueService(diffs.graph, diffs.topics, diffs.metrics, diffs.clock)

    async def Diff(
        self,
        request: pb.DiffRequest,
        context: Context,
    ) -> AsyncIterator[pb.DiffChunk]:
        async def body() -> AsyncIterator[pb.DiffChunk]:
            if not request.strategy_id.strip():
                raise InvalidSpec("strategy_id is required", reason="MissingField")
            outcome = await self._guard.bounded(
                "Diff", self._diffs.diff(request_of(request), request.dag_json)
            )
            tell_pending(context, self._queues.pending(n.topic for n in outcome.plan.nodes))
            sent = self._guard.metrics.chunks_sent
            for chunk in chunks.build(outcome.plan):
                sent.inc()
                yield chunk

        async for chunk in self._guard.stream(context, "Diff", body):
            yield chunk

    async def AckChunk(self, request: pb.ChunkAck, context: Context) -> pb.ChunkAck:
        self._guard.metrics.chunk_acks.inc()
        return pb.ChunkAck(sentinel_id=request.sentinel_id, chunk_id=request.chunk_id)


class TagQueryServicer(pb_grpc.TagQueryServicer):
    def __init__(self, queues: QueueService, guard: Guard) -> None:
        self._queues = queues
        self._guard = guard

    async def GetQueues(self, request: pb.TagQueryRequest, context: Context) -> pb.TagQueryReply:
        async def body() -> pb.TagQueryReply:
            refs = await self._queues.by_tags(
                list(request.tags), request.interval, request.match_mode
            )
            tell_pending(context, self._queues.pending(r.topic for r in refs))
            return pb.TagQueryReply(
                queues=[pb.QueueDescriptor(queue=r.topic, **{"global": r.is_global}) for r in refs]
            )

        return await self._guard.unary(context, "GetQueues", body)


class AdminServicer(pb_grpc.AdminServiceServicer):
    def __init__(
        self,
        diffs: DiffService,
        queues: QueueService,
        guard: Guard,
        stats_limit: RateLimit | None = None,
    ) -> None:
        self._diffs = diffs
        self._queues = queues
        self._guard = guard
        self._stats_limit = stats_limit

    async def Cleanup(self, request: pb.CleanupRequest, context: Context) -> pb.CleanupResponse:
        async def body() -> pb.CleanupResponse:
            await self._queues.cleanup(request.strategy_id)
            return pb.CleanupResponse()

        return await self._guard.unary(context, "Cleanup", body)

    async def GetQueueStats(self, request: pb.QueueStatsRequest, context: Context) -> pb.QueueStats:
        async def body() -> pb.QueueStats:
            if self._stats_limit is not None and not self._stats_limit.allow():
                raise Overloaded(
                    f"GetQueueStats is limited to {self._stats_limit.rate:g} calls per second"
                )
            sizes = await self._queues.stats(request.filter)
            tell_pending(context, self._queues.pending(sizes))
            return pb.QueueStats(sizes=sizes)

        return await self._guard.unary(context, "GetQueueStats", body)

    async def RedoDiff(self, request: pb.RedoDiffRequest, context: Context) -> pb.DiffResult:
        async def body() -> pb.DiffResult:
            sid = request.sentinel_id.strip()
            if not sid:
                raise InvalidSpec("sentinel_id is required", reason="MissingField")
            strategy = sid.removesuffix(SENTINEL_SUFFIX) or sid
            # RedoDiff carries no context: re-run in the strategy's last recorded one.
            ctx = await self._diffs.graph.strategy_context(strategy) or {}
            outcome = await self._diffs.diff(plan.Request(strategy, **ctx), request.dag_json)
            p = outcome.plan
            return pb.DiffResult(
                queue_map=dict(p.queue_map), sentinel_id=p.sentinel_id, version=p.version
            )

        return await self._guard.unary(context, "RedoDiff", body)


class HealthServicer(pb_grpc.HealthCheckServicer):
    """Contract §3: up only with neo4j="ok" and state="running". A graph that does not
    answer within `deadline` seconds is "error"."""

    def __init__(self, graph: GraphStore, deadline: float = 2.0) -> None:
        self._graph = graph
        self._deadline = deadline

    async def Status(self, request: pb.StatusRequest, context: Any) -> pb.StatusReply:
        ok = await bounds.reachable(self._graph.ping(), self._deadline)
        return pb.StatusReply(neo4j="ok" if ok else "error", state="running")
