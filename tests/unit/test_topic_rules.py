"""The topic rules both admins share: durability by profile, replication against the brokers,
and what about an existing topic is a conflict or only a durability shortfall."""

from __future__ import annotations

from confluent_kafka import KafkaError

from qmtl_dagmanager.adapters import kafka_topics, topic_rules
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.core.topics import (
    MIN_INSYNC,
    Profile,
    TopicCatalog,
    TopicSpec,
    TopicType,
    durable,
)
from qmtl_dagmanager.ports import BELOW_SPEC, TopicState, TopicStatus

RETAIN = (("cleanup.policy", "delete"), ("retention.ms", "86400000"))
RF2 = TopicSpec(TopicType.INDICATOR, 1, 2, RETAIN)


def test_production_raises_replication_to_three_and_sets_min_insync_two() -> None:
    spec = durable(RF2, Profile.PRODUCTION)
    assert spec.replication_factor == 3
    assert dict(spec.config) == {**dict(RETAIN), MIN_INSYNC: "2"}
    assert durable(RF2, Profile.DEVELOPMENT) is RF2
    catalog = TopicCatalog().for_profile(Profile.PRODUCTION)
    assert {s.replication_factor for s in catalog.specs.values()} == {3}
    assert {dict(s.config)[MIN_INSYNC] for s in catalog.specs.values()} == {"2"}


def test_a_spec_may_ask_more_than_the_floor() -> None:
    spec = TopicSpec(TopicType.RAW, 3, 5, ((MIN_INSYNC, "3"),))
    assert durable(spec, Profile.PRODUCTION) == spec


def test_production_leaves_replication_to_the_controller_when_brokers_are_unknown() -> None:
    spec, why = topic_rules.effective_spec("t", RF2, None, Profile.PRODUCTION)
    assert spec is not None and spec.replication_factor == 3 and not why
    refused, why = topic_rules.effective_spec("t", RF2, 2, Profile.PRODUCTION)
    assert refused is None
    assert "replication factor 3 for t exceeds the 2 registered broker(s)" in why
    capped, _ = topic_rules.effective_spec("t", RF2, 1, Profile.DEVELOPMENT)
    assert capped is not None and capped.replication_factor == 1


def state(rf: int, **config: str) -> TopicState:
    return TopicState("t", 1, rf, {**dict(RETAIN), **config})


def test_fewer_replicas_is_a_shortfall_not_a_conflict() -> None:
    want = durable(RF2, Profile.PRODUCTION)
    result = topic_rules.existing_result("t", want, state(2, **{MIN_INSYNC: "1"}))
    assert result.status is TopicStatus.EXISTS and result.ok
    assert result.message == BELOW_SPEC + "replication 2 < 3; min.insync.replicas 1 < 2"
    assert topic_rules.existing_result("t", want, state(3, **{MIN_INSYNC: "2"})).message == ""
    assert topic_rules.existing_result("t", RF2, state(3, **{MIN_INSYNC: "2"})).message == ""


def test_partitions_and_retention_still_conflict() -> None:
    other = TopicState("t", 4, 3, {"cleanup.policy": "compact", "retention.ms": "86400000"})
    result = topic_rules.existing_result("t", RF2, other)
    assert result.status is TopicStatus.CONFLICT
    assert "partitions 4 != 1" in result.message and "cleanup.policy compact" in result.message


async def test_the_twin_reuses_a_topic_made_before_the_production_profile() -> None:
    admin = MemoryTopicAdmin(brokers=3)
    assert (await admin.ensure({"t": RF2}))["t"].status is TopicStatus.CREATED
    admin.profile = Profile.PRODUCTION
    again = await admin.ensure({"t": RF2, "u": RF2})
    assert again["t"].status is TopicStatus.EXISTS and "replication 2 < 3" in again["t"].message
    assert again["u"].status is TopicStatus.CREATED
    made = (await admin.describe(["u"]))["u"]
    assert made.replication_factor == 3 and made.config[MIN_INSYNC] == "2"


def test_a_fenced_cluster_is_transient_too_few_brokers_is_not() -> None:
    fenced = KafkaError(
        KafkaError.INVALID_REPLICATION_FACTOR,
        "Unable to replicate the partition 3 time(s): All brokers are currently fenced.",
    )
    too_few = KafkaError(
        KafkaError.INVALID_REPLICATION_FACTOR,
        "Unable to replicate the partition 3 time(s): The target replication factor of 3 "
        "cannot be reached because only 1 broker(s) are registered.",
    )
    assert kafka_topics._transient(fenced)
    assert not kafka_topics._transient(too_few)
