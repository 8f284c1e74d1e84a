"""Kafka's security on the local stack: SASL_SSL with SCRAM users and the StandardAuthorizer.
The product's principals have only the ACLs they need; a principal without ACLs, or with a
wrong password, gets a clear error in bounded time, and nothing is half-written."""

from __future__ import annotations

import dataclasses
import time
import uuid
from pathlib import Path
from typing import Any

import grpc
import pytest
from confluent_kafka import KafkaException
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    NewTopic,
    ResourcePatternType,
    ResourceType,
)

from qmtl_dagmanager.adapters.kafka_topics import KafkaTopicAdmin
from qmtl_dagmanager.config import kafka_security
from qmtl_dagmanager.core.errors import Conflict, Unavailable
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.ports import TopicResult, TopicStatus
from qmtl_dagmanager.services.controlbus import EVENT_TOPIC_SPEC
from qmtl_dagmanager.services.diffs import DiffService
from qmtl_dagmanager.sidecar import app
from qmtl_dagmanager.sidecar.errors import code_for
from tests.conftest import Stack
from tests.integration.conftest import real_settings

pytestmark = pytest.mark.integration


def secured(stack: Stack) -> None:
    if not stack.kafka_users:
        pytest.fail("the stack's Kafka is not secured (no SCRAM users in its env)")


def topics_now(stack: Stack) -> set[str]:
    return set(AdminClient(stack.kafka_client()).list_topics(timeout=10).topics)


async def test_a_principal_without_acls_is_refused_clearly(stack: Stack, tmp_path: Path) -> None:
    """A sidecar whose principal has no ACLs stops at start with the principal and Kafka's
    reason, at once; creating topics as it is FORBIDDEN (never retried until a deadline) and
    creates nothing."""
    secured(stack)
    settings = dataclasses.replace(
        real_settings(stack, archive_dir=str(tmp_path)), **stack.kafka_settings("noacl")
    )
    before = topics_now(stack)
    started = time.monotonic()
    with pytest.raises(RuntimeError) as e:
        await app.start(settings)
    assert time.monotonic() - started < 30
    message = str(e.value)
    assert "cannot prepare the ControlBus topics" in message, message
    assert "TOPIC_AUTHORIZATION_FAILED" in message and "User:qmtl-noacl" in message, message
    noacl = KafkaTopicAdmin(settings.kafka_bootstrap, extra=kafka_security(settings))
    names = [f"noacl-{uuid.uuid4().hex[:8]}-{i}" for i in range(3)]
    started = time.monotonic()
    results = await noacl.ensure({n: EVENT_TOPIC_SPEC for n in names})
    assert time.monotonic() - started < 15
    assert {r.status for r in results.values()} == {TopicStatus.FORBIDDEN}
    assert all("User:qmtl-noacl" in r.message for r in results.values())
    assert topics_now(stack) == before  # nothing was created


def test_forbidden_topics_fail_a_diff_with_the_reason() -> None:
    """How a diff reports them: FAILED_PRECONDITION, reason KafkaForbidden, naming what the
    principal lacks (the gRPC mapping of a Conflict)."""
    service = DiffService.__new__(DiffService)
    service.metrics = Metrics()
    bad = {"t1": TopicResult("t1", TopicStatus.FORBIDDEN, "TOPIC_AUTHORIZATION_FAILED: x")}
    with pytest.raises(Conflict) as e:
        service._raise_for_topics(bad)
    assert e.value.reason == "KafkaForbidden"
    assert code_for(e.value) is grpc.StatusCode.FAILED_PRECONDITION
    assert "CREATE, DESCRIBE" in e.value.message and "t1" in e.value.message


async def test_a_wrong_password_is_unavailable_with_the_reason(
    stack: Stack, tmp_path: Path
) -> None:
    secured(stack)
    settings = dataclasses.replace(
        real_settings(stack, archive_dir=str(tmp_path)), kafka_sasl_password="not-the-password"
    )

    async def attempt() -> None:
        s = await app.start(settings)
        await s.stop(0)

    started = time.monotonic()
    with pytest.raises(Exception) as e:  # noqa: PT011 - the message is what is checked
        await attempt()
    assert time.monotonic() - started < 60
    message = str(e.value)
    assert "Kafka refused this client (User:qmtl-sidecar)" in message, message
    assert "invalid credentials with SASL mechanism SCRAM-SHA-512" in message, message
    assert isinstance(e.value, Unavailable) and e.value.reason == "KafkaAuthFailed"


def test_the_product_principal_has_only_its_acls(stack: Stack) -> None:
    """The sidecar's principal manages topics but cannot grant itself more, nor read a
    consumer group outside its prefix."""
    secured(stack)
    sidecar: dict[str, Any] = {"bootstrap.servers": stack.kafka_bootstrap, **stack.kafka_security}
    admin = AdminClient(sidecar)
    grab = AclBinding(
        ResourceType.TOPIC,
        "*",
        ResourcePatternType.LITERAL,
        f"User:{stack.kafka_env['KAFKA_SASL_USERNAME']}",
        "*",
        AclOperation.ALL,
        AclPermissionType.ALLOW,
    )
    with pytest.raises(KafkaException) as e:
        admin.create_acls([grab])[grab].result(timeout=15)
    assert "CLUSTER_AUTHORIZATION_FAILED" in str(e.value) or "uthoriz" in str(e.value)
    with pytest.raises(KafkaException) as e:
        admin.describe_consumer_groups(["someone-elses-group"])["someone-elses-group"].result(
            timeout=15
        )
    assert "GROUP_AUTHORIZATION_FAILED" in str(e.value), str(e.value)
    own = "qmtl-reader-acl-check"  # the prefix its readers and archives use
    admin.describe_consumer_groups([own])[own].result(timeout=15)
    topic = f"acl-{uuid.uuid4().hex[:8]}"
    admin.create_topics([NewTopic(topic, 1, 1)])[topic].result(timeout=15)  # that it may
    admin.delete_topics([topic])[topic].result(timeout=15)
