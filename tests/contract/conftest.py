"""Fixtures that give each port twice: the embedded twin and the real adapter on the stack."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from qmtl_dagmanager.adapters.kafka_events import KafkaEventBus, read_events
from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_events import MemoryEventBus
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.ports import EventBus, GraphStore, Published, TopicAdmin
from qmtl_dagmanager.services.controlbus import EVENT_TOPIC_SPEC, EventTopics
from tests.conftest import Stack, settle_publishers

REAL = pytest.mark.integration


@pytest.fixture(params=["memory", pytest.param("neo4j", marks=REAL)])
async def graph(request: pytest.FixtureRequest) -> AsyncIterator[GraphStore]:
    if request.param == "memory":
        store: GraphStore = MemoryGraphStore()
    else:
        stack: Stack = request.getfixturevalue("stack")
        with stack.neo4j_driver() as d:
            d.execute_query("MATCH (n) DETACH DELETE n")
        store = Neo4jGraphStore(
            stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca
        )
    await store.init_schema()
    yield store
    await settle_publishers()
    await store.close()


@pytest.fixture(params=["memory", pytest.param("kafka", marks=REAL)])
async def topic_admin(request: pytest.FixtureRequest) -> AsyncIterator[TopicAdmin]:
    if request.param == "memory":
        admin: TopicAdmin = MemoryTopicAdmin()
        yield admin
        return
    stack: Stack = request.getfixturevalue("stack")
    real = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
    before = await real.list_topics()
    yield real
    leftovers = sorted((await real.list_topics()) - before)
    await real.delete(leftovers)


@dataclass
class Events:
    """An event bus and a way to read back what reached it."""

    bus: EventBus
    read: Callable[[str], list[Published]]
    topics: EventTopics


@pytest.fixture(params=["memory", pytest.param("kafka", marks=REAL)])
async def events(request: pytest.FixtureRequest) -> AsyncIterator[Events]:
    if request.param == "memory":
        mem = MemoryEventBus()
        yield Events(mem, mem.read, EventTopics())
        return
    stack: Stack = request.getfixturevalue("stack")
    run = uuid.uuid4().hex[:6]
    topics = EventTopics(queue=f"queue-{run}", sentinel_weight=f"sentinel_weight-{run}")
    admin = KafkaTopicAdmin(stack.kafka_bootstrap, extra=stack.kafka_security)
    made = await admin.ensure(
        {topics.queue: EVENT_TOPIC_SPEC, topics.sentinel_weight: EVENT_TOPIC_SPEC}
    )
    assert all(r.ok for r in made.values()), made
    bus = KafkaEventBus(stack.kafka_bootstrap, extra=stack.kafka_security)
    yield Events(
        bus, lambda t: read_events(stack.kafka_bootstrap, t, extra=stack.kafka_security), topics
    )
    await bus.close()
    await admin.delete([topics.queue, topics.sentinel_weight])


async def listed_eventually(
    topics: TopicAdmin, check: Callable[[set[str]], bool], seconds: float = 30
) -> None:
    """Until the topic listing passes `check`: Kafka's listing (broker metadata) trails
    creations and deletions briefly."""
    deadline = time.monotonic() + seconds
    while not check(listed := await topics.list_topics()):
        assert time.monotonic() < deadline, sorted(listed)
        await asyncio.sleep(0.2)
