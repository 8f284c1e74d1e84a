"""The Neo4j graph store: every Cypher statement of the product lives in this module.

Model: (:ComputeNode)-[:EMITS]->(:Queue); (:ComputeNode|:Queue)-[:USED_BY]->(:Strategy) for
exact reference counts; (:VersionSentinel)-[:HAS]->(:ComputeNode). Reads of a DAG take one
query; a plan is written in one managed (retried) transaction of batched UNWIND … MERGE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import weakref
import zlib
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import neo4j
import orjson
from neo4j import exceptions as neo4j_errors

from qmtl_dagmanager.adapters import graph_rows
from qmtl_dagmanager.core.errors import (
    Conflict,
    InvalidSpec,
    QueueBusy,
    QueueGone,
    StaleRead,
    Unavailable,
)
from qmtl_dagmanager.core.gc import retired_key
from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import NodeRecord, Plan, QueryGroup, QueueRecord, Request
from qmtl_dagmanager.core.tag_match import TagQuery
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

log = logging.getLogger(__name__)
# what a concurrent creator of the same index or constraint makes our statement fail with
SCHEMA_RACE_CODES = frozenset(
    {
        "Neo.ClientError.Schema.EquivalentSchemaRuleAlreadyExists",
        "Neo.ClientError.Schema.IndexAlreadyExists",
        "Neo.ClientError.Schema.ConstraintAlreadyExists",
    }
)
T = TypeVar("T")

CONSTRAINTS = {
    "compute_node_id": "FOR (n:ComputeNode) REQUIRE n.node_id IS UNIQUE",
    "queue_topic": "FOR (q:Queue) REQUIRE q.topic IS UNIQUE",
    "version_sentinel_key": "FOR (s:VersionSentinel) REQUIRE (s.sentinel_id, s.version) IS UNIQUE",
    "strategy_id": "FOR (s:Strategy) REQUIRE s.strategy_id IS UNIQUE",
    "artifact_path": "FOR (a:Artifact) REQUIRE a.path IS UNIQUE",
    # one queue per (node, compute key): `slot` is "<node_id>|<compute_key>"
    "queue_slot": "FOR (q:Queue) REQUIRE q.slot IS UNIQUE",
    "topic_intent": "FOR (i:TopicIntent) REQUIRE i.topic IS UNIQUE",
    "queue_event_claim_key": "FOR (c:QueueEventClaim) REQUIRE c.key IS UNIQUE",
    "pending_diff_key": "FOR (j:PendingDiff) REQUIRE j.key IS UNIQUE",
}
INDEXES = {
    "compute_node_tags": "FOR (n:ComputeNode) ON (n.tags)",
    "compute_node_buffering_since": "FOR (n:ComputeNode) ON (n.buffering_since)",
    "compute_node_created_at": "FOR (n:ComputeNode) ON (n.created_at)",
    "queue_interval": "FOR (q:Queue) ON (q.interval)",
    "topic_intent_at": "FOR (i:TopicIntent) ON (i.at)",
    "topic_intent_deleted_at": "FOR (i:TopicIntent) ON (i.deleted_at)",
    "queue_event_mark_key": "FOR (m:QueueEventMark) ON (m.key)",
    "pending_diff_strategy": "FOR (j:PendingDiff) ON (j.strategy_id)",
    "pending_diff_at": "FOR (j:PendingDiff) ON (j.at)",
    "cross_context_hit_at": "FOR (h:CrossContextHit) ON (h.at)",
}

# Graphs written before queues had a `slot`: give each (node, compute key) one queue (the most
# referenced, then the oldest); any other queue of the same pair is marked superseded (its own
# slot), so plans stop choosing it and GC collects it once nothing references it.
MIGRATE_SLOTS = """
MATCH (n:ComputeNode)-[:EMITS]->(q:Queue) WHERE q.slot IS NULL
WITH n.node_id + '|' + coalesce(q.compute_key, '') AS slot, q,
     COUNT { (q)-[:USED_BY]->() } AS refs
ORDER BY refs DESC, q.created_at ASC, q.topic ASC
WITH slot, collect(q) AS qs
OPTIONAL MATCH (held:Queue {slot: slot})
WITH slot, qs, held IS NOT NULL AS taken
UNWIND range(0, size(qs) - 1) AS i
WITH slot, qs[i] AS q, (i > 0 OR taken) AS dup
SET q.slot = CASE WHEN dup THEN slot + '|superseded:' + q.topic ELSE slot END,
    q.superseded = CASE WHEN dup THEN true ELSE null END
RETURN count(q) AS migrated, sum(CASE WHEN dup THEN 1 ELSE 0 END) AS superseded
"""

READ = """
CALL () {
  UNWIND $ids AS id
  MATCH (n:ComputeNode {node_id: id})
  OPTIONAL MATCH (n)-[:EMITS]->(q:Queue) WHERE q.superseded IS NULL
  WITH n, collect([q.topic, q.compute_key]) AS qs
  RETURN collect([n.node_id, n.schema_hash, n.schema_compat_id, qs, n.buffering_since,
                  coalesce(n.recompute, 0)]) AS nodes
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
FOREACH (_ IN CASE WHEN r.recompute > coalesce(n.recompute, 0) THEN [1] ELSE [] END |
  SET n.recompute = r.recompute, n.schema_hash = r.schema_hash REMOVE n.buffering_since)
"""

# A created queue's name must be free or already this (node, compute key)'s queue; the slot
# constraint refuses a second queue for one pair. Returns names some other pair holds.
MERGE_QUEUES = """
UNWIND $rows AS r
MATCH (n:ComputeNode {node_id: r.node_id})
MERGE (q:Queue {topic: r.props.topic})
ON CREATE SET q += r.props, q.managed = true
WITH n, q, r
CALL (n, q, r) {
  WITH n, q, r WHERE q.slot = r.props.slot
  MERGE (n)-[:EMITS]->(q)
}
WITH q, r WHERE q.slot IS NULL OR q.slot <> r.props.slot
RETURN collect(q.topic) AS foreign
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
WITH s, collect(DISTINCT CASE WHEN x:Queue THEN x END) AS dropped
CALL (dropped) {
  UNWIND dropped AS q
  WITH q WHERE NOT (q)-[:USED_BY]->()
  SET q.orphaned_at = $now
}
WITH s
UNWIND $refs AS r
MATCH (n:ComputeNode {node_id: r.node_id})
MATCH (q:Queue {topic: r.topic})
MERGE (n)-[:USED_BY]->(s)
MERGE (q)-[:USED_BY]->(s)
REMOVE q.orphaned_at
"""

# After SET_REFS in the same transaction (its new USED_BY edges hold the queues' locks, so a
# GC claim or deletion mark committed meanwhile is seen): each referenced queue must still be
# the plan's (node, compute key) queue and not being deleted. A claim is released (its run
# will not delete the topic); a deletion mark older than $cutoff was left by a dead run.
CHECK_REFS = """
UNWIND $refs AS r
OPTIONAL MATCH (q:Queue {topic: r.topic})
WITH r, q,
  CASE WHEN q IS NULL THEN 'gone'
       WHEN q.slot IS NULL OR q.slot <> r.slot THEN 'stale'
       WHEN q.gc_deleting_at IS NOT NULL AND q.gc_deleting_at > $cutoff THEN 'busy'
       WHEN q.gc_claim IS NOT NULL THEN 'reclaim'
       ELSE 'ok' END AS state
FOREACH (_ IN CASE WHEN state = 'reclaim' THEN [1] ELSE [] END |
  REMOVE q.gc_claim, q.gc_claim_at, q.gc_deleting_at)
WITH r, state WHERE state <> 'ok'
RETURN r.topic AS topic, r.node_id AS node_id, state
"""

# The intents of the names this write creates are settled, unless a live sweep is deleting
# one of those names right now, or a sweep deleted its topic since this diff recorded the
# intent (its generation moved on; c.gen is null when the caller recorded none): the write
# is then refused (busy).
SETTLE_INTENTS = """
UNWIND $created AS c
MATCH (i:TopicIntent {topic: c.topic})
SET i.lock = true
WITH i, c
REMOVE i.lock
WITH i, c, (i.sweep IS NOT NULL AND i.sweep_at > $cutoff)
  OR (c.gen IS NOT NULL AND coalesce(i.gen, 0) <> c.gen) AS busy
FOREACH (_ IN CASE WHEN busy THEN [] ELSE [1] END | DELETE i)
WITH c, busy WHERE busy
RETURN collect(c.topic) AS busy
"""

RECORD_INTENTS = """
UNWIND $topics AS t
MERGE (i:TopicIntent {topic: t})
ON CREATE SET i.at = $now, i.owner = $owner, i.gen = 0
SET i.lock = true
WITH i, t
REMOVE i.lock
WITH i, t, (i.sweep IS NOT NULL AND i.sweep_at > $cutoff) AS busy
FOREACH (_ IN CASE WHEN busy THEN [] ELSE [1] END |
  SET i.at = $now, i.owner = $owner, i.gen = coalesce(i.gen, 0)
  REMOVE i.sweep, i.sweep_at, i.deleted_at)
RETURN t AS topic, busy, i.gen AS gen
"""

# The journal of diffs answered before their graph write (see `record_intents`). A newer
# submission of the strategy replaces an older entry: the last submission is the one to finish.
JOURNAL = """
OPTIONAL MATCH (old:PendingDiff {strategy_id: $sid}) WHERE old.key <> $key
DELETE old
WITH count(*) AS _
MERGE (j:PendingDiff {key: $key})
SET j.strategy_id = $sid, j.request = $request, j.dag = $dag, j.ids = $ids, j.at = $now,
    j.owner = $owner, j.replays = coalesce(j.replays, 0)
"""

PENDING_DIFFS = """
MATCH (j:PendingDiff) WHERE j.at <= $before
RETURN j.key AS key, j.request AS request, j.dag AS dag, j.ids AS ids, j.at AS at,
       j.owner AS owner, j.replays AS replays
ORDER BY j.at LIMIT $limit
"""

CLAIM_PENDING_DIFF = """
MATCH (j:PendingDiff {key: $key}) WHERE j.at <= $before
SET j.at = $now, j.replays = coalesce(j.replays, 0) + 1
RETURN count(j) AS claimed
"""

DROP_PENDING_DIFF = "MATCH (j:PendingDiff {key: $key}) DELETE j"

STALE_INTENTS = """
MATCH (i:TopicIntent) WHERE i.at <= $before AND i.deleted_at IS NULL
RETURN i.topic AS topic ORDER BY i.at LIMIT $limit
"""

RECORD_ATTEMPTS = 5

PURGE_TOMBSTONES = """
MATCH (i:TopicIntent) WHERE i.deleted_at <= $before
DELETE i
RETURN count(*) AS purged
"""

# Lock, then re-find (as in CLAIM_QUEUE): a write that settled the intent meanwhile wins.
CLAIM_INTENT = """
MATCH (i:TopicIntent {topic: $topic})
SET i.lock = true
WITH i
OPTIONAL MATCH (current:TopicIntent {topic: $topic})
WITH i, current
REMOVE i.lock
WITH i, current
WHERE current IS NOT NULL AND elementId(current) = elementId(i) AND i.at <= $before
  AND i.deleted_at IS NULL AND (i.sweep IS NULL OR i.sweep = $run OR i.sweep_at <= $cutoff)
OPTIONAL MATCH (q:Queue {topic: $topic})
WITH i, q IS NOT NULL AS owned
FOREACH (_ IN CASE WHEN owned THEN [1] ELSE [] END | DELETE i)
FOREACH (_ IN CASE WHEN owned THEN [] ELSE [1] END |
  SET i.sweep = $run, i.sweep_at = $now, i.gen = coalesce(i.gen, 0) + 1)
RETURN owned
"""

# The topic is deleted: a tombstone keeps the generation for diffs that recorded before.
DROP_INTENT = """
MATCH (i:TopicIntent {topic: $topic}) WHERE i.sweep = $run
SET i.deleted_at = $now
REMOVE i.sweep, i.sweep_at
"""

MARK_DELETING = """
MATCH (q:Queue {topic: $topic})
SET q.gc_lock = true
WITH q
OPTIONAL MATCH (current:Queue {topic: $topic})
WITH q, current
REMOVE q.gc_lock
WITH q WHERE current IS NOT NULL AND elementId(current) = elementId(q) AND q.gc_claim = $run
WITH q, EXISTS { (q)-[:USED_BY]->() } AS referenced
FOREACH (_ IN CASE WHEN referenced THEN [1] ELSE [] END | REMOVE q.gc_claim, q.gc_claim_at)
FOREACH (_ IN CASE WHEN referenced THEN [] ELSE [1] END | SET q.gc_deleting_at = $now)
RETURN NOT referenced AS marked
"""

# The QueueUpdated outbox. A write adds one mark per group it changed: a new node, so
# concurrent writers never wait on one another for it. Publishers take a group's claim node
# (the lock first, then the check: one live publisher per group) and remove exactly the marks
# they published; a mark added meanwhile keeps the group pending.
MARK_EVENTS = """
UNWIND $groups AS g
CREATE (:QueueEventMark {key: g.key, tags: g.tags, interval: g.interval,
  match_mode: g.match_mode, at: $now})
"""

# The marks are read again once the claim is held (the first read may include marks another
# publisher removed meanwhile); a claim that finds none is given back at once.
CLAIM_EVENTS = """
MATCH (m:QueueEventMark)
WITH m.key AS key, min(m.at) AS first
// a mark another publisher settled while this read ran reads as null: not ours to claim
WHERE key IS NOT NULL
ORDER BY first LIMIT $limit
MERGE (c:QueueEventClaim {key: key})
SET c.lock = true
WITH key, c
REMOVE c.lock
WITH key, c WHERE c.owner IS NULL OR c.owner = $owner OR c.at <= $stale
SET c.owner = $owner, c.at = $now
WITH key, c
OPTIONAL MATCH (m:QueueEventMark {key: key})
WITH c, collect(m) AS marks
FOREACH (_ IN CASE WHEN size(marks) = 0 THEN [1] ELSE [] END | REMOVE c.owner, c.at)
WITH marks WHERE size(marks) > 0
WITH marks, head(marks) AS m
RETURN m.tags AS tags, m.interval AS interval, m.match_mode AS match_mode,
  [x IN marks | elementId(x)] AS marks
"""

SETTLE_EVENTS = """
UNWIND $keys AS k
MATCH (c:QueueEventClaim {key: k}) WHERE c.owner = $owner
SET c.lock = true
WITH c
REMOVE c.lock, c.owner, c.at
WITH collect(c.key) AS mine
CALL (mine) {
  MATCH (m:QueueEventMark) WHERE elementId(m) IN $marks AND m.key IN mine
  DELETE m
}
UNWIND mine AS k
WITH k WHERE EXISTS { MATCH (:QueueEventMark {key: k}) }
RETURN count(k) AS pending
"""

RELEASE_EVENTS = """
UNWIND $keys AS k
MATCH (c:QueueEventClaim {key: k}) WHERE c.owner = $owner
REMOVE c.owner, c.at
"""

PENDING_EVENTS = "MATCH (m:QueueEventMark) RETURN count(DISTINCT m.key) AS n"

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
OPTIONAL MATCH (x)-[u:USED_BY]->(s)
WITH s, collect(u) AS us, collect(DISTINCT CASE WHEN x:Queue THEN x END) AS queues
FOREACH (x IN us | DELETE x)
DETACH DELETE s
WITH us, queues
CALL (queues) {
  UNWIND queues AS q
  WITH q WHERE NOT (q)-[:USED_BY]->()
  SET q.orphaned_at = $now
}
RETURN size(us) AS dropped
"""

MARK_ORPHANED = """
UNWIND $topics AS t
MATCH (q:Queue {topic: t})
WHERE q.orphaned_at IS NULL AND NOT (q)-[:USED_BY]->()
SET q.orphaned_at = $now
RETURN count(q) AS stamped
"""

# A version retired (or back): its sentinel node is marked, and the queues of its compute
# nodes that no other live version of the sentinel HAS get (or lose) the version's key.
RETIRE_VERSION = """
MATCH (v:VersionSentinel {sentinel_id: $sid, version: $version})
FOREACH (_ IN CASE WHEN $retired THEN [1] ELSE [] END | SET v.retired_at = $now)
FOREACH (_ IN CASE WHEN $retired THEN [] ELSE [1] END | REMOVE v.retired_at)
WITH v
MATCH (v)-[:HAS]->(n:ComputeNode)-[:EMITS]->(q:Queue)
WHERE NOT EXISTS {
  MATCH (o:VersionSentinel {sentinel_id: $sid})-[:HAS]->(n)
  WHERE o.version <> $version AND o.retired_at IS NULL
}
  AND CASE WHEN $retired THEN coalesce(q.retired, '') <> $key ELSE q.retired = $key END
FOREACH (_ IN CASE WHEN $retired THEN [1] ELSE [] END | SET q.retired = $key)
FOREACH (_ IN CASE WHEN $retired THEN [] ELSE [1] END | REMOVE q.retired)
RETURN collect(q.topic) AS topics
"""

# Compute nodes nothing needs any more: no queue, no strategy, no live sentinel version (one
# not retired that takes traffic).
COMPACTABLE = """
MATCH (n:ComputeNode) WHERE n.created_at < $before
  AND NOT (n)-[:EMITS]->() AND NOT (n)-[:USED_BY]->()
  AND NOT EXISTS { MATCH (v:VersionSentinel)-[:HAS]->(n)
                   WHERE v.retired_at IS NULL AND coalesce(v.traffic_weight, 0) > 0 }
RETURN n.node_id AS id ORDER BY n.created_at, n.node_id LIMIT $limit
"""

# The lock first (as in CLAIM_QUEUE): a diff writing one of these nodes concurrently either
# commits before (the node has a queue or a reference now and stays) or after (it MERGEs the
# node anew, with the properties its plan carries).
COMPACT = """
UNWIND $ids AS id
MATCH (n:ComputeNode {node_id: id})
SET n.compact_lock = true
WITH n
REMOVE n.compact_lock
WITH n WHERE n.created_at < $before
  AND NOT (n)-[:EMITS]->() AND NOT (n)-[:USED_BY]->()
  AND NOT EXISTS { MATCH (v:VersionSentinel)-[:HAS]->(n)
                   WHERE v.retired_at IS NULL AND coalesce(v.traffic_weight, 0) > 0 }
DETACH DELETE n
RETURN count(*) AS removed
"""

SET_KEEP = """
UNWIND $topics AS t
MATCH (q:Queue {topic: t})
WITH q, coalesce(q.keep_by, []) AS before
WITH q, before, CASE WHEN $keep
  THEN CASE WHEN $keeper IN before THEN before ELSE before + $keeper END
  ELSE [k IN before WHERE k <> $keeper] END AS after
WHERE size(after) <> size(before)
SET q.keep_by = after
RETURN count(q) AS changed
"""

# Matched in the query, one row per query with its (topic, global) pairs: reading one row per
# (queue, node) with the node's tags and matching in Python cost the process a Python object
# per row, tens of thousands for a common tag, decoded in the event loop.
BY_TAG_QUERIES = """
UNWIND range(0, size($queries) - 1) AS i
WITH i, $queries[i] AS tq
CALL (tq) {
  MATCH (q:Queue) WHERE q.interval = tq.interval
  MATCH (n:ComputeNode)-[:EMITS]->(q)
  WHERE CASE WHEN tq.all THEN all(t IN tq.tags WHERE t IN n.tags)
             ELSE any(t IN tq.tags WHERE t IN n.tags) END
  WITH q.base AS topic, max(coalesce(q.is_global, false)) AS is_global
  ORDER BY topic
  RETURN collect([topic, is_global]) AS hits
}
RETURN i, hits
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
  AND size(coalesce(q.keep_by, [])) = 0
  AND ($orphaned_by IS NULL OR q.orphaned_at <= $orphaned_by)
  AND (q.gc_claim IS NULL OR q.gc_claim = $run OR q.gc_claim_at <= $stale)
SET q.gc_claim = $run, q.gc_claim_at = $now
REMOVE q.gc_deleting_at
RETURN q.topic AS topic
"""

# The lock first (as in CLAIM_QUEUE): a diff referencing the queue concurrently either
# commits before (the queue stays, its claim released) or sees it gone (and plans again).
FORGET_QUEUE = """
MATCH (q:Queue {topic: $topic})
SET q.gc_lock = true
WITH q, COUNT { (q)-[:USED_BY]->() } AS refs
REMOVE q.gc_lock
FOREACH (_ IN CASE WHEN refs > 0 THEN [1] ELSE [] END |
  REMOVE q.gc_claim, q.gc_claim_at, q.gc_deleting_at)
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

RECORD_CROSS_CONTEXT = """
CREATE (:CrossContextHit {at: $now, strategy_id: $strategy_id, nodes: $nodes})
"""
PRUNE_CROSS_CONTEXT = """
MATCH (h:CrossContextHit) WHERE h.at < $cutoff
WITH h LIMIT 1000
DELETE h
"""
CROSS_CONTEXT_SINCE = """
MATCH (h:CrossContextHit) WHERE h.at >= $since
RETURN coalesce(sum(h.nodes), 0) AS nodes
"""

COUNTS = """
CALL () { MATCH (n:ComputeNode) RETURN count(n) AS nodes }
CALL () { MATCH (q:Queue) RETURN count(q) AS queues }
CALL () { MATCH (v:VersionSentinel) RETURN count(v) AS sentinels }
CALL () { MATCH (s:Strategy) WHERE EXISTS { ()-[:USED_BY]->(s) } RETURN count(s) AS strategies }
CALL () { MATCH ()-[r:EMITS|USED_BY|HAS]->() RETURN count(r) AS rels }
RETURN nodes, queues, sentinels, strategies, rels
"""


def _raise_for(checked: list[tuple[str, str, str]]) -> None:
    """Refuse a write whose referenced queues changed since the plan read them."""
    gone = [topic for topic, _, state in checked if state == "gone"]
    if gone:
        raise QueueGone(gone)
    busy = [topic for topic, _, state in checked if state == "busy"]
    if busy:
        raise QueueBusy(busy)
    stale = [
        f"{topic} is not node {nid}'s queue for this context"
        for topic, nid, state in checked
        if state == "stale"
    ]
    if stale:
        raise StaleRead("; ".join(stale[:3]))


TLS_SHUTDOWN_WAIT = 0.5  # seconds, at most, for TLS connections to finish closing


def _journal_params(journal: PendingDiff, owner: str) -> dict[str, Any]:
    r = journal.request
    return {
        "key": journal.key,
        "sid": r.strategy_id,
        "request": orjson.dumps(dataclasses.asdict(r)).decode(),
        "dag": zlib.compress(journal.dag.encode(), 1),  # a DAG's JSON shrinks some 5x
        "ids": journal.ids,
        "now": journal.at,
        "owner": journal.owner or owner,
    }


def _pooled_writers(driver: Any) -> list[asyncio.StreamWriter]:
    """The stream writers of the driver's pooled connections (read from its internals,
    defensively: a driver without them just gives none)."""
    pool = getattr(driver, "_pool", None)
    out = []
    for conns in dict(getattr(pool, "connections", None) or {}).values():
        for conn in list(conns):
            writer = getattr(getattr(conn, "socket", None), "_writer", None)
            if isinstance(writer, asyncio.StreamWriter):
                out.append(writer)
    return out


def tls_options(uri: str, ca: str) -> tuple[str, dict[str, Any]]:
    """The URI and driver options for `uri` with a custom CA: the driver takes a CA only with
    the plain schemes, so `bolt+s`/`neo4j+s` become `bolt`/`neo4j` with encryption on and
    the certificates checked against `ca` (PEM). Without a CA the URI is used as given."""
    if not ca:
        return uri, {}
    scheme, sep, rest = uri.partition("://")
    plain = {"bolt+s": "bolt", "neo4j+s": "neo4j"}.get(scheme)
    if not sep or plain is None:
        raise ValueError(f"neo4j_ssl_ca needs a bolt+s:// or neo4j+s:// URI, not {scheme}://")
    options = {"encrypted": True, "trusted_certificates": neo4j.TrustCustomCAs(ca)}
    return f"{plain}://{rest}", options


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
        ca: str = "",
    ) -> None:
        self._db = database
        self._tls = "+s" in uri.partition("://")[0] or bool(ca)
        self._seen: weakref.WeakSet[asyncio.StreamWriter] = weakref.WeakSet()
        uri, tls = tls_options(uri, ca)
        self._driver = neo4j.AsyncGraphDatabase.driver(
            uri,
            auth=(user, password),
            **tls,
            connection_timeout=connect_timeout,
            connection_acquisition_timeout=connect_timeout,
            max_transaction_retry_time=max_retry_time,
            # Writers that touch shared nodes deadlock now and then (Neo4j aborts one; the
            # driver retries it). The default first delay of 1 s would blow the Gateway's
            # 0.1 s budget: retry after 20 ms, doubling, with jitter against lock-step.
            initial_retry_delay=0.02,
            retry_delay_multiplier=2.0,
            retry_delay_jitter_factor=0.5,
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
            if e.code == "Neo.ClientError.Statement.EntityNotFound":
                # a node this statement matched was deleted by another writer's transaction
                # before it could be locked (GC forgetting a queue): the read is stale
                raise StaleRead(f"{what}: {e.message}") from e
            raise InvalidSpec(f"Neo4j rejected {what}: {e.message}", reason="GraphRejected") from e
        except neo4j_errors.DriverError as e:  # the driver closed under a late caller, and kin
            raise Unavailable(f"Neo4j driver failed ({what}): {e}", reason="Neo4jDriver") from e
        finally:
            if self._tls:  # the connections to finish closing at `close` (see there)
                self._seen.update(_pooled_writers(self._driver))

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
        await self._migrate_slots()
        for stmt in self.schema_statements():
            await self._call("schema init", lambda s=stmt: self._schema_statement(s))  # type: ignore[misc]
        log.info("neo4j schema ready: %d constraints, %d indexes", len(CONSTRAINTS), len(INDEXES))

    async def _schema_statement(self, stmt: str) -> None:
        """One `... IF NOT EXISTS` statement. Processes that start together on a fresh graph
        (the operator's replicas, every sidecar) race on it: both see no such rule, one
        commits, the other fails as equivalent. Run again, the statement finds the rule."""
        try:
            await self._driver.execute_query(stmt, database_=self._db)
        except neo4j_errors.ClientError as e:
            if e.code not in SCHEMA_RACE_CODES:
                raise
            log.info("neo4j schema: created concurrently by another process (%s)", e.code)
            await self._driver.execute_query(stmt, database_=self._db)

    async def _migrate_slots(self) -> None:
        """Give queues written before `slot` existed their slot (idempotent: a graph that has
        them all reads nothing)."""

        async def tx(t: neo4j.AsyncManagedTransaction) -> tuple[int, int]:
            row = await (await t.run(MIGRATE_SLOTS)).single()
            return (int(row["migrated"]), int(row["superseded"] or 0)) if row else (0, 0)

        migrated, superseded = await self._write("slot migration", tx)
        if migrated:
            log.info(
                "neo4j migration: %d queue(s) given a (node, compute key) slot; %d duplicate(s)"
                " marked superseded",
                migrated,
                superseded,
            )

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
        for nid, schema_hash, compat, queues, buffering, recompute in rows[0]["nodes"]:
            records[nid] = NodeRecord(
                nid,
                schema_hash,
                compat,
                tuple(QueueRecord(t, ck) for t, ck in queues if t is not None),
                None if buffering is None else float(buffering),
                int(recompute),
            )
        owners = {t: NodeId(o) for t, o in rows[0]["owners"]}
        return GraphRead(records, owners, rows[0]["fingerprint"])

    async def apply(
        self,
        plan: Plan,
        now: float,
        sentinel: SentinelWrite | None,
        intents: Mapping[str, int] | None = None,
        journal: str = "",
    ) -> tuple[str, ...]:
        r = graph_rows.rows(plan, now)
        queue_rows = [
            {"node_id": q["node_id"], "props": {k: v for k, v in q.items() if k != "node_id"}}
            for q in r.queues
        ]
        topics = [x["topic"] for x in r.refs]
        created = [
            {"topic": t, "gen": None if intents is None else intents.get(t)}
            for t in sorted(x["topic"] for x in r.refs if x["create"])
        ]
        cutoff = now - DELETING_TTL
        groups = [
            {"key": g.key, "tags": list(g.tags), "interval": g.interval, "match_mode": g.match_mode}
            for g in sorted(plan.query_groups, key=lambda g: g.key)  # one lock order
        ]

        async def tx(t: neo4j.AsyncManagedTransaction) -> tuple[str, ...]:
            await (await t.run(MERGE_NODES, rows=r.nodes)).consume()
            res = await t.run(MERGE_QUEUES, rows=queue_rows)
            foreign = [rec["foreign"] async for rec in res]
            if foreign and foreign[0]:
                raise StaleRead(f"queue(s) {', '.join(foreign[0][:3])} belong to another node")
            await (
                await t.run(
                    SET_REFS,
                    sid=r.strategy_id,
                    context=orjson.dumps(r.context, option=orjson.OPT_SORT_KEYS).decode(),
                    fingerprint=r.fingerprint,
                    refs=r.refs,
                    node_ids=[x["node_id"] for x in r.refs],
                    topics=topics,
                    now=now,
                )
            ).consume()
            checked = [
                (rec["topic"], rec["node_id"], rec["state"])
                async for rec in await t.run(CHECK_REFS, refs=r.refs, cutoff=cutoff)
            ]
            _raise_for(checked)
            if created:
                row = await (await t.run(SETTLE_INTENTS, created=created, cutoff=cutoff)).single()
                if row is not None and row["busy"]:
                    raise QueueBusy(list(row["busy"]))
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
            if journal:
                await (await t.run(DROP_PENDING_DIFF, key=journal)).consume()
            if groups:  # last: the outbox locks are held for the shortest time
                await (await t.run(MARK_EVENTS, groups=groups, now=now)).consume()
            return tuple(topic for topic, _, state in checked if state == "reclaim")

        try:
            return await self._write("plan write", tx)
        except Conflict as e:
            if isinstance(e.__cause__, neo4j_errors.ConstraintError):
                # another writer created a queue for one of the plan's (node, compute key)
                # pairs, or took a name, between the plan's read and this write
                raise StaleRead(e.message) from e
            raise

    async def claim_events(self, owner: str, now: float, limit: int) -> list[PendingEvent]:
        async def tx(t: neo4j.AsyncManagedTransaction) -> list[PendingEvent]:
            res = await t.run(
                CLAIM_EVENTS, owner=owner, now=now, stale=now - EVENT_CLAIM_TTL, limit=limit
            )
            return [
                PendingEvent(
                    QueryGroup(tuple(r["tags"]), int(r["interval"]), r["match_mode"]),
                    tuple(r["marks"]),
                )
                async for r in res
            ]

        return await self._write("outbox claim", tx)

    async def settle_events(self, owner: str, published: Sequence[PendingEvent]) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            row = await (await t.run(SETTLE_EVENTS, owner=owner, keys=keys, marks=marks)).single()
            return int(row["pending"]) if row is not None else 0

        keys = sorted({p.group.key for p in published})
        marks = [m for p in published for m in p.marks]
        return await self._write("outbox settle", tx) if keys else 0

    async def release_events(self, owner: str, events: Sequence[PendingEvent]) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (await t.run(RELEASE_EVENTS, owner=owner, keys=keys)).consume()

        keys = sorted(p.group.key for p in events)
        if keys:
            await self._write("outbox release", tx)

    async def pending_events(self) -> int:
        rows = await self._read("outbox size", PENDING_EVENTS)
        return int(rows[0]["n"]) if rows else 0

    async def record_intents(
        self,
        topics: Sequence[str],
        now: float,
        owner: str,
        journal: PendingDiff | None = None,
    ) -> Intents:
        async def tx(t: neo4j.AsyncManagedTransaction) -> list[tuple[str, bool, int | None]]:
            if entry is not None:
                await (await t.run(JOURNAL, **entry)).consume()
            if not pending:
                return []
            res = await t.run(
                RECORD_INTENTS,
                topics=pending,  # sorted: one lock order for every writer
                now=now,
                owner=owner,
                cutoff=now - DELETING_TTL,
            )
            return [(r["topic"], r["busy"], r["gen"]) async for r in res]

        busy: list[str] = []
        gens: dict[str, int] = {}
        pending = sorted(set(topics))
        entry = None if journal is None else _journal_params(journal, owner)
        for _ in range(RECORD_ATTEMPTS):
            if not pending and entry is None:
                break
            rows = await self._write("creation intents", tx)
            entry = None  # recorded with the first transaction
            busy += [topic for topic, b, _ in rows if b]
            gens |= {topic: gen for topic, b, gen in rows if not b and gen is not None}
            # no generation: a write settled (deleted) the intent this MERGE had matched
            # before it got the lock; record it again in a new transaction
            pending = sorted(topic for topic, b, gen in rows if not b and gen is None)
        if pending:
            raise Unavailable(
                f"creation intents of {', '.join(pending[:3])} kept vanishing while recorded",
                reason="Neo4jUnavailable",
            )
        return Intents(tuple(busy), gens)

    async def pending_diffs(self, before: float, limit: int) -> list[PendingDiff]:
        rows = await self._read("journal", PENDING_DIFFS, before=before, limit=limit)
        return [
            PendingDiff(
                r["key"],
                Request(**orjson.loads(r["request"])),
                zlib.decompress(r["dag"]).decode(),
                r["ids"],
                float(r["at"]),
                r["owner"] or "",
                int(r["replays"] or 0),
            )
            for r in rows
        ]

    async def claim_pending_diff(self, key: str, now: float, before: float) -> bool:
        async def tx(t: neo4j.AsyncManagedTransaction) -> bool:
            row = await (await t.run(CLAIM_PENDING_DIFF, key=key, now=now, before=before)).single()
            return row is not None and int(row["claimed"]) > 0

        return await self._write("journal claim", tx)

    async def drop_pending_diff(self, key: str) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (await t.run(DROP_PENDING_DIFF, key=key)).consume()

        await self._write("journal drop", tx)

    async def stale_intents(self, before: float, limit: int) -> list[str]:
        rows = await self._read("stale intents", STALE_INTENTS, before=before, limit=limit)
        return [r["topic"] for r in rows]

    async def claim_intent(self, topic: str, run: str, now: float, before: float) -> Intent:
        async def tx(t: neo4j.AsyncManagedTransaction) -> Intent:
            row = await (
                await t.run(
                    CLAIM_INTENT,
                    topic=topic,
                    run=run,
                    now=now,
                    before=before,
                    cutoff=now - DELETING_TTL,
                )
            ).single()
            if row is None:
                return Intent.KEPT
            return Intent.ADOPTED if row["owned"] else Intent.CLAIMED

        return await self._write("intent claim", tx)

    async def drop_intent(self, topic: str, run: str, now: float) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (await t.run(DROP_INTENT, topic=topic, run=run, now=now)).consume()

        await self._write("intent drop", tx)

    async def purge_tombstones(self, before: float) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            row = await (await t.run(PURGE_TOMBSTONES, before=before)).single()
            return int(row["purged"]) if row is not None else 0

        return await self._write("intent tombstones", tx)

    async def mark_deleting(self, topic: str, run: str, now: float) -> bool:
        async def tx(t: neo4j.AsyncManagedTransaction) -> bool:
            row = await (await t.run(MARK_DELETING, topic=topic, run=run, now=now)).single()
            return row is not None and bool(row["marked"])

        return await self._write("gc deletion mark", tx)

    async def release(self, strategy_id: str, now: float) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            rec = await (await t.run(RELEASE, sid=strategy_id, now=now)).single()
            return int(rec["dropped"]) if rec else 0

        return await self._write("release", tx)

    async def mark_orphaned(self, topics: Sequence[str], now: float) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            rec = await (await t.run(MARK_ORPHANED, topics=list(topics), now=now)).single()
            return int(rec["stamped"]) if rec else 0

        return await self._write("orphan times", tx)

    async def retire_version(
        self, sentinel_id: str, version: str, now: float, retired: bool = True
    ) -> list[str]:
        async def tx(t: neo4j.AsyncManagedTransaction) -> list[str]:
            rec = await (
                await t.run(
                    RETIRE_VERSION,
                    sid=sentinel_id,
                    version=version,
                    now=now,
                    retired=retired,
                    key=retired_key(sentinel_id, version),
                )
            ).single()
            return sorted(rec["topics"]) if rec else []

        return await self._write("retire version", tx)

    async def compactable(self, created_before: float, limit: int) -> list[NodeId]:
        rows = await self._read(
            "compaction candidates", COMPACTABLE, before=created_before, limit=limit
        )
        return [NodeId(r["id"]) for r in rows]

    async def compact(self, node_ids: Sequence[NodeId], created_before: float) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            rec = await (await t.run(COMPACT, ids=list(node_ids), before=created_before)).single()
            return int(rec["removed"]) if rec else 0

        return await self._write("compaction", tx)

    async def set_keep(self, topics: Sequence[str], keeper: str, keep: bool) -> int:
        async def tx(t: neo4j.AsyncManagedTransaction) -> int:
            rec = await (
                await t.run(SET_KEEP, topics=list(topics), keeper=keeper, keep=keep)
            ).single()
            return int(rec["changed"]) if rec else 0

        return await self._write("keep marks", tx)

    async def queues_by_tags(
        self, tags: Sequence[str], interval: int, match_mode: str
    ) -> list[QueueRef]:
        return (await self.queues_by_tag_queries([TagQuery(tuple(tags), interval, match_mode)]))[0]

    async def queues_by_tag_queries(self, queries: Sequence[TagQuery]) -> list[list[QueueRef]]:
        """One read: every query matched by Neo4j, answered as one list per query."""
        asked = [
            {"tags": sorted(set(q.tags)), "interval": int(q.interval), "all": q.match_mode == "all"}
            for q in queries
        ]
        out: list[list[QueueRef]] = [[] for _ in queries]
        live = [i for i, q in enumerate(asked) if q["tags"]]  # no tags: selects nothing
        if not live:
            return out
        rows = await self._read("tag query", BY_TAG_QUERIES, queries=[asked[i] for i in live])
        for row in rows:
            out[live[int(row["i"])]] = [QueueRef(t, bool(g)) for t, g in row["hits"]]
        return out

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
                    orphaned_at=None if q.get("orphaned_at") is None else float(q["orphaned_at"]),
                    keep_by=tuple(q.get("keep_by") or ()),
                    retired=str(q.get("retired") or ""),
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

    async def claim_queue(
        self,
        topic: str,
        run: str,
        now: float,
        stale_after: float,
        orphaned_by: float | None = None,
    ) -> bool:
        async def tx(t: neo4j.AsyncManagedTransaction) -> bool:
            result = await t.run(
                CLAIM_QUEUE,
                topic=topic,
                run=run,
                now=now,
                stale=now - stale_after,
                orphaned_by=orphaned_by,
            )
            return await result.single() is not None

        return await self._write("gc claim", tx)

    async def release_claim(self, topic: str, run: str) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await (
                await t.run(
                    "MATCH (q:Queue {topic: $topic}) WHERE q.gc_claim = $run "
                    "REMOVE q.gc_claim, q.gc_claim_at, q.gc_deleting_at",
                    topic=topic,
                    run=run,
                )
            ).consume()

        await self._write("gc claim release", tx)

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

    async def record_cross_context(self, strategy_id: str, nodes: int, now: float) -> None:
        async def tx(t: neo4j.AsyncManagedTransaction) -> None:
            await t.run(RECORD_CROSS_CONTEXT, now=now, strategy_id=strategy_id, nodes=nodes)
            await t.run(PRUNE_CROSS_CONTEXT, cutoff=now - CROSS_CONTEXT_KEEP)

        await self._write("record cross-context hit", tx)

    async def cross_context_since(self, since: float) -> int:
        rows = await self._read("cross-context hits", CROSS_CONTEXT_SINCE, since=since)
        return int(rows[0]["nodes"]) if rows else 0

    async def counts(self) -> GraphCounts:
        row = (await self._read("counts", COUNTS))[0]
        return GraphCounts(
            row["nodes"], row["queues"], row["sentinels"], row["strategies"], row["rels"]
        )

    async def close(self) -> None:
        writers = {*self._seen, *_pooled_writers(self._driver)} if self._tls else set()
        await self._driver.close()
        if writers:
            # The driver closes its sockets in the background (also one it dropped earlier,
            # after an error or a cancelled query); over TLS asyncio finishes each close
            # (close_notify both ways) on later turns of the loop, or only after 30 s when the
            # server does not answer. Wait briefly, then cut what is left, so a caller that
            # ends its loop next leaves no socket open.
            waits = {asyncio.ensure_future(w.wait_closed()): w for w in writers}
            done, late = await asyncio.wait(waits, timeout=TLS_SHUTDOWN_WAIT)
            for fut in done:
                # a TLS shutdown can fail (the server sent data after its close_notify):
                # asyncio has cut that socket already; the error is only read here
                if not fut.cancelled() and fut.exception() is not None:
                    log.debug("Neo4j TLS close: %s", fut.exception())
            for fut in late:
                waits[fut].transport.abort()
                fut.cancel()
            if late:
                await asyncio.sleep(0)  # let the aborted transports close their sockets
