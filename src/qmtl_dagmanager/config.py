"""Settings: one YAML file (optional) with environment overrides, read explicitly by the
composition root (never at import time). An unknown key or a bad value is an error naming it.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from qmtl_dagmanager.core.dag import IdMode, Limits
from qmtl_dagmanager.core.gc import DEFAULT_POLICIES, GcAction, GcPolicy
from qmtl_dagmanager.core.topics import Profile


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the key or variable."""


@dataclass(frozen=True, slots=True)
class Settings:
    profile: str = "dev"  # dev | prod (prod refuses embedded backends)
    neo4j_uri: str = ""  # empty: the embedded in-memory graph store
    neo4j_user: str = "neo4j"
    neo4j_password: str = ""
    neo4j_database: str = "neo4j"
    kafka_bootstrap: str = ""  # empty: the embedded in-memory topic admin and event bus
    controlbus_bootstrap: str = ""  # empty: same as kafka_bootstrap
    queue_topic: str = "queue"
    sentinel_weight_topic: str = "sentinel_weight"
    topic_profile: Profile = Profile.DEVELOPMENT
    enable_topic_namespace: bool = True
    node_ids: IdMode = IdMode.VERIFY
    limits: Limits = field(default_factory=Limits)
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8001
    gc_interval_seconds: int = 3600  # 0 disables the timer (GC still runs on a trigger)
    gc_dry_run: bool = False  # decide and report, but drop nothing
    # tag → policy; the mapping given is merged over the defaults (core.gc.DEFAULT_POLICIES)
    gc_policies: Mapping[str, GcPolicy] = field(default_factory=lambda: dict(DEFAULT_POLICIES))
    gc_intent_grace_seconds: int = 600  # a created topic no queue owns after this is swept
    prometheus_url: str = ""  # a Prometheus-compatible HTTP API (GC load metric, gates)
    gc_load_query: str = ""  # PromQL for the broker load; empty: GC is never throttled
    gc_load_threshold: float = 0.8  # above it (or unreadable) the per-run GC cap is halved
    archive_dir: str = "./archive"
    dry_run_strategy: str = "dryrun"
    node_cache_ttl_seconds: int = 60  # 0 disables the node cache
    diff_max_inflight: int = 8
    diff_max_waiting: int = 256  # diffs that may wait (each at most 2 s) before shedding
    resubmission_cache_nodes: int = 20_000  # 0 disables the resubmission cache
    node_memo_nodes: int = 20_000  # validated nodes kept to skip re-checking (0 disables)
    # the sidecar runs Python's full garbage collections itself, between diffs, at most this
    # often (less often when they are long); 0 leaves them automatic (they then pause
    # whichever diff triggers them)
    heap_full_collection_seconds: int = 5
    log_level: str = "INFO"
    log_format: str = "text"  # text | json (one object per line)
    # security (README: Security); secrets come from the environment only
    grpc_tls_cert: str = ""  # PEM files, re-read when they change (no restart)
    grpc_tls_key: str = ""
    grpc_tls_client_ca: str = ""  # set: mutual TLS, clients need a certificate it signed
    grpc_jwt_key: str = ""  # set: every call needs `authorization: Bearer <HS256 JWT>`
    grpc_jwt_audience: str = ""
    grpc_jwt_issuer: str = ""
    http_admin_token: str = ""  # required by mutating HTTP endpoints (always off loopback)
    queue_stats_per_second: int = 5
    gc_trigger_interval_seconds: int = 10
    # the operator's Kubernetes identity (the chart sets the pod's from the downward API)
    kubeconfig: str = ""  # empty: the in-cluster service account, else ~/.kube/config
    pod_namespace: str = "default"  # the operator's namespace: its lease and GC report
    pod_name: str = ""  # its lease holder identity (empty: host name and process id)

    @property
    def embedded_graph(self) -> bool:
        return not self.neo4j_uri

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap


def _text(v: Any) -> str:
    if isinstance(v, str | int | float) and not isinstance(v, bool):
        return str(v).strip()
    raise ValueError("expected a string")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    raise ValueError("expected an integer")


def _port(v: Any) -> int:
    n = _int(v)
    if not 0 <= n <= 65535:
        raise ValueError("expected a port number 0-65535")
    return n


def _nonneg(v: Any) -> int:
    n = _int(v)
    if n < 0:
        raise ValueError("must not be negative")
    return n


def _positive(v: Any) -> int:
    n = _int(v)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in (
        "true",
        "1",
        "yes",
        "on",
        "false",
        "0",
        "no",
        "off",
    ):
        return v.strip().lower() in ("true", "1", "yes", "on")
    raise ValueError("expected true or false")


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        text = _text(v).lower()
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return text

    return parse


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError("expected a number") from None
    if not math.isfinite(f):
        raise ValueError("expected a finite number")
    return f


def _url(v: Any) -> str:
    text = _text(v)
    if text and not text.startswith(("http://", "https://")):
        raise ValueError("expected an http:// or https:// URL")
    return text


POLICY_FIELDS = ("ttl_seconds", "grace_seconds", "action")


def _policy(v: Any) -> GcPolicy:
    """`{ttl_seconds, grace_seconds, action}`; in the environment also the short form
    `ttl_seconds=…,grace_seconds=…,action=…`."""
    if isinstance(v, str):
        try:
            v = dict(part.split("=", 1) for part in v.replace(" ", "").split(",") if part)
        except ValueError:
            raise ValueError(
                "expected ttl_seconds=<n>,grace_seconds=<n>,action=drop|archive"
            ) from None
    if not isinstance(v, dict):
        raise ValueError("expected a mapping with ttl_seconds, grace_seconds and action")
    unknown = sorted(str(k) for k in v if k not in POLICY_FIELDS)
    missing = [k for k in POLICY_FIELDS if k not in v]
    if unknown or missing:
        raise ValueError(
            "expected exactly ttl_seconds, grace_seconds and action"
            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
            + (f"; missing: {', '.join(missing)}" if missing else "")
        )
    return GcPolicy(
        float(_nonneg(v["ttl_seconds"])),
        float(_nonneg(v["grace_seconds"])),
        GcAction(_choice("drop", "archive")(v["action"])),
    )


def _policies(v: Any) -> dict[str, GcPolicy]:
    if isinstance(v, str):
        try:
            v = yaml.safe_load(v)
        except yaml.YAMLError:
            raise ValueError("expected a YAML/JSON mapping of tag to policy") from None
    if not isinstance(v, dict):
        raise ValueError("expected a mapping of tag to {ttl_seconds, grace_seconds, action}")
    out = dict(DEFAULT_POLICIES)
    for tag, raw in v.items():
        try:
            out[_text(tag)] = _policy(raw)
        except ValueError as e:
            raise ValueError(f"tag {tag}: {e}") from None
    return out


def _archive(v: Any) -> str:
    text = _text(v)
    if text.startswith("s3://"):
        raise ValueError("S3 archives are not supported yet; use a directory path")
    return text.removeprefix("file://")


# yaml key, environment variable, Settings field, parser
KEYS: tuple[tuple[str, str, str, Callable[[Any], Any]], ...] = (
    ("profile", "QMTL_PROFILE", "profile", _choice("dev", "prod")),
    ("neo4j_dsn", "NEO4J_URI", "neo4j_uri", _text),
    ("neo4j_user", "NEO4J_USER", "neo4j_user", _text),
    ("neo4j_password", "NEO4J_PASSWORD", "neo4j_password", _text),
    ("neo4j_database", "NEO4J_DATABASE", "neo4j_database", _text),
    ("kafka_dsn", "KAFKA_BOOTSTRAP_SERVERS", "kafka_bootstrap", _text),
    ("controlbus_dsn", "QMTL_CONTROLBUS_DSN", "controlbus_bootstrap", _text),
    ("controlbus_queue_topic", "QMTL_QUEUE_TOPIC", "queue_topic", _text),
    ("controlbus_sentinel_topic", "QMTL_SENTINEL_WEIGHT_TOPIC", "sentinel_weight_topic", _text),
    (
        "topic_profile",
        "QMTL_TOPIC_PROFILE",
        "topic_profile",
        lambda v: Profile(_choice("development", "production")(v)),
    ),
    ("enable_topic_namespace", "QMTL_ENABLE_TOPIC_NAMESPACE", "enable_topic_namespace", _bool),
    ("node_ids", "QMTL_NODE_IDS", "node_ids", lambda v: IdMode(_choice("verify", "trust")(v))),
    ("grpc_host", "QMTL_GRPC_HOST", "grpc_host", _text),
    ("grpc_port", "QMTL_GRPC_PORT", "grpc_port", _port),
    ("http_host", "QMTL_HTTP_HOST", "http_host", _text),
    ("http_port", "QMTL_HTTP_PORT", "http_port", _port),
    ("gc_interval_seconds", "QMTL_GC_INTERVAL_SECONDS", "gc_interval_seconds", _nonneg),
    ("gc_archive_bucket", "QMTL_ARCHIVE_DIR", "archive_dir", _archive),
    ("gc_dry_run", "QMTL_GC_DRY_RUN", "gc_dry_run", _bool),
    ("gc_policies", "QMTL_GC_POLICIES", "gc_policies", _policies),
    (
        "gc_intent_grace_seconds",
        "QMTL_GC_INTENT_GRACE_SECONDS",
        "gc_intent_grace_seconds",
        _positive,
    ),
    ("prometheus_url", "QMTL_PROMETHEUS_URL", "prometheus_url", _url),
    ("gc_load_query", "QMTL_GC_LOAD_QUERY", "gc_load_query", _text),
    ("gc_load_threshold", "QMTL_GC_LOAD_THRESHOLD", "gc_load_threshold", _float),
    ("dry_run_strategy", "QMTL_DRY_RUN_STRATEGY", "dry_run_strategy", _text),
    ("node_cache_ttl_seconds", "QMTL_NODE_CACHE_TTL", "node_cache_ttl_seconds", _nonneg),
    ("diff_max_inflight", "QMTL_DIFF_MAX_INFLIGHT", "diff_max_inflight", _positive),
    ("diff_max_waiting", "QMTL_DIFF_MAX_WAITING", "diff_max_waiting", _nonneg),
    (
        "resubmission_cache_nodes",
        "QMTL_RESUBMISSION_CACHE_NODES",
        "resubmission_cache_nodes",
        _nonneg,
    ),
    ("node_memo_nodes", "QMTL_NODE_MEMO_NODES", "node_memo_nodes", _nonneg),
    (
        "heap_full_collection_seconds",
        "QMTL_HEAP_FULL_COLLECTION_SECONDS",
        "heap_full_collection_seconds",
        _nonneg,
    ),
    ("log_level", "QMTL_LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error")),
    ("log_format", "QMTL_LOG_FORMAT", "log_format", _choice("text", "json")),
    ("grpc_tls_cert", "QMTL_GRPC_TLS_CERT", "grpc_tls_cert", _text),
    ("grpc_tls_key", "QMTL_GRPC_TLS_KEY", "grpc_tls_key", _text),
    ("grpc_tls_client_ca", "QMTL_GRPC_TLS_CLIENT_CA", "grpc_tls_client_ca", _text),
    ("grpc_jwt_key", "QMTL_GRPC_JWT_KEY", "grpc_jwt_key", _text),
    ("grpc_jwt_audience", "QMTL_GRPC_JWT_AUDIENCE", "grpc_jwt_audience", _text),
    ("grpc_jwt_issuer", "QMTL_GRPC_JWT_ISSUER", "grpc_jwt_issuer", _text),
    ("http_admin_token", "QMTL_HTTP_ADMIN_TOKEN", "http_admin_token", _text),
    ("queue_stats_per_second", "QMTL_QUEUE_STATS_PER_SECOND", "queue_stats_per_second", _positive),
    (
        "gc_trigger_interval_seconds",
        "QMTL_GC_TRIGGER_INTERVAL_SECONDS",
        "gc_trigger_interval_seconds",
        _nonneg,
    ),
    ("kubeconfig", "KUBECONFIG", "kubeconfig", _text),
    ("pod_namespace", "POD_NAMESPACE", "pod_namespace", _text),
    ("pod_name", "POD_NAME", "pod_name", _text),
    ("max_nodes", "QMTL_MAX_NODES", "max_nodes", _nonneg),
    ("max_dag_bytes", "QMTL_MAX_DAG_BYTES", "max_bytes", _nonneg),
)


SECRETS = {
    "neo4j_password": "NEO4J_PASSWORD",
    "grpc_jwt_key": "QMTL_GRPC_JWT_KEY",
    "http_admin_token": "QMTL_HTTP_ADMIN_TOKEN",
}


def load(path: Path | None, env: Mapping[str, str]) -> Settings:
    """Defaults, then the YAML file, then environment variables (which win)."""
    values: dict[str, Any] = {}
    if path is not None:
        if not path.exists():
            raise SettingsError(f"{path}: no such file")
        try:
            doc = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise SettingsError(f"{path}: not valid YAML: {e}") from None
        if doc is None:
            doc = {}
        if not isinstance(doc, dict):
            raise SettingsError(f"{path}: expected a mapping of settings")
        secret = sorted(k for k in doc if k in SECRETS)
        if secret:
            raise SettingsError(
                f"{path}: {', '.join(secret)} must not be in a file: set "
                + ", ".join(SECRETS[k] for k in secret)
                + " in the environment (from a Kubernetes Secret in a cluster)"
            )
        known = {k for k, _, _, _ in KEYS}
        unknown = sorted(str(k) for k in doc if k not in known)
        if unknown:
            raise SettingsError(
                f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        for key, _, name, parse in KEYS:
            if key in doc and doc[key] is not None:
                values[name] = _parsed(parse, doc[key], f"{path}: {key}")
    for _, var, name, parse in KEYS:
        raw = env.get(var)
        if raw is not None and raw.strip() != "":
            values[name] = _parsed(parse, raw, f"environment variable {var}")
    policy_prefix = "QMTL_GC_POLICY_"
    for var in sorted(env):
        if var.startswith(policy_prefix) and env[var].strip():
            tag = var.removeprefix(policy_prefix).lower()
            policies = dict(values.get("gc_policies", DEFAULT_POLICIES))
            policies[tag] = _parsed(_policy, env[var], f"environment variable {var}")
            values["gc_policies"] = policies
    limits = Limits(
        max_nodes=values.pop("max_nodes", Limits().max_nodes),
        max_bytes=values.pop("max_bytes", Limits().max_bytes),
    )
    settings = dataclasses.replace(Settings(), limits=limits, **values)
    if settings.log_level:
        settings = dataclasses.replace(settings, log_level=settings.log_level.upper())
    if bool(settings.grpc_tls_cert) != bool(settings.grpc_tls_key):
        raise SettingsError("grpc_tls_cert and grpc_tls_key go together")
    if settings.grpc_tls_client_ca and not settings.grpc_tls_cert:
        raise SettingsError("grpc_tls_client_ca (mutual TLS) needs grpc_tls_cert and grpc_tls_key")
    unauthenticated = not (settings.grpc_jwt_key or settings.grpc_tls_client_ca)
    if settings.profile == "prod" and not loopback(settings.grpc_host) and unauthenticated:
        raise SettingsError(
            f"grpc_host {settings.grpc_host} is not loopback: profile prod needs "
            "grpc_jwt_key (QMTL_GRPC_JWT_KEY) or mutual TLS (grpc_tls_client_ca)"
        )
    if settings.gc_load_query and not settings.prometheus_url:
        raise SettingsError("gc_load_query needs prometheus_url (QMTL_PROMETHEUS_URL)")
    if settings.profile == "prod":
        missing = [
            k
            for k, v in (("neo4j_dsn", settings.neo4j_uri), ("kafka_dsn", settings.kafka_bootstrap))
            if not v
        ]
        if missing:
            raise SettingsError(f"profile prod needs real backends: set {', '.join(missing)}")
    return settings


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def _parsed(parse: Callable[[Any], Any], raw: Any, where: str) -> Any:
    try:
        return parse(raw)
    except ValueError as e:
        raise SettingsError(f"{where}: {raw!r}: {e}") from None
