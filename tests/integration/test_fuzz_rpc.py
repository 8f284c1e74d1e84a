"""Every RPC field fuzzed against a running sidecar (embedded backends, real gRPC): the answer
is OK or a named error with a message, never UNKNOWN or INTERNAL; oversized messages are
refused by size."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc
from qmtl_dagmanager.sidecar import app
from tests.unit.dags import node
from tests.unit.test_fuzz import CONFUSABLES, FIELDS, json_values

ALLOWED = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
text = st.text(max_size=60) | st.sampled_from(CONFUSABLES) | st.just("x" * 5000)


@pytest.fixture(scope="module")
def channel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[grpc.Channel]:
    """A sidecar on its own event loop in a thread, and a blocking client channel."""
    loop = asyncio.new_event_loop()
    settings = dataclasses.replace(
        Settings(),
        grpc_port=0,
        http_port=0,
        gc_interval_seconds=0,
        queue_stats_per_second=10_000,
        archive_dir=str(Path(tmp_path_factory.mktemp("archive"))),
    )
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    sidecar = asyncio.run_coroutine_threadsafe(app.start(settings), loop).result(30)
    with grpc.insecure_channel(f"127.0.0.1:{sidecar.grpc_port}") as ch:
        yield ch
    asyncio.run_coroutine_threadsafe(sidecar.stop(0), loop).result(30)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()  # else its self-pipe shows up later as unraisable ResourceWarnings


def check(call: object) -> None:
    try:
        if callable(call):
            result = call()
            if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
                list(result)  # drain a stream
    except grpc.RpcError as e:
        code = e.code()
        assert code in ALLOWED, f"{code}: {e.details()}"
        assert e.details(), code


def dag_text(field: str, value: object) -> str:
    a = node("StreamInput", tags=["BTC"], code="fz")
    a[field] = value
    try:
        return orjson.dumps({"schema_version": "v1", "nodes": [a]}).decode()
    except (TypeError, orjson.JSONEncodeError):
        return "{}"


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(text, text, text, text, text, st.sampled_from(FIELDS), json_values)
def test_diff_fields(
    channel: grpc.Channel,
    sid: str,
    world: str,
    domain: str,
    as_of: str,
    part: str,
    field: str,
    value: object,
) -> None:
    stub = pb_grpc.DiffServiceStub(channel)
    request = pb.DiffRequest(
        strategy_id=sid,
        dag_json=dag_text(field, value),
        world_id=world,
        execution_domain=domain,
        as_of=as_of,
        partition=part,
    )
    check(lambda: stub.Diff(request, timeout=10))


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(st.lists(text, max_size=5), st.integers(-(2**63), 2**63 - 1), text, text, text)
def test_query_admin_and_redo_fields(
    channel: grpc.Channel, tags: list[str], interval: int, mode: str, flt: str, sid: str
) -> None:
    tq, admin = pb_grpc.TagQueryStub(channel), pb_grpc.AdminServiceStub(channel)
    check(lambda: tq.GetQueues(pb.TagQueryRequest(tags=tags, interval=interval, match_mode=mode)))
    check(lambda: admin.GetQueueStats(pb.QueueStatsRequest(filter=flt)))
    check(lambda: admin.Cleanup(pb.CleanupRequest(strategy_id=sid)))
    check(lambda: admin.RedoDiff(pb.RedoDiffRequest(sentinel_id=sid, dag_json=flt)))
    check(lambda: pb_grpc.DiffServiceStub(channel).AckChunk(pb.ChunkAck(sentinel_id=sid)))


def test_an_oversized_message_is_refused_by_size(channel: grpc.Channel) -> None:
    stub = pb_grpc.DiffServiceStub(channel)
    huge = pb.DiffRequest(strategy_id="big", dag_json="x" * (app.MAX_MESSAGE + 1))
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Diff(huge, timeout=30))
    assert e.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
