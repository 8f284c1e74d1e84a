"""The diff planner: which nodes are reused, reused with buffering, or new; their topics; the
queue_map the Gateway reads; and the tag groups whose QueueUpdated events must be refreshed.

Pure: the caller passes what the graph already holds for the DAG's node ids (`records`) and the
owners of topic names that may collide (`taken`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import NamedTuple

from blake3 import blake3

from qmtl_dagmanager.core import context, native, topics
from qmtl_dagmanager.core.dag import Dag, Node
from qmtl_dagmanager.core.errors import CrossContextReuse
from qmtl_dagmanager.core.identity import ComputeKey, NodeId
from qmtl_dagmanager.core.topics import TopicCatalog, TopicName, TopicSpec

MAX_HASH = 64


class Action(StrEnum):
    REUSE = "reuse"
    BUFFER = "buffer"  # reused, schema changed under the same compat id: replay `period` bars
    CREATE = "create"


@dataclass(frozen=True, slots=True)
class QueueRecord:
    topic: str
    compute_key: str


@dataclass(frozen=True, slots=True)
class NodeRecord:
    """What the graph holds for one node id."""

    node_id: NodeId
    schema_hash: str
    schema_compat_id: str
    queues: tuple[QueueRecord, ...] = ()
    buffering_since: float | None = None  # a back-compatible schema change replays since
    recompute: int = 0  # how many times the node was fully recomputed (its queue generation)


@dataclass(frozen=True, slots=True)
class Request:
    strategy_id: str
    world_id: str = ""
    execution_domain: str = ""
    as_of: str = ""
    partition: str = ""
    dataset_fingerprint: str = ""

    def context_layer(self) -> dict[str, str]:
        return {
            "world_id": self.world_id,
            "execution_domain": self.execution_domain,
            "as_of": self.as_of,
            "partition": self.partition,
            "dataset_fingerprint": self.dataset_fingerprint,
        }


class NodePlan(NamedTuple):
    """The decision for one node (a NamedTuple: built once per node on the hot path)."""

    node: Node
    action: Action
    topic: TopicName
    compute_key: ComputeKey
    spec: TopicSpec | None = None  # set when a topic must be created
    previous_schema_hash: str = ""  # set when buffering
    recompute: int = 0  # the queue generation (> 0 after a full recompute)
    replaces: str = ""  # the buffering queue a full recompute replaces


@dataclass(frozen=True, slots=True)
class Buffer:
    """A buffer instruction (DiffChunk.buffer_nodes): lag = period."""

    node: Node
    lag: int


@dataclass(frozen=True, slots=True)
class Violation:
    node_id: NodeId
    topic: str
    compute_key: ComputeKey
    message: str


@dataclass(frozen=True, slots=True)
class QueryGroup:
    """A (tags, interval, match_mode) whose QueueUpdated event must be (re)published."""

    tags: tuple[str, ...]
    interval: int
    match_mode: str

    @property
    def key(self) -> str:
        """A stable, unambiguous text key (the graph's QueueUpdated outbox is keyed by it)."""
        return json.dumps([self.match_mode, self.interval, list(self.tags)], separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Plan:
    strategy_id: str
    sentinel_id: str
    version: str
    crc32: int
    namespace: str | None
    context: context.ComputeContext
    nodes: tuple[NodePlan, ...]  # submitted order
    queue_map: Mapping[str, str]
    buffers: tuple[Buffer, ...]
    violations: tuple[Violation, ...]
    query_groups: tuple[QueryGroup, ...]
    counts: Mapping[str, int] = field(default_factory=dict)
    # the first time a node this plan reuses while it buffers is due for a full recompute:
    # from then on an identical resubmission must be planned again, not answered from cache
    recompute_due: float | None = None

    @property
    def recomputes(self) -> tuple[NodePlan, ...]:
        return tuple(p for p in self.nodes if p.replaces)

    @property
    def creates(self) -> tuple[NodePlan, ...]:
        return tuple(p for p in self.nodes if p.action is Action.CREATE)

    def fingerprint(self) -> str:
        """A digest of what a write of this plan records for its strategy: the (node, queue)
        references, the compute context and the version."""
        refs = sorted(f"{p.node.node_id}>{p.topic}" for p in self.nodes)
        ctx = self.context.as_dict()
        text = "\n".join([self.version, *(f"{k}={ctx[k]}" for k in sorted(ctx)), *refs])
        return blake3(text.encode()).hexdigest()[:32]

    def unchanged(self, recorded: str | None) -> bool:
        """True when writing this plan would change nothing: every node reused as is and the
        strategy's recorded fingerprint is this plan's."""
        if not recorded or self.counts["new"] or self.counts["buffered"]:
            return False
        return recorded == self.fingerprint()

    def raise_for_violations(self) -> None:
        if self.violations:
            first = self.violations[0]
            more = f" (and {len(self.violations) - 1} more)" if len(self.violations) > 1 else ""
            raise CrossContextReuse(
                f"node {first.node_id}: {first.message}{more}",
                node_ids=tuple(v.node_id for v in self.violations),
            )


def sentinel_id(strategy_id: str) -> str:
    return f"{strategy_id}-sentinel"


def queue_key(node: Node, ck: str) -> str:
    """`<node_id>:<interval>:<bucket>#ck=<compute_key>`; the Gateway reads the node id with
    `key.partition("#")[0].rsplit(":", 2)[0]`."""
    return f"{node.node_id}:{node.interval}:{node.bucket}#ck={ck}"


def resolve_namespace(dag: Dag, request: Request) -> str | None:
    """meta.topic_namespace; else the request's world with meta.execution_domain; else with the
    request's execution_domain (or `live`). No world → no namespace."""
    if dag.topic_namespace:
        return dag.topic_namespace
    if not request.world_id.strip():
        return None
    domain = dag.meta_domain or request.execution_domain or "live"
    return topics.namespace(request.world_id, domain)


def candidate_topics(dag: Dag, ns: str | None) -> list[TopicName]:
    """The first-choice names of every node: what a caller should look up in `taken`."""
    namer = topics.Namer(dag.version, ns)
    return [namer.name(n.tags, n.node_type, n.digest) for n in dag.nodes]


def plan(
    dag: Dag,
    request: Request,
    records: Mapping[NodeId, NodeRecord],
    taken: Mapping[str, NodeId],
    catalog: TopicCatalog,
    *,
    namespaces: bool = True,
    now: float = 0.0,
    buffer_max_age: float | None = None,
) -> Plan:
    """Decide every node of `dag`. Never raises for cross-context reuse: the plan lists it.
    With `namespaces` off, topic names carry no `<world>.<domain>.` prefix. A node that has
    been buffering (a back-compatible schema change) for `buffer_max_age` seconds at `now`
    is fully recomputed: a new queue generation (its own compute key and topic name) is
    created, and the buffering queue, no longer referenced, is left to GC's rules."""
    ctx = context.resolve(request.context_layer(), *dag.context_layers)
    ns = resolve_namespace(dag, request) if namespaces else None
    key_suffix = ctx.key_suffix()
    namer = topics.Namer(dag.version, ns)
    claimed: dict[str, NodeId] = {}
    planned: list[NodePlan] = []
    buffers: list[Buffer] = []
    violations: list[Violation] = []
    queue_map: dict[str, str] = {}
    specs: dict[str, TopicSpec] = {}
    reused = buffered = created = recomputed = 0
    recompute_due: float | None = None
    first_keys = native.compute_keys([n.node_id for n in dag.nodes], key_suffix)
    for index, node in enumerate(dag.nodes):
        nid = node.node_id
        rec = records.get(nid)
        generation, replaces, due = _generation(rec, nid, key_suffix, now, buffer_max_age)
        ck = (
            ComputeKey(first_keys[index])
            if first_keys is not None and generation == 0
            else _compute_key(nid, key_suffix, generation)
        )
        own = _own_topic(rec, ck)
        if rec is not None and own is not None:
            if rec.schema_hash != node.schema_hash:
                planned.append(
                    NodePlan(node, Action.BUFFER, TopicName(own), ck, None, rec.schema_hash)
                )
                buffers.append(Buffer(node, node.period))
                buffered += 1
                if buffer_max_age:
                    due = (rec.buffering_since or now) + buffer_max_age
            else:
                planned.append(NodePlan(node, Action.REUSE, TopicName(own), ck))
                reused += 1
            if due is not None:
                recompute_due = due if recompute_due is None else min(recompute_due, due)
            claimed[own] = nid
            queue_map[f"{nid}:{node.interval}:{node.bucket}#ck={ck}"] = own
            continue
        name, clash = _free_name(node, namer, taken, claimed, rec, generation)
        if clash is not None:
            violations.append(Violation(nid, name, ck, clash))
            continue
        claimed[name] = nid
        spec = specs.get(node.node_type)
        if spec is None:
            spec = specs[node.node_type] = catalog.spec_for(node.node_type)
        planned.append(
            NodePlan(node, Action.CREATE, name, ck, spec, "", generation, TopicName(replaces))
        )
        queue_map[f"{nid}:{node.interval}:{node.bucket}#ck={ck}"] = name
        created += 1
        recomputed += bool(replaces)
    groups = _changed_groups(dag, planned)
    return Plan(
        strategy_id=request.strategy_id,
        sentinel_id=sentinel_id(request.strategy_id),
        version=dag.version,
        crc32=dag.crc32,
        namespace=ns,
        context=ctx,
        nodes=tuple(planned),
        queue_map=queue_map,
        buffers=tuple(buffers),
        violations=tuple(violations),
        query_groups=groups,
        counts={
            "total": len(dag.nodes),
            "reused": reused,
            "buffered": buffered,
            "new": created,
            "recomputed": recomputed,
            "sentinels": len(dag.sentinels),
        },
        recompute_due=recompute_due,
    )


def _generation(
    rec: NodeRecord | None, nid: NodeId, key_suffix: str, now: float, max_age: float | None
) -> tuple[int, str, float | None]:
    """The node's queue generation for this plan, the queue a full recompute replaces (or
    ""), and when the node's buffering is due for one (None: not buffering)."""
    if rec is None:
        return 0, "", None
    due = rec.buffering_since + max_age if rec.buffering_since is not None and max_age else None
    if due is not None and now >= due:
        old = _own_topic(rec, _compute_key(nid, key_suffix, rec.recompute)) or ""
        return rec.recompute + 1, old, due
    return rec.recompute, "", due


def _compute_key(nid: NodeId, key_suffix: str, generation: int) -> ComputeKey:
    """The node's compute key in a context; a recomputed node's queue generation is part of
    it, so each generation is its own (node, compute key) queue."""
    text = f"{nid}{key_suffix}" if generation == 0 else f"{nid}{key_suffix}#recompute={generation}"
    return ComputeKey("blake3:" + blake3(text.encode()).hexdigest())


def _own_topic(rec: NodeRecord | None, ck: ComputeKey) -> str | None:
    if rec is not None:
        for q in rec.queues:
            if q.compute_key == ck:
                return q.topic
    return None


def _changed_groups(dag: Dag, planned: list[NodePlan]) -> tuple[QueryGroup, ...]:
    """The (tags, interval, mode) groups whose queue sets this plan changes: each new queue's
    own tag group, and every TagQueryNode of the DAG that a new queue matches."""
    new = [p.node for p in planned if p.action is Action.CREATE and not p.node.is_tag_query]
    if not new:
        return ()
    groups: dict[QueryGroup, None] = {}
    for n in new:
        if n.tags:
            groups[QueryGroup(tuple(sorted(set(n.tags))), n.interval, "any")] = None
    for q in dag.nodes:
        if not q.is_tag_query:
            continue
        want = set(q.query_tags)
        for n in new:
            have = set(n.tags)
            if n.interval == q.interval and (
                want <= have if q.match_mode == "all" else bool(want & have)
            ):
                groups[QueryGroup(q.query_tags, q.interval, q.match_mode)] = None
                break
    return tuple(groups)


def _free_name(
    node: Node,
    namer: topics.Namer,
    taken: Mapping[str, NodeId],
    claimed: Mapping[str, NodeId],
    rec: NodeRecord | None,
    generation: int = 0,
) -> tuple[TopicName, str | None]:
    """The first name no other node holds, lengthening the short hash by 2 on each clash.
    A name this node already holds under another compute key is a cross-context reuse. A
    recomputed generation's names come from its own digest."""
    own_other = {q.topic: q.compute_key for q in rec.queues} if rec is not None else {}
    digest = (
        node.digest
        if generation == 0
        else blake3(f"{node.digest}#recompute={generation}".encode()).hexdigest()
    )
    hash_len = topics.SHORT_HASH
    while True:
        name = namer.name(node.tags, node.node_type, digest, hash_len)
        if name in own_other:
            return name, (
                f"its queue {name} belongs to compute key {own_other[name]}; reusing it in "
                "another compute context would mix their data"
            )
        owner = taken.get(name) or claimed.get(name)
        if owner is None:
            return name, None
        if owner == node.node_id:
            return name, (
                f"its queue {name} is bound to another compute context; reusing it would mix "
                "their data"
            )
        if hash_len >= MAX_HASH:
            return name, f"no free topic name: every hash length up to {MAX_HASH} is taken"
        hash_len += 2
