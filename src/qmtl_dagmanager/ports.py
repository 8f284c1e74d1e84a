"""Ports: what the services need from the outside world, as Protocols.

Adapters implement them for real (Neo4j, Kafka, a directory) and in memory (the embedded
twins); contract test suites hold both to the same behaviour. All I/O methods are async: both
drivers (kopf and grpc.aio) run on asyncio.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from qmtl_dagmanager.core.dag import Sentinel
from qmtl_dagmanager.core.gc import GcQueue
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import NodeRecord, Plan, QueryGroup, Request
from qmtl_dagmanager.core.tag_match import TagQuery
from qmtl_dagmanager.core.topics import TopicSpec

# --------------------------------------------------------------------------- graph


@dataclass(frozen=True, slots=True)
class GraphRead:
    """Everything a diff needs from the graph, fetched in one round trip."""

    records: Mapping[NodeId, NodeRecord]
    owners: Mapping[str, NodeId]  # topic name → the node that EMITS it
    fingerprint: str | None = None  # of the strategy's last write, when asked for


@dataclass(frozen=True, slots=True)
class QueueRef:
    topic: str
    is_global: bool


DELETING_TTL = 30.0  # a GC deletion mark older than this was left by a run that died
# A swept intent is kept this long as a tombstone holding its generation, so that a diff that
# recorded the intent before the sweep still learns, when it writes, that its topic was
# deleted. Far longer than any diff takes.
TOMBSTONE_TTL = 3600.0


EVENT_CLAIM_TTL = 30.0  # a publisher's claim on an outbox group older than this: it died


@dataclass(frozen=True, slots=True)
class PendingEvent:
    """A QueueUpdated group in the outbox: its queue set changed and is not yet published.
    `marks` are the outbox marks (one per write that changed it) this publication covers;
    settling removes exactly these, so a write after the claim keeps the group pending."""

    group: QueryGroup
    marks: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Intents:
    """What recording creation intents found: the names a sweep is deleting right now
    (nothing recorded for those) and, for every name recorded, the intent's sweep generation.
    A sweep that deletes a name's topic moves its generation on; `apply` given the generations
    refuses (QueueBusy) a created name whose generation moved: its topic was deleted after
    this diff created it."""

    busy: tuple[str, ...] = ()
    generations: Mapping[str, int] = field(default_factory=dict)


class Intent(StrEnum):
    """What claiming a creation intent found."""

    CLAIMED = "claimed"
    ADOPTED = "adopted"
    KEPT = "kept"


class Forgot(StrEnum):
    """What forgetting a queue did."""

    DROPPED = "dropped"
    REFERENCED = "referenced"  # referenced again meanwhile: kept
    ABSENT = "absent"  # already gone


@dataclass(frozen=True, slots=True)
class QueueDetail:
    """A queue as the graph records it."""

    topic: str
    node_id: NodeId | None
    tag: str
    interval: int
    created_at: float
    ref_count: int
    managed: bool
    compute_key: str
    partitions: int
    replication: int
    retention_ms: int
    tags: tuple[str, ...] = ()  # the emitting node's tags
    orphaned_at: float | None = None  # when it lost its last reference; None while used
    keep_by: tuple[str, ...] = ()  # who marked it keep (a StrategyDAG, an operator)
    retired: str = ""  # `<sentinel id>@<version>` when only a retired version used it

    def as_gc_queue(self) -> GcQueue:
        return GcQueue(
            self.topic,
            self.tag,
            self.created_at,
            self.ref_count,
            self.node_id is not None and self.managed,
            self.orphaned_at,
            bool(self.keep_by),
            self.retired,
        )


@dataclass(frozen=True, slots=True)
class SentinelRecord:
    sentinel_id: str
    version: str
    weight: float | None
    history: tuple[tuple[float, float], ...]  # (when, weight), oldest first
    commit_hash: str
    release_tag: str
    has: int  # HAS edges to compute nodes


def parse_history(raw: Sequence[str] | None) -> tuple[tuple[float, float], ...]:
    """The stored weight history: entries "<epoch seconds>:<weight>"."""
    out = []
    for entry in raw or ():
        when, _, weight = str(entry).partition(":")
        out.append((float(when), float(weight)))
    return tuple(out)


@dataclass(frozen=True, slots=True)
class SentinelWrite:
    """A VersionSentinel version boundary and the nodes it HAS."""

    sentinel_id: str
    version: str
    node_ids: tuple[NodeId, ...]
    traffic_weight: float | None = None
    commit_hash: str = ""
    release_tag: str = ""

    @classmethod
    def from_plan(cls, plan: Plan, sentinel: Sentinel | None) -> SentinelWrite:
        return cls(
            plan.sentinel_id,
            plan.version,
            tuple(p.node.node_id for p in plan.nodes),
            sentinel.weight if sentinel else None,
        )


@dataclass(frozen=True, slots=True)
class GraphCounts:
    compute_nodes: int
    queues: int
    sentinels: int
    strategies: int
    relationships: int


CROSS_CONTEXT_KEEP = 7 * 86_400.0  # seconds a cross-context hit is remembered


@dataclass(frozen=True, slots=True)
class PendingDiff:
    """A diff answered before its graph write: the journal entry that lets any process run it
    to its end (`services/diff_journal.py`). `key` is the request's identity (`diff_work`);
    the entry is removed by the graph write of that very request, whoever makes it."""

    key: str
    request: Request
    dag: str  # the DAG document, as submitted
    ids: str  # the NodeID mode it was checked with
    at: float  # when it was journaled (or last claimed for a replay)
    owner: str = ""
    replays: int = 0


class GraphStore(Protocol):
    async def ping(self) -> bool:
        """True when the store answers a trivial query."""
        ...

    async def init_schema(self) -> None:
        """Create constraints and indexes (idempotent)."""
        ...

    async def rollback_schema(self) -> None:
        """Drop what init_schema created (idempotent)."""
        ...

    def schema_statements(self) -> list[str]:
        """The schema as statements (export)."""
        ...

    async def read(
        self, node_ids: Sequence[NodeId], topics: Sequence[str], strategy_id: str = ""
    ) -> GraphRead:
        """Records of the given nodes, the owners of the given topic names and (with a
        strategy id) the fingerprint of the strategy's last write, in one query."""
        ...

    async def apply(
        self,
        plan: Plan,
        now: float,
        sentinel: SentinelWrite | None,
        intents: Mapping[str, int] | None = None,
        journal: str = "",
    ) -> tuple[str, ...]:
        """Write a plan in one transaction, idempotently and only if the graph still holds
        what the plan was made from: nodes, queues, EMITS, the strategy's references (exactly
        the plan's nodes and queues), the sentinel's HAS edges and the plan's query groups in
        the QueueUpdated outbox (see `claim_events`). The creation intents of
        the plan's topics are settled (the queues own them now); `intents` are the
        generations `record_intents` returned for them.

        Each reused queue must still be emitted by its node for the plan's compute key; each
        created queue's topic name must be free, or already that very (node, compute key)'s
        queue (another writer created it first: taken as it is). At most one queue exists per
        (node, compute key) and one owner per topic name, whatever writers race.

        Returns the referenced queues a GC run had claimed; their claim is cleared (that run
        will not delete them) and the caller makes sure their topics exist. Raises, writing
        nothing: QueueGone when a reused queue is no longer in the graph; QueueBusy when a
        queue or created name is being deleted by a live GC run, or a sweep deleted a created
        name's topic since its intent was recorded; StaleRead when another
        writer changed what the plan read. The same transaction removes the journal entry
        `journal` (a request key, see `record_intents`), if there is one."""
        ...

    async def claim_events(self, owner: str, now: float, limit: int) -> list[PendingEvent]:
        """The outbox: pending QueueUpdated groups (oldest first) that no live publisher has
        claimed, now claimed by `owner` (a claim older than EVENT_CLAIM_TTL is a dead
        publisher's). `apply` marks the plan's query groups in its own transaction."""
        ...

    async def settle_events(self, owner: str, published: Sequence[PendingEvent]) -> int:
        """After publishing: the published marks are removed and the claims released; groups
        written again meanwhile stay pending. Returns how many stay pending."""
        ...

    async def release_events(self, owner: str, events: Sequence[PendingEvent]) -> None:
        """Publishing failed: release the claims, the groups stay pending."""
        ...

    async def pending_events(self) -> int:
        """How many groups are waiting for publication."""
        ...

    async def record_intents(
        self,
        topics: Sequence[str],
        now: float,
        owner: str,
        journal: PendingDiff | None = None,
    ) -> Intents:
        """Before creating topics: note that they are about to be created, so a topic whose
        queue is never written (a crash, a re-plan, a lost race) is found and collected. With
        `journal`, the same transaction records the diff as answered but not yet written
        (replacing any other entry of its strategy: the last submission is the one to
        finish)."""
        ...

    async def pending_diffs(self, before: float, limit: int) -> list[PendingDiff]:
        """Journal entries recorded (or last claimed) before `before`, oldest first."""
        ...

    async def claim_pending_diff(self, key: str, now: float, before: float) -> bool:
        """Take a journal entry for a replay: true when it is still there and older than
        `before` (its time moves to `now` and its replay count up, so other processes leave
        it alone for a while)."""
        ...

    async def drop_pending_diff(self, key: str) -> None:
        """Forget a journal entry (its replay failed for good)."""
        ...

    async def stale_intents(self, before: float, limit: int) -> list[str]:
        """Names whose creation intent is older than `before` (oldest first); tombstones of
        swept intents are not."""
        ...

    async def claim_intent(self, topic: str, run: str, now: float, before: float) -> Intent:
        """Take one stale intent for a sweep: CLAIMED when it is still older than `before`
        and no queue owns the name (its generation moves on; the caller deletes the topic,
        then `drop_intent`);
        ADOPTED when a queue owns it now (the intent is removed: nothing to delete); KEPT
        when it was refreshed, is being swept by another live run, or is gone."""
        ...

    async def drop_intent(self, topic: str, run: str, now: float) -> None:
        """The topic of an intent this run claimed is deleted: the intent becomes a tombstone
        (keeping its generation) until `purge_tombstones`, or a diff records it again."""
        ...

    async def purge_tombstones(self, before: float) -> int:
        """Forget tombstones of intents swept before `before`; returns how many."""
        ...

    async def mark_deleting(self, topic: str, run: str, now: float) -> bool:
        """Just before a GC run deletes a claimed queue's topic: True when the queue is still
        claimed by `run` and unreferenced; from then on a diff referencing it waits (QueueBusy)
        until the run forgets it, or takes it over once the mark is `DELETING_TTL` old (the
        run died). False, with the claim released, when it was referenced meanwhile."""
        ...

    async def release(self, strategy_id: str, now: float) -> int:
        """Drop every reference of the strategy; return how many were dropped. A queue left
        with no reference records `now` as its orphan time (`apply` does the same for the
        queues a plan stops referencing, and clears it on the queues it references)."""
        ...

    async def mark_orphaned(self, topics: Sequence[str], now: float) -> int:
        """Record `now` as the orphan time of those queues that are unreferenced and have
        none (graphs written before orphan times); returns how many were stamped."""
        ...

    async def retire_version(
        self, sentinel_id: str, version: str, now: float, retired: bool = True
    ) -> list[str]:
        """A version stopped taking traffic for good (True) or takes it again (False). The
        queues emitted by its sentinel node's compute nodes that no other live version of
        the same sentinel has get (or lose) the mark `<sentinel id>@<version>`: GC treats a
        marked queue as a sentinel queue. Returns the topics marked (or unmarked)."""
        ...

    async def compactable(self, created_before: float, limit: int) -> list[NodeId]:
        """Compute nodes (oldest first, at most `limit`) created before `created_before` that
        emit no queue, are used by no strategy and are had by no live sentinel version (one
        not retired that takes traffic)."""
        ...

    async def compact(self, node_ids: Sequence[NodeId], created_before: float) -> int:
        """Remove those of the nodes that are still compactable (checked under the node's
        lock, so a diff writing one meanwhile keeps it); returns how many were removed."""
        ...

    async def set_keep(self, topics: Sequence[str], keeper: str, keep: bool) -> int:
        """Add (or remove) `keeper` among the markers that protect the queues from GC;
        returns how many queues changed. A queue is kept while any marker remains."""
        ...

    async def queues_by_tags(
        self, tags: Sequence[str], interval: int, match_mode: str
    ) -> list[QueueRef]: ...

    async def queues_by_tag_queries(self, queries: Sequence[TagQuery]) -> list[list[QueueRef]]:
        """Many tag queries in one read: per query, what `queues_by_tags` would answer."""
        ...

    async def queues(self, topics: Sequence[str] | None = None) -> list[QueueDetail]:
        """Queues (all, or the named ones) with their reference counts."""
        ...

    async def forget_queue(self, topic: str) -> Forgot:
        """Remove a dropped queue (and its EMITS edge); its compute node stays. REFERENCED
        when it became referenced again (it stays, unclaimed); ABSENT when it was not there
        (another run dropped it)."""
        ...

    async def claim_queue(
        self,
        topic: str,
        run: str,
        now: float,
        stale_after: float,
        orphaned_by: float | None = None,
    ) -> bool:
        """Atomically reserve an unreferenced queue for one GC run: True for exactly one
        claimant; False when it is referenced, gone, marked keep, claimed by another run
        less than `stale_after` seconds ago (a crashed run's claim expires), or, with
        `orphaned_by`, orphaned later than that (it was referenced again meanwhile, so its
        grace starts over) or without an orphan time."""
        ...

    async def release_claim(self, topic: str, run: str) -> None:
        """Give up `run`'s claim on a queue (its archive failed: nothing was deleted), so
        the next run can try again at once."""
        ...

    async def set_unmanaged(self, topics: Sequence[str]) -> None: ...

    async def set_sentinel_weight(
        self, sentinel_id: str, version: str, weight: float, now: float
    ) -> None: ...

    async def sentinel_weights(self, sentinel_id: str) -> dict[str, float]: ...

    async def link_sentinel(self, sentinel: SentinelWrite, now: float) -> None:
        """Create or update a version's sentinel node (commit hash and release tag when
        given) and its HAS edges to the given compute nodes; the weight is left alone."""
        ...

    async def sentinel(self, sentinel_id: str, version: str) -> SentinelRecord | None:
        """One version's sentinel node: weight, weight history, HAS edge count."""
        ...

    async def strategy_nodes(self, strategy_id: str) -> set[NodeId]: ...

    async def strategy_context(self, strategy_id: str) -> dict[str, str] | None:
        """The compute context of the strategy's last written diff (None if unknown)."""
        ...

    async def counts(self) -> GraphCounts: ...

    async def record_cross_context(self, strategy_id: str, nodes: int, now: float) -> None:
        """Remember a refused cross-context reuse of `nodes` nodes, for every process: canary
        rollouts halt while one was recorded within their analysis window. Records older than
        `CROSS_CONTEXT_KEEP` seconds are dropped on the way."""
        ...

    async def cross_context_since(self, since: float) -> int:
        """Nodes refused as cross-context reuses at or after `since` (0: none)."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- topics


BELOW_SPEC = "reused below its durability spec: "  # an EXISTS result's message, if any


class TopicStatus(StrEnum):
    CREATED = "created"
    EXISTS = "exists"  # already there, the same topic (its message: a durability shortfall)
    CONFLICT = "conflict"  # already there with a different configuration
    COLLISION = "collision"  # differs from an existing name only in case or `.` versus `_`
    FORBIDDEN = "forbidden"  # the broker's authorizer refused this process's principal
    FAILED = "failed"


@dataclass(frozen=True, slots=True)
class TopicResult:
    topic: str
    status: TopicStatus
    message: str = ""
    attempts: int = 1
    retriable: bool = False  # FAILED for a reason that may pass on a later try

    @property
    def ok(self) -> bool:
        return self.status in (TopicStatus.CREATED, TopicStatus.EXISTS)


@dataclass(frozen=True, slots=True)
class TopicState:
    """A topic as Kafka describes it."""

    topic: str
    partitions: int
    replication_factor: int
    config: Mapping[str, str] = field(default_factory=dict)


class TopicAdmin(Protocol):
    async def ensure(
        self, topics: Mapping[str, TopicSpec], *, wait_visible: bool = True
    ) -> dict[str, TopicResult]:
        """Create many topics in one batch, one result per topic; verify existing ones.
        CREATED means the controller acknowledged the creation (committed it); with
        `wait_visible` the call also waits (bounded) until the broker describes them."""
        ...

    async def validate(self, topics: Mapping[str, TopicSpec]) -> dict[str, TopicResult]:
        """Ask the controller whether it would create these topics, creating nothing (one
        request): authorization, policy and config refusals come back as they would on
        creation (FORBIDDEN, FAILED); an existing name is no refusal (`ensure` verifies it)."""
        ...

    async def unseen(self, topics: Sequence[str]) -> list[str]:
        """Those of `topics` the broker does not describe now (one request)."""
        ...

    async def describe(self, topics: Sequence[str]) -> dict[str, TopicState]:
        """The topics that exist among `topics`, with partitions, replication and configs."""
        ...

    async def list_topics(self) -> set[str]: ...

    async def delete(self, topics: Sequence[str]) -> dict[str, str | None]:
        """Delete topics; per topic None or an error message. Missing topics are no error."""
        ...

    async def message_counts(self, topics: Sequence[str]) -> dict[str, int]:
        """Sum over partitions of high minus low watermark."""
        ...

    async def broker_count(self) -> int: ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Published:
    topic: str
    key: str
    value: Mapping[str, Any]


class EventBus(Protocol):
    async def publish(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        """Deliver one CloudEvent (waits for the broker's acknowledgement)."""
        ...

    async def close(self) -> None: ...


# --------------------------------------------------------------------------- archive


@dataclass(frozen=True, slots=True)
class ArchiveResult:
    topic: str
    location: str
    messages: int
    bytes: int


@dataclass(frozen=True, slots=True)
class ArchiveEntry:
    """A complete archive (its manifest exists)."""

    topic: str
    manifest: str  # the manifest's key: what `restore` takes
    messages: int
    bytes: int
    created_at: float
    partitions: int = 1  # how many partitions the archived topic had


class Archive(Protocol):
    async def archive(self, topic: str) -> ArchiveResult:
        """Dump every message of the topic (partitions, offsets, timestamps, keys, headers,
        values) to the store, read it back and check it, check the topic did not change
        meanwhile, then write the manifest; raises (`ArchiveFailed`, `Unavailable`) on any
        failure, and then no archive counts."""
        ...

    async def entries(self, queue: str | None = None) -> list[ArchiveEntry]:
        """The complete archives (of one queue, or all), oldest first per queue."""
        ...

    async def restore(self, manifest: str, to_topic: str) -> int:
        """Produce an archive's messages into an existing topic (same keys, values, headers,
        timestamps; partition = archived partition modulo the topic's count); returns how
        many were produced."""
        ...


class LoadGauge(Protocol):
    """One number that says how loaded a dependency is now (a broker load metric)."""

    async def value(self) -> float:
        """The current value; raises Unavailable when it cannot be read."""
        ...


class MetricQuery(Protocol):
    """PromQL evaluated by a Prometheus-compatible API, reduced to one number (a scalar, or
    the largest sample of a vector): the analysis gates of a rollout."""

    async def value(self, base_url: str, query: str) -> float:
        """The value now; raises Unavailable when it cannot be read (no answer, an error,
        no samples)."""
        ...


class StrategyReadiness(Protocol):
    """Whether a version's StrategyDAG runs: a rollout starts only once it is Ready."""

    async def ready(self, namespace: str, name: str) -> str | None:
        """The strategy id of the StrategyDAG when it is Ready; None while it is not Ready
        or does not exist; raises Unavailable when the API cannot be read."""
        ...


@dataclass(frozen=True, slots=True)
class Owner:
    """The object a ConfigMap belongs to (deleted with it)."""

    api_version: str
    kind: str
    name: str
    uid: str


class ConfigMapStore(Protocol):
    """Small documents kept next to a resource: a DAG too large for its spec, the node →
    topic map of a large DAG, the GC report. Calls are blocking (drivers run them in a
    thread) and raise typed errors (Unavailable, Conflict)."""

    def read(self, namespace: str, name: str, key: str) -> str | None:
        """The key's value; None when the ConfigMap or the key does not exist."""
        ...

    def upsert(
        self, namespace: str, name: str, data: Mapping[str, str], owner: Owner | None = None
    ) -> None:
        """Create or replace the ConfigMap with exactly `data`."""
        ...


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch."""
        ...
