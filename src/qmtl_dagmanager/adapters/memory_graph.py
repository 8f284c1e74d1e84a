"""The embedded graph store: the Neo4j store's semantics, in memory.

The default when no Neo4j is configured, and the fast twin in tests. Every write is atomic (no
await inside it), idempotent, and never deletes a referenced compute node.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from qmtl_dagmanager.adapters import graph_rows
from qmtl_dagmanager.core import tag_match
from qmtl_dagmanager.core.errors import QueueBusy, QueueGone, StaleRead
from qmtl_dagmanager.core.gc import retired_key
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import NodeRecord, Plan, QueryGroup, QueueRecord
from qmtl_dagmanager.core.tag_match import TaggedQueue, TagQuery
from qmtl_dagmanager.ports import (
    CROSS_CONTEXT_KEEP,
    DELETING_TTL,
    EVENT_CLAIM_TTL,
    Forgot,
    GraphCounts,
    GraphRead,
    Intent,
    Intents,
    PendingDiff,
    PendingEvent,
    QueueDetail,
    QueueRef,
    SentinelRecord,
    SentinelWrite,
    parse_history,
)


def _swept_since(
    intent: dict[str, Any] | None, topic: str, recorded: Mapping[str, int] | None
) -> bool:
    """A sweep deleted the topic after the diff recorded its intent (generation moved)."""
    if intent is None or recorded is None or topic not in recorded:
        return False
    return bool(intent["gen"] != recorded[topic])


def _sweeping(intent: dict[str, Any] | None, now: float) -> bool:
    """A sweep is deleting this name now (a sweep mark older than DELETING_TTL is a dead
    run's)."""
    return intent is not None and "sweep" in intent and now - intent["sweep_at"] < DELETING_TTL


@dataclass
class _Sentinel:
    props: dict[str, Any]
    has: set[NodeId] = field(default_factory=set)


class MemoryGraphStore:
    def __init__(self) -> None:
        self.nodes: dict[NodeId, dict[str, Any]] = {}
        self._queues: dict[str, dict[str, Any]] = {}  # includes "node_id": the EMITS edge
        self._emits: dict[NodeId, list[str]] = {}  # node → its queues' topics (an index)
        self._slots: dict[str, str] = {}  # (node, compute key) slot → its one queue's topic
        self._users: dict[str, int] = {}  # topic → strategies referencing the queue
        self._intents: dict[str, dict[str, Any]] = {}  # topic → creation intent
        self.journal: dict[str, PendingDiff] = {}  # diffs answered before their write
        # (tag, interval) → topics of queues whose node has that tag: tag queries and
        # QueueUpdated sets read only the queues they select
        self._by_tag: dict[tuple[str, int], set[str]] = {}
        # the QueueUpdated outbox: pending groups (oldest first) → their marks; claims
        self._marks: dict[QueryGroup, list[str]] = {}
        self._claims: dict[QueryGroup, tuple[str, float]] = {}
        self._mark_seq = 0
        self.node_refs: dict[str, set[NodeId]] = {}  # strategy → nodes it USES
        self.queue_refs: dict[str, set[str]] = {}  # strategy → queues it USES
        self.sentinels: dict[tuple[str, str], _Sentinel] = {}
        self.contexts: dict[str, dict[str, str]] = {}
        self.fingerprints: dict[str, str] = {}
        self.schema_ready = False
        self._cross_context: list[tuple[float, int]] = []  # (when, nodes), oldest first

    async def ping(self) -> bool:
        return True

    async def init_schema(self) -> None:
        self.schema_ready = True

    async def rollback_schema(self) -> None:
        self.schema_ready = False

    def schema_statements(self) -> list[str]:
        return []

    async def read(
        self, node_ids: Sequence[NodeId], topics: Sequence[str], strategy_id: str = ""
    ) -> GraphRead:
        records: dict[NodeId, NodeRecord] = {}
        for nid in node_ids:
            n = self.nodes.get(nid)
            if n is not None:
                queues = (self._queues[t] for t in self._emits.get(nid, ()))
                records[nid] = NodeRecord(
                    nid,
                    n["schema_hash"],
                    n["schema_compat_id"],
                    tuple(
                        QueueRecord(q["topic"], q["compute_key"])
                        for q in queues
                        if not q.get("superseded")
                    ),
                    n.get("buffering_since"),
                    int(n.get("recompute", 0)),
                )
        owners = {t: self._queues[t]["node_id"] for t in topics if t in self._queues}
        return GraphRead(records, owners, self.fingerprints.get(strategy_id))

    def _check(
        self, r: graph_rows.Rows, now: float, intents: Mapping[str, int] | None
    ) -> tuple[list[str], set[str]]:
        """What a write of `r` may do: raises (writing nothing) when the graph no longer
        holds what the plan read; returns the referenced queues to take back from GC and the
        created names another writer already created for the same (node, compute key)."""
        gone: list[str] = []
        busy: list[str] = []
        stale: list[str] = []
        reclaim: list[str] = []
        adopted: set[str] = set()
        for x in r.refs:
            topic, slot = x["topic"], x["slot"]
            q = self._queues.get(topic)
            if x["create"]:
                if q is None:
                    held = self._slots.get(slot)
                    if held is not None:
                        stale.append(f"node {x['node_id']} has queue {held} for this context")
                    elif _sweeping(intent := self._intents.get(topic), now) or _swept_since(
                        intent, topic, intents
                    ):
                        busy.append(topic)
                    continue
                adopted.add(topic)
            if q is None:
                gone.append(topic)
            elif q["slot"] != slot:
                stale.append(f"{topic} is not node {x['node_id']}'s queue for this context")
            elif "gc_deleting_at" in q and now - q["gc_deleting_at"] < DELETING_TTL:
                busy.append(topic)
            elif "gc_claim" in q:
                reclaim.append(topic)
        if gone:
            raise QueueGone(gone)
        if busy:
            raise QueueBusy(busy)
        if stale:
            raise StaleRead("; ".join(stale[:3]))
        return reclaim, adopted

    async def apply(
        self,
        plan: Plan,
        now: float,
        sentinel: SentinelWrite | None,
        intents: Mapping[str, int] | None = None,
        journal: str = "",
    ) -> tuple[str, ...]:
        r = graph_rows.rows(plan, now)
        reclaim, adopted = self._check(r, now, intents)
        self.journal.pop(journal, None)
        for topic in reclaim:  # referenced again: the GC run's claim (and mark) are void
            self._queues[topic].pop("gc_claim", None)
            self._queues[topic].pop("gc_deleting_at", None)
        for row in r.nodes:
            n = self.nodes.get(row["node_id"])
            if n is None:
                n = {k: v for k, v in row.items() if k not in ("compute_key", "buffer")}
                n["compute_keys"] = []
                self.nodes[row["node_id"]] = n
            if row["compute_key"] not in n["compute_keys"]:
                n["compute_keys"] = [*n["compute_keys"], row["compute_key"]]
            if row["buffer"] and n["schema_hash"] != row["schema_hash"]:
                n["schema_hash"] = row["schema_hash"]
                n["buffering_since"] = now
            if row["recompute"] > n.get("recompute", 0):
                n["recompute"] = row["recompute"]
                n["schema_hash"] = row["schema_hash"]
                n.pop("buffering_since", None)
        for row in r.queues:
            if row["topic"] not in adopted:
                self._queues[row["topic"]] = {**row, "managed": True}
                self._emits.setdefault(row["node_id"], []).append(row["topic"])
                self._slots[row["slot"]] = row["topic"]
                self._index(row["topic"], row["node_id"], add=True)
            self._intents.pop(row["topic"], None)
        for g in plan.query_groups:
            self._mark_seq += 1
            self._marks.setdefault(g, []).append(str(self._mark_seq))
        self.contexts[r.strategy_id] = dict(r.context)
        self.fingerprints[r.strategy_id] = r.fingerprint
        self._unreference(r.strategy_id, now)
        self.node_refs[r.strategy_id] = {ref["node_id"] for ref in r.refs}
        self.queue_refs[r.strategy_id] = topics = {ref["topic"] for ref in r.refs}
        for t in topics:
            self._users[t] = self._users.get(t, 0) + 1
            self._queues[t].pop("orphaned_at", None)  # referenced: its grace starts over
        if sentinel is not None:
            key = (sentinel.sentinel_id, sentinel.version)
            s = self.sentinels.get(key)
            if s is None:
                s = self.sentinels[key] = _Sentinel(
                    {
                        "sentinel_id": sentinel.sentinel_id,
                        "version": sentinel.version,
                        "commit_hash": sentinel.commit_hash,
                        "release_tag": sentinel.release_tag,
                        "traffic_weight": sentinel.traffic_weight,
                        "created_at": now,
                        "weight_history": [],
                    }
                )
            s.has |= set(sentinel.node_ids)
        return tuple(reclaim)

    def _unreference(self, strategy_id: str, now: float) -> int:
        topics = self.queue_refs.pop(strategy_id, set())
        for t in topics:
            left = self._users.get(t, 0) - 1
            if left > 0:
                self._users[t] = left
            else:
                self._users.pop(t, None)
                if t in self._queues:
                    self._queues[t]["orphaned_at"] = now
        return len(topics)

    async def release(self, strategy_id: str, now: float) -> int:
        self.contexts.pop(strategy_id, None)
        self.fingerprints.pop(strategy_id, None)
        dropped = len(self.node_refs.pop(strategy_id, set()))
        return dropped + self._unreference(strategy_id, now)

    async def mark_orphaned(self, topics: Sequence[str], now: float) -> int:
        stamped = 0
        for t in topics:
            q = self._queues.get(t)
            if q is not None and self._ref_count(t) == 0 and q.get("orphaned_at") is None:
                q["orphaned_at"] = now
                stamped += 1
        return stamped

    async def retire_version(
        self, sentinel_id: str, version: str, now: float, retired: bool = True
    ) -> list[str]:
        s = self.sentinels.get((sentinel_id, version))
        if s is None:
            return []
        if retired:
            s.props["retired_at"] = now
        else:
            s.props.pop("retired_at", None)
        live = set().union(
            *(
                o.has
                for (sid, v), o in self.sentinels.items()
                if sid == sentinel_id and v != version and "retired_at" not in o.props
            )
        )
        key = retired_key(sentinel_id, version)
        out = []
        for nid in sorted(s.has - live):
            for topic in self._emits.get(nid, []):
                q = self._queues[topic]
                if retired and q.get("retired") != key:
                    q["retired"] = key
                    out.append(topic)
                elif not retired and q.get("retired") == key:
                    del q["retired"]
                    out.append(topic)
        return sorted(out)

    def _compactable(self, nid: NodeId, created_before: float) -> bool:
        n = self.nodes.get(nid)
        if n is None or n["created_at"] >= created_before or self._emits.get(nid):
            return False
        if any(nid in used for used in self.node_refs.values()):
            return False
        return not any(
            nid in s.has and "retired_at" not in s.props and (s.props["traffic_weight"] or 0) > 0
            for s in self.sentinels.values()
        )

    async def compactable(self, created_before: float, limit: int) -> list[NodeId]:
        found = [nid for nid in self.nodes if self._compactable(nid, created_before)]
        found.sort(key=lambda nid: (self.nodes[nid]["created_at"], nid))
        return found[:limit]

    async def compact(self, node_ids: Sequence[NodeId], created_before: float) -> int:
        removed = 0
        for nid in node_ids:
            if self._compactable(nid, created_before):
                del self.nodes[nid]
                self._emits.pop(nid, None)
                for s in self.sentinels.values():
                    s.has.discard(nid)
                removed += 1
        return removed

    async def set_keep(self, topics: Sequence[str], keeper: str, keep: bool) -> int:
        changed = 0
        for t in topics:
            q = self._queues.get(t)
            if q is None:
                continue
            marks = set(q.get("keep_by", ()))
            before = len(marks)
            if keep:
                marks.add(keeper)
            else:
                marks.discard(keeper)
            if len(marks) != before:
                q["keep_by"] = tuple(sorted(marks))
                changed += 1
        return changed

    async def record_intents(
        self,
        topics: Sequence[str],
        now: float,
        owner: str,
        journal: PendingDiff | None = None,
    ) -> Intents:
        busy = tuple(t for t in topics if _sweeping(self._intents.get(t), now))
        if journal is not None:
            sid = journal.request.strategy_id
            for key in [k for k, j in self.journal.items() if j.request.strategy_id == sid]:
                del self.journal[key]
            self.journal[journal.key] = journal
        gens: dict[str, int] = {}
        for t in topics:
            if t in busy:
                continue
            i = self._intents.setdefault(t, {"gen": 0})
            for k in ("sweep", "sweep_at", "deleted_at"):
                i.pop(k, None)
            i["at"], i["owner"] = now, owner
            gens[t] = i["gen"]
        return Intents(busy, gens)

    async def pending_diffs(self, before: float, limit: int) -> list[PendingDiff]:
        old = sorted((j for j in self.journal.values() if j.at <= before), key=lambda j: j.at)
        return old[:limit]

    async def claim_pending_diff(self, key: str, now: float, before: float) -> bool:
        j = self.journal.get(key)
        if j is None or j.at > before:
            return False
        self.journal[key] = dataclasses.replace(j, at=now, replays=j.replays + 1)
        return True

    async def drop_pending_diff(self, key: str) -> None:
        self.journal.pop(key, None)

    async def stale_intents(self, before: float, limit: int) -> list[str]:
        old = sorted(
            (i["at"], t)
            for t, i in self._intents.items()
            if i["at"] <= before and "deleted_at" not in i
        )
        return [t for _, t in old[:limit]]

    async def claim_intent(self, topic: str, run: str, now: float, before: float) -> Intent:
        i = self._intents.get(topic)
        if (
            i is None
            or "deleted_at" in i
            or i["at"] > before
            or (_sweeping(i, now) and i["sweep"] != run)
        ):
            return Intent.KEPT
        if topic in self._queues:
            del self._intents[topic]
            return Intent.ADOPTED
        i["sweep"], i["sweep_at"] = run, now
        i["gen"] += 1
        return Intent.CLAIMED

    async def drop_intent(self, topic: str, run: str, now: float) -> None:
        i = self._intents.get(topic)
        if i is not None and i.get("sweep") == run:
            i.pop("sweep")
            i.pop("sweep_at")
            i["deleted_at"] = now

    async def purge_tombstones(self, before: float) -> int:
        dead = [t for t, i in self._intents.items() if i.get("deleted_at", before + 1) <= before]
        for t in dead:
            del self._intents[t]
        return len(dead)

    async def mark_deleting(self, topic: str, run: str, now: float) -> bool:
        q = self._queues.get(topic)
        if q is None or q.get("gc_claim", ("",))[0] != run:
            return False
        if self._users.get(topic):
            q.pop("gc_claim", None)
            return False
        q["gc_deleting_at"] = now
        return True

    async def queues_by_tags(
        self, tags: Sequence[str], interval: int, match_mode: str
    ) -> list[QueueRef]:
        return (await self.queues_by_tag_queries([TagQuery(tuple(tags), interval, match_mode)]))[0]

    def _index(self, topic: str, node_id: NodeId, *, add: bool) -> None:
        node = self.nodes.get(node_id)
        if node is None:
            return
        for tag in node["tags"]:
            key = (tag, node["interval"])
            if add:
                self._by_tag.setdefault(key, set()).add(topic)
            elif key in self._by_tag:
                self._by_tag[key].discard(topic)
                if not self._by_tag[key]:
                    del self._by_tag[key]

    async def queues_by_tag_queries(self, queries: Sequence[TagQuery]) -> list[list[QueueRef]]:
        topics: set[str] = set()
        for query in queries:
            for tag in query.tags:
                topics |= self._by_tag.get((tag, query.interval), set())
        candidates = [
            TaggedQueue(q["base"], bool(q["is_global"]), node["interval"], frozenset(node["tags"]))
            for t in topics
            if (q := self._queues.get(t)) is not None
            and (node := self.nodes.get(q["node_id"])) is not None
        ]
        return [[QueueRef(t, g) for t, g in hit] for hit in tag_match.select(queries, candidates)]

    async def claim_events(self, owner: str, now: float, limit: int) -> list[PendingEvent]:
        out: list[PendingEvent] = []
        for g, marks in self._marks.items():
            claim = self._claims.get(g)
            if claim is not None and claim[0] != owner and now - claim[1] < EVENT_CLAIM_TTL:
                continue
            self._claims[g] = (owner, now)
            out.append(PendingEvent(g, tuple(marks)))
            if len(out) >= limit:
                break
        return out

    async def settle_events(self, owner: str, published: Sequence[PendingEvent]) -> int:
        pending = 0
        for p in published:
            if self._claims.get(p.group, ("",))[0] != owner:
                continue
            del self._claims[p.group]
            done = set(p.marks)
            left = [m for m in self._marks.get(p.group, []) if m not in done]
            if left:
                self._marks[p.group] = left
                pending += 1
            else:
                self._marks.pop(p.group, None)
        return pending

    async def release_events(self, owner: str, events: Sequence[PendingEvent]) -> None:
        for p in events:
            if self._claims.get(p.group, ("",))[0] == owner:
                del self._claims[p.group]

    async def pending_events(self) -> int:
        return len(self._marks)

    def _ref_count(self, topic: str) -> int:
        return self._users.get(topic, 0)

    async def queues(self, topics: Sequence[str] | None = None) -> list[QueueDetail]:
        names = list(self._queues) if topics is None else [t for t in topics if t in self._queues]
        out = []
        for t in sorted(names):
            q = self._queues[t]
            out.append(
                QueueDetail(
                    topic=t,
                    node_id=q["node_id"],
                    tag=q["tag"],
                    interval=q["interval"],
                    created_at=q["created_at"],
                    ref_count=self._ref_count(t),
                    managed=q["managed"],
                    compute_key=q["compute_key"],
                    partitions=q["partitions"],
                    replication=q["replication"],
                    retention_ms=q["retention_ms"],
                    tags=tuple(self.nodes[q["node_id"]]["tags"])
                    if q["node_id"] in self.nodes
                    else (),
                    orphaned_at=q.get("orphaned_at"),
                    keep_by=tuple(q.get("keep_by", ())),
                    retired=str(q.get("retired", "")),
                )
            )
        return out

    async def forget_queue(self, topic: str) -> Forgot:
        if topic not in self._queues:
            return Forgot.ABSENT
        if self._ref_count(topic) == 0:
            q = self._queues.pop(topic)
            self._emits[q["node_id"]].remove(topic)
            self._index(topic, q["node_id"], add=False)
            if self._slots.get(q["slot"]) == topic:
                del self._slots[q["slot"]]
            return Forgot.DROPPED
        self._queues[topic].pop("gc_claim", None)
        self._queues[topic].pop("gc_deleting_at", None)
        return Forgot.REFERENCED

    async def claim_queue(
        self,
        topic: str,
        run: str,
        now: float,
        stale_after: float,
        orphaned_by: float | None = None,
    ) -> bool:
        q = self._queues.get(topic)
        if q is None or self._ref_count(topic) > 0 or q.get("keep_by"):
            return False
        if orphaned_by is not None:
            orphaned = q.get("orphaned_at")
            if orphaned is None or orphaned > orphaned_by:
                return False
        claim = q.get("gc_claim")
        if claim is not None and claim[0] != run and now - claim[1] < stale_after:
            return False
        q["gc_claim"] = (run, now)
        q.pop("gc_deleting_at", None)
        return True

    async def release_claim(self, topic: str, run: str) -> None:
        q = self._queues.get(topic)
        if q is not None and (q.get("gc_claim") or ("",))[0] == run:
            q.pop("gc_claim", None)
            q.pop("gc_deleting_at", None)

    async def set_unmanaged(self, topics: Sequence[str]) -> None:
        for t in topics:
            if t in self._queues:
                self._queues[t]["managed"] = False

    async def set_sentinel_weight(
        self, sentinel_id: str, version: str, weight: float, now: float
    ) -> None:
        s = self._sentinel(sentinel_id, version, now)
        if s.props["traffic_weight"] != weight:
            s.props["traffic_weight"] = weight
            s.props["weight_history"] = [*s.props["weight_history"], f"{now}:{weight}"]

    def _sentinel(self, sentinel_id: str, version: str, now: float) -> _Sentinel:
        key = (sentinel_id, version)
        s = self.sentinels.get(key)
        if s is None:
            s = self.sentinels[key] = _Sentinel(
                {
                    "sentinel_id": sentinel_id,
                    "version": version,
                    "commit_hash": "",
                    "release_tag": "",
                    "traffic_weight": None,
                    "created_at": now,
                    "weight_history": [],
                }
            )
        return s

    async def link_sentinel(self, sentinel: SentinelWrite, now: float) -> None:
        s = self._sentinel(sentinel.sentinel_id, sentinel.version, now)
        if sentinel.commit_hash:
            s.props["commit_hash"] = sentinel.commit_hash
        if sentinel.release_tag:
            s.props["release_tag"] = sentinel.release_tag
        s.has |= {n for n in sentinel.node_ids if n in self.nodes}

    async def sentinel(self, sentinel_id: str, version: str) -> SentinelRecord | None:
        s = self.sentinels.get((sentinel_id, version))
        if s is None:
            return None
        w = s.props["traffic_weight"]
        return SentinelRecord(
            sentinel_id,
            version,
            None if w is None else float(w),
            parse_history(s.props["weight_history"]),
            str(s.props["commit_hash"] or ""),
            str(s.props["release_tag"] or ""),
            len(s.has),
        )

    async def sentinel_weights(self, sentinel_id: str) -> dict[str, float]:
        return {
            v: s.props["traffic_weight"]
            for (sid, v), s in self.sentinels.items()
            if sid == sentinel_id and s.props["traffic_weight"] is not None
        }

    async def strategy_nodes(self, strategy_id: str) -> set[NodeId]:
        return set(self.node_refs.get(strategy_id, set()))

    async def strategy_context(self, strategy_id: str) -> dict[str, str] | None:
        ctx = self.contexts.get(strategy_id)
        return dict(ctx) if ctx is not None else None

    async def counts(self) -> GraphCounts:
        relationships = (
            len(self._queues)  # EMITS
            + sum(len(v) for v in self.node_refs.values())
            + sum(len(v) for v in self.queue_refs.values())
            + sum(len(s.has) for s in self.sentinels.values())
        )
        strategies = sum(1 for k in self.node_refs if self.node_refs[k])
        return GraphCounts(
            len(self.nodes), len(self._queues), len(self.sentinels), strategies, relationships
        )

    async def record_cross_context(self, strategy_id: str, nodes: int, now: float) -> None:
        keep = [h for h in self._cross_context if h[0] >= now - CROSS_CONTEXT_KEEP]
        self._cross_context = [*keep, (now, nodes)]

    async def cross_context_since(self, since: float) -> int:
        return sum(n for at, n in self._cross_context if at >= since)

    async def close(self) -> None:
        return None
