"""A bounded, time-limited cache of the graph's node records, shared by the services of one
process. Only records that exist are cached (compute nodes are never deleted); an entry lives
`ttl` seconds at most, so a queue dropped by another process is seen again within that time.
Our own writes and garbage collection update or evict entries at once."""

from __future__ import annotations

import itertools
import sys
from collections import OrderedDict
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import NodeRecord
from qmtl_dagmanager.ports import Clock

if TYPE_CHECKING:
    from qmtl_dagmanager.services.diffs import DiffOutcome


class _Stopped:
    """The clock of a disabled cache: never read for an expiry that matters."""

    def now(self) -> float:
        return 0.0


class NodeCache:
    @classmethod
    def disabled(cls) -> NodeCache:
        """A cache that keeps nothing (ttl 0)."""
        return cls(_Stopped(), ttl=0)

    def __init__(self, clock: Clock, *, ttl: float = 60.0, max_entries: int = 200_000) -> None:
        self._clock = clock
        self._ttl = ttl
        self._max = max_entries
        self._entries: OrderedDict[NodeId, tuple[float, NodeRecord]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get_many(self, ids: Iterable[NodeId]) -> dict[NodeId, NodeRecord]:
        if self._ttl <= 0:
            return {}
        now = self._clock.now()
        out: dict[NodeId, NodeRecord] = {}
        entries = self._entries
        for nid in ids:
            hit = entries.get(nid)
            if hit is None:
                continue
            if now - hit[0] > self._ttl:
                del entries[nid]
                continue
            out[nid] = hit[1]
        return out

    def put_many(self, records: Mapping[NodeId, NodeRecord]) -> None:
        if self._ttl <= 0:
            return
        now = self._clock.now()
        entries = self._entries
        for nid, rec in records.items():
            entries[nid] = (now, rec)
            entries.move_to_end(nid)
        while len(entries) > self._max:
            entries.popitem(last=False)

    def evict(self, ids: Iterable[NodeId]) -> None:
        for nid in ids:
            self._entries.pop(nid, None)

    def evict_topic(self, topic: str) -> None:
        stale = [
            nid
            for nid, (_, rec) in self._entries.items()
            if any(q.topic == topic for q in rec.queues)
        ]
        self.evict(stale)

    def clear(self) -> None:
        self._entries.clear()

    def resident_bytes(self, sample: int = 256) -> int:
        """Bytes the cache holds: its table, plus the entry count times the mean deep size
        (key, timestamp, record, its queues and strings) of up to `sample` entries. Strings
        shared between entries are counted in each, so this errs on the high side."""
        n = len(self._entries)
        table = sys.getsizeof(self._entries)
        if n == 0:
            return table
        taken = list(itertools.islice(self._entries.items(), sample))
        total = sum(_entry_bytes(nid, at, rec) for nid, (at, rec) in taken)
        return table + round(total * n / len(taken))


def _entry_bytes(nid: NodeId, at: float, rec: NodeRecord) -> int:
    size = sys.getsizeof(nid) + sys.getsizeof((at, rec)) + sys.getsizeof(at)
    size += sys.getsizeof(rec) + sys.getsizeof(rec.schema_hash) + sys.getsizeof(rec.queues)
    size += sys.getsizeof(rec.schema_compat_id) + sys.getsizeof(rec.buffering_since)
    for q in rec.queues:
        size += sys.getsizeof(q) + sys.getsizeof(q.topic) + sys.getsizeof(q.compute_key)
    return size


class ResubmissionCache:
    """Outcomes of recent written diffs, keyed by the exact request (bytes and context).

    The Gateway resubmits the same DAG again and again. A hit is served only after the graph
    confirms, with one small query, that the strategy's recorded fingerprint is still the one
    that outcome wrote; otherwise the diff runs in full. Bounded by the total node count."""

    def __init__(self, max_nodes: int = 50_000) -> None:
        self._max_nodes = max_nodes
        self._nodes = 0
        self._entries: OrderedDict[str, DiffOutcome] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self._max_nodes > 0

    def get(self, key: str) -> DiffOutcome | None:
        if not key:
            return None
        hit = self._entries.get(key)
        if hit is not None:
            self._entries.move_to_end(key)
        return hit

    def put(self, key: str, outcome: DiffOutcome) -> None:
        size = len(outcome.plan.nodes)
        if not key or size > self._max_nodes:
            return
        self.drop(key)
        self._entries[key] = outcome
        self._nodes += size
        while self._nodes > self._max_nodes:
            _, old = self._entries.popitem(last=False)
            self._nodes -= len(old.plan.nodes)

    def drop(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self._nodes -= len(old.plan.nodes)
