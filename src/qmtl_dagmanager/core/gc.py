"""Garbage-collection decisions: which orphaned queues may go, and why.

Never selected: a queue that is referenced, younger than TTL + grace, not owned by a graph node
(unmanaged: absence is no evidence), internal to Kafka (`__` prefix), of a tag without a
policy; never more than the per-run cap, which is halved while the broker is under load.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

DAY = 86_400.0


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


class SkipReason(StrEnum):
    INTERNAL = "Internal"
    UNMANAGED = "Unmanaged"
    REFERENCED = "Referenced"
    TOO_YOUNG = "TooYoung"
    NO_POLICY = "NoPolicy"
    OVER_CAP = "OverCap"


@dataclass(frozen=True, slots=True)
class GcDecision:
    topic: str
    action: GcAction
    reason: str


@dataclass(frozen=True, slots=True)
class GcLimits:
    max_count: int = 100
    max_fraction: float = 0.1  # of managed queues


@dataclass(frozen=True, slots=True)
class GcReport:
    decisions: tuple[GcDecision, ...]
    skipped: Mapping[str, int] = field(default_factory=dict)
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
) -> GcReport:
    """Decide the queues to collect now, oldest first, within the cap."""
    skipped: dict[str, int] = {}
    eligible: list[tuple[GcQueue, GcPolicy]] = []
    managed = 0

    def skip(reason: SkipReason) -> None:
        skipped[reason.value] = skipped.get(reason.value, 0) + 1

    for q in queues:
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
        policy = policies.get(q.tag)
        if policy is None:
            skip(SkipReason.NO_POLICY)
            continue
        if now - q.created_at < policy.ttl + policy.grace:
            skip(SkipReason.TOO_YOUNG)
            continue
        eligible.append((q, policy))
    cap = cap_for(managed, limits, loaded)
    eligible.sort(key=lambda qp: (qp[0].created_at, qp[0].topic))
    chosen = eligible[:cap]
    if len(eligible) > cap:
        skipped[SkipReason.OVER_CAP.value] = len(eligible) - cap
    decisions = tuple(
        GcDecision(
            q.topic,
            p.action,
            f"unreferenced {q.tag} queue, {(now - q.created_at) / DAY:.1f} d old "
            f"(TTL {p.ttl / DAY:g} d + grace {p.grace / DAY:g} d)",
        )
        for q, p in chosen
    )
    return GcReport(decisions, skipped, cap, managed, loaded)
