"""Many writers for real: three `dagmanager server` processes and a `dagmanager operator`
process on one Neo4j and one Kafka, node caches on at their default TTL, GC every second under
GC policies of a few seconds, overlapping strategies and versions, Cleanup, TagQuery and GC
triggers on every sidecar. Afterwards Neo4j and Kafka are read directly (`tests/writers.py`).
`bench/writers_bench.py` runs the same for longer."""

from __future__ import annotations

import pytest

from tests.conftest import Stack
from tests.writers import Shape, soak

pytestmark = pytest.mark.integration


async def test_many_writers_never_give_a_wrong_answer(stack: Stack) -> None:
    tally, findings, fleet = await soak(stack, Shape(seconds=30))
    # every Diff answer's topics were committed when the answer arrived and are described by
    # a broker within the stated bound (the answer comes on the controller's acknowledgement)
    assert tally.missing_at_answer == []
    # no valid diff was refused or failed: no CrossContextReuse, no INTERNAL, no UNAVAILABLE
    assert dict(tally.errors) == {}
    assert tally.diffs >= 50 and tally.cleanups and tally.tag_queries and tally.gc_triggers
    # the graph and Kafka agree: one queue per (node, compute key), every referenced queue
    # has its topic, no topic of ours without a queue (beyond creation intents in flight)
    assert findings.violations() == []
    assert findings.referenced > 0
    # GC really ran under the traffic and collected what the cleanups released
    assert fleet.log_lines("gc collected"), "no GC run collected anything"
    # no traceback in any writer's log
    assert fleet.log_lines("Traceback") == []
