"""Traces and audit records through OpenTelemetry, received by a real OpenTelemetry Collector
(built from the Go module proxy: hack/otel/build-otelcol.sh) whose debug exporter prints every
span and log record: a traced diff is read back span by span from the collector's output."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from qmtl_dagmanager.bootstrap import build_fake
from qmtl_dagmanager.client import GatewayClient
from qmtl_dagmanager.sidecar import app
from tests.conftest import Stack, settle_publishers
from tests.gen import dumps, generate
from tests.integration.conftest import real_settings
from tests.otel_collector import Collector

pytestmark = pytest.mark.integration


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[Collector]:
    c = Collector(tmp_path)
    yield c
    c.stop()


def spans(output: str) -> list[dict[str, str]]:
    """The spans the debug exporter printed: name, ids and attributes."""
    out = []
    for raw in re.split(r"\nSpan #\d+\n", output)[1:]:
        block = raw.split("\n\t{", 1)[0]
        fields = dict(re.findall(r"^\s{4}(\w[\w ]*?)\s*: (.*)$", block, re.M))
        attrs = dict(re.findall(r"^\s+-> ([\w.]+): \w+\((.*)\)$", block, re.M))
        out.append({**fields, **{f"attr.{k}": v for k, v in attrs.items()}})
    return out


async def test_a_diff_is_traced_span_by_span_and_audited_as_otlp_logs(
    stack: Stack, collector: Collector
) -> None:
    settings = real_settings(stack, otlp_endpoint=collector.endpoint)
    sidecar = await app.start(settings)
    client = GatewayClient(f"127.0.0.1:{sidecar.grpc_port}")
    strategy = f"traced-{uuid.uuid4().hex[:8]}"
    try:
        reply = await client.diff(strategy, dumps(generate(5, salt=uuid.uuid4().hex[:8])))
        assert len(reply.queue_map) == 5
        await settle_publishers()  # the QueueUpdated publication, off the response path
    finally:
        await client.close()
        await sidecar.stop(0)  # flushes the exporter
    collector.wait_for(f"strategy_id: Str({strategy})")
    out = collector.wait_for("InstrumentationScope qmtl_dagmanager.audit")
    received = spans(out)
    root = next(s for s in received if s.get("attr.strategy_id") == strategy)
    assert root["Name"] == "dagmanager.diff" and root["Parent ID"] == ""
    assert root["Status code"] == "Ok" and root["attr.nodes"] == "5"
    trace = [s for s in received if s["Trace ID"] == root["Trace ID"]]
    by_id = {s["ID"]: s for s in trace}

    def parent(s: dict[str, str]) -> str:
        return by_id[s["Parent ID"]]["Name"] if s["Parent ID"] else ""

    names = {(s["Name"], parent(s)) for s in trace}
    assert {
        ("parse", "dagmanager.diff"),
        ("plan", "dagmanager.diff"),
        ("graph.read", "plan"),
        ("graph.record_intents", "dagmanager.diff"),
        ("kafka.create_topics", "dagmanager.diff"),
        ("graph.write", "dagmanager.diff"),
        ("controlbus.schedule", "dagmanager.diff"),
    } <= names, sorted(names)
    assert next(s for s in trace if s["Name"] == "kafka.create_topics")["attr.topics"] == "5"
    # every child lies within the root's time
    start, end = root["Start time"], root["End time"]
    assert all(start <= s["Start time"] and s["End time"] <= end for s in trace)
    # the QueueUpdated publication, off the response path, is traced too
    assert any(s["Name"] == "controlbus.publish" for s in received)
    # the audit record as an OTLP log record, with who, what, the DAG hash and the outcome
    audit = out.split("InstrumentationScope qmtl_dagmanager.audit", 1)
    assert len(audit) == 2, out[-3000:]
    record = audit[1].split("\n\t{", 1)[0]
    assert f"strategy: Str({strategy})" in record
    assert "audit: Str(diff)" in record or "audit: Str(Diff)" in record, record
    assert re.search(r"dag_hash: Str\([0-9a-f]{16,}\)", record), record
    assert "outcome: Str(OK)" in record and "who: Str(" in record


def test_without_an_endpoint_nothing_is_traced() -> None:
    c = build_fake()
    assert not c.tracer.enabled and c.exporter is None
