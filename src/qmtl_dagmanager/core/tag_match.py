"""Which queues a tag query selects (contract §8): queues of compute nodes with the query's
interval whose tags include any (`any`) or every (`all`) requested tag. Many queries are
answered in one pass over the candidate queues."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple


class TaggedQueue(NamedTuple):
    topic: str  # the base (un-namespaced) name
    is_global: bool
    interval: int
    tags: frozenset[str]


class TagQuery(NamedTuple):
    tags: tuple[str, ...]
    interval: int
    match_mode: str  # "all", or anything else for "any"


def hits(q: TagQuery, queue: TaggedQueue) -> bool:
    wanted = set(q.tags)
    if not wanted or queue.interval != q.interval:
        return False
    return wanted <= queue.tags if q.match_mode == "all" else bool(wanted & queue.tags)


def select(
    queries: Sequence[TagQuery], queues: Iterable[TaggedQueue]
) -> list[list[tuple[str, bool]]]:
    """Per query, its (topic, is_global) pairs sorted by topic; a topic reached through
    several nodes is global if any of them says so."""
    found: list[dict[str, bool]] = [{} for _ in queries]
    by_interval: dict[int, list[int]] = {}
    for i, q in enumerate(queries):
        by_interval.setdefault(q.interval, []).append(i)
    for queue in queues:
        for i in by_interval.get(queue.interval, ()):
            if hits(queries[i], queue):
                f = found[i]
                f[queue.topic] = f.get(queue.topic, False) or queue.is_global
    return [sorted(f.items()) for f in found]
