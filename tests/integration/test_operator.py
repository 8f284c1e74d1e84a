"""The StrategyDAG operator in-process (kopf) against the real kube-apiserver, Neo4j and Kafka."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path

from kubernetes import client

from qmtl_dagmanager.core import identity
from tests.conftest import Stack, free_port, kafka_env_of
from tests.gen import generate
from tests.integration.kube_harness import Cluster, condition, spec_of, until

ROOT = Path(__file__).resolve().parent.parent.parent


async def test_strategydag_lifecycle(cluster: Cluster) -> None:
    sample = json.loads((ROOT / "tests" / "data" / "sample-dag.json").read_text())
    salt = uuid.uuid4().hex[:6]
    for n in sample["nodes"]:
        n["name"] = f"{n['name']}-{salt}"
    strategy = f"s-{salt}"
    cluster.create("sample", spec_of(sample, strategy))
    obj = await cluster.ready("sample")
    st = obj["status"]
    assert (
        st["nodes"] == {"total": 3, "reused": 0, "buffered": 0, "new": 3}
        or st["nodes"]["total"] == 3
    )
    assert st["sentinelId"] == f"{strategy}-sentinel" and st["observedGeneration"] == 1
    topics = st["topics"]
    assert set(topics) == {n["node_id"] for n in sample["nodes"]}
    have = await cluster.container.topics.describe(list(topics.values()))
    assert set(have) == set(topics.values())
    catalog = {t: (s.partitions, s.config.get("retention.ms")) for t, s in have.items()}
    assert all(p >= 1 and r for p, r in catalog.values())
    graph = cluster.container.graph
    assert await graph.strategy_nodes(strategy) == set(topics)
    assert any(e.startswith("Reconciled") for e in cluster.events("sample"))
    reg = cluster.container.metrics.registry
    assert (
        reg.get_sample_value(
            "operator_reconcile_total", {"trigger": "create", "result": "reconciled"}
        )
        or 0
    ) >= 1

    # change one leaf node: exactly one new topic, the rest reused
    changed = copy.deepcopy(sample)
    leaf = changed["nodes"][2]  # the TagQueryNode: nothing depends on it
    leaf["params"]["query_tags"] = ["BTC", f"X{salt}"]  # new content: a new node id
    leaf["tags"] = ["BTC", f"X{salt}"]
    leaf["node_id"] = identity.node_id(leaf)
    cluster.patch_spec("sample", {"dag": {"nodes": changed["nodes"]}})
    obj = await until(
        lambda: (
            (cluster.get("sample").get("status") or {}).get("observedGeneration") == 2
            and cluster.get("sample")
        ),
        what="gen 2",
    )
    assert obj["status"]["nodes"]["new"] == 1 and obj["status"]["nodes"]["reused"] == 2
    assert condition(obj, "Ready")["status"] == "True"

    # delete: the finalizer drops the references
    cluster.delete("sample")
    await cluster.all_deleted()
    assert await graph.strategy_nodes(strategy) == set()


async def test_invalid_dag_is_permanent_and_writes_nothing(cluster: Cluster) -> None:
    doc = generate(4, salt=uuid.uuid4().hex[:6])
    del doc["nodes"][1]["code_hash"]
    strategy = f"bad-{uuid.uuid4().hex[:6]}"
    cluster.create("bad", spec_of(doc, strategy))
    obj = await until(
        lambda: condition(cluster.get("bad"), "Ready").get("reason") and cluster.get("bad"),
        what="a Ready condition",
    )
    ready = condition(obj, "Ready")
    assert ready["status"] == "False" and ready["reason"] == "MissingField"
    assert doc["nodes"][1]["node_id"] in ready["message"] and "code_hash" in ready["message"]
    assert obj["status"]["phase"] == "Failed"
    assert await cluster.container.graph.strategy_nodes(strategy) == set()
    assert any(e.startswith("MissingField") for e in cluster.events("bad"))


async def test_ids_of_a_configmap_dag_are_verified(cluster: Cluster) -> None:
    doc = generate(4, salt=uuid.uuid4().hex[:6])
    doc["nodes"][1]["period"] = 999  # content no longer matches its id
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="tampered"), data={"dag.json": json.dumps(doc)}
        ),
    )
    strategy = f"tamper-{uuid.uuid4().hex[:6]}"
    cluster.create(
        "tamper",
        {"strategyId": strategy, "dagConfigMapRef": {"name": "tampered", "key": "dag.json"}},
    )
    obj = await until(
        lambda: condition(cluster.get("tamper"), "Ready").get("reason") and cluster.get("tamper"),
        what="a Ready condition",
    )
    assert condition(obj, "Ready")["reason"] == "NodeIdMismatch"
    assert await cluster.container.graph.strategy_nodes(strategy) == set()


async def test_integral_floats_survive_the_api_server(cluster: Cluster) -> None:
    # The API server stores 0.0 as 0; an inline DAG is still accepted under its SDK ids.
    doc = generate(3, salt=uuid.uuid4().hex[:6])
    doc["nodes"][-1]["params"] = {"alpha": 0.0, "beta": 2.0}
    doc["nodes"][-1]["node_id"] = identity.node_id(doc["nodes"][-1])
    cluster.create("floats", spec_of(doc, f"floats-{uuid.uuid4().hex[:6]}"))
    obj = await cluster.ready("floats")
    assert doc["nodes"][-1]["node_id"] in obj["status"]["topics"]


async def test_dry_run_plans_without_writing(cluster: Cluster) -> None:
    doc = generate(6, salt=uuid.uuid4().hex[:6])
    strategy = f"dry-{uuid.uuid4().hex[:6]}"
    cluster.create("dry", spec_of(doc, strategy, dryRun=True))
    obj = await until(
        lambda: (
            (cluster.get("dry").get("status") or {}).get("phase") == "Planned"
            and cluster.get("dry")
        ),
        what="a plan",
    )
    plan = obj["status"]["plan"]
    assert plan["counts"]["new"] == 6 and len(plan["nodes"]) == 6
    assert await cluster.container.graph.strategy_nodes(strategy) == set()
    topics = {n["topic"] for n in plan["nodes"]}
    assert not topics & await cluster.container.topics.list_topics()


async def test_dag_from_a_configmap(cluster: Cluster) -> None:
    doc = generate(30, salt=uuid.uuid4().hex[:6])
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="big-dag"), data={"dag.json": json.dumps(doc)}
        ),
    )
    strategy = f"cm-{uuid.uuid4().hex[:6]}"
    cluster.create(
        "cm",
        {
            "strategyId": strategy,
            "worldId": "w1",
            "dagConfigMapRef": {"name": "big-dag", "key": "dag.json"},
        },
    )
    obj = await cluster.ready("cm")
    assert obj["status"]["nodes"]["total"] == 30
    assert len(await cluster.container.graph.strategy_nodes(strategy)) == 30


async def test_large_topic_maps_go_to_an_owned_configmap(cluster: Cluster) -> None:
    doc = generate(250, salt=uuid.uuid4().hex[:6])
    cluster.core.create_namespaced_config_map(
        cluster.namespace,
        client.V1ConfigMap(
            metadata=client.V1ObjectMeta(name="large-dag"), data={"dag.json": json.dumps(doc)}
        ),
    )
    strategy = f"large-{uuid.uuid4().hex[:6]}"
    cluster.create(
        "large",
        {
            "strategyId": strategy,
            "worldId": "w1",
            "deletionPolicy": "Retain",
            "dagConfigMapRef": {"name": "large-dag", "key": "dag.json"},
        },
    )
    obj = await cluster.ready("large", 120)
    st = obj["status"]
    assert st["topicCount"] == 250 and not st.get("topics")
    cm = cluster.core.read_namespaced_config_map(st["topicsConfigMap"], cluster.namespace)
    assert cm.data is not None and cm.metadata is not None
    topics = json.loads(cm.data["topics.json"])
    assert set(topics) == {n["node_id"] for n in doc["nodes"]}
    assert cm.metadata.owner_references is not None
    owner = cm.metadata.owner_references[0]
    assert (owner.kind, owner.name, owner.uid) == ("StrategyDAG", "large", obj["metadata"]["uid"])
    cluster.delete("large")  # Retain reads the topics from the ConfigMap
    await cluster.all_deleted(60)
    details = await cluster.container.graph.queues(list(topics.values()))
    assert len(details) == 250 and {q.managed for q in details} == {False}


async def test_retain_keeps_topics_as_unmanaged(cluster: Cluster) -> None:
    doc = generate(5, salt=uuid.uuid4().hex[:6])
    strategy = f"keep-{uuid.uuid4().hex[:6]}"
    cluster.create("keep", spec_of(doc, strategy, deletionPolicy="Retain"))
    obj = await cluster.ready("keep")
    topics = list(obj["status"]["topics"].values())
    cluster.delete("keep")
    await cluster.all_deleted()
    graph = cluster.container.graph
    assert await graph.strategy_nodes(strategy) == set()
    assert {q.managed for q in await graph.queues(topics)} == {False}
    assert set(topics) <= await cluster.container.topics.list_topics()


async def test_drift_is_corrected_on_resync(cluster: Cluster) -> None:
    doc = generate(4, salt=uuid.uuid4().hex[:6])
    cluster.create("drift", spec_of(doc, f"drift-{uuid.uuid4().hex[:6]}"))
    obj = await cluster.ready("drift")
    victim = sorted(obj["status"]["topics"].values())[0]
    admin = cluster.container.topics
    assert (await admin.delete([victim]))[victim] is None
    await until(
        lambda: any(
            e.startswith("DriftCorrected") and victim in e for e in cluster.events("drift")
        ),
        60,
        "a DriftCorrected event",
    )
    assert victim in await admin.list_topics()


async def test_restart_mid_reconcile_converges_without_duplicates(cluster: Cluster) -> None:
    doc = generate(40, salt=uuid.uuid4().hex[:6])
    strategy = f"restart-{uuid.uuid4().hex[:6]}"
    cluster.create("restart", spec_of(doc, strategy))
    await until(  # the operator has picked it up and is working on it
        lambda: (
            "qmtl.io/strategy-cleanup"
            in (cluster.get("restart")["metadata"].get("finalizers") or [])
        ),
        30,
        "the operator's finalizer on the new StrategyDAG",
    )
    await cluster.stop_operator()
    await cluster.start_operator()
    obj = await cluster.ready("restart")
    topics = obj["status"]["topics"]
    assert len(topics) == 40 and len(set(topics.values())) == 40
    graph = cluster.container.graph
    assert len(await graph.strategy_nodes(strategy)) == 40
    details = await graph.queues(list(topics.values()))
    assert len(details) == 40 and {q.ref_count for q in details} == {1}


async def test_kafka_outage_degrades_then_recovers(cluster: Cluster, stack: Stack) -> None:
    """Kafka stopped during a reconcile: Degraded with the reason, retried with backoff,
    Ready once the broker is back, with every topic created exactly once."""
    doc = generate(6, salt=uuid.uuid4().hex[:6])
    strategy = f"outage-{uuid.uuid4().hex[:6]}"
    stack.stop_server("kafka")
    try:
        cluster.create("outage", spec_of(doc, strategy))
        degraded = await until(
            lambda: (
                condition(cluster.get("outage"), "Degraded").get("status") == "True"
                and cluster.get("outage")
            ),
            90,
            "Degraded",
        )
        assert condition(degraded, "Degraded")["reason"] == "KafkaUnavailable"
        assert condition(degraded, "Ready")["status"] == "False"
        assert not await cluster.container.graph.strategy_nodes(strategy)  # nothing half-written
    finally:
        stack.start_server("kafka")
    obj = await cluster.ready("outage", 120)
    assert condition(obj, "Degraded")["status"] == "False"
    topics = obj["status"]["topics"]
    assert len(topics) == 6 and len(set(topics.values())) == 6
    assert set(topics.values()) <= await cluster.container.topics.list_topics()
    assert any(e.startswith("KafkaUnavailable") for e in cluster.events("outage"))


async def test_operator_process_probes_and_metrics(cluster: Cluster) -> None:
    """`dagmanager operator` as a process: liveness with the graph probe, /metrics, SIGTERM."""
    live, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "KUBECONFIG": os.environ["KUBECONFIG"],
        "NEO4J_URI": cluster.settings.neo4j_uri,
        "NEO4J_SSL_CA": cluster.settings.neo4j_ssl_ca,
        "NEO4J_USER": cluster.settings.neo4j_user,
        "NEO4J_PASSWORD": cluster.settings.neo4j_password,
        **kafka_env_of(cluster.settings),
    }
    await cluster.stop_operator()  # one operator per namespace
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmtl_dagmanager.cli",
            "operator",
            "--namespace",
            cluster.namespace,
            "--liveness",
            f"http://127.0.0.1:{live}/healthz",
            "--metrics-port",
            str(metrics_port),
        ],
        env=env,
    )
    try:
        doc = generate(3, salt=uuid.uuid4().hex[:6])
        cluster.create("proc", spec_of(doc, f"proc-{uuid.uuid4().hex[:6]}"))
        await until(
            lambda: condition(cluster.get("proc"), "Ready").get("status") == "True",
            what="Ready from the operator process",
        )

        def fetch(url: str) -> str:
            with urllib.request.urlopen(url, timeout=2) as r:
                return str(r.read().decode())

        health = await until(
            lambda: _try(fetch, f"http://127.0.0.1:{live}/healthz"), what="liveness"
        )
        assert json.loads(health).get("graph") == "ok"
        text = await until(
            lambda: _try(fetch, f"http://127.0.0.1:{metrics_port}/metrics"), what="metrics"
        )
        assert "operator_reconcile_total" in text and "diff_requests_total" in text
        cluster.delete("proc")
        await cluster.all_deleted()
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
        await cluster.start_operator()


def _try(fn: Callable[[str], str], url: str) -> str | None:
    try:
        return fn(url)
    except OSError:
        return None
