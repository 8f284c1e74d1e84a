"""The one place where the sidecar turns errors into gRPC status codes. Never UNKNOWN for
anything we can name: typed errors map to their codes; anything else is INTERNAL, logged."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeAlias, TypeVar

import grpc

from qmtl_dagmanager.core.errors import (
    Conflict,
    DagManagerError,
    InvalidSpec,
    Overloaded,
    Unavailable,
)
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.sidecar import bounds

log = logging.getLogger(__name__)
T = TypeVar("T")
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"


def code_for(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, Overloaded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, InvalidSpec):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, Conflict):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, Unavailable):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.INTERNAL


class Guard:
    """Runs a handler body and maps what it raises, once, for every RPC. No call waits longer
    than `deadline` seconds for its answer: past it (Neo4j or Kafka slow or down, the
    driver still retrying) the caller gets UNAVAILABLE at once and the work goes on in the
    background, bounded by the drivers' own timeouts (a diff by its own deadline)."""

    def __init__(self, metrics: Metrics, deadline: float = 4.0) -> None:
        self.metrics = metrics
        self.deadline = deadline

    async def bounded(self, method: str, work: Awaitable[T]) -> T:
        try:
            return await bounds.within(work, self.deadline)
        except TimeoutError:
            self.metrics.rpc_deadline_exceeded.labels(method).inc()
            raise Unavailable(
                f"{method} found no answer within {self.deadline:g} s: Neo4j or Kafka is slow "
                "or down (grpc_answer_deadline_seconds; the work goes on in the background)",
                reason="DependencyTimeout",
            ) from None

    async def _abort(self, context: Context, method: str, error: Exception) -> NoReturn:
        if isinstance(error, DagManagerError):
            message = f"{error.reason}: {error.message}"
        else:
            log.error("%s failed unexpectedly", method, exc_info=error)
            message = f"internal error ({type(error).__name__}); see the sidecar log"
        code = code_for(error)
        self.metrics.grpc_errors.labels(method, code.name).inc()
        await context.abort(code, message)

    async def unary(self, context: Context, method: str, body: Callable[[], Awaitable[T]]) -> T:
        try:
            return await self.bounded(method, body())
        except Exception as error:  # noqa: BLE001 - the single mapping point of this driver
            await self._abort(context, method, error)

    async def stream(
        self, context: Context, method: str, body: Callable[[], AsyncIterator[T]]
    ) -> AsyncIterator[T]:
        try:
            async for item in body():
                yield item
        except Exception as error:  # noqa: BLE001 - the single mapping point of this driver
            await self._abort(context, method, error)
