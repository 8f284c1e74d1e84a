"""Making sure the topics of queues the graph records exist: used when a diff or a GC run
finds that a queue GC was dropping is referenced again."""

from __future__ import annotations

from collections.abc import Sequence

from qmtl_dagmanager.core.topics import TopicCatalog
from qmtl_dagmanager.ports import GraphStore, TopicAdmin, TopicResult


async def ensure_queue_topics(
    graph: GraphStore, topics: TopicAdmin, catalog: TopicCatalog, queues: Sequence[str]
) -> dict[str, TopicResult]:
    """Each named queue's topic, created if missing, as the catalog specifies its type (the
    same spec a diff creates it with, so drift repair finds nothing to report)."""
    recorded = await graph.queues(queues)
    return await topics.ensure({q.topic: catalog.spec_for_tag(q.tag) for q in recorded})
