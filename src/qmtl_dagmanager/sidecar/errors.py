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
    """Runs a handler body and maps what it raises, once, for every RPC."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

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
            return await body()
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
