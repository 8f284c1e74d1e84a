"""A bounded, time-limited cache of the graph's node records, shared by the services of one
process. Only records that exist are cached (compute nodes are never deleted); an entry lives
`ttl` seconds at most, so a queue dropped by another process is seen again within that time.
Our own writes and garbage collection update or evict entries at once."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Mapping

from qmtl_dagmanager.core.identity import NodeId
from qmtl_dagmanager.core.plan import NodeRecord
from qmtl_dagmanager.ports import Clock


class NodeCache:
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
