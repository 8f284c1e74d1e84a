"""Settings, read explicitly from an environment mapping (never at import time)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from qmtl_dagmanager.adapters.topic_rules import Profile
from qmtl_dagmanager.core.dag import IdMode, Limits


class SettingsError(ValueError):
    """A setting has a value we cannot use; the message names the variable."""


def _int(env: Mapping[str, str], key: str, default: int) -> int:
    raw = env.get(key, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(f"{key}={raw!r} is not an integer") from None


def _choice(env: Mapping[str, str], key: str, choices: tuple[str, ...], default: str) -> str:
    raw = env.get(key, "").strip().lower() or default
    if raw not in choices:
        raise SettingsError(f"{key}={raw!r}: expected one of {', '.join(choices)}")
    return raw


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, with its environment variable in the README's configuration table."""

    neo4j_uri: str = ""  # empty: the embedded in-memory graph store
    neo4j_user: str = "neo4j"
    neo4j_password: str = ""
    neo4j_database: str = "neo4j"
    kafka_bootstrap: str = ""  # empty: the embedded in-memory topic admin and event bus
    topic_profile: Profile = Profile.DEVELOPMENT
    node_ids: IdMode = IdMode.VERIFY
    limits: Limits = field(default_factory=Limits)
    queue_topic: str = "queue"
    sentinel_weight_topic: str = "sentinel_weight"
    archive_dir: str = "./archive"
    grpc_host: str = "127.0.0.1"
    grpc_port: int = 50051
    http_host: str = "127.0.0.1"
    http_port: int = 8001

    @property
    def embedded_graph(self) -> bool:
        return not self.neo4j_uri

    @property
    def embedded_kafka(self) -> bool:
        return not self.kafka_bootstrap

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        return cls(
            neo4j_uri=env.get("NEO4J_URI", "").strip(),
            neo4j_user=env.get("NEO4J_USER", "neo4j"),
            neo4j_password=env.get("NEO4J_PASSWORD", ""),
            neo4j_database=env.get("NEO4J_DATABASE", "neo4j"),
            kafka_bootstrap=env.get("KAFKA_BOOTSTRAP_SERVERS", "").strip(),
            topic_profile=Profile(
                _choice(env, "QMTL_TOPIC_PROFILE", ("development", "production"), "development")
            ),
            node_ids=IdMode(_choice(env, "QMTL_NODE_IDS", ("verify", "trust"), "verify")),
            limits=Limits(
                max_nodes=_int(env, "QMTL_MAX_NODES", Limits().max_nodes),
                max_bytes=_int(env, "QMTL_MAX_DAG_BYTES", Limits().max_bytes),
            ),
            queue_topic=env.get("QMTL_QUEUE_TOPIC", "queue"),
            sentinel_weight_topic=env.get("QMTL_SENTINEL_WEIGHT_TOPIC", "sentinel_weight"),
            archive_dir=env.get("QMTL_ARCHIVE_DIR", "./archive"),
            grpc_host=env.get("QMTL_GRPC_HOST", "127.0.0.1"),
            grpc_port=_int(env, "QMTL_GRPC_PORT", 50051),
            http_host=env.get("QMTL_HTTP_HOST", "127.0.0.1"),
            http_port=_int(env, "QMTL_HTTP_PORT", 8001),
        )
