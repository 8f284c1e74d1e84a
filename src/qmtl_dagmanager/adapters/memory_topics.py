"""The embedded topic admin: the Kafka admin's semantics, in memory."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from qmtl_dagmanager.adapters import topic_rules
from qmtl_dagmanager.core.topics import Profile, TopicSpec
from qmtl_dagmanager.ports import TopicResult, TopicState, TopicStatus


class MemoryTopicAdmin:
    def __init__(self, brokers: int = 1, profile: Profile = Profile.DEVELOPMENT) -> None:
        """`brokers`: the brokers the twin's cluster has registered (its controller refuses
        replication above it under the production profile, as Kafka's does)."""
        self.topics: dict[str, TopicState] = {}
        self.messages: dict[str, int] = {}
        self.brokers = brokers
        self.profile = profile
        self.create_requests = 0  # batched create calls, for tests

    async def ensure(
        self, topics: Mapping[str, TopicSpec], *, wait_visible: bool = True
    ) -> dict[str, TopicResult]:
        specs, results = topic_rules.admit(topics, self.topics, self.brokers, self.profile)
        to_create: dict[str, TopicSpec] = {}
        for name, spec in specs.items():
            state = self.topics.get(name)
            if state is None:
                to_create[name] = spec
                continue
            results[name] = topic_rules.existing_result(name, spec, state)
        if to_create:
            self.create_requests += 1
        for name, spec in to_create.items():
            self.topics[name] = TopicState(
                name, spec.partitions, spec.replication_factor, dict(spec.config)
            )
            self.messages.setdefault(name, 0)
            results[name] = TopicResult(name, TopicStatus.CREATED)
        return results

    async def validate(self, topics: Mapping[str, TopicSpec]) -> dict[str, TopicResult]:
        specs, results = topic_rules.admit(topics, self.topics, self.brokers, self.profile)
        for name in specs:
            status = TopicStatus.EXISTS if name in self.topics else TopicStatus.CREATED
            results[name] = TopicResult(name, status)
        return results

    async def unseen(self, topics: Sequence[str]) -> list[str]:
        return [t for t in topics if t not in self.topics]

    async def describe(self, topics: Sequence[str]) -> dict[str, TopicState]:
        return {t: self.topics[t] for t in topics if t in self.topics}

    async def list_topics(self) -> set[str]:
        return set(self.topics)

    async def delete(self, topics: Sequence[str]) -> dict[str, str | None]:
        for t in topics:
            self.topics.pop(t, None)
            self.messages.pop(t, None)
        return dict.fromkeys(topics)

    async def message_counts(self, topics: Sequence[str]) -> dict[str, int]:
        return {t: self.messages.get(t, 0) for t in topics if t in self.topics}

    async def broker_count(self) -> int:
        return self.brokers

    async def close(self) -> None:
        return None
