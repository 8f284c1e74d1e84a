"""`dagmanager server --config FILE` as a process, driven by the `dagmanager` CLI."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qmtl_dagmanager.client import GatewayClient
from tests.conftest import Stack, free_port
from tests.gen import dumps, generate

CLI = [sys.executable, "-m", "qmtl_dagmanager.cli"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, check=False, timeout=120, env=env
    )


def wait_serving(port: int, proc: subprocess.Popen[str], deadline: float = 60) -> None:
    end = time.monotonic() + deadline
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < end:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {proc.stderr.read() if proc.stderr else ''}")
            try:
                # types-grpcio-health-checking's HealthStub declares no RPCs
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:  # type: ignore[attr-defined]
                    return
            except grpc.RpcError:
                time.sleep(0.2)
    raise AssertionError("server did not become SERVING")


@pytest.fixture(params=["embedded", "real"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[int, int]]:
    grpc_port, http_port = free_port(), free_port()
    lines = [
        f"grpc_port: {grpc_port}",
        f"http_port: {http_port}",
        "gc_interval_seconds: 0",
        f"gc_archive_bucket: {tmp_path / 'archive'}",
    ]
    if request.param == "real":
        stack: Stack = request.getfixturevalue("stack")
        lines += [
            f"neo4j_dsn: {stack.neo4j_uri}",
            f"neo4j_user: {stack.neo4j_user}",
            f"kafka_dsn: {stack.kafka_bootstrap}",
            "profile: prod",
            f"gc_archive_bucket: s3://{stack.s3_bucket}/cli-server",
            f"s3_endpoint: {stack.s3_endpoint}",
            f"s3_access_key: {stack.s3_access_key}",
        ]
    config = tmp_path / "dagmanager.yml"
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))}
    if request.param == "real":
        env["NEO4J_PASSWORD"] = stack.neo4j_password  # secrets come from the environment only
        env["NEO4J_SSL_CA"] = stack.neo4j_ca  # empty: no TLS
        env["QMTL_S3_SECRET_KEY"] = stack.s3_secret_key
        env.update(stack.kafka_process_env())
    proc = subprocess.Popen(
        [*CLI, "--config", str(config), "server"],
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_serving(grpc_port, proc)
        yield grpc_port, http_port
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()
        assert code == 0


def test_cli_against_a_running_server(server: tuple[int, int], tmp_path: Path) -> None:
    grpc_port, http_port = server
    dag_file = tmp_path / "dag.json"
    doc = generate(12, seed=5, salt=uuid.uuid4().hex[:8])
    dag_file.write_text(dumps(doc))
    target = f"127.0.0.1:{grpc_port}"
    strategy = f"cli-{uuid.uuid4().hex[:6]}"
    r = run(
        "diff",
        "--file",
        str(dag_file),
        "--target",
        target,
        "--strategy",
        strategy,
        "--world",
        "w1",
        "--output",
        "json",
    )
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["queues"] == 12 and len(body["nodes"]) == 12
    assert all(n["topic"].startswith("w1.live.") for n in body["nodes"])
    r = run("queue-stats", "--tag", "BTC", "--interval", "60", "--target", target)
    assert r.returncode == 0, r.stderr
    r = run(
        "redo-diff",
        "--sentinel",
        f"{strategy}-sentinel",
        "--file",
        str(dag_file),
        "--target",
        target,
    )
    assert r.returncode == 0 and "queues=12" in r.stdout, r.stderr
    r = run("gc", "--dry-run", "--target", f"127.0.0.1:{http_port}")
    assert r.returncode == 0 and '"processed"' in r.stdout, r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"nodes": [{"node_id": "nope"}]}')
    r = run("diff", "--file", str(bad), "--target", target)
    assert r.returncode == 2 and "node_id" in r.stderr


def test_exit_codes_and_settings_errors(tmp_path: Path) -> None:
    dag_file = tmp_path / "dag.json"
    dag_file.write_text(dumps(generate(3)))
    r = run(
        "diff", "--file", str(dag_file), "--target", f"127.0.0.1:{free_port()}", "--timeout", "2"
    )
    assert r.returncode == 3 and "UNAVAILABLE" in r.stderr
    cfg = tmp_path / "bad.yml"
    cfg.write_text("grpc_prot: 1\n")
    r = run("--config", str(cfg), "server")
    assert r.returncode == 2 and "grpc_prot" in r.stderr
    cfg.write_text("profile: prod\n")
    r = run("--config", str(cfg), "server")
    assert r.returncode == 2 and "neo4j_dsn" in r.stderr
    r = run("diff", "--file", str(dag_file), "--dry-run", "--output", "dot")
    assert r.returncode == 0 and r.stdout.startswith("digraph")


def test_gc_policies_of_seconds_work_from_outside(tmp_path: Path) -> None:
    """A server process with 3-second policies: after a Diff and a Cleanup, a GC trigger
    keeps the orphans (listed with their due time) until TTL + grace has passed since the
    Cleanup, then drops them; a queue marked keep stays."""
    grpc_port, http_port = free_port(), free_port()
    config = tmp_path / "dagmanager.yml"
    config.write_text(
        "\n".join(
            [
                f"grpc_port: {grpc_port}",
                f"http_port: {http_port}",
                "gc_interval_seconds: 0",
                "gc_trigger_interval_seconds: 0",
                "gc_policies:",
                "  raw: {ttl_seconds: 2, grace_seconds: 1, action: drop}",
                "  indicator: {ttl_seconds: 2, grace_seconds: 1, action: drop}",
                "  trade_exec: {ttl_seconds: 2, grace_seconds: 1, action: archive}",
            ]
        )
        + "\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))}
    proc = subprocess.Popen(
        [*CLI, "--config", str(config), "server"],
        env=env,
        text=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_serving(grpc_port, proc)
        dag_file = tmp_path / "dag.json"
        dag_file.write_text(dumps(generate(6, seed=3, salt=uuid.uuid4().hex[:8])))
        target = f"127.0.0.1:{grpc_port}"
        r = run("diff", "--file", str(dag_file), "--target", target, "--strategy", "gc-s",
                "--world", "w1", "--output", "json")  # fmt: skip
        assert r.returncode == 0, r.stderr
        topics = sorted(n["topic"] for n in json.loads(r.stdout)["nodes"])
        r = run("gc-keep", topics[0], "--target", f"127.0.0.1:{http_port}")
        assert r.returncode == 0 and '"changed":1' in r.stdout.replace(" ", ""), r.stderr
        asyncio.run(_cleanup(target, "gc-s"))
        released = time.time()
        first = _trigger(http_port)
        assert first["processed"] == []
        due = {k["queue"]: k["due"] for k in first["kept"]}
        assert due[topics[0]] is None  # marked keep: never due
        late = {t: due[t] for t in topics[1:] if not released - 1 <= due[t] <= time.time() + 3}
        assert not late, (released, late)
        end = time.monotonic() + 30
        dropped: set[str] = set()
        while time.monotonic() < end and dropped != set(topics[1:]):
            dropped |= {p["queue"] for p in _trigger(http_port)["processed"]}
            time.sleep(0.5)
        assert dropped == set(topics[1:])
        assert time.time() >= min(d for d in due.values() if d is not None)
        assert topics[0] in {k["queue"] for k in _trigger(http_port)["kept"]}
        # the commands of retired versions, wired through: nothing to roll back or collect
        admin = f"127.0.0.1:{http_port}"
        r = run("redo-diff", "--sentinel", "gc-s-sentinel", "--rollback", "--admin", admin)
        assert r.returncode == 4 and "nothing to roll back" in r.stderr, r.stderr
        r = run("gc", "--sentinel", "gc-s-sentinel@v9", "--target", admin)
        assert r.returncode == 2 and "not a retired version" in r.stderr, r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(30)
        if proc.stderr is not None:
            proc.stderr.close()
        assert code == 0


async def _cleanup(target: str, strategy: str) -> None:
    client = GatewayClient(target)
    try:
        await client.cleanup(strategy)
    finally:
        await client.close()


def _trigger(http_port: int) -> dict[str, Any]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{http_port}/admin/gc-trigger",
        data=json.dumps({"id": f"t-{uuid.uuid4().hex[:6]}"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as r:
        body: dict[str, Any] = json.loads(r.read())
    return body


def test_compact_runs_offline_on_the_configured_graph(stack: Stack, tmp_path: Path) -> None:
    cfg = tmp_path / "c.yml"
    cfg.write_text(f"neo4j_dsn: {stack.neo4j_uri}\nneo4j_user: {stack.neo4j_user}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))}
    env["NEO4J_PASSWORD"] = stack.neo4j_password
    env["NEO4J_SSL_CA"] = stack.neo4j_ca  # empty: no TLS
    r = run("--config", str(cfg), "compact", "--dry-run", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["removed"] == 0
    assert "[compact]" in r.stderr  # progress on standard error
