"""The Diff use case: parse → read the graph (one query) → plan → record creation intents →
create topics (one batch) → write the graph (one transaction, conditional on what the plan
read; it also marks the changed QueueUpdated groups in the graph's outbox) → answer. The
events are published off the response path (`queue_events`).

Order and failure: topics are created before the graph is written, and their names are
recorded as creation intents before that. If the write fails or the diff plans again with other
names, a retry of the same diff adopts the topics ("exists with the same configuration" is
success) or, if no queue ever owns them, GC's intent sweep deletes them. The graph is unchanged:
no partial graph writes.

Many writers (a sidecar per Gateway pod, the operator) share one graph. The node cache is a
hint: the write checks in its transaction that every reused queue is still the node's queue for
the compute key and that every created name is free, and refuses otherwise (StaleRead,
QueueGone, QueueBusy). The diff then evicts the cache entries and plans again from fresh graph
data. A sweep that deleted a created name's topic between the intent and the write (a diff
slower than `gc_intent_grace_seconds`) moved the intent's generation on: the write is refused
(QueueBusy) and the next plan creates the topic again. A cross-context refusal is only ever
decided on fresh graph data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field

from qmtl_dagmanager.core import dag, plan
from qmtl_dagmanager.core.errors import (
    Conflict,
    DagManagerError,
    Overloaded,
    QueueBusy,
    QueueGone,
    StaleRead,
    Unavailable,
)
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.topics import TopicCatalog, TopicSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import (
    BELOW_SPEC,
    Clock,
    GraphStore,
    PendingDiff,
    SentinelWrite,
    TopicAdmin,
    TopicResult,
    TopicStatus,
)
from qmtl_dagmanager.services import diff_work
from qmtl_dagmanager.services.controlbus import ControlBus
from qmtl_dagmanager.services.diff_ahead import Ahead
from qmtl_dagmanager.services.node_cache import NodeCache, ResubmissionCache
from qmtl_dagmanager.services.queue_events import QueueEvents
from qmtl_dagmanager.services.queue_topics import ensure_queue_topics
from qmtl_dagmanager.services.topic_settle import TopicSettler
from qmtl_dagmanager.tracing import Attribute, Tracer

log = logging.getLogger(__name__)
MAX_RENAME_ROUNDS = 3
# Plans of one diff when other writers change what it read. Each lost race means another
# writer committed, so the next fresh read is closer to settled; under heavy churn (GC with
# short policies, cleanups, several writers on one node pool) a few rounds can be needed.
PLAN_ATTEMPTS = 8
REPLAN_JITTER = 0.02  # seconds, times the attempt: writers that collided do not collide again
CONFIRM_READS = 2  # fresh reads that must agree before a cross-context refusal
BUSY_WAIT = 5.0  # seconds a diff waits for a GC run deleting names it needs
STALLED = 2.0  # seconds after which a running diff is taken as waiting for a dependency


@dataclass(slots=True)
class _Submission:
    """One diff request as its work sees it: what the journal records when it answers early."""

    key: str  # the request's identity (`diff_work.request_key`)
    request: plan.Request
    dag_json: str | bytes
    ids: dag.IdMode
    early: bool  # answered once journaled and validated (the sidecar)
    parsed: dag.Dag | None = None
    ahead: Ahead | None = None  # the journal and validation started beside the read

    def entry(self, now: float) -> PendingDiff:
        text = self.dag_json if isinstance(self.dag_json, str) else self.dag_json.decode()
        return PendingDiff(self.key, self.request, text, self.ids.value, now)


def _topics(p: plan.Plan) -> dict[NodeId, str]:
    return {n.node.node_id: n.topic for n in p.nodes}


@dataclass(frozen=True, slots=True)
class DiffOutcome:
    plan: plan.Plan
    dag: dag.Dag
    dry_run: bool
    topics: dict[str, TopicResult] = field(default_factory=dict)


@dataclass
class DiffService:
    graph: GraphStore
    topics: TopicAdmin
    controlbus: ControlBus
    clock: Clock
    metrics: Metrics
    catalog: TopicCatalog = field(default_factory=TopicCatalog)
    limits: dag.Limits = field(default_factory=dag.Limits)
    ids: dag.IdMode = dag.IdMode.VERIFY
    dry_run_strategy: str = "dryrun"
    buffer_max_age: float = 7 * 86_400.0  # a node buffering this long is fully recomputed
    namespaces: bool = True
    cache: NodeCache = field(default_factory=NodeCache.disabled)
    max_inflight: int = 8
    max_waiting: int = 64
    max_wait: float = 2.0
    resubmissions: ResubmissionCache = field(default_factory=lambda: ResubmissionCache(0))
    memo: dag.NodeMemo | None = None  # validated nodes by content, shared by the process
    _gaps: dict[str, bool] = field(default_factory=dict)
    _slots: asyncio.Semaphore | None = None
    _waiting: int = 0
    _since: dict[object, float] = field(default_factory=dict)  # when each running diff began
    events: QueueEvents | None = None  # the process's publisher; one of its own if None
    _background: set[asyncio.Task[None]] = field(default_factory=set)
    _abandoning: set[asyncio.Task[None]] = field(default_factory=set)
    _counts_stale: bool = False
    tracer: Tracer = field(default_factory=Tracer)
    work: diff_work.DiffWork | None = None  # the process's running diffs; its own if None
    # With a settler, a diff answers once Kafka acknowledged its topics' creation and the
    # settler sees them through to describable (the sidecar: the Gateway's 0.1 s budget);
    # without one it waits, bounded, until the broker describes them (the operator).
    settler: TopicSettler | None = None
    # Answer once journaled and validated, before the topics and the graph write (needs a
    # settler): the sidecar with `diff_answer_early`.
    answer_early: bool = False

    async def diff(
        self,
        request: plan.Request,
        dag_json: str | bytes,
        *,
        dry_run: bool = False,
        ids: dag.IdMode | None = None,
    ) -> DiffOutcome:
        """Diff a DAG; with `dry_run` (or the dry-run strategy id) nothing is written.
        `ids` overrides the configured NodeID check for this request. The work runs as a
        task of its own that a caller leaving does not stop, and an identical request
        joins it (`diff_work`)."""
        started = time.perf_counter()
        self.metrics.diff_requests.inc()
        dry = dry_run or request.strategy_id == self.dry_run_strategy
        attrs: dict[str, Attribute] = {
            "strategy_id": request.strategy_id,
            "dry_run": dry,
            "bytes": len(dag_json),
        }
        mode = ids or self.ids
        key = diff_work.request_key(
            request, dag_json, ids=mode.value, namespaces=self.namespaces, dry=dry
        )

        async def work() -> DiffOutcome:
            with self.tracer.span("dagmanager.diff", attrs) as span:
                try:
                    async with self._admission():
                        self.running().start(key)  # from here on it may change state
                        outcome = await self._diff(request, dag_json, dry, mode, key)
                except DagManagerError as e:
                    self.metrics.diff_failures.labels(e.reason).inc()
                    self.metrics.diff_duration.labels("error").observe(
                        time.perf_counter() - started
                    )
                    log.info("diff of %s failed: %s: %s", request.strategy_id, e.reason, e.message)
                    span.set("error.reason", e.reason)
                    raise
                span.set("nodes", len(outcome.plan.nodes))
                span.set("created", outcome.plan.counts["new"])
            self.metrics.diff_duration.labels("ok").observe(time.perf_counter() - started)
            return outcome

        return await self.running().run(key, request.strategy_id, work)

    @contextlib.asynccontextmanager
    async def _admission(self) -> AsyncIterator[None]:
        """At most `max_inflight` diffs run at once; at most `max_waiting` wait, each for at
        most `max_wait` seconds. Beyond that the sidecar sheds load at once instead of
        queueing work the Gateway will have discarded (its budget is 0.1 s)."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_inflight)
        if self._slots.locked() and self._waiting >= self.max_waiting:
            raise self._refusal(f"{self._waiting} diffs already waiting; try again shortly")
        self._waiting += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), self.max_wait)
        except TimeoutError:
            raise self._refusal(f"no diff slot within {self.max_wait:g} s") from None
        finally:
            self._waiting -= 1
        token = object()
        self._since[token] = time.monotonic()
        try:
            yield
        finally:
            del self._since[token]
            self._slots.release()

    def _refusal(self, why: str) -> DagManagerError:
        """Overloaded; or Unavailable when the diffs holding the slots have been running for
        over STALLED s: a dependency is slow or down, not the sidecar busy."""
        now = time.monotonic()
        stalled = sum(1 for t in self._since.values() if now - t > STALLED)
        if stalled:
            return Unavailable(
                f"{why}: {stalled} diff(s) have waited over {STALLED:g} s for Neo4j or Kafka",
                reason="DependencyTimeout",
            )
        return Overloaded(why)

    @property
    def busy(self) -> bool:
        """Whether a diff is running or waiting for a slot."""
        return bool(self._since) or self._waiting > 0

    async def _plan(
        self, d: dag.Dag, request: plan.Request, *, fresh: bool = False, ahead: Ahead | None = None
    ) -> tuple[plan.Plan, str | None]:
        """Plan with the node records (from the cache unless `fresh`, else one graph query
        that also returns the strategy's fingerprint), then look up who owns the names of new
        topics. A plan that would refuse a cross-context reuse is made again from records and
        owners read together in one query: a refusal is never decided on cached records, nor
        on two reads another writer committed between."""
        ids = [n.node_id for n in d.nodes]
        records = {} if fresh else self.cache.get_many(ids)
        cached = bool(records)
        missing = [nid for nid in ids if nid not in records] if records else ids
        # the first-choice names of the nodes not known here, looked up in the same read:
        # a new node's name is then settled without a second round trip
        ns = plan.resolve_namespace(d, request) if self.namespaces else None
        unknown = set(missing)
        guesses = {
            t: n.node_type
            for n, t in zip(d.nodes, plan.candidate_topics(d, ns), strict=True)
            if n.node_id in unknown
        }
        first_choice = sorted(guesses)
        if ahead is not None:  # journal, and validate the likely creations, beside the read
            ahead.start({t: self.catalog.spec_for(kind) for t, kind in guesses.items()})
        with self.tracer.span("graph.read", {"nodes": len(missing), "cached": len(records)}):
            read = await self.graph.read(missing, first_choice, request.strategy_id)
        self.cache.put_many(read.records)
        records.update(read.records)
        owners: dict[str, NodeId] = dict(read.owners)
        looked_up: set[str] = set(first_choice)
        confirmations = 0
        rounds = 0
        while True:
            p = plan.plan(
                d,
                request,
                records,
                owners,
                self.catalog,
                namespaces=self.namespaces,
                now=self.clock.now(),
                buffer_max_age=self.buffer_max_age or None,
            )
            if p.violations:
                self.cache.evict(v.node_id for v in p.violations)
                if confirmations >= CONFIRM_READS:
                    return p, read.fingerprint  # refused on one consistent read
                confirmations += 1
                if cached:
                    self.metrics.cache_refusals_avoided.inc()
                    cached = False
                looked_up |= {v.topic for v in p.violations}
                with self.tracer.span("graph.read", {"nodes": len(ids), "confirm": True}):
                    read = await self.graph.read(ids, sorted(looked_up), request.strategy_id)
                self.cache.put_many(read.records)
                records, owners = dict(read.records), dict(read.owners)
                continue
            fresh_names = [c.topic for c in p.creates if c.topic not in looked_up]
            if not fresh_names:
                return p, read.fingerprint
            rounds += 1
            if rounds > MAX_RENAME_ROUNDS:
                raise Conflict(
                    f"could not find free topic names for {request.strategy_id} after "
                    f"{MAX_RENAME_ROUNDS} rounds"
                )
            looked_up |= set(fresh_names)
            with self.tracer.span("graph.read", {"topics": len(fresh_names)}):
                extra = await self.graph.read([], fresh_names)
            if not extra.owners:
                return p, read.fingerprint
            owners |= extra.owners

    async def _diff(
        self, request: plan.Request, dag_json: str | bytes, dry: bool, ids: dag.IdMode, key: str
    ) -> DiffOutcome:
        early = self.answer_early and self.settler is not None
        submission = _Submission(key, request, dag_json, ids, early=early)
        key = "" if dry or not self.resubmissions.enabled else key
        seen = self.resubmissions.get(key)
        if seen is not None:
            # The same bytes in the same context were diffed and written before: if the
            # graph still records exactly that write for the strategy, the answer stands.
            read = await self.graph.read([], [], request.strategy_id)
            due = seen.plan.recompute_due
            if seen.plan.unchanged(read.fingerprint) and (due is None or self.clock.now() < due):
                await self._create_failed(seen.plan)
                return seen
            self.resubmissions.drop(key)
        outcome = await self._diff_fresh(submission, dry)
        if key and not outcome.dry_run and not outcome.plan.violations:
            self.resubmissions.put(key, outcome)
        return outcome

    async def _diff_fresh(self, submission: _Submission, dry: bool) -> DiffOutcome:
        with self.tracer.span("parse") as span:
            d = dag.parse(
                submission.dag_json, limits=self.limits, ids=submission.ids, memo=self.memo
            )
            span.set("nodes", len(d.nodes))
        submission.parsed = d
        if self.memo is not None:
            self.metrics.node_memo.set(len(self.memo))
        if submission.early and not dry:
            entry = submission.entry(self.clock.now())
            submission.ahead = Ahead(self.graph, self.topics, entry, self.tracer)
        try:
            return await self._replan(d, submission, dry)
        finally:
            ahead = submission.ahead
            if ahead is not None and not ahead.answered:  # nothing to write, or refused
                task = asyncio.get_running_loop().create_task(ahead.abandon())
                self._abandoning.add(task)
                task.add_done_callback(self._abandoning.discard)

    async def _replan(self, d: dag.Dag, submission: _Submission, dry: bool) -> DiffOutcome:
        request = submission.request
        attempt, fresh = 1, False
        waited, delay = 0.0, 0.05
        while True:
            try:
                return await self._plan_and_write(d, submission, dry, fresh)
            except QueueBusy as e:  # a GC run is deleting names we need: wait, plan again
                self.cache.evict(n.node_id for n in d.nodes)
                self.metrics.diff_replans.labels(e.reason).inc()
                if waited >= BUSY_WAIT:
                    raise
                log.info("diff %s: %s; waiting %.2f s", request.strategy_id, e.message, delay)
                await asyncio.sleep(delay)
                waited += delay
                delay = min(delay * 2, 0.5)
                fresh = True
            except (QueueGone, StaleRead) as e:  # another writer got there first
                self.cache.evict(n.node_id for n in d.nodes)
                self.metrics.diff_replans.labels(e.reason).inc()
                if attempt >= PLAN_ATTEMPTS:
                    raise
                attempt += 1
                fresh = True
                log.info("diff %s: %s; planning again", request.strategy_id, e.message)
                if attempt > 2:
                    await asyncio.sleep(random.uniform(0, REPLAN_JITTER * attempt))  # noqa: S311 - jitter

    async def _plan_and_write(
        self, d: dag.Dag, submission: _Submission, dry: bool, fresh: bool = False
    ) -> DiffOutcome:
        request = submission.request
        with self.tracer.span("plan", {"fresh": fresh}):
            p, fingerprint = await self._plan(d, request, fresh=fresh, ahead=submission.ahead)
        if p.violations:
            self.metrics.cross_context.inc(len(p.violations))
            if not dry:  # a dry run (a person checking a DAG) holds no rollout back
                await self._note_cross_context(request.strategy_id, len(p.violations))
            p.raise_for_violations()
        for action, count in (
            ("reuse", p.counts["reused"]),
            ("buffer", p.counts["buffered"]),
            ("create", p.counts["new"]),
        ):
            if count:
                self.metrics.nodes_planned.labels(action).inc(count)
        if dry:
            return DiffOutcome(p, d, True)
        await self._create_failed(p)
        if p.unchanged(fingerprint):
            return DiffOutcome(p, d, False)  # a resubmission: nothing to write or announce
        creates = p.creates
        now = self.clock.now()
        intents: Mapping[str, int] = {}
        if submission.ahead is not None:
            await self._answer_early(p, submission.ahead, d)
        if creates:
            intents = await self._intents(p, request.strategy_id, now)
        results = await self._create_topics(creates, request.strategy_id)
        sentinel = d.sentinels[0] if d.sentinels else None
        try:
            with self.tracer.span("graph.write", {"nodes": len(p.nodes)}):
                reclaimed = await self.graph.apply(
                    p, now, SentinelWrite.from_plan(p, sentinel), intents, journal=submission.key
                )
        except DagManagerError:
            self.cache.evict(n.node_id for n in d.nodes)
            raise
        if reclaimed:
            await self._revive(request.strategy_id, reclaimed)
        self._remember(p, now)
        for r in p.recomputes:
            log.info("diff %s: node %s recomputed: %s replaces %s", request.strategy_id,
                     r.node.node_id, r.topic, r.replaces)  # fmt: skip
            await self.controlbus.queue_lifecycle(
                r.topic,
                "recompute",
                f"node {r.node.node_id} fully recomputed after {self.buffer_max_age:g} s of "
                f"buffering; replaces {r.replaces}",
            )
            self.metrics.recomputes.inc()
            self.metrics.events_published.labels("queue_lifecycle").inc()
        self._gaps[request.strategy_id] = sentinel is None
        self.metrics.sentinel_gap.set(sum(self._gaps.values()))
        if creates:
            log.info(
                "diff %s: %d new, %d reused, %d buffered",
                request.strategy_id,
                p.counts["new"],
                p.counts["reused"],
                p.counts["buffered"],
            )
            self._refresh_counts()
        if p.query_groups:  # marked in the outbox by the write; published off this path
            with self.tracer.span("controlbus.schedule", {"groups": len(p.query_groups)}):
                self.queue_events().kick()
        self.metrics.node_cache.set(len(self.cache))
        return DiffOutcome(p, d, False, results)

    async def _answer_early(self, p: plan.Plan, ahead: Ahead, d: dag.Dag) -> None:
        """The sidecar answers once the diff is journaled and Kafka validated its creations
        (authorization, policy, configs; both started beside the read: `diff_ahead`). The
        work goes on to record the intents, create the topics and write the graph, whose
        transaction removes the entry; if this process dies first, another one replays it
        (`diff_journal`): every name handed out is created in the end."""
        specs: dict[str, TopicSpec] = {c.topic: c.spec for c in p.creates if c.spec}
        results = await ahead.settle(specs)
        self._raise_for_topics(results, counted=False)
        if self.settler is not None:
            self.settler.watch(specs, p.strategy_id)  # pending from the answer on
        ahead.answered = True
        superseded = self._answer(p, d)
        if superseded:
            await self._keep_handed_out(p, superseded)

    async def _intents(self, p: plan.Plan, sid: str, now: float) -> Mapping[str, int]:
        """The creation intents, written before the topics exist: a topic no queue ever
        owns is swept by GC; the write is refused if a sweep deleted one of them meanwhile."""
        with self.tracer.span("graph.record_intents", {"topics": len(p.creates)}):
            recorded = await self.graph.record_intents([c.topic for c in p.creates], now, sid)
        if recorded.busy:
            raise QueueBusy(list(recorded.busy))
        return recorded.generations

    def _answer(self, p: plan.Plan, d: dag.Dag) -> dict[str, tuple[TopicSpec, str]]:
        """Answer the callers now (the work goes on). On a later plan of the same work (its
        write was refused: another writer got there first), returns the topics the answer
        handed out that this plan no longer uses: {topic: (spec, the node's topic now)}."""
        outcome = DiffOutcome(p, d, False)
        earlier = diff_work.DiffWork.answer(outcome)
        if earlier is None:
            self.metrics.diff_answered_early.inc()
            return {}
        if not isinstance(earlier, DiffOutcome):
            return {}
        now = _topics(p)
        lost: dict[str, tuple[TopicSpec, str]] = {
            n.topic: (n.spec, now.get(n.node.node_id, ""))
            for n in earlier.plan.creates
            if n.spec is not None and now.get(n.node.node_id) != n.topic
        }
        if lost:
            self.metrics.diff_answers_superseded.inc()
            name, (_, instead) = next(iter(lost.items()))
            log.warning(
                "diff %s: planned again after its answer; %d node(s) now have other topics "
                "than the answer gave (another writer created them first under another "
                "version label), e.g. %s instead of %s; the answered topics are created too",
                p.strategy_id,
                len(lost),
                instead,
                name,
            )
        return lost

    async def _keep_handed_out(
        self, p: plan.Plan, lost: Mapping[str, tuple[TopicSpec, str]]
    ) -> None:
        """Topics an early answer named that the graph will not own (another writer created
        those nodes first under other names) are still created: nothing handed out is
        missing, and producers writing to them lose nothing. They carry creation intents, so
        GC deletes them after `gc_intent_grace_seconds`; a QueueLifecycle `superseded` event
        names each one's replacement, and the Gateway's next Diff gets the graph's names."""
        await self.graph.record_intents(sorted(lost), self.clock.now(), p.strategy_id)
        results = await self.topics.ensure(
            {t: spec for t, (spec, _) in lost.items()}, wait_visible=self.settler is None
        )
        for topic, (_, instead) in sorted(lost.items()):
            if not results.get(topic, TopicResult(topic, TopicStatus.FAILED)).ok:
                log.warning("superseded topic %s of %s not created", topic, p.strategy_id)
                continue
            try:
                await self.controlbus.queue_lifecycle(
                    topic, "superseded", f"the node's queue is {instead}; submit again"
                )
                self.metrics.events_published.labels("queue_lifecycle").inc()
            except DagManagerError as e:
                log.warning("QueueLifecycle for %s not published: %s", topic, e.message)

    async def _create_topics(
        self, creates: Sequence[plan.NodePlan], strategy_id: str
    ) -> dict[str, TopicResult]:
        """One batch; with a settler, answered on Kafka's acknowledgement (see `settler`)."""
        with self.tracer.span("kafka.create_topics", {"topics": len(creates)}):
            specs: dict[str, TopicSpec] = {c.topic: c.spec for c in creates if c.spec}
            results = await self.topics.ensure(specs, wait_visible=self.settler is None)
        self._raise_for_topics(results)
        if self.settler is not None:
            made = TopicStatus.CREATED
            self.settler.watch(
                {t: spec for t, spec in specs.items() if results[t].status is made}, strategy_id
            )
        return results

    async def _create_failed(self, p: plan.Plan) -> None:
        """Topics of the answer whose creation was acknowledged but that the broker still
        does not describe past their bound, and whose creation failed again: create them now
        rather than hand them out (raising as a failed creation does)."""
        if self.settler is None:
            return
        failed = self.settler.failed(n.topic for n in p.nodes)
        if not failed:
            return
        log.info("diff %s: %d topic(s) failed to settle; creating again", p.strategy_id,
                 len(failed))  # fmt: skip
        results = await self.topics.ensure(failed)
        self._raise_for_topics(results)

    async def _note_cross_context(self, strategy_id: str, nodes: int) -> None:
        """Record the refusal in the graph, where every process's canary rollouts see it; the
        diff is refused either way, so a graph that cannot take the record only costs a log
        line (the counter above still rose)."""
        try:
            await self.graph.record_cross_context(strategy_id, nodes, self.clock.now())
        except DagManagerError as e:
            log.warning("cross-context hit of %s not recorded: %s", strategy_id, e.message)

    def _remember(self, p: plan.Plan, now: float) -> None:
        """After a write: the graph now holds each node with its queue for this context (and
        its buffering time and queue generation)."""
        known = self.cache.get_many(n.node.node_id for n in p.nodes)
        fresh: dict[NodeId, plan.NodeRecord] = {}
        for n in p.nodes:
            old = known.get(n.node.node_id)
            queues = old.queues if old else ()
            if not any(q.compute_key == n.compute_key for q in queues):
                queues = (*queues, plan.QueueRecord(n.topic, n.compute_key))
            buffering = old.buffering_since if old else None
            if n.action is plan.Action.BUFFER:
                buffering = now  # as the graph records it: each new schema starts it over
            if n.replaces:
                buffering = None
            fresh[n.node.node_id] = plan.NodeRecord(
                n.node.node_id,
                n.node.schema_hash,
                n.node.schema_compat_id,
                queues,
                buffering,
                n.recompute,
            )
        self.cache.put_many(fresh)

    async def _revive(self, strategy_id: str, topics: tuple[str, ...]) -> None:
        """Queues this diff references that a GC run had claimed: their claim is released,
        and their topics exist again if the run deleted them already (it recreates them too,
        when it finds them referenced; creating a topic twice is harmless)."""
        results = await ensure_queue_topics(self.graph, self.topics, self.catalog, topics)
        created = sorted(t for t, r in results.items() if r.status is TopicStatus.CREATED)
        self.metrics.queues_revived.inc(len(topics))
        log.warning(
            "diff %s: %d queue(s) referenced again while GC was dropping them (claim released)%s",
            strategy_id,
            len(topics),
            f"; topics created again: {', '.join(created[:5])}" if created else "",
        )
        self._raise_for_topics(results)

    def _raise_for_topics(self, results: dict[str, TopicResult], *, counted: bool = True) -> None:
        short = sorted(t for t, r in results.items() if r.ok and r.message)
        if short and counted:  # reused below the durability asked: the drift event says so
            log.warning(
                "%d topic(s) %s e.g. %s: %s",
                len(short),
                BELOW_SPEC.rstrip(": "),
                short[0],
                results[short[0]].message.removeprefix(BELOW_SPEC),
            )
        bad = {t: r for t, r in results.items() if not r.ok}
        if len(bad) < len(results) and counted:
            self.metrics.queue_create_successes.inc(len(results) - len(bad))
        if not bad:
            return
        if counted:
            self.metrics.queue_create_errors.inc(len(bad))
        detail = "; ".join(
            f"{t}: {r.status.value} {r.message}".strip() for t, r in sorted(bad.items())[:5]
        )
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        denied = [r for r in bad.values() if r.status is TopicStatus.FORBIDDEN]
        if denied:
            raise Conflict(
                f"Kafka's authorizer refused {len(denied)} topic creation(s): {detail}{more}. "
                "Grant this process's principal CREATE, DESCRIBE, DESCRIBE_CONFIGS, "
                "ALTER_CONFIGS, DELETE, READ and WRITE on the managed topics "
                "(docs/security.md)",
                reason="KafkaForbidden",
            )
        if all(r.status is TopicStatus.FAILED and r.retriable for r in bad.values()):
            raise Unavailable(
                f"Kafka could not create {len(bad)} topic(s): {detail}{more}",
                reason="KafkaUnavailable",
            )
        raise Conflict(
            f"{len(bad)} topic(s) cannot be created as planned: {detail}{more}",
            reason="TopicConflict",
        )

    def running(self) -> diff_work.DiffWork:
        if self.work is None:
            self.work = diff_work.DiffWork(self.metrics)
        return self.work

    def queue_events(self) -> QueueEvents:
        if self.events is None:
            self.events = QueueEvents(self.graph, self.controlbus, self.metrics, self.clock)
        return self.events

    def _refresh_counts(self) -> None:
        """The graph-size gauges, read in the background (one read at a time, coalesced)."""
        self._counts_stale = True
        if self._background:
            return

        async def refresh() -> None:
            while self._counts_stale:
                self._counts_stale = False
                try:
                    counts = await self.graph.counts()
                except DagManagerError as e:
                    log.debug("graph counts unavailable: %s", e)
                    return
                self.metrics.compute_nodes.set(counts.compute_nodes)
                self.metrics.queues.set(counts.queues)

        task = asyncio.get_running_loop().create_task(refresh())
        self._background.add(task)
        task.add_done_callback(self._background.discard)
