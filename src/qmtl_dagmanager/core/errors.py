"""Typed errors of the core. Each says whether retrying can help and carries a CamelCase
reason that drivers use as a status condition reason or map to a gRPC status code."""

from __future__ import annotations


class DagManagerError(Exception):
    """Base of every error the product raises on purpose."""

    reason = "Error"
    retryable = False
    retry_after = 5.0  # seconds a driver waits before retrying a retryable error

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason


class InvalidSpec(DagManagerError):
    """The input is wrong; the same input will always fail. Nothing was written."""

    reason = "InvalidSpec"


class InvalidDag(InvalidSpec):
    """A DAG that cannot be accepted; names the node (id or position) and the field."""

    def __init__(
        self,
        message: str,
        *,
        reason: str,
        node: str | None = None,
        field: str | None = None,
    ) -> None:
        where = []
        if node is not None:
            where.append(f"node {node}")
        if field is not None:
            where.append(f"field {field!r}")
        full = f"{', '.join(where)}: {message}" if where else message
        super().__init__(full, reason=reason)
        self.node = node
        self.field = field


class Conflict(DagManagerError):
    """Permanent until something else changes (for example another strategy's state)."""

    reason = "Conflict"


class CrossContextReuse(Conflict):
    """A node's queue would be shared between different compute contexts (ComputeKeys)."""

    reason = "CrossContextReuse"

    def __init__(self, message: str, *, node_ids: tuple[str, ...]) -> None:
        super().__init__(message)
        self.node_ids = node_ids


class Unavailable(DagManagerError):
    """A dependency (Neo4j, Kafka, the API server) did not answer; retry after a delay."""

    reason = "DependencyUnavailable"
    retryable = True

    def __init__(
        self, message: str, *, retry_after: float = 5.0, reason: str | None = None
    ) -> None:
        super().__init__(message, reason=reason)
        self.retry_after = retry_after


class QueueGone(Unavailable):
    """Queues a plan reuses were dropped by garbage collection after it was planned; nothing
    was written. Planning again creates them."""

    def __init__(self, topics: list[str]) -> None:
        super().__init__(
            f"queue(s) dropped by garbage collection while the diff was planned: {_shown(topics)}",
            retry_after=0.1,
            reason="QueueGone",
        )
        self.topics = tuple(topics)


class QueueBusy(Unavailable):
    """Queues or topic names a plan needs are being deleted by a garbage-collection run right
    now; nothing was written. Planning again once the run has finished gives a correct answer
    (the diff does so itself, for a bounded time)."""

    def __init__(self, topics: list[str]) -> None:
        super().__init__(
            f"topic(s) being deleted by garbage collection: {_shown(topics)}",
            retry_after=0.2,
            reason="QueueBusy",
        )
        self.topics = tuple(topics)


class StaleRead(Unavailable):
    """What a plan read of the graph changed before its write (another writer got there
    first): nothing was written. Planning again from fresh graph data gives a correct answer."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"the graph changed under the diff: {what}", retry_after=0.1, reason="GraphChanged"
        )


def _shown(topics: list[str]) -> str:
    return ", ".join(topics[:5]) + (f" and {len(topics) - 5} more" if len(topics) > 5 else "")


class Overloaded(Unavailable):
    """Too much work in flight: shed at once rather than queue it."""

    reason = "Overloaded"

    def __init__(self, message: str) -> None:
        super().__init__(message, retry_after=0.5, reason="Overloaded")
