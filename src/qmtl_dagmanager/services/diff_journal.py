"""Diffs answered before their graph write are seen through by any process.

The sidecar answers a new diff once its names are durable: the creation intents and a journal
entry (the request and its DAG) written in one transaction, with Kafka having validated the
creation. The same work then creates the topics and writes the graph, and that write removes
the entry. If the work does not get there (its process died, Neo4j or Kafka failed), the
entry stays, and every process that diffs (each sidecar, the operator) runs this timer:

- every `every` s it reads entries older than `grace` s (oldest first, at most `limit`);
- it claims one (its time moves on, so other processes leave it for another `grace` s) and
  runs the diff again from the journaled request: the same names, created if missing, the
  graph written and the entry removed by that write;
- a replay refused for good (the DAG or the creation is refused now) drops the entry with an
  error log; one that fails for a dependency (UNAVAILABLE) is tried again after `grace` s, at
  most `max_replays` times.

Replays are ordinary diffs: the graph's claims serialize them with any other writer, so a
replay racing the original work (or another process's replay) is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from qmtl_dagmanager.core.dag import IdMode
from qmtl_dagmanager.core.errors import DagManagerError, Unavailable
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Clock, GraphStore, PendingDiff
from qmtl_dagmanager.services.diffs import DiffService

log = logging.getLogger(__name__)
MAX_REPLAYS = 40


@dataclass
class DiffJournal:
    graph: GraphStore
    diffs: DiffService  # runs the replays (the process's waiting diff service)
    clock: Clock
    metrics: Metrics
    grace: float = 15.0
    every: float = 5.0
    limit: int = 20
    max_replays: int = MAX_REPLAYS
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """The background timer: returns after `stop`, at its next pause."""
        while not self._stop.is_set():
            try:
                await self.replay_once()
            except DagManagerError as e:
                log.warning("diff journal: %s (retrying)", e.message)
            try:
                await asyncio.wait_for(self._stop.wait(), self.every)
            except TimeoutError:
                continue

    async def replay_once(self) -> int:
        """One round; returns how many entries it completed."""
        before = self.clock.now() - self.grace
        entries = await self.graph.pending_diffs(before, self.limit)
        self.metrics.diff_journal_pending.set(len(entries))
        done = 0
        for entry in entries:
            if self._stop.is_set():
                break
            if not await self.graph.claim_pending_diff(entry.key, self.clock.now(), before):
                continue  # written meanwhile, or another process took it
            done += await self._replay(entry)
        return done

    async def _replay(self, entry: PendingDiff) -> int:
        sid = entry.request.strategy_id
        age = self.clock.now() - entry.at
        try:
            await self.diffs.diff(entry.request, entry.dag, ids=IdMode(entry.ids))
        except Unavailable as e:
            if entry.replays + 1 >= self.max_replays:
                return await self._drop(entry, f"{e.reason}: {e.message}")
            self.metrics.diff_journal_replays.labels("retry").inc()
            log.warning(
                "journaled diff of %s (%.0f s old) not completed: %s: %s; trying again in %.0f s",
                sid,
                age,
                e.reason,
                e.message,
                self.grace,
            )
            return 0
        except (DagManagerError, ValueError) as e:
            return await self._drop(entry, f"{getattr(e, 'reason', 'Invalid')}: {e}")
        await self.graph.drop_pending_diff(entry.key)  # a write that changed nothing keeps it
        self.metrics.diff_journal_replays.labels("completed").inc()
        log.warning(
            "journaled diff of %s completed by this process %.0f s after its answer (the "
            "process that answered it did not write it)",
            sid,
            age,
        )
        return 1

    async def _drop(self, entry: PendingDiff, why: str) -> int:
        await self.graph.drop_pending_diff(entry.key)
        self.metrics.diff_journal_replays.labels("dropped").inc()
        log.error(
            "journaled diff of %s dropped after %d replay(s): %s; the topics its answer named "
            "may not exist: the strategy must be submitted again",
            entry.request.strategy_id,
            entry.replays + 1,
            why,
        )
        return 0
