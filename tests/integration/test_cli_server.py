"""`dagmanager server --config FILE` as a process, driven by the `dagmanager` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

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
        ]
    config = tmp_path / "dagmanager.yml"
    config.write_text("\n".join(lines) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_", "QMTL_"))}
    if request.param == "real":
        env["NEO4J_PASSWORD"] = stack.neo4j_password  # secrets come from the environment only
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
        assert proc.wait(30) == 0


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
