"""The part of an early-answering diff that runs beside its graph read.

The sidecar answers a new diff once its names are durable and Kafka validated their creation
(`diffs`). Both are started before the plan is known, while the graph is read:

- the journal entry (the request and its DAG: `diff_journal` replays it if the work never
  writes the graph) needs nothing from the plan;
- the names a new node gets are almost always their first choice (`plan.candidate_topics`),
  so the nodes this process does not know are validated under those names at once.

When the plan is made, `settle` waits for both and validates whatever the plan creates beyond
those guesses (a renamed collision, a full recompute, a known node in a new context). A diff
that ends without answering early (a refusal, a dry run, nothing to write) `abandon`s its
entry. Validation creates nothing, so a guess the plan does not use costs only the request.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass
from typing import cast

from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.core.topics import TopicSpec
from qmtl_dagmanager.ports import GraphStore, PendingDiff, TopicAdmin, TopicResult
from qmtl_dagmanager.tracing import Tracer

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Ahead:
    graph: GraphStore
    topics: TopicAdmin
    entry: PendingDiff
    tracer: Tracer
    _journal: asyncio.Task[object] | None = None
    _validation: asyncio.Task[object] | None = None
    _guessed: frozenset[str] = frozenset()
    answered: bool = False  # the callers have their answer: the entry must stay

    def start(self, guesses: Mapping[str, TopicSpec]) -> None:
        """Journal the diff and validate the names it likely creates (no-op once started)."""
        loop = asyncio.get_running_loop()
        if self._journal is None:
            sid = self.entry.request.strategy_id
            self._journal = loop.create_task(
                self._traced("graph.journal", self.graph.record_intents([], self.entry.at, sid,
                                                                         self.entry))
            )  # fmt: skip
        if guesses and self._validation is None:
            self._guessed = frozenset(guesses)
            self._validation = loop.create_task(
                self._traced("kafka.validate", self.topics.validate(dict(guesses)))
            )

    async def _traced(self, name: str, step: Awaitable[object]) -> object:
        with self.tracer.span(name):
            return await step

    async def settle(self, creates: Mapping[str, TopicSpec]) -> dict[str, TopicResult]:
        """Wait for the journal and the validation; validate now what the guesses missed.
        Returns the validation of exactly `creates`; raises what the journal raised."""
        self.start({})
        rest = {n: s for n, s in creates.items() if n not in self._guessed}
        steps: list[Awaitable[object]] = [self._journal] if self._journal else []
        if self._validation is not None:
            steps.append(self._validation)
        if rest:
            steps.append(self._traced("kafka.validate", self.topics.validate(rest)))
        done = await asyncio.gather(*steps, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        results: dict[str, TopicResult] = {}
        for outcome in done[1 if self._journal else 0 :]:
            results.update(cast(dict[str, TopicResult], outcome))
        return {n: r for n, r in results.items() if n in creates}

    async def abandon(self) -> None:
        """The diff ends without an early answer: wait for what was started and remove the
        journal entry (best effort; a leftover is replayed, finds nothing to do, and goes)."""
        started = [t for t in (self._journal, self._validation) if t is not None]
        if not started:
            return
        await asyncio.gather(*started, return_exceptions=True)
        if self._journal is None or self.answered:
            return
        try:
            await self.graph.drop_pending_diff(self.entry.key)
        except DagManagerError as e:
            log.info("journal entry of %s not dropped: %s", self.entry.request.strategy_id, e)
