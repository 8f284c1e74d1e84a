"""Who may call the sidecar: JWT bearer tokens, TLS with certificate reload, mutual TLS,
malformed messages, rate limits, the HTTP admin token, audit lines, and secrets kept out of
logs. The sidecar runs in-process on the embedded backends (and on the real stack for the
log check)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.pb import dagmanager_pb2 as pb
from qmtl_dagmanager.pb import dagmanager_pb2_grpc as pb_grpc
from qmtl_dagmanager.sidecar import app
from qmtl_dagmanager.sidecar.security import redact
from qmtl_dagmanager.sidecar.tokens import sign_jwt
from tests.conftest import Stack, free_port
from tests.gen import dumps, generate
from tests.integration.conftest import real_settings
from tests.jwks import pem, serving
from tests.tls import ca, leaf

KEY = "test-signing-key-0123456789abcdef0123456789"

Start = Callable[..., Any]


@pytest.fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    running: list[app.Sidecar] = []

    async def go(**over: Any) -> app.Sidecar:
        base = dataclasses.replace(
            Settings(),
            grpc_port=0,
            http_port=free_port(),
            gc_interval_seconds=0,
            archive_dir=str(tmp_path / "archive"),
        )
        s = await app.start(dataclasses.replace(base, **over))
        running.append(s)
        return s

    yield go
    for s in running:
        await s.stop(0)


def token(**claims: Any) -> str:
    return sign_jwt({"sub": "gateway", "exp": time.time() + 60, **claims}, KEY.encode())


async def test_bearer_tokens_are_required_and_checked(start: Start) -> None:
    s = await start(grpc_jwt_key=KEY, grpc_jwt_audience="dagmanager")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        tags = pb_grpc.TagQueryStub(ch)
        req = pb.TagQueryRequest(tags=["BTC"], interval=60, match_mode="any")
        cases = {
            "missing": None,
            "bad signature": sign_jwt(
                {"exp": time.time() + 60, "aud": "dagmanager"},
                b"other-key-0123456789abcdef0123456789",
            ),
            "expired": token(aud="dagmanager", exp=time.time() - 120),
            "wrong audience": token(aud="someone-else"),
            "not a JWT": "abc",
        }
        for why, tok in cases.items():
            md = None if tok is None else (("authorization", f"Bearer {tok}"),)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await tags.GetQueues(req, metadata=md)
            assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED, why
            assert (e.value.details() or "").startswith("Unauthenticated: "), why
        ok = await tags.GetQueues(
            req, metadata=(("authorization", f"Bearer {token(aud='dagmanager')}"),)
        )
        assert list(ok.queues) == []
        # kubelet's gRPC probe carries no token: the standard health service stays open
        # types-grpcio-health-checking's HealthStub declares no RPCs
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]
        assert r.status == health_pb2.HealthCheckResponse.SERVING


async def test_keys_rotate_under_load_without_a_failed_call(start: Start, tmp_path: Path) -> None:
    """Load runs while both kinds of keys rotate: a JWKS issuer publishes a new key and signs
    with it at once (the unknown kid makes the sidecar fetch), then retires the old one; the
    shared-key file gains a new key (swapped in as a Secret volume does), signers move to it,
    and the old one is removed. No call with a valid token fails; retired keys stop working."""
    old_hs, new_hs = KEY, "next-signing-key-0123456789abcdef0123456789"
    keys_file = tmp_path / "jwt-keys"
    keys_file.write_text(f"{old_hs}\n")

    def swap(text: str) -> None:
        staged = tmp_path / "jwt-keys.new"
        staged.write_text(text)
        os.replace(staged, keys_file)

    async with serving() as idp:
        first = pem(idp.add_rsa("k1"))
        signer: dict[str, Any] = {"kid": "k1", "key": first, "hs": old_hs}
        s = await start(
            grpc_jwks_url=idp.url,
            grpc_jwks_refresh_seconds=3600,  # only unknown kids make it fetch in this test
            grpc_jwt_keys_file=str(keys_file),
            grpc_jwt_audience="dagmanager",
        )

        def tok(kind: str) -> str:
            body = {"sub": "gateway", "aud": "dagmanager", "exp": time.time() + 60}
            if kind == "hs":
                return sign_jwt(body, signer["hs"])
            return sign_jwt(body, signer["key"], algorithm="RS256", kid=signer["kid"])

        ok, failures, running = [0], [], [True]
        req = pb.TagQueryRequest(tags=["BTC"], interval=60, match_mode="any")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
            tags = pb_grpc.TagQueryStub(ch)

            async def client(kind: str) -> None:
                while running[0]:
                    md = (("authorization", f"Bearer {tok(kind)}"),)
                    try:
                        await tags.GetQueues(req, metadata=md, timeout=5)
                        ok[0] += 1
                    except grpc.aio.AioRpcError as e:
                        failures.append(f"{kind}: {e.code().name} {e.details()}")

            clients = [asyncio.create_task(client(k)) for k in ("hs", "rs") * 4]
            await asyncio.sleep(1.0)
            signer.update(kid="k2", key=pem(idp.add_rsa("k2")))  # publish and sign at once
            await asyncio.sleep(1.5)
            del idp.keys["k1"]
            swap(f"{old_hs}\n{new_hs}\n")
            signer["hs"] = new_hs  # signers move at once: a bad signature re-reads the file
            await asyncio.sleep(1.5)
            swap(f"{new_hs}\n")
            await asyncio.sleep(1.5)
            running[0] = False
            await asyncio.gather(*clients)
            assert failures == []
            assert ok[0] > 100, ok  # the load really ran through every step
            # what was retired no longer verifies
            await s.tokens.refresh()
            s.tokens._file.checked = -1e9  # past the file's check
            for why, bad in (
                ("old HS key", sign_jwt({"aud": "dagmanager", "exp": time.time() + 60}, old_hs)),
                (
                    "retired kid",
                    sign_jwt(
                        {"aud": "dagmanager", "exp": time.time() + 60},
                        first,
                        algorithm="RS256",
                        kid="k1",
                    ),
                ),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as e:
                    await tags.GetQueues(req, metadata=(("authorization", f"Bearer {bad}"),))
                assert e.value.code() is grpc.StatusCode.UNAUTHENTICATED, why


async def test_probe_ports_serve_health_and_metrics_only(start: Start) -> None:
    """A kubelet probes the pod's IP while the Gateway's calls stay on loopback: the probe
    ports answer health and liveness, and nothing else."""
    grpc_probe, http_probe = free_port(), free_port()
    s = await start(probe_host="127.0.0.1", probe_grpc_port=grpc_probe, probe_http_port=http_probe)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_probe}") as ch:
        r = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())  # type: ignore[attr-defined]
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        named = health_pb2.HealthCheckRequest(service="qmtl.services.dagmanager.DiffService")
        r = await health_pb2_grpc.HealthStub(ch).Check(named)  # type: ignore[attr-defined]
        assert r.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await pb_grpc.TagQueryStub(ch).GetQueues(
                pb.TagQueryRequest(tags=["BTC"], interval=60, match_mode="any")
            )
        assert e.value.code() is grpc.StatusCode.UNIMPLEMENTED
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{http_probe}/livez") as resp:
            assert resp.status == 200
            assert (await resp.json()) == {"status": "alive"}
        async with http.get(f"http://127.0.0.1:{http_probe}/status") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.post(f"http://127.0.0.1:{http_probe}/admin/gc-trigger") as resp:
            assert resp.status in (404, 405)
        async with http.get(f"http://127.0.0.1:{http_probe}/metrics") as resp:
            assert resp.status == 200  # for Prometheus: the sidecar's diffs are SLO-1's
            assert "# TYPE diff_duration_seconds histogram" in await resp.text()
        async with http.post(f"http://127.0.0.1:{http_probe}/admin/rollback") as resp:
            assert resp.status in (404, 405)
    # the main listeners are unchanged
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        got = await pb_grpc.TagQueryStub(ch).GetQueues(
            pb.TagQueryRequest(tags=["BTC"], interval=60, match_mode="any")
        )
        assert list(got.queues) == []


async def test_tls_certificates_reload_without_restart(start: Start, tmp_path: Path) -> None:
    first = ca(tmp_path, "ca1")
    crt, key = leaf(tmp_path, "server1", first, server=True)
    live_crt, live_key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(crt, live_crt)
    shutil.copy(key, live_key)
    s = await start(grpc_tls_cert=str(live_crt), grpc_tls_key=str(live_key))

    async def status_with(root: Path) -> str:
        creds = grpc.ssl_channel_credentials(root_certificates=root.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{s.grpc_port}", creds) as ch:
            r = await pb_grpc.HealthCheckStub(ch).Status(pb.StatusRequest(), timeout=5)
            return str(r.state)

    assert await status_with(first[0]) == "running"
    with pytest.raises(grpc.aio.AioRpcError):
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
            await pb_grpc.HealthCheckStub(ch).Status(pb.StatusRequest(), timeout=3)
    second = ca(tmp_path, "ca2")  # rotate: a certificate from another CA
    crt2, key2 = leaf(tmp_path, "server2", second, server=True)
    shutil.copy(key2, live_key)
    shutil.copy(crt2, live_crt)
    os.utime(live_crt, (time.time() + 5, time.time() + 5))
    assert await status_with(second[0]) == "running"  # new connections get the new one
    with pytest.raises(grpc.aio.AioRpcError):
        await status_with(first[0])


async def test_mutual_tls_needs_a_client_certificate(start: Start, tmp_path: Path) -> None:
    server_ca, client_ca = ca(tmp_path, "sca"), ca(tmp_path, "cca")
    crt, key = leaf(tmp_path, "server", server_ca, server=True)
    s = await start(
        grpc_tls_cert=str(crt), grpc_tls_key=str(key), grpc_tls_client_ca=str(client_ca[0])
    )
    ccrt, ckey = leaf(tmp_path, "gateway", client_ca, server=False)

    async def call(creds: grpc.ChannelCredentials) -> str:
        async with grpc.aio.secure_channel(f"127.0.0.1:{s.grpc_port}", creds) as ch:
            r = await pb_grpc.HealthCheckStub(ch).Status(pb.StatusRequest(), timeout=5)
            return str(r.state)

    root = server_ca[0].read_bytes()
    with pytest.raises(grpc.aio.AioRpcError):
        await call(grpc.ssl_channel_credentials(root_certificates=root))
    good = grpc.ssl_channel_credentials(root, ckey.read_bytes(), ccrt.read_bytes())
    assert await call(good) == "running"


async def test_malformed_messages_are_invalid_argument(start: Start) -> None:
    s = await start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        raw = ch.unary_stream(
            "/qmtl.services.dagmanager.DiffService/Diff",
            request_serializer=lambda b: b,
            response_deserializer=lambda b: b,
        )
        for payload in (b"\x0a\x02\xff\xfe", b"\xff\xff\xff", b"\x0a\x05ab"):  # bad UTF-8, junk
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in raw(payload):
                    pass
            assert e.value.code() is grpc.StatusCode.INVALID_ARGUMENT, payload
            assert "MalformedRequest" in (e.value.details() or "")


async def test_queue_stats_are_rate_limited(start: Start) -> None:
    s = await start(queue_stats_per_second=5)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        admin = pb_grpc.AdminServiceStub(ch)
        codes = []
        for _ in range(12):
            try:
                await admin.GetQueueStats(pb.QueueStatsRequest(filter="tag=x"))
                codes.append("OK")
            except grpc.aio.AioRpcError as e:
                codes.append(e.code().name)
        assert codes.count("OK") <= 6 and "RESOURCE_EXHAUSTED" in codes
        deadline = time.monotonic() + 5  # the bucket refills at 5 per second
        while True:
            try:
                await admin.GetQueueStats(pb.QueueStatsRequest(filter="tag=x"))
                break
            except grpc.aio.AioRpcError as e:
                assert e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
                assert time.monotonic() < deadline, "the rate limit did not refill in 5 s"
                await asyncio.sleep(0.05)


async def test_http_admin_token_and_gc_trigger_limit(start: Start) -> None:
    s = await start(http_admin_token="tok3n", gc_trigger_interval_seconds=60)
    url = f"http://127.0.0.1:{s.http_port}/admin/gc-trigger"
    async with aiohttp.ClientSession() as http:
        async with http.post(url, json={"id": "a"}) as r:
            assert r.status == 401
        async with http.post(url, json={"id": "a"}, headers={"Authorization": "Bearer no"}) as r:
            assert r.status == 401
        auth = {"Authorization": "Bearer tok3n"}
        async with http.post(url, json={"id": "a"}, headers=auth) as r:
            assert r.status == 202
        async with http.post(url, json={"id": "b"}, headers=auth) as r:
            assert r.status == 429 and r.headers["Retry-After"] == "60"
        async with http.get(f"http://127.0.0.1:{s.http_port}/status") as r:
            assert r.status == 200  # reads stay open
    open_http = await start(http_host="0.0.0.0")  # off loopback and no token: refused
    async with aiohttp.ClientSession() as http:
        url = f"http://127.0.0.1:{open_http.http_port}/admin/gc-trigger"
        async with http.post(url, json={"id": "a"}) as r:
            assert r.status == 403 and "http_admin_token" in (await r.json())["detail"]


async def test_audit_lines_for_diffs_and_destructive_calls(
    start: Start, caplog: pytest.LogCaptureFixture
) -> None:
    s = await start()
    caplog.set_level(logging.INFO, logger="qmtl_dagmanager.audit")
    doc = dumps(generate(3, salt="audit"))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
        diff = pb_grpc.DiffServiceStub(ch)
        async for _ in diff.Diff(pb.DiffRequest(strategy_id="aud", dag_json=doc, world_id="w")):
            pass
        with pytest.raises(grpc.aio.AioRpcError):
            async for _ in diff.Diff(pb.DiffRequest(strategy_id="aud", dag_json="{")):
                pass
        await pb_grpc.AdminServiceStub(ch).Cleanup(pb.CleanupRequest(strategy_id="aud"))
    lines = [r for r in caplog.records if r.name == "qmtl_dagmanager.audit"]
    got = [(r.audit, r.strategy, r.outcome) for r in lines]  # type: ignore[attr-defined]
    assert got == [
        ("diff", "aud", "OK"),
        ("diff", "aud", "INVALID_ARGUMENT"),
        ("cleanup", "aud", "OK"),
    ]
    assert len(lines[0].dag_hash) == 16 and "127.0.0.1" in lines[0].who  # type: ignore[attr-defined]


def test_uris_are_logged_without_passwords() -> None:
    assert redact("bolt://neo4j:s3cret@db:7687") == "bolt://neo4j:***@db:7687"
    assert redact("bolt://db:7687") == "bolt://db:7687"
    assert redact("k1:9092,k2:9092") == "k1:9092,k2:9092"


@pytest.mark.integration
async def test_the_neo4j_password_never_reaches_a_log_line(
    stack: Stack, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = real_settings(stack, archive_dir=str(tmp_path))
    s = await app.start(dataclasses.replace(settings, log_level="DEBUG"))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{s.grpc_port}") as ch:
            doc = dumps(generate(3, salt=str(time.time())))
            async for _ in pb_grpc.DiffServiceStub(ch).Diff(
                pb.DiffRequest(strategy_id="pw-check", dag_json=doc, world_id="w")
            ):
                pass
    finally:
        await s.stop(0)
    text = "\n".join(f"{r.getMessage()} {vars(r)}" for r in caplog.records)
    assert caplog.records and stack.neo4j_password not in text
