"""Garbage-collection decisions: which orphaned queues may go, and why.

A queue may go only once it has been unreferenced *continuously* for its policy's TTL +
grace, counted from `orphaned_at` (when it lost its last reference; a new reference clears
it), never from its creation: a 30-day-old queue orphaned now is kept until TTL + grace
later, so a rollback or re-apply meanwhile finds its topic and its data. An unreferenced
queue without `orphaned_at` (a graph written before the field existed) is stamped by the
run that first sees it and kept from then on.

Never selected either: a queue marked keep, not owned by a graph node (unmanaged: absence
is no evidence), internal to Kafka (`__` prefix), of a tag without a policy; never more than
the per-run cap, which is halved while the broker is under load.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

DAY = 86_400.0
SENTINEL_TAG = "sentinel"


def retired_key(sentinel_id: str, version: str) -> str:
    """How a retired version is named on its queues and in `gc --sentinel`."""
    return f"{sentinel_id}@{version}"


def in_scope(retired: str, scope: str) -> bool:
    """Whether a queue of retired version `retired` belongs to `scope`: a whole key
    (`<sentinel id>@<version>`) or a bare version label (that version of any sentinel)."""
    if not retired:
        return False
    return retired == scope or ("@" not in scope and retired.rpartition("@")[2] == scope)


class GcAction(StrEnum):
    DROP = "drop"
    ARCHIVE = "archive"  # archive the data, then drop


@dataclass(frozen=True, slots=True)
class GcPolicy:
    ttl: float  # seconds after which an unreferenced queue is stale
    grace: float  # extra seconds before it is collected
    action: GcAction


DEFAULT_POLICIES: Mapping[str, GcPolicy] = {
    "raw": GcPolicy(7 * DAY, 1 * DAY, GcAction.DROP),
    "indicator": GcPolicy(30 * DAY, 3 * DAY, GcAction.DROP),
    "sentinel": GcPolicy(180 * DAY, 30 * DAY, GcAction.ARCHIVE),
    "trade_exec": GcPolicy(90 * DAY, 7 * DAY, GcAction.ARCHIVE),
}


@dataclass(frozen=True, slots=True)
class GcQueue:
    topic: str
    tag: str  # the queue's policy tag: raw, indicator, sentinel, trade_exec
    created_at: float  # epoch seconds
    ref_count: int
    owned: bool  # a graph node EMITS it
    orphaned_at: float | None = None  # when it lost its last reference (None: referenced)
    keep: bool = False  # protected: never collected
    retired: str = ""  # `<sentinel id>@<version>` of the retired version it belongs to

    @property
    def policy_tag(self) -> str:
        """A retired version's queue is a sentinel queue, whatever its own tag: it is kept
        for the sentinel policy's TTL + grace so that a rollback finds its data."""
        return SENTINEL_TAG if self.retired else self.tag


class SkipReason(StrEnum):
    INTERNAL = "Internal"
    UNMANAGED = "Unmanaged"
    REFERENCED = "Referenced"
    KEPT = "Kept"  # marked keep (the queue, or its StrategyDAG by annotation)
    TOO_YOUNG = "TooYoung"  # unreferenced for less than TTL + grace
    NO_POLICY = "NoPolicy"
    OVER_CAP = "OverCap"


@dataclass(frozen=True, slots=True)
class GcDecision:
    topic: str
    action: GcAction
    reason: str
    orphaned_by: float | None = 0.0  # claim only if orphaned at or before this (None: any)


@dataclass(frozen=True, slots=True)
class Orphan:
    """An unreferenced queue this run kept, and when it becomes due (None: never, kept)."""

    topic: str
    tag: str
    orphaned_at: float
    due: float | None
    why: str


@dataclass(frozen=True, slots=True)
class GcLimits:
    max_count: int = 100
    max_fraction: float = 0.1  # of managed queues


@dataclass(frozen=True, slots=True)
class GcReport:
    decisions: tuple[GcDecision, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)
    kept: tuple[Orphan, ...] = ()  # every unreferenced queue kept, with its due time
    stamp: tuple[str, ...] = ()  # unreferenced queues without orphaned_at: record `now`
    cap: int = 0
    managed: int = 0
    loaded: bool = False  # the cap was halved because the broker reported high load


def cap_for(managed: int, limits: GcLimits, loaded: bool = False) -> int:
    """The per-run cap; halved (rounded down) while the broker is loaded."""
    cap = max(0, min(limits.max_count, math.ceil(managed * limits.max_fraction)))
    return cap // 2 if loaded else cap


def select(
    queues: Iterable[GcQueue],
    now: float,
    policies: Mapping[str, GcPolicy] = DEFAULT_POLICIES,
    limits: GcLimits = GcLimits(),
    *,
    loaded: bool = False,
    scope: str | None = None,
    force: bool = False,
) -> GcReport:
    """Decide the queues to collect now, longest orphaned first, within the cap. With a
    `scope` (a retired version, see `in_scope`) only that version's queues are considered;
    `force` (an operator collecting one retired version by hand) ignores TTL + grace, never
    references, keep marks or the cap."""
    skipped: dict[str, int] = {}
    eligible: list[tuple[GcQueue, GcPolicy, float]] = []
    kept: list[Orphan] = []
    stamp: list[str] = []
    managed = 0

    def skip(reason: SkipReason) -> None:
        skipped[reason.value] = skipped.get(reason.value, 0) + 1

    for q in queues:
        if scope is not None and not in_scope(q.retired, scope):
            continue
        if q.topic.startswith("__"):
            skip(SkipReason.INTERNAL)
            continue
        if not q.owned:
            skip(SkipReason.UNMANAGED)
            continue
        managed += 1
        if q.ref_count > 0:
            skip(SkipReason.REFERENCED)
            continue
        orphaned = q.orphaned_at
        if orphaned is None:  # first seen unreferenced (a graph older than orphan times)
            stamp.append(q.topic)
            orphaned = now
        if q.keep:
            skip(SkipReason.KEPT)
            kept.append(Orphan(q.topic, q.tag, orphaned, None, "marked keep"))
            continue
        tag = q.policy_tag
        policy = policies.get(tag)
        if policy is None:
            skip(SkipReason.NO_POLICY)
            kept.append(Orphan(q.topic, tag, orphaned, None, f"no GC policy for {tag!r}"))
            continue
        due = orphaned if force else orphaned + policy.ttl + policy.grace
        if now < due:
            skip(SkipReason.TOO_YOUNG)
            kept.append(
                Orphan(
                    q.topic,
                    tag,
                    orphaned,
                    due,
                    f"unreferenced for {_days(now - orphaned)} of "
                    f"TTL {_days(policy.ttl)} + grace {_days(policy.grace)}",
                )
            )
            continue
        eligible.append((q, policy, orphaned))
    cap = len(eligible) if force else cap_for(managed, limits, loaded)
    eligible.sort(key=lambda e: (e[2], e[0].topic))
    chosen = eligible[:cap]
    for q, _, orphaned in eligible[cap:]:
        kept.append(Orphan(q.topic, q.policy_tag, orphaned, now, "due, over this run's cap"))
    if len(eligible) > cap:
        skipped[SkipReason.OVER_CAP.value] = len(eligible) - cap
    decisions = tuple(
        GcDecision(
            q.topic,
            p.action,
            f"retired version {q.retired}, collected by hand"
            if force
            else f"unreferenced {q.policy_tag} queue for {_days(now - orphaned)} "
            f"(TTL {_days(p.ttl)} + grace {_days(p.grace)})"
            + (f", of retired version {q.retired}" if q.retired else ""),
            None if force else now - p.ttl - p.grace,
        )
        for q, p, orphaned in chosen
    )
    kept.sort(key=lambda o: (o.due is None, o.due or 0.0, o.topic))
    return GcReport(
        decisions, skipped, tuple(kept), tuple(stamp), cap=cap, managed=managed, loaded=loaded
    )


def _days(seconds: float) -> str:
    """A span for a report: days when at least one, else seconds."""
    if seconds >= DAY:
        return f"{seconds / DAY:.1f} d"
    return f"{seconds:.0f} s"
