"""The Neo4j graph store: every Cypher statement of the product lives in this module.

Model: (:ComputeNode)-[:EMITS]->(:Queue); (:ComputeNode|:Queue)-[:USED_BY]->(:Strategy) for
exact reference counts; (:VersionSentinel)-[:HAS]->(:ComputeNode). Reads of a DAG take one
query; a plan is written in one managed (retried) transaction of batched UNWIND … MERGE.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import neo4j
import orjson
from neo4j import exceptions as neo4j_errors

from qmtl_dagmanager.adapters import graph_rows
from qmtl_dagmanager.core import tag_match
from qmtl_dagmanager.core.errors import Conflict, InvalidSpec, QueueGone, Unavailable
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

log = logging.getLogger(__name__)
T = TypeVar("T")

CONSTRAINTS = {
    "compute_node_id": "FOR (n:ComputeNode) REQUIRE n.node_id IS UNIQUE",
    "queue_topic": "FOR (q:Queue) REQUIRE q.topic IS UNIQUE",
    "version_sentinel_key": "FOR (s:VersionSentinel) REQUIRE (s.sentinel_id, s.version) IS UNIQUE",
    "strategy_id": "FOR (s:Strategy) REQUIRE s.strategy_id IS UNIQUE",
    "artifact_path": "FOR (a:Artifact) REQUIRE a.path IS UNIQUE",
}
INDEXES = {
    "compute_node_tags": "FOR (n:ComputeNode) ON (n.tags)",
    "compute_node_buffering_since": "FOR (n:ComputeNode) ON (n.buffering_since)",
    "queue_interval": "FOR (q:Queue) ON (q.interval)",
}

READ = """
CALL () {
  UNWIND $ids AS id
  MATCH (n:ComputeNode {node_id: id})
  OPTIONAL MATCH (n)-[:EMITS]->(q:Queue)
  WITH n, collect([q.topic, q.compute_key]) AS qs
  RETURN collect([n.node_id, n.schema_hash, n.schema_compat_id, qs]) AS nodes
}
CALL () {
  UNWIND $topics AS t
  MATCH (o:ComputeNode)-[:EMITS]->(:Queue {topic: t})
  RETURN collect([t, o.node_id]) AS owners
}
CALL () {
  OPTIONAL MATCH (s:Strategy {strategy_id: $sid})
  RETURN s.fingerprint AS fingerprint
}
RETURN nodes, owners, fingerprint
"""

MERGE_NODES = """
UNWIND $rows AS r
MERGE (n:ComputeNode {node_id: r.node_id})
ON CREATE SET n.node_type = r.node_type, n.interval = r.interval, n.period = r.period,
  n.code_hash = r.code_hash, n.schema_compat_id = r.schema_compat_id,
  n.schema_hash = r.schema_hash, n.params_canon = r.params_canon, n.tags = r.tags,
  n.query_tags = r.query_tags, n.created_at = r.created_at, n.owner = r.owner,
  n.compute_keys = [r.compute_key]
WITH n, r
WHERE NOT r.compute_key IN n.compute_keys OR (r.buffer AND n.schema_hash <> r.schema_hash)
SET n.compute_keys = CASE WHEN r.compute_key IN n.compute_keys THEN n.compute_keys
                          ELSE n.compute_keys + r.compute_key END
FOREACH (_ IN CASE WHEN r.buffer AND n.schema_hash <> r.schema_hash THEN [1] ELSE [] END |
  SET n.schema_hash = r.schema_hash, n.buffering_since = r.created_at)
"""

MERGE_QUEUES = """
UNWIND $rows AS r
MATCH (n:ComputeNode {node_id: r.node_id})
MERGE (q:Queue {topic: r.props.topic})
ON CREATE SET q += r.props, q.managed = true
MERGE (n)-[:EMITS]->(q)
WITH q
MATCH (o:ComputeNode)-[:EMITS]->(q)
WITH q, count(o) AS owners
WHERE owners > 1
RETURN collect(q.topic) AS shared
"""

SET_REFS = """
MERGE (s:Strategy {strategy_id: $sid})
WITH s
CALL (s) {
  WITH s WHERE s.fingerprint IS NULL OR s.fingerprint <> $fingerprint
  SET s.context = $context, s.fingerprint = $fingerprint
}
WITH s
OPTIONAL MATCH (x)-[u:USED_BY]->(s)
WHERE NOT ((x:ComputeNode AND x.node_id IN $node_ids) OR (x:Queue AND x.topic IN $topics))
DELETE u
WITH DISTINCT s
UNWIND $refs AS r
MATCH (n:ComputeNode {node_id: r.node_id})
MATCH (q:Queue {topic: r.topic})
MERGE (n)-[:USED_BY]->(s)
MERGE (q)-[:USED_BY]->(s)
"""

# After SET_REFS in the same transaction (its new USED_BY edges hold the queues' locks, so a
# GC claim committed meanwhile is seen): referenced queues that are gone or claimed by GC.
CHECK_REFS = """
UNWIND $topics AS t
OPTIONAL MATCH (q:Queue {topic: t})
WITH t, q WHERE q IS NULL OR q.gc_claim IS NOT NULL
FOREACH (_ IN CASE WHEN q IS NULL THEN [] ELSE [1] END | REMOVE q.gc_claim, q.gc_claim_at)
RETURN t AS topic, q IS NULL AS gone
"""

MERGE_SENTINEL = """
MERGE (v:VersionSentinel {sentinel_id: $sid, version: $version})
ON CREATE SET v.created_at = $now, v.commit_hash = $commit_hash, v.release_tag = $release_tag,
  v.traffic_weight = $weight, v.weight_history = []
WITH v
UNWIND $ids AS id
MATCH (n:ComputeNode {node_id: id})
MERGE (v)-[:HAS]->(n)
"""

LINK_SENTINEL = """
MERGE (v:VersionSentinel {sentinel_id: $sid, version: $version})
ON CREATE SET v.created_at = $now, v.weight_history = [], v.commit_hash = '', v.release_tag = ''
SET v.commit_hash = CASE $commit_hash WHEN '' THEN v.commit_hash ELSE $commit_hash END,
    v.release_tag = CASE $release_tag WHEN '' THEN v.release_tag ELSE $release_tag END
WITH v
UNWIND $ids AS id
MATCH (n:ComputeNode {node_id: id})
MERGE (v)-[:HAS]->(n)
"""

SENTINEL = """
MATCH (v:VersionSentinel {sentinel_id: $sid, version: $version})
RETURN v {.*} AS v, COUNT { (v)-[:HAS]->() } AS has
"""

RELEASE = """
MATCH (s:Strategy {strategy_id: $sid})
OPTIONAL MATCH ()-[u:USED_BY]->(s)
WITH s, collect(u) AS us
FOREACH (x IN us | DELETE x)
DETACH DELETE s
RETURN size(us) AS dropped
"""

BY_TAGS = """
MATCH (q:Queue) WHERE q.interval IN $intervals
MATCH (n:ComputeNode)-[:EMITS]->(q)
WHERE any(t IN $tags WHERE t IN n.tags)
RETURN q.base AS topic, q.is_global AS is_global, q.interval AS interval, n.tags AS tags
"""

QUEUES = """
MATCH (q:Queue) WHERE $topics IS NULL OR q.topic IN $topics
OPTIONAL MATCH (n:ComputeNode)-[:EMITS]->(q)
RETURN q {.*} AS q, n.node_id AS node_id, n.tags AS tags,
       COUNT { (q)-[:USED_BY]->() } AS refs
ORDER BY q.topic
"""

# The first SET takes the node's write lock, so what follows reads what a concurrent claim or
# forget committed: exactly one run wins, and a queue deleted meanwhile (the index no longer
# finds it) is not claimed.
CLAIM_QUEUE = """
MATCH (q:Queue {topic: $topic})
SET q.gc_lock = true
WITH q
OPTIONAL MATCH (current:Queue {topic: $topic})
WITH q, current
REMOVE q.gc_lock
WITH q, current
WHERE current IS NOT NULL AND elementId(current) = elementId(q)
  AND NOT (q)-[:USED_BY]->()
  AND (q.gc_claim IS NULL OR q.gc_claim = $run OR q.gc_claim_at <= $stale)
SET q.gc_claim = $run, q.gc_claim_at = $now
RETURN q.topic AS topic
"""

# The lock first (as in CLAIM_QUEUE): a diff referencing the queue concurrently either
# commits before (the queue stays, its claim released) or sees it gone (and plans again).
FORGET_QUEUE = """
MATCH (q:Queue {topic: $topic})
SET q.gc_lock = true
WITH q, COUNT { (q)-[:USED_BY]->() } AS refs
REMOVE q.gc_lock
FOREACH (_ IN CASE WHEN refs > 0 THEN [1] ELSE [] END | REMOVE q.gc_claim, q.gc_claim_at)
FOREACH (_ IN CASE WHEN refs = 0 THEN [1] ELSE [] END | DETACH DELETE q)
RETURN refs = 0 AS forgotten
"""

SET_WEIGHT = """
MERGE (v:VersionSentinel {sentinel_id: $sid, version: $version})
ON CREATE SET v.created_at = $now, v.commit_hash = '', v.release_tag = '', v.weight_history = []
WITH v
WHERE v.traffic_weight IS NULL OR v.traffic_weight <> $weight
SET v.traffic_weight = $weight,
    v.weight_history = coalesce(v.weight_history, []) + ($now + ':' + $weight)
"""

COUNTS = """
CALL () { MATCH (n:ComputeNode) RETURN count(n) AS nodes }
CALL () { MATCH (q:Queue) RETURN count(q) AS queues }
CALL () { MATCH (v:VersionSentinel) RETURN count(v) AS sentinels }
CALL () { MATCH (s:Strategy) WHERE EXISTS { ()-[:USED_BY]->(s) } RETURN count(s) AS strategies }
CALL () { MATCH ()-[r:EMITS|USED_BY|HAS]->() RETURN count(r) AS rels }
RETURN nodes, queues, sentinels, strategies, rels
"""


class Neo4jGraphStore:
    def __init__(
        self,
        uri: str,
        user: str,
        password: str,
        *,
        database: str = "neo4j",
        connect_timeout: float = 5.0,
        max_retry_time: float = 10.0,
    ) -> None:
        self._db = database
        self._driver = neo4j.AsyncGraphDatabase.driver(
            uri,
            auth=(user, password),
            connection_timeout=connect_timeout,
            connection_acquisition_timeout=connect_timeout,
            max_transaction_retry_time=max_retry_time,
            notifications_min_severity=neo4j.NotificationMinimumSeverity.WARNING,
            # an empty graph has no EMITS or compute_key yet: not worth a warning per query
            notifications_disabled_classifications=[
                neo4j.NotificationDisabledClassification.UNRECOGNIZED
            ],
        )

    # -- error mapping: the one place driver errors become typed errors -----------------

    async def _call(self, what: str, fn: Callable[[], Awaitable[T]]) -> T:
        try:
            return await fn()
        except neo4j_errors.AuthError as e:
            raise Unavailable(
                f"Neo4j refused the credentials ({what}): {e.message}",
                reason="Neo4jAuthFailed",
                retry_after=30.0,
            ) from e
        except (neo4j_errors.ServiceUnavailable, neo4j_errors.SessionExpired, OSError) as e:
            raise Unavailable(
                f"Neo4j is unreachable ({what}): {e}", reason="Neo4jUnavailable"
            ) from e
        except neo4j_errors.TransientError as e:
            raise Unavailable(
                f"Neo4j transient failure ({what}): {e.message}",
                reason="Neo4jTransient",
                retry_after=1.0,
            ) from e
        except neo4j_errors.ConstraintError as e:
            raise Conflict(f"graph constraint violated ({what}): {e.message}") from e
        except neo4j_errors.ClientError as e:
            raise InvalidSpec(f"Neo4j rejected {what}: {e.message}", reason="GraphRejected") from e

    async def _write(
        self, what: str, tx_fn: Callable[[neo4j.AsyncManagedTransaction], Awaitable[T]]
    ) -> T:
        async def run() -> T:
            async with self._driver.session(database=self._db) as session:
                return await session.execute_write(tx_fn)

        return await self._call(what, run)

    async def _read(self, what: str, query: str, **params: Any) -> list[neo4j.Record]:
        async def run() -> list[neo4j.Record]:
            records, _, _ = await self._driver.execute_query(
                query, params, database_=self._db, routing_=neo4j.RoutingControl.READ
            )
            return records

        return await self._call(what, run)

    # -- port ----------------------------------------------------------------------------

    async def ping(self) -> bool:
        try:
            rows = await self._read("ping", "RETURN 1 AS one")
        except Unavailable:
            return False
        return bool(rows) and rows[0]["one"] == 1

    def schema_statements(self) -> list[str]:
        return [
            f"CREATE CONSTRAINT {name} IF NOT EXISTS {body}" for name, body in CONSTRAINTS.items()
        ] + [f"CREATE INDEX {name} IF NOT EXISTS {body}" for name, body in INDEXES.items()]

    async def init_schema(self) -> None:
        for stmt in self.schema_statements():
            await self._call(
                "schema init",
                lambda s=stmt: self._driver.execute_query(  # type: ignore[misc]
                    s, database_=self._db
                ),
            )
        log.info("neo4j schema ready: %d constraints, %d indexes", len(CONSTRAINTS), len(INDEXES))

    async def rollback_schema(self) -> None:
        stmts = [f"DROP CONSTRAINT {n} IF EXISTS" for n in CONSTRAINTS] + [
            f"DROP INDEX {n} IF EXISTS" for n in INDEXES
        ]
        for stmt in stmts:
            await self._call(
                "schema rollback",
                lambda s=stmt: self._driver.execute_query(  # type: ignore[misc]
                    s, database_=self._db
                ),
            )
        log.info("neo4j schema rolled back")

    async def read(
        self, node_ids: Sequence[NodeId], topics: Sequence[str], strategy_id: str = ""
    ) -> GraphRead:
        rows = await self._read(
            "read",
            READ,
            ids=list(node_ids),
            topics=list(topics),
            sid=strategy_id,
        )
        records: dict[NodeId, NodeRecord] = {}
        for nid, schema_hash, compat, queues in rows[0]["nodes"]:
            records[nid] = NodeRecord(
                nid,
                schema_hash,
                compat,
                tuple(QueueRecord(t, ck) for t, ck in queues if t is not None),
            )
        owners = {t: NodeId(o) for t, o in rows[0]["owners"]}
        return GraphRead(records, owners, rows[0]["fingerprint"])

    async def apply(
        self, plan: Plan, now: float, sentinel: SentinelWrite | None
    ) -> tuple[str, ...]:
        r = graph_rows.rows(plan, now)
        queue_rows = [
            {"node_id": q["node_id"], "props": {k: v for k, v in q.items() if k != "node_id"}}
            for q in r.queues
        ]

        topics = [x["topic"] for x in r.refs]

        async def tx(t: neo4j.AsyncManagedTransaction) -> tuple[str, ...]:
            await (await t.run(MERGE_NODES, rows=r.nodes)).consume()
            res = await t.run(MERGE_QUEUES, rows=queue_rows)
            shared = [rec["shared"] async for rec in res]
            if shared and shared[0]:
                raise Conflict(f"queues already emitted by another node: {shared[0][:5]}")
            await (
                await t.run(
                    SET_REFS,
                    sid=r.strategy_id,
                    context=orjson.dumps(r.context, option=orjson.OPT_SORT_KEYS).decode(),
                    fingerprint=r.fingerprint,
                    refs=r.refs,
                    node_ids=[x["node_id"] for x in r.refs],
                    topics=topics,
                )
            ).consume()
            checked = [
                (rec["topic"], rec["gone"]) async for rec in await t.run(CHECK_REFS, topics=topics)
            ]
            gone = [topic for topic, g in checked if g]
            if gone:
                raise QueueGone(gone)  # the transaction rolls back: nothing written
            if sentinel is not None:
                await (
                    await t.run(
                        MERGE_SENTINEL,
                        sid=sentinel.sentinel_id,
                        version=sentinel.version,
                        now=now,
                        commit_hash=sentinel.commit_hash,
                        release_tag=sentinel.release_tag,
                        weight=sentinel.traffic_weight,
                        ids=list(sentinel.node_ids),
                    )
                ).consume()
            return tuple(topic for topic, _ in checked)

        return await self._write("plan write", tx)

    async def release(self, strategy_id: str) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            rec = await (await t.run(RELEASE, sid=strategy_id)).single()
            return int(rec["dropped"]) if rec else 0

        return await self._write("release", tx)

    async def queues_by_tags(
        self, tags: Sequence[str], interval: int, match_mode: str
    ) -> list[QueueRef]:
        return (await self.queues_by_tag_queries([TagQuery(tuple(tags), interval, match_mode)]))[0]

    async def queues_by_tag_queries(self, queries: Sequence[TagQuery]) -> list[list[QueueRef]]:
        """One read of every queue any query could select (each once), matched in Python."""
        tags = sorted({t for q in queries for t in q.tags})
        if not tags:
            return [[] for _ in queries]
        rows = await self._read(
            "tag query",
            BY_TAGS,
            intervals=sorted({q.interval for q in queries}),
            tags=tags,
        )
        candidates = [
            TaggedQueue(
                r["topic"], bool(r["is_global"]), int(r["interval"]), frozenset(r["tags"] or ())
            )
            for r in rows
        ]
        return [[QueueRef(t, g) for t, g in hit] for hit in tag_match.select(queries, candidates)]

    async def queues(self, topics: Sequence[str] | None = None) -> list[QueueDetail]:
        rows = await self._read(
            "queue listing", QUEUES, topics=None if topics is None else list(topics)
        )
        out = []
        for row in rows:
            q = row["q"]
            out.append(
                QueueDetail(
                    topic=q["topic"],
                    node_id=row["node_id"],
                    tag=q.get("tag", ""),
                    interval=int(q.get("interval") or 0),
                    created_at=float(q.get("created_at") or 0),
                    ref_count=int(row["refs"]),
                    managed=bool(q.get("managed", True)),
                    compute_key=q.get("compute_key", ""),
                    partitions=int(q.get("partitions") or 0),
                    replication=int(q.get("replication") or 0),
                    retention_ms=int(q.get("retention_ms") or 0),
                    tags=tuple(row["tags"] or ()),
                )
            )
        return out

    async def forget_queue(self, topic: str) -> Forgot:
        async def tx(t: neo4j.AsyncManagedTransaction) -> Forgot:
            row = await (await t.run(FORGET_QUEUE, topic=topic)).single()
            if row is None:
                return Forgot.ABSENT
            return Forgot.DROPPED if row["forgotten"] else Forgot.REFERENCED

        return await self._write("forget queue", tx)

    async def claim_queue(self, topic: str, run: str, now: float, stale_after: float) -> bool:
        async def tx(t: neo4j.AsyncManagedTransaction) -> bool:
            result = await t.run(
                CLAIM_QUEUE, topic=topic, run=run, now=now, stale=now - stale_after
            )
            return await result.single() is not None

        return await self._write("gc claim", tx)

    async def set_unmanaged(self, topics: Sequence[str]) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (
                await t.run(
                    "UNWIND $topics AS t MATCH (q:Queue {topic: t}) SET q.managed = false",
                    topics=list(topics),
                )
            ).consume()

        await self._write("mark unmanaged", tx)

    async def set_sentinel_weight(
        self, sentinel_id: str, version: str, weight: float, now: float
    ) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (
                await t.run(SET_WEIGHT, sid=sentinel_id, version=version, weight=weight, now=now)
            ).consume()

        await self._write("sentinel weight", tx)

    async def link_sentinel(self, sentinel: SentinelWrite, now: float) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (
                await t.run(
                    LINK_SENTINEL,
                    sid=sentinel.sentinel_id,
                    version=sentinel.version,
                    now=now,
                    commit_hash=sentinel.commit_hash,
                    release_tag=sentinel.release_tag,
                    ids=list(sentinel.node_ids),
                )
            ).consume()

        await self._write("sentinel link", tx)

    async def sentinel(self, sentinel_id: str, version: str) -> SentinelRecord | None:
        rows = await self._read("sentinel", SENTINEL, sid=sentinel_id, version=version)
        if not rows:
            return None
        v, w = rows[0]["v"], rows[0]["v"].get("traffic_weight")
        return SentinelRecord(
            sentinel_id,
            version,
            None if w is None else float(w),
            parse_history(v.get("weight_history")),
            str(v.get("commit_hash") or ""),
            str(v.get("release_tag") or ""),
            int(rows[0]["has"]),
        )

    async def sentinel_weights(self, sentinel_id: str) -> dict[str, float]:
        rows = await self._read(
            "sentinel weights",
            "MATCH (v:VersionSentinel {sentinel_id: $sid}) WHERE v.traffic_weight IS NOT NULL "
            "RETURN v.version AS version, v.traffic_weight AS weight",
            sid=sentinel_id,
        )
        return {r["version"]: float(r["weight"]) for r in rows}

    async def strategy_nodes(self, strategy_id: str) -> set[NodeId]:
        rows = await self._read(
            "strategy nodes",
            "MATCH (n:ComputeNode)-[:USED_BY]->(:Strategy {strategy_id: $sid}) "
            "RETURN n.node_id AS id",
            sid=strategy_id,
        )
        return {NodeId(r["id"]) for r in rows}

    async def strategy_context(self, strategy_id: str) -> dict[str, str] | None:
        rows = await self._read(
            "strategy context",
            "MATCH (s:Strategy {strategy_id: $sid}) RETURN s.context AS context",
            sid=strategy_id,
        )
        if not rows or not rows[0]["context"]:
            return None
        ctx = orjson.loads(rows[0]["context"])
        return {str(k): str(v) for k, v in ctx.items()} if isinstance(ctx, dict) else None

    async def counts(self) -> GraphCounts:
        row = (await self._read("counts", COUNTS))[0]
        return GraphCounts(
            row["nodes"], row["queues"], row["sentinels"], row["strategies"], row["rels"]
        )

    async def close(self) -> None:
        await self._driver.close()
