"""Shared by the benchmarks: the local stack's endpoints, a free port, open-loop load."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import neo4j
from confluent_kafka import KafkaException, TopicCollection
from confluent_kafka.admin import AdminClient
from tests import conftest

from qmtl_dagmanager.adapters.neo4j_graph import tls_options
from qmtl_dagmanager.config import Settings, kafka_security, load

ROOT = Path(__file__).resolve().parent.parent


def stack_env() -> dict[str, str]:
    """The environment, completed with `.stack/env` (written by `make stack-up`)."""
    out = dict(os.environ)
    path = ROOT / ".stack" / "env"
    if path.exists() and "NEO4J_URI" not in out:
        for line in path.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value
    return out


BACKEND_PREFIXES = ("NEO4J_", "KAFKA_")


def backend_env(env: dict[str, str]) -> dict[str, str]:
    """The stack's Neo4j and Kafka variables (URIs, credentials, TLS and SASL settings)."""
    return {k: v for k, v in env.items() if k.startswith(BACKEND_PREFIXES)}


def backend_settings(env: dict[str, str]) -> Settings:
    """Settings for the stack's Neo4j and Kafka, as the product reads them."""
    return load(None, backend_env(env))


def kafka_extra(env: dict[str, str]) -> dict[str, str]:
    """librdkafka security settings of the stack's Kafka (empty on a plaintext one)."""
    return kafka_security(backend_settings(env))


def neo4j_driver(env: dict[str, str]) -> neo4j.Driver:
    s = backend_settings(env)
    uri, tls = tls_options(s.neo4j_uri, s.neo4j_ssl_ca)
    return neo4j.GraphDatabase.driver(uri, auth=(s.neo4j_user, s.neo4j_password), **tls)


def stack_of(env: dict[str, str]) -> conftest.Stack:
    """The test harness's view of the stack, from its environment."""
    return conftest.stack_from_env(env)


def free_port() -> int:
    """A free port below the kernel's ephemeral range (tests/conftest.py says why)."""
    return conftest.free_port()


async def open_loop(
    rate: float,
    seconds: float,
    one: Callable[[int], Awaitable[None]],
    every_second: Callable[[float], None] = lambda elapsed: None,
) -> int:
    """Start `one(i)` at `rate` per second for `seconds`, whether or not earlier requests have
    finished (a slow server builds a backlog, as under a real client), calling `every_second`
    with the elapsed time about once a second; then wait for all. Returns how many started."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(i: int) -> None:
        await one(i)

    start = time.perf_counter()
    i, next_tick = 0, start
    while time.perf_counter() - start < seconds:
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(run(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        now = time.perf_counter()
        if now >= next_tick:
            every_second(now - start)
            next_tick += 1.0
    await asyncio.gather(*tasks)
    return i


def until_described(
    admin: AdminClient, names: list[str], deadline: float, poll: float = 0.05
) -> float | None:
    """Poll the broker every `poll` s until it describes every topic (it applies creations
    after the controller); the `time.perf_counter()` when it did, None past `deadline` (on
    that clock)."""
    pending = list(names)
    while pending:
        if time.perf_counter() > deadline:
            return None
        futures = admin.describe_topics(TopicCollection(pending), request_timeout=30)
        still = []
        for name, fut in futures.items():
            try:
                fut.result()
            except KafkaException:
                still.append(name)
        pending = still
        if pending:
            time.sleep(poll)
    return time.perf_counter()


def start_sidecar(
    env: dict[str, str], name: str, extra: str = ""
) -> tuple[subprocess.Popen[bytes], int]:
    """`dagmanager server` as its own process on the stack's Neo4j and Kafka, configured by
    `.stack/<name>.yml` (timed GC off, warnings only, plus the YAML lines `extra`); secrets
    come from the environment. Returns the process and its gRPC port."""
    port, http = free_port(), free_port()
    cfg = ROOT / ".stack" / f"{name}.yml"
    cfg.parent.mkdir(exist_ok=True)
    cfg.write_text(
        f"neo4j_dsn: {env['NEO4J_URI']}\nneo4j_user: {env['NEO4J_USER']}\nkafka_dsn: "
        f"{env['KAFKA_BOOTSTRAP_SERVERS']}\ngrpc_port: {port}\nhttp_port: {http}\n"
        "gc_interval_seconds: 0\nlog_level: warning\n" + extra
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "qmtl_dagmanager.cli", "--config", str(cfg), "server"],
        env={**os.environ, **backend_env(env)},
    )
    return proc, port
