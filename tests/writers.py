"""The production shape of many writers, run for real: several `dagmanager server` processes
(one per Gateway pod) and a `dagmanager operator` process, all on one Neo4j and one Kafka,
each with its node cache on and timed GC every second under GC policies of a few seconds.

Clients play Gateways: overlapping strategies drawn from one shared node pool, two version
labels, two worlds, Cleanup, TagQuery and GC triggers on every sidecar, while the operator
reconciles StrategyDAGs drawn from the same pool. Every Diff answer's topics are checked in
Kafka the moment it arrives. Afterwards `check` reads Neo4j and Kafka directly.

Used by `tests/integration/test_many_writers.py` (bounded, in CI) and by
`bench/writers_bench.py` (the longer soak in `make bench`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import grpc
import orjson
import yaml
from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from kubernetes import client, config

from qmtl_dagmanager.client import DiffReply, GatewayClient
from tests.conftest import Stack, free_port
from tests.unit.dags import node

ROOT = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "qmtl_dagmanager.cli"]
GROUP, VERSION, PLURAL = "qmtl.io", "v1alpha1", "strategydags"
VISIBLE_BOUND = 10.0  # topic_visible_bound_seconds' default: an answered topic is described by then


@dataclass(frozen=True)
class Shape:
    sidecars: int = 3
    operator: bool = True
    seconds: float = 30.0  # traffic for this long at least (see Traffic.done)
    min_diffs: int = 50
    max_seconds: float = 180.0
    clients: int = 6  # concurrent Gateway clients, each owning its strategies
    strategies_per_client: int = 3
    pool: int = 24  # shared nodes the strategies draw from
    dag_nodes: int = 6
    strategy_dags: int = 4  # applied through the operator
    gc_seconds: int = 2  # TTL of raw/indicator queues (grace 1 s)
    intent_grace: int = 4
    seed: int = 0


@dataclass
class Tally:
    diffs: int = 0
    answered_topics: int = 0
    missing_at_answer: list[tuple[str, str]] = field(default_factory=list)
    errors: Counter[str] = field(default_factory=Counter)
    cleanups: int = 0
    tag_queries: int = 0
    gc_triggers: int = 0
    operator_updates: int = 0
    latencies: list[float] = field(default_factory=list)
    seconds: float = 0.0  # how long the traffic ran
    # diffs answered UNAVAILABLE (DependencyTimeout) past the sidecar's answer deadline, their
    # work still running, and asked again at once as the Gateway would: the retry joins it
    rejoined: int = 0
    # answered topics a broker did not describe yet at the answer (acknowledged, not yet in
    # the metadata); each must be described within VISIBLE_BOUND
    pending_at_answer: int = 0

    def percentile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


@dataclass
class Findings:
    """What `check` found in Neo4j and Kafka after the run."""

    queues: int
    referenced: int
    referenced_without_topic: list[str]
    duplicate_slots: list[tuple[str, str, list[str]]]
    topics: int
    topics_without_queue: list[str]
    pending_intents: list[str]

    def violations(self) -> list[str]:
        out = []
        if self.referenced_without_topic:
            out.append(f"referenced queues without a topic: {self.referenced_without_topic[:5]}")
        if self.duplicate_slots:
            out.append(f"several queues for one (node, compute key): {self.duplicate_slots[:3]}")
        if self.topics_without_queue:
            out.append(f"managed topics without a queue: {self.topics_without_queue[:5]}")
        return out


class Fleet:
    """The processes: sidecars and (optionally) the operator, started and stopped together."""

    def __init__(self, stack: Stack, shape: Shape, run: str, workdir: Path) -> None:
        self.stack, self.shape, self.run, self.dir = stack, shape, run, workdir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.sidecars: list[tuple[int, int]] = []  # (grpc, http) ports
        self.namespace = f"mw-{run}"
        self.logs: list[Path] = []

    def _settings(self) -> dict[str, Any]:
        policy = {"ttl_seconds": self.shape.gc_seconds, "grace_seconds": 1, "action": "drop"}
        return {
            "neo4j_dsn": self.stack.neo4j_uri,
            "neo4j_user": self.stack.neo4j_user,
            "kafka_dsn": self.stack.kafka_bootstrap,
            "gc_interval_seconds": 1,
            "gc_trigger_interval_seconds": 0,
            "gc_policies": {"raw": policy, "indicator": policy},
            "gc_intent_grace_seconds": self.shape.intent_grace,
            "gc_archive_bucket": str(self.dir / "archive"),
        }

    def _env(self) -> dict[str, str]:
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))
        }
        env["NEO4J_PASSWORD"] = self.stack.neo4j_password
        env["NEO4J_SSL_CA"] = self.stack.neo4j_ca  # empty: no TLS
        env.update(self.stack.kafka_process_env())  # the Kafka password comes from there too
        return env

    def _spawn(self, args: list[str], name: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = self.dir / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc

    async def start(self) -> None:
        for i in range(self.shape.sidecars):
            grpc_port, http_port = free_port(), free_port()
            cfg = self.dir / f"sidecar-{i}.yml"
            cfg.write_text(
                yaml.safe_dump({**self._settings(), "grpc_port": grpc_port, "http_port": http_port})
            )
            proc = self._spawn([*CLI, "--config", str(cfg), "server"], f"sidecar-{i}", self._env())
            self.sidecars.append((grpc_port, http_port))
            await _serving(grpc_port, proc)
        if self.shape.operator:
            self._install_crds_and_namespace()
            cfg = self.dir / "operator.yml"
            cfg.write_text(yaml.safe_dump(self._settings()))
            env = {**self._env(), "KUBECONFIG": self.stack.kubeconfig}
            self._spawn(
                [
                    *CLI, "--config", str(cfg), "operator", "--namespace", self.namespace,
                    "--resync", "5", "--liveness", f"http://127.0.0.1:{free_port()}/healthz",
                    "--lease-namespace", self.namespace,
                ],
                "operator",
                env,
            )  # fmt: skip

    def _install_crds_and_namespace(self) -> None:
        api = config.new_client_from_config(config_file=self.stack.kubeconfig)
        ext = client.ApiextensionsV1Api(api)
        for path in sorted((ROOT / "crds").glob("*.yaml")):
            crd = yaml.safe_load(path.read_text())
            try:
                ext.create_custom_resource_definition(crd)
            except client.ApiException as e:
                if e.status != 409:
                    raise
        deadline = time.monotonic() + 60
        while True:
            try:
                client.CustomObjectsApi(api).list_namespaced_custom_object(
                    GROUP, VERSION, "default", PLURAL
                )
                break
            except client.ApiException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=self.namespace))
        )
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)

    def stop(self) -> list[int]:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(60))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(p.wait())
        return codes

    def log_lines(self, *needles: str) -> list[str]:
        out = []
        for log in self.logs:
            text = log.read_text(errors="replace") if log.exists() else ""
            out += [
                f"{log.stem}: {line}"
                for line in text.splitlines()
                if any(n in line for n in needles)
            ]
        return out


async def _serving(port: int, proc: subprocess.Popen[bytes], seconds: float = 60) -> None:
    end = time.monotonic() + seconds
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise AssertionError(f"sidecar on {port} exited with {proc.returncode}")
            with contextlib.suppress(grpc.RpcError):
                # types-grpcio-health-checking's HealthStub declares no RPCs
                got = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)  # type: ignore[attr-defined]
                if got.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.2)
    raise AssertionError(f"sidecar on {port} did not become SERVING")


class Traffic:
    """Gateway clients and the platform team's StrategyDAG edits, for `shape.seconds`."""

    def __init__(self, fleet: Fleet, shape: Shape, run: str) -> None:
        self.fleet, self.shape, self.run = fleet, shape, run
        self.worlds = (f"mw{run}a", f"mw{run}b")
        self.pool = [
            node(
                "RawPriceFeed" if i % 2 else "IndicatorNode",
                tags=["BTC", f"mw{run}"],
                code=f"mw-{run}-{i}",
            )
            for i in range(shape.pool)
        ]
        self.kafka = AdminClient(fleet.stack.kafka_client())
        self.tally = Tally()
        self.started = time.monotonic()
        self.clients = [GatewayClient(f"127.0.0.1:{g}") for g, _ in fleet.sidecars]

    def dag(self, rnd: random.Random, version: str) -> bytes:
        picked = rnd.sample(self.pool, self.shape.dag_nodes)
        return orjson.dumps({"schema_version": "v1", "version": version, "nodes": picked})

    async def missing(self, topics: list[str]) -> list[str]:
        """Topics Kafka does not describe within VISIBLE_BOUND seconds of the answer. The
        sidecar answers once the controller has acknowledged a creation (committed); a broker
        describes the topic a moment later (`services/topic_settle.py`). Topics that needed
        that moment are counted in `pending_at_answer`."""
        pending = await self._undescribed(topics)
        if pending:
            self.tally.pending_at_answer += len(pending)
        deadline = time.monotonic() + VISIBLE_BOUND
        while pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            pending = await self._undescribed(pending)
        return pending

    async def _undescribed(self, topics: list[str]) -> list[str]:
        futures = self.kafka.describe_topics(TopicCollection(topics), request_timeout=10)
        out = []
        for name, fut in futures.items():
            try:
                await asyncio.wrap_future(fut)
            except KafkaException:
                out.append(name)
        return out

    def done(self) -> bool:
        """The traffic ends once `seconds` have passed and every kind of call was made
        (`min_diffs` diffs at least), or at `max_seconds` whatever was made: on a slow
        machine the run takes longer instead of covering less."""
        elapsed = time.monotonic() - self.started
        if elapsed < self.shape.seconds:
            return False
        t = self.tally
        covered = t.diffs >= self.shape.min_diffs and t.cleanups and t.tag_queries
        return bool(covered and t.gc_triggers) or elapsed >= self.shape.max_seconds

    async def gateway(self, index: int) -> None:
        rnd = random.Random(self.shape.seed * 1000 + index)
        mine = [f"mw{self.run}-c{index}-s{k}" for k in range(self.shape.strategies_per_client)]
        while not self.done():
            sid = rnd.choice(mine)
            sidecar = rnd.randrange(len(self.clients))
            gw = self.clients[sidecar]
            roll = rnd.random()
            try:
                if roll < 0.15:
                    await gw.cleanup(sid)
                    self.tally.cleanups += 1
                    continue
                if roll < 0.25:
                    await gw.get_queues(["BTC", f"mw{self.run}"], 60, "all")
                    self.tally.tag_queries += 1
                    continue
                if roll < 0.30:
                    await asyncio.to_thread(self._trigger_gc, sidecar)
                    continue
                version = rnd.choice(("v1", "v2"))
                world = rnd.choice(self.worlds)
                started = time.perf_counter()
                doc = self.dag(rnd, version)
                reply = await self._diff(gw, sid, doc, world)
                self.tally.latencies.append(time.perf_counter() - started)
                self.tally.diffs += 1
                topics = sorted(set(reply.queue_map.values()))
                self.tally.answered_topics += len(topics)
                # the strategy is this client's alone: until its next call, nothing may
                # take these topics away
                for t in await self.missing(topics):
                    self.tally.missing_at_answer.append((sid, t))
            except grpc.aio.AioRpcError as e:
                self.tally.errors[f"{e.code().name}: {(e.details() or '')[:80]}"] += 1

    async def _diff(self, gw: GatewayClient, sid: str, doc: bytes, world: str) -> DiffReply:
        """A diff; one slower than the sidecar's answer deadline (GC deleting names it needs,
        writers racing on a crowded machine) is answered UNAVAILABLE while its work goes on,
        and the same request asked again joins that work."""
        for attempt in range(10):
            try:
                return await gw.diff(sid, doc, world_id=world, timeout=30)
            except grpc.aio.AioRpcError as e:
                if "DependencyTimeout" not in (e.details() or "") or attempt == 9:
                    raise
                self.tally.rejoined += 1
        raise AssertionError("not reached")

    def _trigger_gc(self, sidecar: int) -> None:
        _, http_port = self.fleet.sidecars[sidecar]
        req = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/admin/gc-trigger",
            data=orjson.dumps({"id": f"mw{self.run}"}),
            method="POST",
        )
        req.add_header("Content-Type", "application/json")
        try:
            urllib.request.urlopen(req, timeout=30).close()
        except urllib.error.HTTPError as e:
            self.tally.errors[f"gc-trigger HTTP {e.code}: {e.read()[:80]!r}"] += 1
            return
        self.tally.gc_triggers += 1

    async def platform(self) -> None:
        """The platform team applies and edits StrategyDAGs drawn from the same pool."""
        if not self.shape.operator:
            return
        rnd = random.Random(self.shape.seed + 7)
        names = [f"sdag-{k}" for k in range(self.shape.strategy_dags)]
        for name in names:
            await asyncio.to_thread(self._apply, name, rnd, create=True)
        while not self.done():
            await asyncio.sleep(2)
            await asyncio.to_thread(self._apply, rnd.choice(names), rnd, create=False)
            self.tally.operator_updates += 1

    def _spec(self, name: str, rnd: random.Random) -> dict[str, Any]:
        return {
            "strategyId": f"mw{self.run}-{name}",
            "worldId": self.worlds[0],
            "deletionPolicy": "Delete",
            "dag": {"schemaVersion": "v1", "nodes": rnd.sample(self.pool, self.shape.dag_nodes)},
        }

    def _apply(self, name: str, rnd: random.Random, *, create: bool) -> None:
        f = self.fleet
        if create:
            body = {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": "StrategyDAG",
                "metadata": {"name": name},
                "spec": self._spec(name, rnd),
            }
            f.custom.create_namespaced_custom_object(GROUP, VERSION, f.namespace, PLURAL, body)
        else:
            f.custom.patch_namespaced_custom_object(
                GROUP, VERSION, f.namespace, PLURAL, name, {"spec": self._spec(name, rnd)}
            )

    async def operator_settled(self, seconds: float = 90) -> list[dict[str, Any]]:
        """Every StrategyDAG Ready for its latest generation; their status."""
        if not self.shape.operator:
            return []
        f = self.fleet
        end = time.monotonic() + seconds
        while True:
            listed = await asyncio.to_thread(
                f.custom.list_namespaced_custom_object, GROUP, VERSION, f.namespace, PLURAL
            )
            items = cast(dict[str, Any], listed)["items"]
            ready = [
                i
                for i in items
                if i.get("status", {}).get("observedGeneration") == i["metadata"]["generation"]
                and any(
                    c["type"] == "Ready" and c["status"] == "True"
                    for c in i.get("status", {}).get("conditions", [])
                )
            ]
            if len(ready) == len(items):
                return [i["status"] for i in items]
            if time.monotonic() > end:
                raise AssertionError(
                    "StrategyDAGs not Ready: "
                    + json.dumps([i.get("status", {}).get("conditions") for i in items])[:2000]
                )
            await asyncio.sleep(0.5)

    async def play(self) -> Tally:
        self.started = time.monotonic()
        await asyncio.gather(*(self.gateway(i) for i in range(self.shape.clients)), self.platform())
        self.tally.seconds = time.monotonic() - self.started
        return self.tally

    async def close(self) -> None:
        for c in self.clients:
            await c.close()


def check(stack: Stack, run: str) -> Findings:
    """Read Neo4j and Kafka directly: the invariants of many writers, for this run's topics
    (their names start with one of the run's worlds)."""
    prefixes = (f"mw{run}a.", f"mw{run}b.")
    with stack.neo4j_driver() as d:
        rows, _, _ = d.execute_query(
            "MATCH (q:Queue) WHERE any(p IN $prefixes WHERE q.topic STARTS WITH p) "
            "OPTIONAL MATCH (n:ComputeNode)-[:EMITS]->(q) "
            "RETURN q.topic AS topic, n.node_id AS node, q.compute_key AS ck, "
            "COUNT { (q)-[:USED_BY]->() } AS refs",
            prefixes=list(prefixes),
        )
        intents, _, _ = d.execute_query(
            "MATCH (i:TopicIntent) WHERE any(p IN $prefixes WHERE i.topic STARTS WITH p) "
            "RETURN i.topic AS topic",
            prefixes=list(prefixes),
        )
    admin = AdminClient(stack.kafka_client())
    listed = {t for t in admin.list_topics(timeout=30).topics if t.startswith(prefixes)}
    slots: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        slots.setdefault((r["node"], r["ck"]), []).append(r["topic"])
    queues = {r["topic"] for r in rows}
    referenced = [r["topic"] for r in rows if r["refs"]]
    pending = sorted(r["topic"] for r in intents)
    return Findings(
        queues=len(rows),
        referenced=len(referenced),
        referenced_without_topic=sorted(t for t in referenced if t not in listed),
        duplicate_slots=[(n, ck, ts) for (n, ck), ts in slots.items() if len(ts) > 1],
        topics=len(listed),
        topics_without_queue=sorted(listed - queues - set(pending)),
        pending_intents=pending,
    )


async def soak(stack: Stack, shape: Shape, report: Any = print) -> tuple[Tally, Findings, Fleet]:
    """Start the fleet, run the traffic, let GC settle, stop the fleet, check."""
    run = uuid.uuid4().hex[:6]
    workdir = Path(tempfile.mkdtemp(prefix=f"writers-{run}-"))
    fleet = Fleet(stack, shape, run, workdir)
    traffic: Traffic | None = None
    try:
        await fleet.start()
        who = f"{shape.sidecars} sidecars" + (" + the operator" if shape.operator else "")
        report(f"[writers] {who} up; traffic for {shape.seconds:g} s")
        traffic = Traffic(fleet, shape, run)
        tally = await traffic.play()
        report(
            f"[writers] {tally.seconds:.0f} s: {tally.diffs} diffs (p50 "
            f"{tally.percentile(0.5) * 1000:.0f} ms, p95 {tally.percentile(0.95) * 1000:.0f} ms), "
            f"{tally.cleanups} cleanups, {tally.tag_queries} tag queries, {tally.gc_triggers} GC "
            f"triggers, {tally.operator_updates} StrategyDAG edits; {tally.rejoined} diffs "
            f"asked again past the answer deadline; {tally.pending_at_answer} answered topics "
            f"described only after the answer; errors {dict(tally.errors)}"
        )
        await traffic.operator_settled()
        # let every writer's GC and intent sweep see the final state
        await asyncio.sleep(shape.intent_grace + shape.gc_seconds + 4)
    finally:
        if traffic is not None:
            await traffic.close()
        codes = fleet.stop()
    findings = check(stack, run)
    report(
        f"[writers] graph: {findings.queues} queues ({findings.referenced} referenced); kafka: "
        f"{findings.topics} topics; exit codes {codes}"
    )
    return tally, findings, fleet
