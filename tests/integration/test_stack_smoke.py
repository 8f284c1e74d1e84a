"""Smoke tests proving that each server of the local stack is the real thing."""

from __future__ import annotations

import threading
import time
import uuid
from typing import Any, cast

from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from kubernetes import client, config, watch

from tests.conftest import Stack


def test_kube_apiserver_serves_crds_and_watches(stack: Stack) -> None:
    api = config.new_client_from_config(config_file=stack.kubeconfig)
    ext = client.ApiextensionsV1Api(api)
    custom = client.CustomObjectsApi(api)
    suffix = uuid.uuid4().hex[:8]
    group = f"smoke{suffix}.qmtl.io"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    # the client sends the manifest's dict as it is; the stub asks for the model
    ext.create_custom_resource_definition(cast(Any, crd))
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            got = ext.read_custom_resource_definition(f"widgets.{group}")
            assert got.status is not None
            conds = {c.type: c.status for c in (got.status.conditions or [])}
            if conds.get("Established") == "True":
                break
            time.sleep(0.1)
        else:
            raise AssertionError("CRD never became Established")

        listed = cast(
            dict[str, Any],
            custom.list_namespaced_custom_object(group, "v1", "default", "widgets"),
        )
        seen: list[dict[str, object]] = []
        ready = threading.Event()

        def watch_events() -> None:
            w = watch.Watch()
            ready.set()
            for ev in w.stream(
                custom.list_namespaced_custom_object,
                group,
                "v1",
                "default",
                "widgets",
                resource_version=listed["metadata"]["resourceVersion"],
                timeout_seconds=20,
            ):
                seen.append(ev)
                w.stop()

        t = threading.Thread(target=watch_events)
        t.start()
        ready.wait(5)
        body = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 3},
        }
        custom.create_namespaced_custom_object(group, "v1", "default", "widgets", body)
        t.join(25)
        assert seen, "the watch saw no event"
        assert seen[0]["type"] == "ADDED"
        obj = seen[0]["object"]
        assert isinstance(obj, dict)
        assert obj["metadata"]["name"] == "w1"
        assert obj["spec"] == {"size": 3}

        # The structural schema is enforced by the real server.
        bad = {**body, "metadata": {"name": "w2"}, "spec": {"size": 0}}
        try:
            custom.create_namespaced_custom_object(group, "v1", "default", "widgets", bad)
        except client.ApiException as e:
            assert e.status == 422
        else:
            raise AssertionError("schema validation did not reject size=0")
    finally:
        ext.delete_custom_resource_definition(f"widgets.{group}")
        api.close()


def test_kafka_broker_creates_topics_and_moves_messages(stack: Stack) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    admin = AdminClient(stack.kafka_client())
    futures = admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
    futures[topic].result(timeout=30)
    try:
        md = admin.list_topics(topic, timeout=10)
        assert len(md.topics[topic].partitions) == 2

        producer = Producer(stack.kafka_client())
        delivered: list[object] = []
        producer.produce(
            topic,
            key=b"k",
            value=b"hello",
            on_delivery=lambda err, msg: delivered.append(err or msg),
        )
        assert producer.flush(30) == 0
        assert delivered and not isinstance(delivered[0], KafkaException)

        consumer = Consumer(
            {
                **stack.kafka_client(),
                "group.id": f"g-{topic}",
                "auto.offset.reset": "earliest",
            }
        )
        consumer.subscribe([topic])
        try:
            deadline = time.monotonic() + 30
            msg = None
            while time.monotonic() < deadline:
                msg = consumer.poll(0.5)
                if msg is not None and msg.error() is None:
                    break
            assert msg is not None and msg.error() is None
            assert (msg.key(), msg.value()) == (b"k", b"hello")
        finally:
            consumer.close()
    finally:
        admin.delete_topics([topic])[topic].result(timeout=30)


def test_neo4j_writes_and_reads_a_node(stack: Stack) -> None:
    marker = uuid.uuid4().hex
    with stack.neo4j_driver() as driver:
        driver.verify_connectivity()
        assert driver.execute_query("RETURN 1 AS one").records[0]["one"] == 1
        driver.execute_query("CREATE (:SmokeTest {marker: $m, n: 42})", m=marker)
        records = driver.execute_query(
            "MATCH (s:SmokeTest {marker: $m}) RETURN s.n AS n", m=marker
        ).records
        assert [r["n"] for r in records] == [42]
        driver.execute_query("MATCH (s:SmokeTest {marker: $m}) DELETE s", m=marker)
        info = driver.get_server_info()
        assert info.agent.startswith("Neo4j/5.26")
