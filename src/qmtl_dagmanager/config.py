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

JWT_ALGORITHMS = frozenset(
    {
        "HS256",
        "HS384",
        "HS512",
        "RS256",
        "RS384",
        "RS512",
        "PS256",
        "PS384",
        "PS512",
        "ES256",
        "ES384",
        "ES512",
        "EdDSA",
    }
)


def split_list(text: str) -> list[str]:
    """The non-blank entries of a comma-separated setting."""
    return [part.strip() for part in text.split(",") if part.strip()]


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the key or variable."""


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


def _upper_choice(*choices: str) -> Callable[[Any], str]:
    def parse(v: Any) -> str:
        text = _text(v).upper()
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


def _positive_float(v: Any) -> float:
    f = _float(v)
    if f <= 0:
        raise ValueError("expected a number above 0")
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
    """`s3://bucket[/prefix]` (object storage) or a directory (local development)."""
    text = _text(v)
    if text.startswith("s3://"):
        bucket = text.removeprefix("s3://").partition("/")[0]
        if not bucket:
            raise ValueError("expected s3://<bucket>[/<prefix>]")
        return text.rstrip("/")
    if "://" in text and not text.startswith("file://"):
        raise ValueError("expected s3://<bucket>[/<prefix>] or a directory")
    return text.removeprefix("file://")


def _endpoint(v: Any) -> str:
    text = _text(v).rstrip("/")
    if text and not text.startswith(("http://", "https://")):
        raise ValueError("expected http(s)://host[:port]")
    return text


def setting(
    default: Any,
    yaml_key: str,
    env: str,
    parse: Callable[[Any], Any],
    doc: str,
    *,
    shown: str | None = None,
    secret: bool = False,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """One setting, declared once: its default, YAML key, environment variable, parser and
    documentation (`shown` replaces the default in the README table). A secret is read from
    the environment only."""
    meta = {
        "yaml": None if secret else yaml_key,
        "env": env,
        "parse": parse,
        "doc": doc,
        "shown": shown,
    }
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


def _profile(v: Any) -> Profile:
    return Profile(_choice("development", "production")(v))


def _ids(v: Any) -> IdMode:
    return IdMode(_choice("verify", "trust")(v))


@dataclass(frozen=True, slots=True)
class Settings:
    profile: str = setting(
        "dev", "profile", "QMTL_PROFILE", _choice("dev", "prod"), "`prod` requires real backends"
    )
    neo4j_uri: str = setting(
        "", "neo4j_dsn", "NEO4J_URI", _text, "the graph store (Bolt URI)", shown="embedded"
    )
    neo4j_user: str = setting("neo4j", "neo4j_user", "NEO4J_USER", _text, "its user")
    neo4j_password: str = setting(
        "", "neo4j_password", "NEO4J_PASSWORD", _text, "its password", secret=True
    )
    neo4j_database: str = setting("neo4j", "neo4j_database", "NEO4J_DATABASE", _text, "database")
    neo4j_ssl_ca: str = setting(
        "",
        "neo4j_ssl_ca",
        "NEO4J_SSL_CA",
        _text,
        "PEM CA of Neo4j's certificate, with a bolt+s:// or neo4j+s:// URI (default: the system's)",
    )
    kafka_bootstrap: str = setting(
        "",
        "kafka_dsn",
        "KAFKA_BOOTSTRAP_SERVERS",
        _text,
        "Kafka: topics, archives",
        shown="embedded",
    )
    kafka_security_protocol: str = setting(
        "plaintext",
        "kafka_security_protocol",
        "KAFKA_SECURITY_PROTOCOL",
        _choice("plaintext", "ssl", "sasl_plaintext", "sasl_ssl"),
        "how Kafka (and the ControlBus) is reached: `sasl_ssl` in production",
    )
    kafka_sasl_mechanism: str = setting(
        "SCRAM-SHA-512",
        "kafka_sasl_mechanism",
        "KAFKA_SASL_MECHANISM",
        _upper_choice("SCRAM-SHA-512", "SCRAM-SHA-256", "PLAIN"),
        "SASL mechanism (sasl_* protocols)",
    )
    kafka_sasl_username: str = setting(
        "", "kafka_sasl_username", "KAFKA_SASL_USERNAME", _text, "this process's Kafka principal"
    )
    kafka_sasl_password: str = setting(
        "", "kafka_sasl_password", "KAFKA_SASL_PASSWORD", _text, "its password", secret=True
    )
    kafka_ssl_ca: str = setting(
        "",
        "kafka_ssl_ca",
        "KAFKA_SSL_CA",
        _text,
        "PEM CA the brokers' certificates chain to (default: the system's)",
    )
    controlbus_bootstrap: str = setting(
        "", "controlbus_dsn", "QMTL_CONTROLBUS_DSN", _text, "ControlBus events", shown="`kafka_dsn`"
    )
    queue_topic: str = setting(
        "queue",
        "controlbus_queue_topic",
        "QMTL_QUEUE_TOPIC",
        _text,
        "QueueUpdated topic (created at start)",
    )
    sentinel_weight_topic: str = setting(
        "sentinel_weight",
        "controlbus_sentinel_topic",
        "QMTL_SENTINEL_WEIGHT_TOPIC",
        _text,
        "sentinel weight topic (created at start)",
    )
    topic_profile: Profile = setting(
        Profile.DEVELOPMENT,
        "topic_profile",
        "QMTL_TOPIC_PROFILE",
        _profile,
        "development: replication capped at the brokers seen; production: replication at "
        "least 3 with min.insync.replicas 2, refused where the cluster cannot place it",
    )
    topic_visible_bound_seconds: int = setting(
        10,
        "topic_visible_bound_seconds",
        "QMTL_TOPIC_VISIBLE_BOUND_SECONDS",
        _positive,
        "the sidecar answers once Kafka acknowledged a topic's creation; past this many "
        "seconds without the broker describing it, the creation is sent again and a failure "
        "surfaced (event, metric, status)",
    )
    enable_topic_namespace: bool = setting(
        True,
        "enable_topic_namespace",
        "QMTL_ENABLE_TOPIC_NAMESPACE",
        _bool,
        "prefix topics with `<world>.<domain>.`",
    )
    node_ids: IdMode = setting(
        IdMode.VERIFY,
        "node_ids",
        "QMTL_NODE_IDS",
        _ids,
        "recompute NodeIDs, or `trust` the Gateway's",
    )
    limits: Limits = field(default_factory=Limits)  # from max_nodes and max_dag_bytes below
    grpc_host: str = setting("127.0.0.1", "grpc_host", "QMTL_GRPC_HOST", _text, "gRPC listener")
    grpc_port: int = setting(50051, "grpc_port", "QMTL_GRPC_PORT", _port, "gRPC port")
    http_host: str = setting("127.0.0.1", "http_host", "QMTL_HTTP_HOST", _text, "HTTP admin")
    http_port: int = setting(8001, "http_port", "QMTL_HTTP_PORT", _port, "HTTP admin port")
    probe_host: str = setting(
        "0.0.0.0",  # noqa: S104 (a kubelet probes the pod's IP, never its loopback)
        "probe_host",
        "QMTL_PROBE_HOST",
        _text,
        "listener of the probe ports (health only, nothing else)",
    )
    probe_grpc_port: int = setting(
        0,
        "probe_grpc_port",
        "QMTL_PROBE_GRPC_PORT",
        _port,
        "gRPC health only, for a kubelet's grpc probe (0: off)",
    )
    probe_http_port: int = setting(
        0,
        "probe_http_port",
        "QMTL_PROBE_HTTP_PORT",
        _port,
        "GET /livez and /status only, for a kubelet's httpGet probe (0: off)",
    )
    gc_interval_seconds: int = setting(
        3600,
        "gc_interval_seconds",
        "QMTL_GC_INTERVAL_SECONDS",
        _nonneg,
        "timed GC (0: only on trigger)",
    )
    gc_dry_run: bool = setting(
        False,
        "gc_dry_run",
        "QMTL_GC_DRY_RUN",
        _bool,
        "timed GC decides and reports but drops nothing",
    )
    gc_policies: Mapping[str, GcPolicy] = setting(
        None,
        "gc_policies",
        "QMTL_GC_POLICIES",
        _policies,
        "per tag `{ttl_seconds, grace_seconds, action}` (YAML/JSON in the environment; also "
        "`QMTL_GC_POLICY_<TAG>=ttl_seconds=…,grace_seconds=…,action=drop\\|archive`), "
        "merged over the defaults",
        shown="raw 7 d + 1 d, indicator 30 d + 3 d drop; trade_exec 90 d + 7 d, "
        "sentinel 180 d + 30 d archive",
        factory=lambda: dict(DEFAULT_POLICIES),
    )
    compact_max_nodes: int = setting(
        1000,
        "compact_max_nodes",
        "QMTL_COMPACT_MAX_NODES",
        _nonneg,
        "compute nodes each timed GC run may compact (no queue, reference or live sentinel, "
        "older than the sentinel TTL); 0: only `dagmanager compact`",
    )
    gc_intent_grace_seconds: int = setting(
        600,
        "gc_intent_grace_seconds",
        "QMTL_GC_INTENT_GRACE_SECONDS",
        _positive,
        "a topic created by a diff that no queue owns after this is deleted by GC",
    )
    prometheus_url: str = setting(
        "",
        "prometheus_url",
        "QMTL_PROMETHEUS_URL",
        _url,
        "a Prometheus-compatible HTTP API (`/api/v1/query`): GC load metric, canary gates",
    )
    otlp_endpoint: str = setting(
        "",
        "otlp_endpoint",
        "QMTL_OTLP_ENDPOINT",
        _url,
        "OTLP/HTTP collector (e.g. http://otel-collector:4318): traces of diffs, reconciles and "
        "GC runs, and the audit records as OTLP logs (empty: off; audit stays log lines)",
    )
    otel_service_name: str = setting(
        "qmtl-dagmanager",
        "otel_service_name",
        "QMTL_OTEL_SERVICE_NAME",
        _text,
        "`service.name` of the exported traces and logs",
    )
    gc_load_query: str = setting(
        "",
        "gc_load_query",
        "QMTL_GC_LOAD_QUERY",
        _text,
        "PromQL for the broker load (largest sample of the answer); empty: never throttled",
    )
    gc_load_threshold: float = setting(
        0.8,
        "gc_load_threshold",
        "QMTL_GC_LOAD_THRESHOLD",
        _float,
        "above it, or unreadable, a GC run's cap is halved",
    )
    archive_dir: str = setting(
        "./archive",
        "gc_archive_bucket",
        "QMTL_ARCHIVE_DIR",
        _archive,
        "where archives go: `s3://<bucket>[/<prefix>]`, or a directory (local development "
        "only: `profile: prod` refuses it)",
    )
    s3_endpoint: str = setting(
        "",
        "s3_endpoint",
        "QMTL_S3_ENDPOINT",
        _endpoint,
        "S3 API endpoint `http(s)://host:port` (empty: AWS)",
        shown="AWS",
    )
    s3_region: str = setting("us-east-1", "s3_region", "QMTL_S3_REGION", _text, "S3 region")
    s3_access_key: str = setting(
        "", "s3_access_key", "QMTL_S3_ACCESS_KEY", _text, "S3 access key id"
    )
    s3_secret_key: str = setting(
        "", "s3_secret_key", "QMTL_S3_SECRET_KEY", _text, "S3 secret key", secret=True
    )
    dry_run_strategy: str = setting(
        "dryrun",
        "dry_run_strategy",
        "QMTL_DRY_RUN_STRATEGY",
        _text,
        "diffs of this strategy id write nothing",
    )
    buffer_max_age_seconds: int = setting(
        7 * 86_400,
        "buffer_max_age_seconds",
        "QMTL_BUFFER_MAX_AGE_SECONDS",
        _nonneg,
        "a node buffering (back-compatible schema change) this long is fully recomputed at its "
        "next diff: a new queue generation; the old queue is left to GC (0: never)",
        shown="604800 (7 d)",
    )
    vitals_interval_seconds: int = setting(
        30,
        "vitals_interval_seconds",
        "QMTL_VITALS_INTERVAL_SECONDS",
        _nonneg,
        "how often the graph-size gauges and dependency_up are read (0: off)",
    )
    node_cache_ttl_seconds: int = setting(
        60,
        "node_cache_ttl_seconds",
        "QMTL_NODE_CACHE_TTL",
        _nonneg,
        "node-record cache lifetime (0 disables)",
    )
    diff_max_inflight: int = setting(
        8, "diff_max_inflight", "QMTL_DIFF_MAX_INFLIGHT", _positive, "concurrent diffs"
    )
    diff_max_waiting: int = setting(
        256,
        "diff_max_waiting",
        "QMTL_DIFF_MAX_WAITING",
        _nonneg,
        "diffs that may wait (each up to 2 s) beyond those; then RESOURCE_EXHAUSTED",
    )
    diff_deadline_seconds: int = setting(
        60,
        "diff_deadline_seconds",
        "QMTL_DIFF_DEADLINE_SECONDS",
        _positive,
        "a diff's own deadline: its work runs on when the caller leaves (the Gateway cancels "
        "after 0.1 s), and ends UNAVAILABLE (DiffDeadline) past this",
    )
    diff_answer_early: bool = setting(
        False,
        "diff_answer_early",
        "QMTL_DIFF_ANSWER_EARLY",
        _bool,
        "the sidecar answers a new diff once it is journaled and Kafka validated its topics, "
        "before they are created and the graph written (the Gateway's 0.1 s budget); off: "
        "after the write (README: Work that outlives the caller)",
    )
    diff_journal_grace_seconds: int = setting(
        15,
        "diff_journal_grace_seconds",
        "QMTL_DIFF_JOURNAL_GRACE_SECONDS",
        _positive,
        "a diff the sidecar answered but whose graph write has not happened after this is run "
        "again by any sidecar or the operator (its process died, or Neo4j or Kafka failed)",
    )
    diff_journal_interval_seconds: int = setting(
        5,
        "diff_journal_interval_seconds",
        "QMTL_DIFF_JOURNAL_INTERVAL_SECONDS",
        _positive,
        "how often each process looks for journaled diffs to run again",
    )
    resubmission_cache_nodes: int = setting(
        20_000,
        "resubmission_cache_nodes",
        "QMTL_RESUBMISSION_CACHE_NODES",
        _nonneg,
        "nodes of recent answers kept for identical resubmissions (0 disables)",
    )
    node_memo_nodes: int = setting(
        20_000,
        "node_memo_nodes",
        "QMTL_NODE_MEMO_NODES",
        _nonneg,
        "nodes already validated (and verified), kept by exact content so that a changed DAG "
        "re-checks only its changed nodes (0 disables)",
    )
    heap_full_collection_seconds: int = setting(
        5,
        "heap_full_collection_seconds",
        "QMTL_HEAP_FULL_COLLECTION_SECONDS",
        _nonneg,
        "the sidecar runs Python's full garbage collection itself, between diffs, at most "
        "this often (less often when a collection is long: at most 2 % of the time); 0: "
        "automatic, which pauses the diff that triggers it (see Growth)",
    )
    log_level: str = setting(
        "INFO",
        "log_level",
        "QMTL_LOG_LEVEL",
        _choice("debug", "info", "warning", "error"),
        "debug, info, warning or error",
        shown="info",
    )
    log_format: str = setting(
        "text",
        "log_format",
        "QMTL_LOG_FORMAT",
        _choice("text", "json"),
        "`json`: one object per line",
    )
    grpc_answer_deadline_seconds: float = setting(
        4.0,
        "grpc_answer_deadline_seconds",
        "QMTL_GRPC_ANSWER_DEADLINE_SECONDS",
        _positive_float,
        "no gRPC call waits longer for its answer: past it UNAVAILABLE (DependencyTimeout), "
        "the work going on in the background",
    )
    grpc_tls_cert: str = setting(
        "",
        "grpc_tls_cert",
        "QMTL_GRPC_TLS_CERT",
        _text,
        "PEM file: TLS on the gRPC port, re-read when it changes (no restart)",
    )
    grpc_tls_key: str = setting(
        "", "grpc_tls_key", "QMTL_GRPC_TLS_KEY", _text, "PEM file: its private key"
    )
    grpc_tls_client_ca: str = setting(
        "",
        "grpc_tls_client_ca",
        "QMTL_GRPC_TLS_CLIENT_CA",
        _text,
        "mutual TLS: clients need a certificate this CA signed",
    )
    grpc_jwt_key: str = setting(
        "",
        "grpc_jwt_key",
        "QMTL_GRPC_JWT_KEY",
        _text,
        "shared HS256 key: every call needs `authorization: Bearer <JWT>` (`exp` required); "
        "several keys separated by commas all verify (old and new during a rotation)",
        secret=True,
    )
    grpc_jwt_keys_file: str = setting(
        "",
        "grpc_jwt_keys_file",
        "QMTL_GRPC_JWT_KEYS_FILE",
        _text,
        "file of shared HS256 keys, one per line, re-read when it changes (a mounted Secret)",
    )
    grpc_jwks_url: str = setting(
        "",
        "grpc_jwks_url",
        "QMTL_GRPC_JWKS_URL",
        _url,
        "JWKS of the token issuer: RS256/ES256 tokens are verified against its keys",
    )
    grpc_jwks_ca: str = setting(
        "", "grpc_jwks_ca", "QMTL_GRPC_JWKS_CA", _text, "PEM CA for an https JWKS URL"
    )
    grpc_jwks_refresh_seconds: int = setting(
        300,
        "grpc_jwks_refresh_seconds",
        "QMTL_GRPC_JWKS_REFRESH_SECONDS",
        _positive,
        "JWKS refresh interval (an unknown `kid` also triggers a fetch, at most one a second)",
    )
    grpc_jwt_algorithms: str = setting(
        "HS256,RS256,ES256",
        "grpc_jwt_algorithms",
        "QMTL_GRPC_JWT_ALGORITHMS",
        _text,
        "accepted `alg` values (HS* need a shared key, RS/PS/ES/EdDSA the JWKS)",
    )
    grpc_jwt_leeway_seconds: int = setting(
        30,
        "grpc_jwt_leeway_seconds",
        "QMTL_GRPC_JWT_LEEWAY_SECONDS",
        _nonneg,
        "clock skew allowed on `exp` and `nbf`",
    )
    grpc_jwt_audience: str = setting(
        "", "grpc_jwt_audience", "QMTL_GRPC_JWT_AUDIENCE", _text, "checked when set"
    )
    grpc_jwt_issuer: str = setting(
        "", "grpc_jwt_issuer", "QMTL_GRPC_JWT_ISSUER", _text, "checked when set"
    )
    http_admin_token: str = setting(
        "",
        "http_admin_token",
        "QMTL_HTTP_ADMIN_TOKEN",
        _text,
        "`Authorization: Bearer <token>` for `POST /admin/gc-trigger`; without one that "
        "endpoint is open on loopback only (403 elsewhere)",
        secret=True,
    )
    queue_stats_per_second: int = setting(
        5,
        "queue_stats_per_second",
        "QMTL_QUEUE_STATS_PER_SECOND",
        _positive,
        "GetQueueStats rate limit (RESOURCE_EXHAUSTED beyond)",
    )
    finalizer_timeout_seconds: int = setting(
        300,
        "finalizer_timeout_seconds",
        "QMTL_FINALIZER_TIMEOUT_SECONDS",
        _positive,
        "a StrategyDAG deletion failing this long on unreachable backends, in a terminating "
        "namespace or with the annotation `qmtl.io/release-when-unreachable`, records its "
        "release and lets the finalizer go",
    )
    pending_release_interval_seconds: int = setting(
        30,
        "pending_release_interval_seconds",
        "QMTL_PENDING_RELEASE_INTERVAL_SECONDS",
        _positive,
        "how often the operator tries to complete recorded releases",
    )
    gc_trigger_interval_seconds: int = setting(
        10,
        "gc_trigger_interval_seconds",
        "QMTL_GC_TRIGGER_INTERVAL_SECONDS",
        _nonneg,
        "at most one GC trigger per interval (429 with Retry-After)",
    )
    kubeconfig: str = setting(
        "",
        "kubeconfig",
        "KUBECONFIG",
        _text,
        "the operator's API client (one per process, outside kopf too)",
        shown="in-cluster account, else `~/.kube/config`",
    )
    pod_namespace: str = setting(
        "default",
        "pod_namespace",
        "POD_NAMESPACE",
        _text,
        "the operator's namespace: its lease and GC report (the chart sets it)",
    )
    pod_name: str = setting(
        "",
        "pod_name",
        "POD_NAME",
        _text,
        "the operator's lease identity (the chart sets it)",
        shown="host name and pid",
    )

    @property
    def embedded_graph(self) -> bool:
        return not self.neo4j_uri

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap


@dataclass(frozen=True, slots=True)
class Key:
    """A setting as read: YAML key (None: environment only), variable, field, parser, doc."""

    yaml: str | None
    env: str
    name: str
    parse: Callable[[Any], Any]
    doc: str
    shown: str


def _keys() -> tuple[Key, ...]:
    out = []
    defaults = Settings()
    for f in dataclasses.fields(Settings):
        if "env" not in f.metadata:
            continue
        m = f.metadata
        shown = m["shown"] if m["shown"] is not None else _shown(getattr(defaults, f.name))
        out.append(Key(m["yaml"], m["env"], f.name, m["parse"], m["doc"], shown))
    limits = Limits()
    out += [
        Key(
            "max_nodes",
            "QMTL_MAX_NODES",
            "max_nodes",
            _nonneg,
            "DAG size limit: nodes",
            str(limits.max_nodes),
        ),
        Key(
            "max_dag_bytes",
            "QMTL_MAX_DAG_BYTES",
            "max_bytes",
            _nonneg,
            "DAG size limit: bytes of `dag_json`",
            f"{limits.max_bytes // 2**20} MiB",
        ),
    ]
    return tuple(out)


NONE = "\u2013"  # an en dash: no value


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, int | float):
        return str(value)
    return f"`{value}`" if value else NONE


KEYS = _keys()
SECRETS = {k.name: k.env for k in KEYS if k.yaml is None}


def table() -> str:
    """The README's configuration table (`make settings` writes it, `make lint` checks it)."""
    rows = ["| YAML key | environment | default | meaning |", "|---|---|---|---|"]
    for k in KEYS:
        yaml_key = f"`{k.yaml}`" if k.yaml else NONE
        rows.append(f"| {yaml_key} | `{k.env}` | {k.shown} | {k.doc} |")
    return "\n".join(rows) + "\n"


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
        known = {k.yaml for k in KEYS if k.yaml}
        unknown = sorted(str(k) for k in doc if k not in known)
        if unknown:
            raise SettingsError(
                f"{path}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
            )
        for k in KEYS:
            if k.yaml and doc.get(k.yaml) is not None:
                values[k.name] = _parsed(k.parse, doc[k.yaml], f"{path}: {k.yaml}")
    for k in KEYS:
        raw = env.get(k.env)
        if raw is not None and raw.strip() != "":
            values[k.name] = _parsed(k.parse, raw, f"environment variable {k.env}")
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
    _check_security(settings)
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
        if not settings.archive_dir.startswith("s3://"):
            raise SettingsError(
                "profile prod keeps archives in object storage: set gc_archive_bucket "
                "(QMTL_ARCHIVE_DIR) to s3://<bucket>[/<prefix>], not a directory"
            )
    return settings


def loopback(host: str) -> bool:
    return host in ("127.0.0.1", "::1", "localhost") or host.startswith("127.")


def kafka_security(settings: Settings) -> dict[str, str]:
    """The librdkafka settings that secure a client as the settings ask (empty: plaintext)."""
    out: dict[str, str] = {}
    if settings.kafka_security_protocol != "plaintext":
        out["security.protocol"] = settings.kafka_security_protocol.upper()
    if settings.kafka_security_protocol.startswith("sasl_"):
        out["sasl.mechanism"] = settings.kafka_sasl_mechanism
        out["sasl.username"] = settings.kafka_sasl_username
        out["sasl.password"] = settings.kafka_sasl_password
    if settings.kafka_ssl_ca:
        out["ssl.ca.location"] = settings.kafka_ssl_ca
    return out


def _check_kafka(settings: Settings) -> None:
    protocol = settings.kafka_security_protocol
    sasl = protocol.startswith("sasl_")
    if sasl and not (settings.kafka_sasl_username and settings.kafka_sasl_password):
        raise SettingsError(
            f"kafka_security_protocol {protocol} needs kafka_sasl_username "
            "(KAFKA_SASL_USERNAME) and kafka_sasl_password (KAFKA_SASL_PASSWORD)"
        )
    if not sasl and (settings.kafka_sasl_username or settings.kafka_sasl_password):
        raise SettingsError(
            f"kafka_sasl_username/kafka_sasl_password are set but kafka_security_protocol is "
            f"{protocol}: use sasl_ssl (or sasl_plaintext)"
        )
    if settings.kafka_ssl_ca and protocol in ("plaintext", "sasl_plaintext"):
        raise SettingsError(f"kafka_ssl_ca needs a TLS protocol (ssl or sasl_ssl), not {protocol}")
    if settings.kafka_ssl_ca and not Path(settings.kafka_ssl_ca).is_file():
        raise SettingsError(f"kafka_ssl_ca (KAFKA_SSL_CA): no such file {settings.kafka_ssl_ca}")


def _check_security(settings: Settings) -> None:
    _check_tokens(settings)
    _check_kafka(settings)
    _check_neo4j(settings)


def _check_neo4j(settings: Settings) -> None:
    if not settings.neo4j_ssl_ca:
        return
    if not settings.neo4j_uri.startswith(("bolt+s://", "neo4j+s://")):
        raise SettingsError(
            "neo4j_ssl_ca (NEO4J_SSL_CA) needs TLS: a bolt+s:// or neo4j+s:// neo4j_dsn, "
            f"not {settings.neo4j_uri or 'the embedded graph'}"
        )
    if not Path(settings.neo4j_ssl_ca).is_file():
        raise SettingsError(f"neo4j_ssl_ca (NEO4J_SSL_CA): no such file {settings.neo4j_ssl_ca}")


def _check_tokens(settings: Settings) -> None:
    bad_algs = set(split_list(settings.grpc_jwt_algorithms)) - JWT_ALGORITHMS
    if bad_algs:
        raise SettingsError(
            "grpc_jwt_algorithms (QMTL_GRPC_JWT_ALGORITHMS): unsupported "
            f"{', '.join(sorted(bad_algs))}; expected some of {', '.join(sorted(JWT_ALGORITHMS))}"
        )
    if settings.grpc_jwks_ca and not settings.grpc_jwks_url.startswith("https://"):
        raise SettingsError("grpc_jwks_ca needs an https:// grpc_jwks_url")
    tokens = settings.grpc_jwt_key or settings.grpc_jwt_keys_file or settings.grpc_jwks_url
    unauthenticated = not (tokens or settings.grpc_tls_client_ca)
    if settings.profile == "prod" and not loopback(settings.grpc_host) and unauthenticated:
        raise SettingsError(
            f"grpc_host {settings.grpc_host} is not loopback: profile prod needs "
            "bearer tokens (grpc_jwt_key, grpc_jwt_keys_file or grpc_jwks_url) "
            "or mutual TLS (grpc_tls_client_ca)"
        )


def _parsed(parse: Callable[[Any], Any], raw: Any, where: str) -> Any:
    try:
        return parse(raw)
    except ValueError as e:
        raise SettingsError(f"{where}: {raw!r}: {e}") from None
