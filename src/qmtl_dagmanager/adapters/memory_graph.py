"""The embedded graph store: the Neo4j store's semantics, in memory.

The default when no Neo4j is configured, and the fast twin in tests. Every write is atomic (no
await inside it), idempotent, and never deletes a referenced compute node.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from qmtl_dagmanager.adapters import graph_rows
from qmtl_dagmanager.core import tag_match
from qmtl_dagmanager.core.errors import QueueGone
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import NodeRecord, Plan, QueueRecord
from qmtl_dagmanager.core.tag_match import TaggedQueue, TagQuery
from qmtl_dagmanager.ports import (
    Forgot,
    GraphCounts,
    GraphRead,
    QueueDetail,
    QueueRef,
    SentinelRecord,
    SentinelWrite,
    parse_history,
)


@dataclass
class _Sentinel:
    props: dict[str, Any]
    has: set[NodeId] = field(default_factory=set)


class MemoryGraphStore:
    def __init__(self) -> None:
        self.nodes: dict[NodeId, dict[str, Any]] = {}
        self._queues: dict[str, dict[str, Any]] = {}  # includes "node_id": the EMITS edge
        self.node_refs: dict[str, set[NodeId]] = {}  # strategy → nodes it USES
        self.queue_refs: dict[str, set[str]] = {}  # strategy → queues it USES
        self.sentinels: dict[tuple[str, str], _Sentinel] = {}
        self.contexts: dict[str, dict[str, str]] = {}
        self.fingerprints: dict[str, str] = {}
        self.schema_ready = False

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
        by_node: dict[NodeId, list[QueueRecord]] = {}
        for q in self._queues.values():
            by_node.setdefault(q["node_id"], []).append(QueueRecord(q["topic"], q["compute_key"]))
        for nid in node_ids:
            n = self.nodes.get(nid)
            if n is not None:
                records[nid] = NodeRecord(
                    nid, n["schema_hash"], n["schema_compat_id"], tuple(by_node.get(nid, ()))
                )
        owners = {t: self._queues[t]["node_id"] for t in topics if t in self._queues}
        return GraphRead(records, owners, self.fingerprints.get(strategy_id))

    async def apply(
        self, plan: Plan, now: float, sentinel: SentinelWrite | None
    ) -> tuple[str, ...]:
        r = graph_rows.rows(plan, now)
        created = {row["topic"] for row in r.queues}
        gone = [
            x["topic"]
            for x in r.refs
            if x["topic"] not in created and x["topic"] not in self._queues
        ]
        if gone:
            raise QueueGone(gone)
        claimed: list[str] = []  # referenced queues a GC run had claimed: released
        for x in r.refs:
            q = self._queues.get(x["topic"])
            if q is not None and q.pop("gc_claim", None) is not None:
                claimed.append(x["topic"])
        for row in r.nodes:
            n = self.nodes.get(row["node_id"])
            if n is None:
                n = {k: v for k, v in row.items() if k not in ("compute_key", "buffer")}
                n["compute_keys"] = []
                self.nodes[row["node_id"]] = n
            if row["compute_key"] not in n["compute_keys"]:
                n["compute_keys"] = [*n["compute_keys"], row["compute_key"]]
            if row["buffer"]:
                n["schema_hash"] = row["schema_hash"]
                n["buffering_since"] = now
        for row in r.queues:
            self._queues.setdefault(row["topic"], {**row, "managed": True})
        self.contexts[r.strategy_id] = dict(r.context)
        self.fingerprints[r.strategy_id] = r.fingerprint
        self.node_refs[r.strategy_id] = {ref["node_id"] for ref in r.refs}
        self.queue_refs[r.strategy_id] = {ref["topic"] for ref in r.refs}
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
        return tuple(claimed)

    async def release(self, strategy_id: str) -> int:
        self.contexts.pop(strategy_id, None)
        self.fingerprints.pop(strategy_id, None)
        dropped = len(self.node_refs.pop(strategy_id, set()))
        dropped += len(self.queue_refs.pop(strategy_id, set()))
        return dropped

    async def queues_by_tags(
        self, tags: Sequence[str], interval: int, match_mode: str
    ) -> list[QueueRef]:
        return (await self.queues_by_tag_queries([TagQuery(tuple(tags), interval, match_mode)]))[0]

    async def queues_by_tag_queries(self, queries: Sequence[TagQuery]) -> list[list[QueueRef]]:
        candidates = [
            TaggedQueue(q["base"], bool(q["is_global"]), node["interval"], frozenset(node["tags"]))
            for q in self._queues.values()
            if (node := self.nodes.get(q["node_id"])) is not None
        ]
        return [[QueueRef(t, g) for t, g in hit] for hit in tag_match.select(queries, candidates)]

    def _ref_count(self, topic: str) -> int:
        return sum(1 for refs in self.queue_refs.values() if topic in refs)

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
                )
            )
        return out

    async def forget_queue(self, topic: str) -> Forgot:
        if topic not in self._queues:
            return Forgot.ABSENT
        if self._ref_count(topic) == 0:
            del self._queues[topic]
            return Forgot.DROPPED
        self._queues[topic].pop("gc_claim", None)
        return Forgot.REFERENCED

    async def claim_queue(self, topic: str, run: str, now: float, stale_after: float) -> bool:
        q = self._queues.get(topic)
        if q is None or self._ref_count(topic) > 0:
            return False
        claim = q.get("gc_claim")
        if claim is not None and claim[0] != run and now - claim[1] < stale_after:
            return False
        q["gc_claim"] = (run, now)
        return True

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

    async def close(self) -> None:
        return None
