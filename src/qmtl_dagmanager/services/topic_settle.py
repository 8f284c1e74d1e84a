"""Topics seen through after the answer.

The sidecar answers a Diff once the names are durable (creation intents and the graph write)
and Kafka's controller has acknowledged the creation: the creation is then committed in the
cluster's metadata log, and a producer writing right after loses nothing (librdkafka waits up
to `topic.metadata.propagation.max.ms`, 30 s by default, for a new topic to appear). Brokers
show a new topic in their metadata some hundreds of ms later; waiting for that would cost the
Gateway its 0.1 s budget. So this settler follows each such topic in the background until the
broker describes it:

- one describe request for every pending topic, every `POLL` s;
- a topic not describable `bound` s after its creation was acknowledged is created again (an
  idempotent request: "already exists" is verified) and, if that fails, retried with backoff
  and surfaced: a warning, a QueueLifecycle event (action `create_failed`), the metric
  `topic_settle_failures_total`, `topics_pending` and `dagmanager status`;
- a topic that no queue of the graph owns any more is dropped from the watch;
- `pending` and `failed` tell a pending topic from a ready one: the sidecar's answers say which
  of their topics are pending (trailing metadata), and a diff whose topics failed to settle
  creates them again before answering instead of handing them out.

The state is the process's own: the topics it created. Another process that reuses them finds
them committed by the controller either way.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import GraphStore, TopicAdmin
from qmtl_dagmanager.services.controlbus import ControlBus

log = logging.getLogger(__name__)
POLL = 0.05  # seconds between describe requests while topics are pending
RETRY_MAX = 30.0  # seconds: the longest pause between creations of a failing topic


@dataclass
class _Pending:
    spec: TopicSpec
    strategy: str
    since: float  # monotonic: when the creation was acknowledged
    next_try: float  # monotonic: when to create it again if still not describable
    tries: int = 0
    failure: str = ""


@dataclass
class TopicSettler:
    topics: TopicAdmin
    graph: GraphStore
    controlbus: ControlBus
    metrics: Metrics
    bound: float = 10.0  # seconds an acknowledged topic may take to become describable
    _pending: dict[str, _Pending] = field(default_factory=dict)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False

    def watch(self, specs: Mapping[str, TopicSpec], strategy: str) -> None:
        """Topics whose creation the controller acknowledged just now."""
        now = time.monotonic()
        for name, spec in specs.items():
            if name not in self._pending:
                self._pending[name] = _Pending(spec, strategy, now, now + self.bound)
        self.metrics.topics_pending.set(len(self._pending))
        if specs:
            self._wake.set()

    def pending(self, topics: Iterable[str]) -> list[str]:
        """Those of `topics` not yet seen described by the broker."""
        return [t for t in topics if t in self._pending]

    def failed(self, topics: Iterable[str]) -> dict[str, TopicSpec]:
        """Those of `topics` past their bound whose creation failed again: not to be handed
        out before they are created."""
        return {t: p.spec for t in topics if (p := self._pending.get(t)) is not None and p.failure}

    def oldest(self) -> float:
        """Seconds the oldest pending topic has waited (0 with none)."""
        if not self._pending:
            return 0.0
        return time.monotonic() - min(p.since for p in self._pending.values())

    def __len__(self) -> int:
        return len(self._pending)

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()

    async def run(self) -> None:
        """The background timer: returns after `stop`, at its next pause."""
        while True:
            if self._stopping:
                return
            if not self._pending:
                self._wake.clear()
                await self._wake.wait()
                continue
            try:
                await self.settle_once()
            except DagManagerError as e:
                log.warning("topic settling: %s (retrying)", e.message)
            await asyncio.sleep(POLL if self._pending else 0)

    async def settle_once(self) -> None:
        """One round: describe every pending topic, forget those described, create again
        those past their bound."""
        names = list(self._pending)
        unseen = set(await self.topics.unseen(names))
        now = time.monotonic()
        for name in names:
            if name in unseen:
                continue
            p = self._pending.pop(name, None)
            if p is not None:
                self.metrics.topic_visible_seconds.observe(now - p.since)
                if p.failure:
                    log.info("topic %s of %s is describable now", name, p.strategy)
        due = {n: p for n in unseen if (p := self._pending.get(n)) and now >= p.next_try}
        if due:
            await self._create_again(due)
        self.metrics.topics_pending.set(len(self._pending))

    async def _create_again(self, due: dict[str, _Pending]) -> None:
        owned = {q.topic for q in await self.graph.queues(sorted(due))}
        for name in set(due) - owned:  # no queue owns it now (GC, a lost race): not ours
            self._pending.pop(name, None)
        due = {n: p for n, p in due.items() if n in owned}
        if not due:
            return
        results = await self.topics.ensure({n: p.spec for n, p in due.items()})
        now = time.monotonic()
        for name, p in due.items():
            r = results.get(name)
            p.tries += 1
            if r is not None and r.ok:
                continue  # created (or verified) now; described on a next round
            p.failure = r.message if r is not None else "no result"
            p.next_try = now + min(RETRY_MAX, self.bound * 2**p.tries)
            self.metrics.topic_settle_failures.inc()
            log.warning(
                "topic %s of %s: not describable %.1f s after its creation was acknowledged,"
                " and creating it again failed: %s (next try in %.0f s)",
                name,
                p.strategy,
                now - p.since,
                p.failure,
                p.next_try - now,
            )
            try:
                await self.controlbus.queue_lifecycle(
                    name,
                    "create_failed",
                    f"not describable after {now - p.since:.1f} s: {p.failure}",
                )
                self.metrics.events_published.labels("queue_lifecycle").inc()
            except DagManagerError as e:
                log.warning("QueueLifecycle for %s not published: %s", name, e.message)
