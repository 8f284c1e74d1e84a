"""Topic names, namespaces and topic specs (contract §7).

Name: `{asset}_{node_type}_{short_hash}_{version}`, optionally prefixed by the namespace
`<world>.<domain>`. A node's own topic is reused, never renamed; the short hash is lengthened
by 2 hex digits only when a different node already holds the name.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, NewType

TopicName = NewType("TopicName", str)

MAX_TOPIC_LENGTH = 249  # Kafka's limit
SHORT_HASH = 8
_ASSET_DROP = re.compile(r"[^a-z0-9_-]")
_SEGMENT_SUB = re.compile(r"[^a-z0-9_-]")
_NODE_TYPE_DROP = re.compile(r"[^A-Za-z0-9_-]")
_VERSION_SUB = re.compile(r"[^A-Za-z0-9._-]")
VALID_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")

DAY_MS = 86_400_000


# The production profile's durability floor: every topic survives the loss of one broker
# out of three without refusing writes (producers use acks=all).
PRODUCTION_REPLICATION = 3
PRODUCTION_MIN_INSYNC = 2
MIN_INSYNC = "min.insync.replicas"


class Profile(StrEnum):
    """How topics are made durable, and how replication the cluster cannot hold is treated."""

    # replication capped at the brokers seen, with a warning
    DEVELOPMENT = "development"
    # replication at least 3 and min.insync.replicas 2; the controller refuses what the
    # cluster cannot place, and nothing is capped
    PRODUCTION = "production"


class TopicType(StrEnum):
    RAW = "raw"
    INDICATOR = "indicator"
    TRADE_EXEC = "trade_exec"


@dataclass(frozen=True, slots=True)
class TopicSpec:
    """How a new topic is created: partitions, replication and topic-level configs."""

    topic_type: TopicType
    partitions: int
    replication_factor: int
    config: tuple[tuple[str, str], ...] = ()

    @property
    def retention_ms(self) -> int:
        return int(dict(self.config).get("retention.ms", "-1"))


def durable(spec: TopicSpec, profile: Profile) -> TopicSpec:
    """The spec under `profile`: production raises replication to its floor and sets
    min.insync.replicas (unless the spec sets it); development leaves it as it is."""
    if profile is not Profile.PRODUCTION:
        return spec
    config = dict(spec.config)
    config.setdefault(MIN_INSYNC, str(PRODUCTION_MIN_INSYNC))
    return TopicSpec(
        spec.topic_type,
        spec.partitions,
        max(spec.replication_factor, PRODUCTION_REPLICATION),
        tuple(sorted(config.items())),
    )


def _spec(kind: TopicType, partitions: int, replication: int, days: int) -> TopicSpec:
    return TopicSpec(
        kind,
        partitions,
        replication,
        (("cleanup.policy", "delete"), ("retention.ms", str(days * DAY_MS))),
    )


@dataclass(frozen=True, slots=True)
class TopicCatalog:
    """Topic type → spec; the design's defaults unless configured otherwise."""

    specs: Mapping[TopicType, TopicSpec] = field(
        default_factory=lambda: {
            TopicType.RAW: _spec(TopicType.RAW, 3, 3, 7),
            TopicType.INDICATOR: _spec(TopicType.INDICATOR, 1, 2, 30),
            TopicType.TRADE_EXEC: _spec(TopicType.TRADE_EXEC, 1, 3, 90),
        }
    )

    def spec_for(self, node_type: str) -> TopicSpec:
        return self.specs[topic_type(node_type)]

    def spec_for_tag(self, tag: str) -> TopicSpec:
        """The spec for a queue's recorded tag (its topic type); an unknown tag: indicator."""
        known = tag in {t.value for t in TopicType}
        return self.specs[TopicType(tag) if known else TopicType.INDICATOR]

    def for_profile(self, profile: Profile) -> TopicCatalog:
        """The catalog as topics are created under `profile` (see `durable`)."""
        return TopicCatalog({k: durable(v, profile) for k, v in self.specs.items()})

    def capped(self, max_replication: int) -> TopicCatalog:
        """The same catalog with replication limited to what the cluster has (e.g. 1 broker)."""
        return TopicCatalog(
            {
                k: TopicSpec(
                    v.topic_type, v.partitions, min(v.replication_factor, max_replication), v.config
                )
                for k, v in self.specs.items()
            }
        )


def topic_type(node_type: str) -> TopicType:
    low = node_type.lower()
    if any(w in low for w in ("exec", "trade", "order", "portfolio")):
        return TopicType.TRADE_EXEC
    if any(w in low for w in ("raw", "price", "ohlcv")):
        return TopicType.RAW
    return TopicType.INDICATOR


def normalize_version(label: str | None) -> str:
    """Trim; anything but letters, digits, `-`, `_`, `.` → `-`; strip `-_.` at both ends;
    empty → `v1`."""
    text = _VERSION_SUB.sub("-", (label or "").strip()).strip("-_.")
    return text or "v1"


def _segment(value: Any) -> str:
    return _SEGMENT_SUB.sub("-", str(value or "").strip().lower()).strip("-_")


def namespace(world: Any, domain: Any) -> str | None:
    """`<world>.<domain>` with both segments normalised, or None when either is empty."""
    w, d = _segment(world), _segment(domain)
    return f"{w}.{d}" if w and d else None


class NamespaceError(ValueError):
    pass


def namespace_from_meta(value: Any) -> str | None:
    """`meta.topic_namespace` as `"world.domain"` or `{"world"|"world_id", "domain"|...}`."""
    if value is None:
        return None
    if isinstance(value, str):
        world, _, domain = value.strip().partition(".")
        return namespace(world, domain)
    if isinstance(value, dict):
        return namespace(
            value.get("world", value.get("world_id")),
            value.get("domain", value.get("execution_domain")),
        )
    raise NamespaceError("topic_namespace must be a string or an object")


@functools.lru_cache(maxsize=4096)
def asset_of(first_tag: str) -> str:
    cleaned = _ASSET_DROP.sub("", first_tag.lower())
    return cleaned or "asset"


@functools.lru_cache(maxsize=1024)
def _kind(node_type: str) -> str:
    return _NODE_TYPE_DROP.sub("", node_type) or "node"


class Namer:
    """Names topics for one diff (one version and namespace). The stem `<ns>.<asset>_<kind>`
    is computed once per (first tag, node type): a DAG has few of each."""

    __slots__ = ("_ns", "_stems", "_version")

    def __init__(self, version: str, ns: str | None) -> None:
        self._version = version
        self._ns = ns
        self._stems: dict[tuple[str, str], str] = {}

    def name(
        self, tags: tuple[str, ...], node_type: str, digest: str, hash_len: int = SHORT_HASH
    ) -> TopicName:
        first = tags[0] if tags and tags[0] else next((t for t in tags if t), "")
        stem = self._stems.get((first, node_type))
        if stem is None:
            stem = self._stems[(first, node_type)] = self._stem(first, node_type)
        return TopicName(f"{stem}_{digest[:hash_len]}_{self._version}")

    def _stem(self, first_tag: str, node_type: str) -> str:
        asset = asset_of(first_tag) if first_tag else "asset"
        kind = _kind(node_type)
        prefix = f"{self._ns}." if self._ns else ""
        # room for the longest tail (a full 64-digit hash): names stay within Kafka's limit
        room = MAX_TOPIC_LENGTH - len(prefix) - (64 + 2 + len(self._version)) - 1
        if len(asset) + len(kind) > room:
            asset = asset[: max(room // 2, 1)]
            kind = kind[: max(room - len(asset), 1)]
        return f"{prefix}{asset}_{kind}"


def topic_name(
    tags: tuple[str, ...],
    node_type: str,
    digest: str,
    version: str,
    ns: str | None,
    hash_len: int = SHORT_HASH,
) -> TopicName:
    """The (optionally namespaced) topic name; `digest` is the node id's hex digest."""
    return Namer(version, ns).name(tags, node_type, digest, hash_len)


def strip_namespace(topic: str, ns: str | None) -> str:
    """The base (un-namespaced) name of a topic."""
    if ns and topic.startswith(ns + "."):
        return topic[len(ns) + 1 :]
    return topic
