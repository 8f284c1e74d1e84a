"""Queue queries and strategy cleanup: TagQuery.GetQueues, AdminService.GetQueueStats and
Cleanup (contract §8)."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass

from qmtl_dagmanager.core.errors import InvalidSpec
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import Clock, GraphStore, QueueRef, TopicAdmin
from qmtl_dagmanager.services.diff_work import DiffWork
from qmtl_dagmanager.services.topic_settle import TopicSettler

log = logging.getLogger(__name__)
_DURATION = re.compile(r"^(\d+)([smhd]?)$")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


@dataclass(frozen=True, slots=True)
class StatsFilter:
    tags: tuple[str, ...] = ()
    interval: int | None = None


def parse_interval(text: str) -> int:
    m = _DURATION.match(text.strip().lower())
    if not m:
        raise InvalidSpec(
            f"filter: interval {text!r} is not a number of seconds or 30s/5m/1h",
            reason="InvalidFilter",
        )
    return int(m.group(1)) * _UNIT[m.group(2)]


def parse_filter(text: str) -> StatsFilter:
    """`tag=a,b;interval=60` (interval also `1h`, `5m`, `30s`); empty: everything."""
    tags: tuple[str, ...] = ()
    interval: int | None = None
    for part in (p.strip() for p in text.split(";")):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip().lower()
        if not sep:
            raise InvalidSpec(f"filter: {part!r} is not key=value", reason="InvalidFilter")
        if key in ("tag", "tags"):
            tags = tuple(t.strip() for t in value.split(",") if t.strip())
        elif key == "interval":
            interval = parse_interval(value)
        else:
            raise InvalidSpec(
                f"filter: unknown key {key!r} (known: tag, interval)", reason="InvalidFilter"
            )
    return StatsFilter(tags, interval)


@dataclass
class QueueService:
    graph: GraphStore
    topics: TopicAdmin
    metrics: Metrics
    clock: Clock
    settler: TopicSettler | None = None  # the process's topics not yet described by a broker
    # the process's diffs: a read waits (bounded) for those answered but not yet written
    writes: DiffWork | None = None
    write_wait: float = 2.0

    def pending(self, topics: Iterable[str]) -> list[str]:
        """Those of `topics` answered on Kafka's acknowledgement that no broker describes yet
        (see `topic_settle`); the others are ready."""
        return [] if self.settler is None else self.settler.pending(topics)

    async def by_tags(self, tags: list[str], interval: int, match_mode: str) -> list[QueueRef]:
        mode = (match_mode or "any").strip().lower()
        if mode not in ("any", "all"):
            raise InvalidSpec(
                f"match_mode {match_mode!r}: expected any or all", reason="InvalidMatchMode"
            )
        if interval < 0:
            raise InvalidSpec("interval must not be negative", reason="InvalidInterval")
        clean = [t.strip() for t in tags if t.strip()]
        await self._written()
        return await self.graph.queues_by_tags(clean, interval, mode)

    async def _written(self) -> None:
        """Read your writes: diffs this process answered early are written first (bounded)."""
        if self.writes is not None:
            await self.writes.settled(self.write_wait)

    async def stats(self, filter_text: str) -> dict[str, int]:
        f = parse_filter(filter_text)
        wanted = set(f.tags)
        await self._written()
        names = [
            q.topic
            for q in await self.graph.queues()
            if (f.interval is None or q.interval == f.interval)
            and (not wanted or wanted & set(q.tags))
        ]
        counts = await self.topics.message_counts(names)
        for name in self.pending(n for n in names if n not in counts):
            counts[name] = 0  # created, not yet in the broker's metadata: no message yet
        return counts

    async def cleanup(self, strategy_id: str) -> int:
        if not strategy_id.strip():
            raise InvalidSpec("strategy_id is required", reason="MissingField")
        dropped = await self.graph.release(strategy_id, self.clock.now())
        log.info("cleanup %s: %d references dropped", strategy_id, dropped)
        orphans = sum(1 for q in await self.graph.queues() if q.ref_count == 0 and q.managed)
        self.metrics.orphan_queues.set(orphans)
        return dropped
