"""Garbage-collection decisions."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qmtl_dagmanager.core import gc
from qmtl_dagmanager.core.gc import DAY, GcAction, GcLimits, GcQueue

NOW = 1_800_000_000.0


def q(
    topic: str, tag: str = "raw", age_days: float = 100, refs: int = 0, owned: bool = True
) -> GcQueue:
    return GcQueue(topic, tag, NOW - age_days * DAY, refs, owned)


def test_policy_matrix_and_reasons() -> None:
    queues = [
        q("raw-old", "raw", 8.5),
        q("raw-young", "raw", 7.5),
        q("ind-old", "indicator", 34),
        q("ind-young", "indicator", 32),
        q("sent-old", "sentinel", 211),
        q("sent-young", "sentinel", 200),
        q("referenced", "raw", 100, refs=1),
        q("unmanaged", "raw", 100, owned=False),
        q("__consumer_offsets", "raw", 1000),
        q("odd", "mystery", 1000),
    ]
    report = gc.select(queues, NOW, limits=GcLimits(max_count=100, max_fraction=1.0))
    got = {d.topic: d.action for d in report.decisions}
    assert got == {"raw-old": GcAction.DROP, "ind-old": GcAction.DROP, "sent-old": GcAction.ARCHIVE}
    assert report.skipped == {
        "TooYoung": 3,
        "Referenced": 1,
        "Unmanaged": 1,
        "Internal": 1,
        "NoPolicy": 1,
    }
    assert all("TTL" in d.reason for d in report.decisions)


def test_cap_by_count_and_fraction_oldest_first() -> None:
    queues = [q(f"t{i}", age_days=10 + i) for i in range(50)]
    by_count = gc.select(queues, NOW, limits=GcLimits(max_count=3, max_fraction=1.0))
    assert [d.topic for d in by_count.decisions] == ["t49", "t48", "t47"]
    assert by_count.skipped["OverCap"] == 47
    by_fraction = gc.select(queues, NOW, limits=GcLimits(max_count=100, max_fraction=0.1))
    assert len(by_fraction.decisions) == 5


queue_strategy = st.builds(
    GcQueue,
    topic=st.sampled_from(["a", "b", "__x", "c_topic", "d"]) | st.text(min_size=1, max_size=5),
    tag=st.sampled_from(["raw", "indicator", "sentinel", "trade_exec", "other"]),
    created_at=st.floats(NOW - 400 * DAY, NOW + DAY),
    ref_count=st.integers(0, 3),
    owned=st.booleans(),
)


@given(st.lists(queue_strategy, max_size=60), st.integers(0, 20), st.floats(0, 1))
def test_gc_never_selects_protected_queues_or_exceeds_its_cap(
    queues: list[GcQueue], max_count: int, fraction: float
) -> None:
    limits = GcLimits(max_count, fraction)
    report = gc.select(queues, NOW, limits=limits)
    managed = sum(1 for x in queues if x.owned and not x.topic.startswith("__"))
    assert len(report.decisions) <= min(max_count, gc.cap_for(managed, limits))
    chosen = {d.topic for d in report.decisions}
    for x in queues:
        if x.topic in chosen and not any(y.topic == x.topic and y is not x for y in queues):
            policy = gc.DEFAULT_POLICIES[x.tag]
            assert x.owned and x.ref_count == 0 and not x.topic.startswith("__")
            assert NOW - x.created_at >= policy.ttl + policy.grace
