"""TopicAdmin contract: the embedded twin and the Kafka admin behave the same."""

from __future__ import annotations

import uuid

import pytest
from confluent_kafka import Producer

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.topics import Profile, TopicCatalog, TopicSpec, TopicType
from qmtl_dagmanager.ports import TopicAdmin, TopicStatus
from tests.conftest import Stack

INDICATOR = TopicCatalog().capped(1).specs[TopicType.INDICATOR]


def names(n: int) -> list[str]:
    run = uuid.uuid4().hex[:6]
    return [f"ct-{run}_t{i}" for i in range(n)]


async def test_batch_create_then_exists_is_success(topic_admin: TopicAdmin) -> None:
    wanted = {n: INDICATOR for n in names(5)}
    first = await topic_admin.ensure(wanted)
    assert {r.status for r in first.values()} == {TopicStatus.CREATED}
    assert set(first) == set(wanted)
    assert set(wanted) <= await topic_admin.list_topics()
    before = await topic_admin.list_topics()
    again = await topic_admin.ensure(wanted)
    assert await topic_admin.list_topics() == before
    assert {r.status for r in again.values()} == {TopicStatus.EXISTS}
    assert all(r.ok for r in again.values())
    states = await topic_admin.describe(list(wanted))
    for s in states.values():
        assert (s.partitions, s.replication_factor) == (1, 1)
        assert s.config["retention.ms"] == str(30 * 86_400_000)
        assert s.config["cleanup.policy"] == "delete"


async def test_different_configuration_is_a_conflict(topic_admin: TopicAdmin) -> None:
    (name,) = names(1)
    await topic_admin.ensure({name: INDICATOR})
    other = TopicSpec(TopicType.INDICATOR, 2, 1, (("retention.ms", "1000"),))
    res = (await topic_admin.ensure({name: other}))[name]
    assert res.status is TopicStatus.CONFLICT and not res.ok
    assert "partitions" in res.message and "retention.ms" in res.message


async def test_case_and_dot_underscore_collisions(topic_admin: TopicAdmin) -> None:
    (name,) = names(1)
    await topic_admin.ensure({name: INDICATOR})
    dotted = name.replace("_", ".")
    upper = name.upper()
    res = await topic_admin.ensure({dotted: INDICATOR, upper: INDICATOR})
    assert res[dotted].status is TopicStatus.COLLISION and name in res[dotted].message
    assert res[upper].status is TopicStatus.COLLISION
    assert dotted not in await topic_admin.list_topics()


async def test_one_bad_topic_does_not_sink_the_batch(topic_admin: TopicAdmin) -> None:
    good = names(3)
    (existing,) = names(1)
    await topic_admin.ensure({existing: INDICATOR})
    batch = {**{n: INDICATOR for n in good}, existing.upper(): INDICATOR}
    res = await topic_admin.ensure(batch)
    assert [res[n].status for n in good] == [TopicStatus.CREATED] * 3
    assert res[existing.upper()].status is TopicStatus.COLLISION


async def test_replication_is_capped_in_development_and_refused_in_production(
    topic_admin: TopicAdmin, request: pytest.FixtureRequest
) -> None:
    rf3 = TopicSpec(TopicType.RAW, 3, 3, (("retention.ms", "604800000"),))
    dev, prod = names(2)
    brokers = await topic_admin.broker_count()
    assert brokers == 1
    res = await topic_admin.ensure({dev: rf3})
    assert res[dev].status is TopicStatus.CREATED
    assert (await topic_admin.describe([dev]))[dev].replication_factor == 1
    if isinstance(topic_admin, MemoryTopicAdmin):
        strict: TopicAdmin = MemoryTopicAdmin(profile=Profile.PRODUCTION)
    else:
        stack: Stack = request.getfixturevalue("stack")
        strict = KafkaTopicAdmin(
            stack.kafka_bootstrap, extra=stack.kafka_security, profile=Profile.PRODUCTION
        )
    refused = (await strict.ensure({prod: rf3}))[prod]
    assert refused.status is TopicStatus.FAILED and "replication factor 3" in refused.message
    assert prod not in await topic_admin.list_topics()


async def test_delete_and_message_counts(
    topic_admin: TopicAdmin, request: pytest.FixtureRequest
) -> None:
    a, b = names(2)
    await topic_admin.ensure({a: INDICATOR, b: INDICATOR})
    if isinstance(topic_admin, MemoryTopicAdmin):
        topic_admin.messages[a] = 3
    else:
        stack: Stack = request.getfixturevalue("stack")
        producer = Producer(stack.kafka_client())
        for i in range(3):
            producer.produce(a, value=f"m{i}".encode())
        assert producer.flush(30) == 0
    assert await topic_admin.message_counts([a, b, "no-such-topic"]) == {a: 3, b: 0}
    assert await topic_admin.delete([a, "no-such-topic-either"]) == {
        a: None,
        "no-such-topic-either": None,
    }
    assert a not in await topic_admin.list_topics()


async def test_created_again_right_after_deletion(topic_admin: TopicAdmin) -> None:
    """GC drops a topic and a diff needs it back at once: the topic exists afterwards."""
    wanted = {n: INDICATOR for n in names(3)}
    for _ in range(3):
        assert all(r.ok for r in (await topic_admin.ensure(wanted)).values())
        assert set((await topic_admin.delete(list(wanted))).values()) == {None}
        again = await topic_admin.ensure(wanted)
        assert all(r.ok for r in again.values()), again
        assert set(await topic_admin.describe(list(wanted))) == set(wanted)
