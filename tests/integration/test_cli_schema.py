"""`dagmanager neo4j-init | neo4j-rollback | export-schema` against the real Neo4j."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from tests.conftest import Stack


def dagmanager(stack: Stack, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **stack.neo4j_env,
        "NEO4J_USER": stack.neo4j_user,
        "NEO4J_PASSWORD": stack.neo4j_password,
    }
    return subprocess.run(
        [sys.executable, "-m", "qmtl_dagmanager.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def names(stack: Stack) -> set[str]:
    with stack.neo4j_driver() as d:
        cons = {r["name"] for r in d.execute_query("SHOW CONSTRAINTS YIELD name").records}
        idx = {r["name"] for r in d.execute_query("SHOW INDEXES YIELD name").records}
    return cons | idx


def test_schema_commands(stack: Stack, tmp_path: Path) -> None:
    wanted = {
        "compute_node_id",
        "queue_topic",
        "version_sentinel_key",
        "strategy_id",
        "artifact_path",
        "compute_node_tags",
        "compute_node_buffering_since",
        "queue_interval",
        "queue_slot",
        "topic_intent",
        "topic_intent_at",
    }
    for _ in range(2):  # idempotent
        r = dagmanager(stack, "neo4j-init")
        assert r.returncode == 0, r.stderr
    assert wanted <= names(stack)
    for _ in range(2):
        r = dagmanager(stack, "neo4j-rollback")
        assert r.returncode == 0, r.stderr
    assert not wanted & names(stack)
    assert dagmanager(stack, "neo4j-init").returncode == 0
    out = tmp_path / "schema.cypher"
    r = dagmanager(stack, "export-schema", "--out", str(out))
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert text.count("CREATE CONSTRAINT") == 9 and text.count("CREATE INDEX") == 10
    assert "REQUIRE n.node_id IS UNIQUE" in text
    assert "REQUIRE q.slot IS UNIQUE" in text  # one queue per (node, compute key)


def test_neo4j_commands_need_a_uri() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NEO4J_URI"}
    r = subprocess.run(
        [sys.executable, "-m", "qmtl_dagmanager.cli", "neo4j-init"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 2 and "NEO4J_URI" in r.stderr


async def test_processes_starting_together_on_a_fresh_graph_all_get_the_schema(
    stack: Stack,
) -> None:
    """Several writers (operator replicas, sidecars) start at once on a graph without the
    schema: every one's init succeeds and the schema is complete, however they interleave."""
    stores = [
        Neo4jGraphStore(stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca)
        for _ in range(4)
    ]
    try:
        for _ in range(5):
            await stores[0].rollback_schema()
            assert not names(stack) & expected_names(stores[0])
            await asyncio.gather(*(s.init_schema() for s in stores))
            assert expected_names(stores[0]) <= names(stack)
    finally:
        await stores[0].init_schema()
        for s in stores:
            await s.close()


def expected_names(store: Neo4jGraphStore) -> set[str]:
    return {stmt.split()[2] for stmt in store.schema_statements()}
