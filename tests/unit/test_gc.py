"""Garbage-collection decisions: grace counted from the orphan time, never from creation."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from qmtl_dagmanager.core import gc
from qmtl_dagmanager.core.gc import DAY, GcAction, GcLimits, GcQueue

NOW = 1_800_000_000.0


def q(
    topic: str,
    tag: str = "raw",
    orphan_days: float = 100,
    refs: int = 0,
    owned: bool = True,
    keep: bool = False,
) -> GcQueue:
    """A queue created a year ago, unreferenced for `orphan_days` (when refs is 0)."""
    orphaned = None if refs else NOW - orphan_days * DAY
    return GcQueue(topic, tag, NOW - 365 * DAY, refs, owned, orphaned, keep)


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
    queues = [q(f"t{i}", orphan_days=10 + i) for i in range(50)]
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
    orphaned_at=st.none() | st.floats(NOW - 400 * DAY, NOW + DAY),
    keep=st.booleans(),
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
            assert not x.keep and x.orphaned_at is not None
            assert NOW - x.orphaned_at >= policy.ttl + policy.grace


def test_an_old_queue_orphaned_now_is_kept_until_ttl_and_grace_later() -> None:
    """30 days old, orphaned a minute ago: kept, with its due time in the report."""
    old = GcQueue("raw-q", "raw", NOW - 30 * DAY, 0, True, NOW - 60)
    report = gc.select([old], NOW)
    assert report.decisions == ()
    (kept,) = report.kept
    assert kept.topic == "raw-q" and kept.due == NOW - 60 + 8 * DAY
    assert "TTL 7.0 d + grace 1.0 d" in kept.why
    assert gc.select([old], kept.due - 1).decisions == ()
    due = gc.select([old], kept.due)
    assert [d.topic for d in due.decisions] == ["raw-q"]
    assert due.decisions[0].orphaned_by == NOW - 60  # the claim's cutoff: exactly this orphan


def test_a_queue_without_an_orphan_time_is_stamped_and_kept() -> None:
    """A graph written before orphan times: the first run that sees the queue starts it."""
    legacy = GcQueue("legacy", "raw", NOW - 300 * DAY, 0, True, None)
    report = gc.select([legacy], NOW)
    assert report.stamp == ("legacy",) and report.decisions == ()
    assert report.kept[0].due == NOW + 8 * DAY
    assert gc.select([q("used", refs=1)], NOW).stamp == ()


def test_kept_queues_are_never_selected_and_are_reported() -> None:
    report = gc.select([q("k", keep=True), q("odd", "mystery")], NOW)
    assert report.decisions == ()
    assert report.skipped == {"Kept": 1, "NoPolicy": 1}
    assert {(o.topic, o.due, o.why) for o in report.kept} == {
        ("k", None, "marked keep"),
        ("odd", None, "no GC policy for 'mystery'"),
    }


def test_due_queues_over_the_cap_are_listed_as_kept() -> None:
    queues = [q(f"t{i}", orphan_days=10 + i) for i in range(5)]
    report = gc.select(queues, NOW, limits=GcLimits(max_count=2, max_fraction=1.0))
    assert len(report.decisions) == 2
    assert {o.topic for o in report.kept} == {"t0", "t1", "t2"}
    assert all(o.why == "due, over this run's cap" for o in report.kept)
