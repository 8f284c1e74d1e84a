"""QueueUpdated publication off the Diff response path, through an outbox in the graph.

A diff's graph write marks, in the same transaction, each (tags, interval, match_mode) group
whose queue set it changed (a mark is a new record: writers never wait on each other for it).
A publisher drains the marks: it claims pending groups (one publisher per group at a time,
across processes), reads each group's full post-change set, publishes it, and removes the
marks it covered: a group written again meanwhile stays pending and goes out again with the
newer set. So the last event of a group always carries its current set, a burst of diffs on
one group costs a few events rather than one per diff, and nothing is lost: a publisher that
fails releases its claims, one that dies leaves claims that expire (`EVENT_CLAIM_TTL`), and
every process polls for pending groups.

`kick` (after a write) drains soon without a poller; `run` is the poller of a long-running
process (sidecar, operator).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid

from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.core.tag_match import TagQuery
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Clock, GraphStore, PendingEvent
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.tracing import Tracer

log = logging.getLogger(__name__)
BATCH = 256  # groups claimed per round
GATHER = 0.05  # seconds of writes a round waits to gather: fewer, larger rounds
# Between rounds, at least this many times the last round's duration: big groups (whole queue
# sets to read and encode) take at most a fifth of the process's time, whatever the write rate.
PAUSE_FACTOR = 4.0
RETRY_START, RETRY_MAX = 0.2, 5.0  # seconds between rounds after a failure
DRAIN_TASK = "queue-events-drain"  # the name of the background drain `kick` starts


class QueueEvents:
    def __init__(
        self,
        graph: GraphStore,
        controlbus: ControlBus,
        metrics: Metrics,
        clock: Clock,
        owner: str = "",
    ) -> None:
        self.graph, self.controlbus, self.metrics, self.clock = graph, controlbus, metrics, clock
        self.owner = owner or f"publisher-{uuid.uuid4().hex[:12]}"
        self.tracer = Tracer()  # the process's, set by the composition root
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._polling = False
        self._stopping = False
        self._last_round = 0.0  # seconds the last round took to read and publish

    def kick(self) -> None:
        """A write marked groups: drain soon (in the background)."""
        self._wake.set()
        if self._polling or (self._task is not None and not self._task.done()):
            return
        self._task = asyncio.get_running_loop().create_task(self._until_idle(), name=DRAIN_TASK)

    async def settled(self) -> None:
        """Wait until a background drain started by `kick` has finished (tests, shutdown)."""
        while self._task is not None and not self._task.done():
            await asyncio.wait({self._task})

    async def close(self, timeout: float = 5.0) -> None:
        """Shutdown: finish the background drain and publish what is still marked, within
        `timeout` seconds; what is left stays in the outbox for another process's poller."""
        try:
            async with asyncio.timeout(timeout):
                await self.settled()
                await self.drain()
        except (TimeoutError, DagManagerError) as e:
            why = str(e) or f"not drained in {timeout:g} s"
            log.warning("QueueUpdated groups left in the outbox at shutdown: %s", why)
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task})

    def stop(self) -> None:
        """Ask the poller (`run`) to return at its next pause: between rounds, never inside a
        graph call (one cancelled while it opens a connection can leave the socket open)."""
        self._stopping = True
        self._wake.set()

    async def _until_idle(self) -> None:
        await self._loop(None)

    async def run(self, interval: float = 1.0) -> None:
        """Poll until cancelled: drain every `interval` seconds, or soon after a `kick`.
        Also publishes groups other processes marked and could not publish (they died)."""
        self._polling = True
        try:
            await self._loop(interval)
        finally:
            self._polling = False

    async def _loop(self, interval: float | None) -> None:
        """Drain after each wake (gathering the writes of the next GATHER seconds first);
        with an `interval`, also on a timer, forever; without, until nothing woke it."""
        delay = RETRY_START
        while interval is not None or self._wake.is_set():
            woken = True
            if interval is not None:
                try:
                    await asyncio.wait_for(self._wake.wait(), interval)
                except TimeoutError:
                    woken = False
                if self._stopping:  # `stop` sets the wake too: the wait above returns at once
                    return
            if woken:
                await asyncio.sleep(self._pause())
            self._wake.clear()
            try:
                await self.drain()
                if not woken:
                    self.metrics.queue_events_pending.set(await self.graph.pending_events())
                delay = RETRY_START
            except DagManagerError as e:
                log.warning("QueueUpdated publication failed (%s); retrying in %.1f s", e, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, RETRY_MAX)
                self._wake.set()

    async def drain(self) -> int:
        """Publish every pending group this publisher can claim; how many events went out.
        A group written again while it was published goes out again after GATHER."""
        published = 0
        while True:
            pending = await self.graph.claim_events(self.owner, self.clock.now(), BATCH)
            if not pending:
                break
            started = time.perf_counter()
            with self.tracer.span("controlbus.publish", {"groups": len(pending)}):
                await self._publish(pending)
            self._last_round = time.perf_counter() - started
            published += len(pending)
            changed = await self.graph.settle_events(self.owner, pending)
            if changed:
                self.metrics.queue_events_republished.inc(changed)
                await asyncio.sleep(self._pause())
            elif len(pending) < BATCH:
                break
        return published

    def _pause(self) -> float:
        return max(GATHER, PAUSE_FACTOR * self._last_round)

    async def _publish(self, pending: list[PendingEvent]) -> None:
        try:
            sets = await self.graph.queues_by_tag_queries(
                [TagQuery(p.group.tags, p.group.interval, p.group.match_mode) for p in pending]
            )
            # one event per group, all in flight at once (each group once per round)
            await asyncio.gather(
                *(
                    self.controlbus.queue_updated(
                        p.group.tags,
                        p.group.interval,
                        [(r.topic, r.is_global) for r in refs],
                        p.group.match_mode,
                    )
                    for p, refs in zip(pending, sets, strict=True)
                )
            )
            self.metrics.events_published.labels("queue_updated").inc(len(pending))
        except BaseException:
            # whatever went out stays valid (at-least-once); the rest goes out next round
            try:
                await asyncio.shield(self.graph.release_events(self.owner, pending))
            except DagManagerError as e:  # the claims expire instead
                log.warning("could not release %d outbox claim(s): %s", len(pending), e)
            raise
