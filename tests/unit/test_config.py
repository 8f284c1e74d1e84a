"""Settings from YAML with environment overrides; clear errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmtl_dagmanager.config import SettingsError, load
from qmtl_dagmanager.core.gc import DEFAULT_POLICIES, GcAction
from qmtl_dagmanager.core.topics import Profile


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "dagmanager.yml"
    path.write_text(text)
    return path


def test_defaults_are_embedded() -> None:
    s = load(None, {})
    assert s.embedded_graph and s.embedded_kafka and s.grpc_port == 50051
    assert (s.grpc_host, s.http_port) == ("127.0.0.1", 8001)


def test_yaml_then_environment(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "neo4j_dsn: bolt://db:7687\nkafka_dsn: k:9092\ngrpc_port: 6000\n"
        "topic_profile: production\nenable_topic_namespace: false\n"
        "max_nodes: 10\n",
    )
    s = load(path, {"QMTL_GRPC_PORT": "7000", "NEO4J_PASSWORD": "pw"})
    assert (s.neo4j_uri, s.kafka_bootstrap, s.grpc_port) == ("bolt://db:7687", "k:9092", 7000)
    assert s.neo4j_password == "pw" and s.topic_profile is Profile.PRODUCTION
    assert s.enable_topic_namespace is False and s.limits.max_nodes == 10


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("grpc_prot: 1\n", "grpc_prot"),
        ("grpc_port: lots\n", "grpc_port"),
        ("grpc_port: 70000\n", "grpc_port"),
        ("topic_profile: chaos\n", "topic_profile"),
        ("enable_topic_namespace: maybe\n", "enable_topic_namespace"),
        ("profile: prod\n", "neo4j_dsn"),
        ("profile: prod\nneo4j_dsn: bolt://db:7687\nkafka_dsn: k:9092\n", "s3://<bucket>"),
        ("gc_archive_bucket: s3://\n", "s3://<bucket>"),
        ("gc_archive_bucket: ftp://x\n", "gc_archive_bucket"),
        ("s3_endpoint: localhost:9000\n", "s3_endpoint"),
        ("- a\n- b\n", "mapping"),
        ("a: [\n", "YAML"),
        ("gc_policies: [1]\n", "gc_policies"),
        ("gc_policies:\n  raw: {ttl_seconds: 5, grace_seconds: 1}\n", "missing: action"),
        ("gc_policies:\n  raw: {ttl_seconds: 5, grace_seconds: 1, action: x}\n", "tag raw"),
        ("gc_policies:\n  raw: {ttl_seconds: -1, grace_seconds: 1, action: drop}\n", "raw"),
        ("gc_policies:\n  raw: {ttl: 5, grace_seconds: 1, action: drop}\n", "unknown: ttl"),
        ("gc_intent_grace_seconds: 0\n", "gc_intent_grace_seconds"),
        ("grpc_jwt_algorithms: HS256,none\n", "grpc_jwt_algorithms.*unsupported none"),
        ("grpc_jwks_url: ftp://idp/jwks\n", "grpc_jwks_url"),
        ("grpc_jwks_url: http://idp/jwks\ngrpc_jwks_ca: ca.pem\n", "grpc_jwks_ca needs"),
        ("grpc_jwks_refresh_seconds: 0\n", "grpc_jwks_refresh_seconds"),
        ("grpc_jwt_leeway_seconds: -1\n", "grpc_jwt_leeway_seconds"),
        ("profile: prod\ngrpc_host: 0.0.0.0\n", "bearer tokens"),
    ],
)
def test_bad_settings_name_the_key(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(SettingsError, match=needle):
        load(write(tmp_path, text), {})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(SettingsError, match="QMTL_HTTP_PORT"):
        load(None, {"QMTL_HTTP_PORT": "eighty"})
    with pytest.raises(SettingsError, match="no such file"):
        load(Path("/nonexistent/dagmanager.yml"), {})


def test_gc_policies_merge_over_the_defaults(tmp_path: Path) -> None:
    s = load(
        write(
            tmp_path,
            "gc_policies:\n  raw: {ttl_seconds: 5, grace_seconds: 1, action: drop}\n"
            "gc_intent_grace_seconds: 30\n",
        ),
        {"QMTL_GC_POLICY_INDICATOR": "ttl_seconds=60,grace_seconds=10,action=archive"},
    )
    assert (s.gc_policies["raw"].ttl, s.gc_policies["raw"].grace) == (5.0, 1.0)
    assert s.gc_policies["indicator"].action is GcAction.ARCHIVE
    assert s.gc_policies["sentinel"] == DEFAULT_POLICIES["sentinel"]
    assert s.gc_intent_grace_seconds == 30
    assert load(None, {}).gc_policies == dict(DEFAULT_POLICIES)


def test_bad_gc_policy_variable_is_named() -> None:
    with pytest.raises(SettingsError, match="QMTL_GC_POLICY_RAW"):
        load(None, {"QMTL_GC_POLICY_RAW": "ttl_seconds=5"})
