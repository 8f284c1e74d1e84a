"""Shared by the benchmarks: the local stack's endpoints, a free port, open-loop load."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import neo4j
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
