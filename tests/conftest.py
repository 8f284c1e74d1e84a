"""Test harness: markers, and the session fixture that finds or starts the real local stack.

Integration tests read the endpoints from the environment (KUBECONFIG, NEO4J_URI, NEO4J_USER,
NEO4J_PASSWORD, KAFKA_BOOTSTRAP_SERVERS), falling back to `.stack/env` written by
`make stack-up`. If no healthy stack is found the fixture starts one (and stops it at the end).
Under CI=true a stack that cannot start fails the run; elsewhere the integration tests skip
with the reason.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import neo4j
import pytest

from qmtl_dagmanager.adapters.neo4j_graph import tls_options
from qmtl_dagmanager.config import Settings, kafka_security
from qmtl_dagmanager.services.queue_events import DRAIN_TASK

ROOT = Path(__file__).resolve().parent.parent
STACK = [sys.executable, str(ROOT / "hack" / "stack" / "stack.py")]
KAFKA_ENV_KEYS = (
    "KAFKA_SECURITY_PROTOCOL",
    "KAFKA_SASL_MECHANISM",
    "KAFKA_SASL_USERNAME",
    "KAFKA_SASL_PASSWORD",
    "KAFKA_SSL_CA",
)
KAFKA_FIELDS = (
    "kafka_bootstrap",
    "kafka_security_protocol",
    "kafka_sasl_mechanism",
    "kafka_sasl_username",
    "kafka_sasl_password",
    "kafka_ssl_ca",
)
ENV_KEYS = (
    "KUBECONFIG",
    "NEO4J_URI",
    "NEO4J_USER",
    "NEO4J_PASSWORD",
    "KAFKA_BOOTSTRAP_SERVERS",
    "QMTL_S3_ENDPOINT",
    "QMTL_S3_ACCESS_KEY",
    "QMTL_S3_SECRET_KEY",
    "QMTL_S3_BUCKET",
)


@dataclass(frozen=True)
class Stack:
    kubeconfig: str
    neo4j_uri: str
    neo4j_user: str
    neo4j_password: str
    kafka_bootstrap: str
    s3_endpoint: str
    s3_access_key: str
    s3_secret_key: str
    s3_bucket: str
    # Kafka's security: the product's principal (KAFKA_* variables), plus the stack's other
    # principals by role ("operator", "admin" for tests acting as the world, "noacl")
    neo4j_ca: str = ""  # PEM CA of a TLS Neo4j (bolt+s://), from NEO4J_SSL_CA
    kafka_env: dict[str, str] = field(default_factory=dict)
    kafka_users: dict[str, tuple[str, str]] = field(default_factory=dict)

    def neo4j_driver(self) -> neo4j.Driver:
        """A driver for the stack's Neo4j (TLS with the stack's CA when it serves TLS)."""
        uri, tls = tls_options(self.neo4j_uri, self.neo4j_ca)
        return neo4j.GraphDatabase.driver(uri, auth=(self.neo4j_user, self.neo4j_password), **tls)

    @property
    def neo4j_env(self) -> dict[str, str]:
        """Environment variables that give a child process the stack's Neo4j."""
        env = {
            "NEO4J_URI": self.neo4j_uri,
            "NEO4J_USER": self.neo4j_user,
            "NEO4J_PASSWORD": self.neo4j_password,
        }
        if self.neo4j_ca:
            env["NEO4J_SSL_CA"] = self.neo4j_ca
        return env

    @property
    def kafka_security(self) -> dict[str, str]:
        """librdkafka settings for the product's principal (empty on a plaintext stack)."""
        return kafka_security(self.kafka_fields())

    def kafka_fields(self, role: str = "") -> Settings:
        """Settings with the stack's Kafka, as `role` (default: the product's principal)."""
        e = self.kafka_env
        user, password = e.get("KAFKA_SASL_USERNAME", ""), e.get("KAFKA_SASL_PASSWORD", "")
        if role:
            user, password = self.kafka_users[role]
        return dataclasses.replace(
            Settings(),
            kafka_bootstrap=self.kafka_bootstrap,
            kafka_security_protocol=e.get("KAFKA_SECURITY_PROTOCOL", "plaintext").lower(),
            kafka_sasl_mechanism=e.get("KAFKA_SASL_MECHANISM", "SCRAM-SHA-512"),
            kafka_sasl_username=user,
            kafka_sasl_password=password,
            kafka_ssl_ca=e.get("KAFKA_SSL_CA", ""),
        )

    def kafka_settings(self, role: str = "") -> dict[str, Any]:
        """The Kafka fields of Settings, for `dataclasses.replace(settings, **...)`."""
        f = self.kafka_fields(role)
        return {k: getattr(f, k) for k in KAFKA_FIELDS}

    def kafka_client(self, role: str = "admin") -> dict[str, Any]:
        """librdkafka settings (bootstrap included) for a raw client, by default the stack's
        super user: tests that produce, consume or inspect act as the world, not the product."""
        if not self.kafka_users:
            return {"bootstrap.servers": self.kafka_bootstrap}
        return {
            "bootstrap.servers": self.kafka_bootstrap,
            **kafka_security(self.kafka_fields(role)),
        }

    def kafka_process_env(self, role: str = "") -> dict[str, str]:
        """Environment variables that give a child process the stack's Kafka, as `role`."""
        env = {"KAFKA_BOOTSTRAP_SERVERS": self.kafka_bootstrap, **self.kafka_env}
        if role and role in self.kafka_users:
            env["KAFKA_SASL_USERNAME"], env["KAFKA_SASL_PASSWORD"] = self.kafka_users[role]
        return env

    def s3_settings(self, prefix: str) -> dict[str, str]:
        """Environment settings that send archives to the stack's bucket under `prefix`."""
        return {
            "QMTL_ARCHIVE_DIR": f"s3://{self.s3_bucket}/{prefix}",
            "QMTL_S3_ENDPOINT": self.s3_endpoint,
            "QMTL_S3_ACCESS_KEY": self.s3_access_key,
            "QMTL_S3_SECRET_KEY": self.s3_secret_key,
        }

    def stop_server(self, name: str) -> None:
        """Stop one server of the project's stack (fault tests); `start_server` restores it."""
        subprocess.run([*STACK, "stop", name], check=True, capture_output=True)

    def kill_server(self, name: str) -> None:
        """SIGKILL one server (a crash: no clean shutdown); `start_server` restores it."""
        subprocess.run([*STACK, "kill", name], check=True, capture_output=True)

    def start_server(self, name: str) -> None:
        proc = subprocess.run([*STACK, "start", name], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"{name} did not start again:\n{proc.stdout}{proc.stderr}"

    @property
    def kafka_servers(self) -> tuple[str, ...]:
        """The stack's Kafka nodes by server name (`kafka`, then `kafka-2`, ...)."""
        n = len(self.kafka_bootstrap.split(","))
        return ("kafka", *(f"kafka-{i}" for i in range(2, n + 1)))

    def kafka_leader(self) -> str:
        """The Kafka node that is the active KRaft controller now."""
        proc = subprocess.run([*STACK, "kafka-leader"], capture_output=True, text=True, check=False)
        assert proc.returncode == 0, f"no KRaft leader known:\n{proc.stdout}{proc.stderr}"
        return proc.stdout.strip()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "chart" in item.path.parts:
            item.add_marker(pytest.mark.chart)  # only on a cluster with the chart installed
        elif "integration" in item.path.parts or "e2e" in item.path.parts:
            item.add_marker(pytest.mark.integration)  # warnings fail these too (pyproject)
        elif "unit" in item.path.parts:
            item.add_marker(pytest.mark.unit)


async def settle_publishers(timeout: float = 30.0) -> None:
    """Wait for the QueueUpdated drains that diffs started in the background (`kick`): a
    graph store closed under one leaves its retry half-connected (an unclosed socket)."""
    drains = {t for t in asyncio.all_tasks() if t.get_name() == DRAIN_TASK}
    if drains:
        await asyncio.wait(drains, timeout=timeout)


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free now on loopback, below the kernel's ephemeral range.

    An ephemeral port can be taken by any outgoing connection between choosing it and the server
    binding it (or while a fault test has the server stopped); ports below the range cannot.
    The stack's servers take 10000-21999 (hack/stack/stack.py), so these never meet a stopped one.
    """
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    for _ in range(500):
        port = 22000 + secrets.randbelow(max(low, 24000) - 22000)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free port below the ephemeral range")


def _read_env_file() -> dict[str, str]:
    path = Path(os.environ.get("QMTL_STACK_DIR", ROOT / ".stack")) / "env"
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            out[key.strip()] = value.strip()
    return out


def _healthy() -> bool:
    return subprocess.run([*STACK, "status"], capture_output=True, check=False).returncode == 0


def stack_from_env(env: dict[str, str]) -> Stack:
    """The stack whose endpoints and credentials `env` holds (the keys of `.stack/env`)."""
    return Stack(
        kubeconfig=env["KUBECONFIG"],
        neo4j_uri=env["NEO4J_URI"],
        neo4j_user=env["NEO4J_USER"],
        neo4j_password=env["NEO4J_PASSWORD"],
        kafka_bootstrap=env["KAFKA_BOOTSTRAP_SERVERS"],
        s3_endpoint=env["QMTL_S3_ENDPOINT"],
        s3_access_key=env["QMTL_S3_ACCESS_KEY"],
        s3_secret_key=env["QMTL_S3_SECRET_KEY"],
        s3_bucket=env["QMTL_S3_BUCKET"],
        neo4j_ca=env.get("NEO4J_SSL_CA", ""),
        kafka_env={k: env[k] for k in KAFKA_ENV_KEYS if env.get(k)},
        kafka_users={
            role: (
                env[f"QMTL_STACK_KAFKA_{role.upper()}_USER"],
                env[f"QMTL_STACK_KAFKA_{role.upper()}_PASSWORD"],
            )
            for role in ("admin", "operator", "noacl")
            if env.get(f"QMTL_STACK_KAFKA_{role.upper()}_USER")
        },
    )


@pytest.fixture(scope="session")
def stack() -> Iterator[Stack]:
    in_ci = os.environ.get("CI", "").lower() == "true"
    explicit = all(os.environ.get(k) for k in ENV_KEYS)
    started = False
    if not explicit and not _healthy():
        proc = subprocess.run([*STACK, "up"], capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            msg = f"the local stack did not start:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            if in_ci:
                pytest.fail(msg, pytrace=False)
            pytest.skip(msg)
        started = True
    every = (
        *ENV_KEYS,
        *KAFKA_ENV_KEYS,
        "NEO4J_SSL_CA",
        *(
            f"QMTL_STACK_KAFKA_{r}_{w}"
            for r in ("ADMIN", "OPERATOR", "NOACL")
            for w in ("USER", "PASSWORD")
        ),
    )
    env = {**_read_env_file(), **{k: os.environ[k] for k in every if os.environ.get(k)}}
    missing = [k for k in ENV_KEYS if not env.get(k)]
    if missing:
        pytest.fail(f"stack endpoints missing: {', '.join(missing)}", pytrace=False)
    yield stack_from_env(env)
    if started:
        subprocess.run([*STACK, "down"], check=False)


def topic_stems(topics: set[str]) -> set[str]:
    """The unique hash part of each topic name (`<ns>.<asset>_<kind>_<hash>_<version>`)."""
    return {t.rsplit("_", 2)[-2] for t in topics}


def kafka_env_of(settings: Settings) -> dict[str, str]:
    """Environment variables that give a child process the Kafka of `settings`."""
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": settings.kafka_bootstrap,
        "KAFKA_SECURITY_PROTOCOL": settings.kafka_security_protocol,
        "KAFKA_SASL_MECHANISM": settings.kafka_sasl_mechanism,
        "KAFKA_SASL_USERNAME": settings.kafka_sasl_username,
        "KAFKA_SASL_PASSWORD": settings.kafka_sasl_password,
        "KAFKA_SSL_CA": settings.kafka_ssl_ca,
    }
    return {k: v for k, v in env.items() if v}


def clear_cross_context_hits(stack: Stack) -> None:
    """Delete the recorded cross-context hits from the stack's graph. Tests refuse such reuses
    on purpose, and each hit halts every canary rollout for its analysis window (10 min by
    default): a test that expects a rollout to move starts without any."""
    with stack.neo4j_driver() as d:
        d.execute_query("MATCH (h:CrossContextHit) DELETE h")
