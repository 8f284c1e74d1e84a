"""Fixtures that give each port twice: the embedded twin and the real adapter on the stack."""

from __future__ import annotations

from collections.abc import AsyncIterator

import neo4j
import pytest

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.ports import GraphStore, TopicAdmin
from tests.conftest import Stack

REAL = pytest.mark.integration


@pytest.fixture(params=["memory", pytest.param("neo4j", marks=REAL)])
async def graph(request: pytest.FixtureRequest) -> AsyncIterator[GraphStore]:
    if request.param == "memory":
        store: GraphStore = MemoryGraphStore()
    else:
        stack: Stack = request.getfixturevalue("stack")
        with neo4j.GraphDatabase.driver(
            stack.neo4j_uri, auth=(stack.neo4j_user, stack.neo4j_password)
        ) as d:
            d.execute_query("MATCH (n) DETACH DELETE n")
        store = Neo4jGraphStore(stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password)
    await store.init_schema()
    yield store
    await store.close()


@pytest.fixture(params=["memory", pytest.param("kafka", marks=REAL)])
async def topic_admin(request: pytest.FixtureRequest) -> AsyncIterator[TopicAdmin]:
    if request.param == "memory":
        admin: TopicAdmin = MemoryTopicAdmin()
        yield admin
        return
    stack: Stack = request.getfixturevalue("stack")
    real = KafkaTopicAdmin(stack.kafka_bootstrap)
    before = await real.list_topics()
    yield real
    leftovers = sorted((await real.list_topics()) - before)
    await real.delete(leftovers)
