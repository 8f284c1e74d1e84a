"""Diff work that outlives its caller.

The Gateway waits 0.1 s for a Diff and then cancels the call. Work that a cancellation
abandoned would be work never done: every retry would start over and be cancelled again. So a
diff runs as a task of its own, under a deadline of its own, and its callers only wait for it:

- a caller that leaves (cancelled, disconnected) leaves the work running; once the work holds a
  diff slot it may change state (intents, topics, graph, outbox) and always runs to its end;
  before that, work that every caller has left is dropped (it changed nothing);
- an identical request (same strategy, DAG bytes, compute context, id mode and dry-run flag)
  that arrives while the work runs joins it and gets the same answer: one creation, not two;
- `joined` tells the driver which work its call waited for, so its audit line can record the
  work's outcome even when the caller left first (`sidecar/security.py`);
- the work may answer its callers before it ends (`answer`): the sidecar answers once the
  diff's names are durable (journaled) and Kafka validated their creation, and the work goes
  on to create the topics and write the graph (`diffs`).

Across processes the graph's claims already serialize writers (see `diffs`).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

from blake3 import blake3

from qmtl_dagmanager.core import plan
from qmtl_dagmanager.core.errors import Unavailable
from qmtl_dagmanager.metrics import Metrics

log = logging.getLogger(__name__)
T = TypeVar("T")

# The work the current task runs (set in the task itself: `answer` finds it there).
_running: contextvars.ContextVar[Work[Any] | None] = contextvars.ContextVar(
    "qmtl_diff_running", default=None
)

# The work the current call waits for, set by `DiffWork.run` into the holder a driver put here
# (a list, so that the driver sees what the handler appended whatever task runs it).
joined: contextvars.ContextVar[list[asyncio.Future[object]] | None] = contextvars.ContextVar(
    "qmtl_diff_joined", default=None
)


def request_key(
    request: plan.Request, dag_json: str | bytes, *, ids: str, namespaces: bool, dry: bool
) -> str:
    """The identity of a diff request: BLAKE3 of the DAG bytes and everything else that can
    change its answer."""
    h = blake3(dag_json.encode() if isinstance(dag_json, str) else dag_json)
    ctx = "\x1f".join(
        (
            request.strategy_id,
            request.world_id,
            request.execution_domain,
            request.as_of,
            request.partition,
            request.dataset_fingerprint,
            ids,
            str(namespaces),
            "dry" if dry else "",
        )
    )
    h.update(b"\x00" + ctx.encode())
    return h.hexdigest()


@dataclass(eq=False)
class Work(Generic[T]):
    key: str
    strategy_id: str
    task: asyncio.Task[T]
    answer: asyncio.Future[T]  # the callers' answer: early (`answer`) or the task's result
    started: bool = False  # holds a diff slot: may change state from now on
    callers: int = 0  # callers waiting now
    left: int = 0  # callers that left before it ended


@dataclass
class DiffWork:
    """The diffs running now, by request identity."""

    metrics: Metrics
    deadline: float = 60.0  # seconds a diff's work may take, whoever waits for it
    _inflight: dict[str, Work[Any]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self._inflight)

    def start(self, key: str) -> None:
        """Called by the work itself once it holds a slot (see `run`)."""
        work = self._inflight.get(key)
        if work is not None:
            work.started = True

    async def run(self, key: str, strategy_id: str, make: Callable[[], Awaitable[T]]) -> T:
        """The answer of the work identified by `key`: joined if it runs already, else
        started as a task of its own. Cancelling the caller never cancels work that has
        started (see the module)."""
        found = self._inflight.get(key)
        if found is None:
            loop = asyncio.get_running_loop()
            answer: asyncio.Future[T] = loop.create_future()
            holder: list[Work[Any]] = []
            task = loop.create_task(
                self._bounded(make, strategy_id, holder), name=f"diff {strategy_id}"
            )
            work: Work[Any] = Work(key, strategy_id, task, answer)
            holder.append(work)
            self._inflight[key] = work
            task.add_done_callback(functools.partial(self._ended, work))
        else:
            work = found
            self.metrics.diff_joined.inc()
            log.info("diff %s: an identical request is running; joined it", strategy_id)
        audit = joined.get()
        if audit is not None:
            audit.append(work.task)
        work.callers += 1
        try:
            return cast(T, await asyncio.shield(work.answer))
        except asyncio.CancelledError:
            if not work.answer.done():  # this caller left; the work goes on
                work.left += 1
                self.metrics.diff_callers_left.labels(
                    "started" if work.started else "waiting"
                ).inc()
                if not work.started and work.callers == 1:
                    work.task.cancel()  # it changed nothing and nobody else waits for it
            raise
        finally:
            work.callers -= 1

    async def _bounded(
        self, make: Callable[[], Awaitable[T]], strategy_id: str, holder: list[Work[Any]]
    ) -> T:
        _running.set(holder[0])  # this task's own context
        try:
            async with asyncio.timeout(self.deadline):
                return await make()
        except TimeoutError:
            raise Unavailable(
                f"the diff of {strategy_id} did not end within its deadline of "
                f"{self.deadline:g} s (diff_deadline_seconds)",
                reason="DiffDeadline",
            ) from None

    def _ended(self, work: Work[Any], _: object = None) -> None:
        if self._inflight.get(work.key) is work:
            del self._inflight[work.key]
        early = work.answer.done()
        if work.task.cancelled():
            if not early:
                work.answer.cancel()
            return
        error = work.task.exception()  # retrieved: never "exception was never retrieved"
        if not early:
            if error is None:
                work.answer.set_result(work.task.result())
            else:
                work.answer.set_exception(error)
                work.answer.exception()  # retrieved, whether or not a caller still waits
        elif error is not None:
            reason = getattr(error, "reason", type(error).__name__)
            self.metrics.diff_completion_failures.labels(reason).inc()
            log.warning(
                "diff %s was answered but did not complete: %s: %s (its journal entry is replayed)",
                work.strategy_id,
                reason,
                getattr(error, "message", error),
            )
        if work.left:
            outcome = "OK" if error is None else getattr(error, "reason", type(error).__name__)
            log.info(
                "diff %s ended after its caller(s) left (%d): %s",
                work.strategy_id,
                work.left,
                outcome,
            )

    @staticmethod
    def answer(value: object) -> object | None:
        """Called by running work: answer its callers now with `value`, the work going on.
        Returns the answer given before, if one was (None otherwise, and outside any work)."""
        work = _running.get()
        if work is None:
            return None
        if work.answer.done():
            return work.answer.result() if not work.answer.cancelled() else None
        work.answer.set_result(value)
        return None

    async def settled(self, timeout: float) -> None:
        """Wait (at most `timeout` s) for the work already answered but still writing: a
        read of the graph after an early answer then sees that answer's queues (read your
        writes, within this process)."""
        writing = [w.task for w in self._inflight.values() if w.answer.done()]
        if writing:
            await asyncio.wait(writing, timeout=timeout)

    async def drain(self, timeout: float) -> int:
        """At shutdown: wait (bounded) for started work to end; returns how many did not."""
        tasks = [w.task for w in self._inflight.values()]
        if not tasks:
            return 0
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for t in pending:
            t.cancel()
        return len(pending)
