"""Rules both topic admins (Kafka and its twin) apply identically: the profile's durability,
replication against the brokers, name collisions, and whether an existing topic matches its
spec (a conflict) or only falls short of its durability (reused, and reported)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from qmtl_dagmanager.core.topics import MIN_INSYNC, Profile, TopicSpec, durable
from qmtl_dagmanager.ports import BELOW_SPEC, TopicResult, TopicState, TopicStatus

log = logging.getLogger(__name__)
COMPARED_CONFIGS = ("retention.ms", "cleanup.policy")


_CAPPED_WARNED: set[int | None] = set()  # broker counts the capping warning was logged for


def collision_key(name: str) -> str:
    """Kafka's metric names treat `.` and `_` alike; people treat case alike."""
    return name.lower().replace(".", "_")


def collisions(wanted: Iterable[str], existing: Iterable[str]) -> dict[str, str]:
    """wanted name → the existing (or earlier wanted) name it collides with."""
    seen: dict[str, str] = {}
    for name in existing:
        seen.setdefault(collision_key(name), name)
    out: dict[str, str] = {}
    for name in wanted:
        key = collision_key(name)
        other = seen.get(key)
        if other is not None and other != name:
            out[name] = other
        else:
            seen[key] = name
    return out


def effective_spec(
    name: str, spec: TopicSpec, brokers: int | None, profile: Profile
) -> tuple[TopicSpec | None, str]:
    """The spec to create under the profile, or None and the reason it cannot be.

    `brokers` is the brokers the cluster has registered, or None when the controller is left
    to judge (Kafka under the production profile: a broker that is down stays registered, and
    the controller places replicas on it, so the brokers a client sees alive undercount)."""
    spec = durable(spec, profile)
    if brokers is None or spec.replication_factor <= brokers:
        return spec, ""
    if profile is Profile.PRODUCTION:
        return None, (
            f"replication factor {spec.replication_factor} for {name} exceeds the {brokers} "
            "registered broker(s) (production profile refuses to cap it)"
        )
    return TopicSpec(spec.topic_type, spec.partitions, max(brokers, 1), spec.config), ""


def admit(
    wanted: Mapping[str, TopicSpec],
    existing: Iterable[str],
    brokers: int | None,
    profile: Profile,
) -> tuple[dict[str, TopicSpec], dict[str, TopicResult]]:
    """Split a batch into the specs to create or verify and the topics refused outright
    (collisions, replication the profile refuses). Capping is a warning once per process."""
    clashes = collisions(wanted, existing)
    specs: dict[str, TopicSpec] = {}
    refused: dict[str, TopicResult] = {}
    capped = 0
    for name, spec in wanted.items():
        if name in clashes:
            refused[name] = TopicResult(
                name, TopicStatus.COLLISION, f"collides with existing topic {clashes[name]}"
            )
            continue
        effective, why = effective_spec(name, spec, brokers, profile)
        if effective is None:
            refused[name] = TopicResult(name, TopicStatus.FAILED, why)
            continue
        capped += effective.replication_factor < spec.replication_factor
        specs[name] = effective
    if capped:
        # once per process and broker count at WARNING (it is a setting, not an event)
        level = logging.DEBUG if brokers in _CAPPED_WARNED else logging.WARNING
        _CAPPED_WARNED.add(brokers)
        log.log(
            level,
            "%d topic(s): replication factor capped to %d broker(s) (development profile)",
            capped,
            brokers,
        )
    return specs, refused


def differences(spec: TopicSpec, state: TopicState) -> list[str]:
    """What makes the topic as it exists another topic than the spec (empty: the same).
    Partitions route keys and retention and cleanup decide what a reader finds: those must
    match. Replication is durability, see `shortfalls`."""
    diffs = []
    if state.partitions != spec.partitions:
        diffs.append(f"partitions {state.partitions} != {spec.partitions}")
    want: Mapping[str, str] = dict(spec.config)
    for key in COMPARED_CONFIGS:
        if key in want and state.config.get(key) != want[key]:
            diffs.append(f"{key} {state.config.get(key)} != {want[key]}")
    return diffs


def shortfalls(spec: TopicSpec, state: TopicState) -> list[str]:
    """Where an existing topic is less durable than the spec asks: fewer replicas (one made
    under a smaller cluster or the development profile), or a lower min.insync.replicas.
    Such a topic is reused (its data stays where readers are) and the shortfall reported:
    raising it is a partition reassignment, an operator's decision. More is never short."""
    out = []
    if state.replication_factor < spec.replication_factor:
        out.append(f"replication {state.replication_factor} < {spec.replication_factor}")
    want = dict(spec.config).get(MIN_INSYNC)
    have = state.config.get(MIN_INSYNC)
    if want is not None and have is not None and int(have) < int(want):
        out.append(f"{MIN_INSYNC} {have} < {want}")
    return out


def existing_result(name: str, spec: TopicSpec, state: TopicState) -> TopicResult:
    """The result for a topic found existing: CONFLICT if it is another topic, else EXISTS
    (with the durability shortfall, if any, as its message)."""
    diffs = differences(spec, state)
    if diffs:
        return TopicResult(
            name, TopicStatus.CONFLICT, "exists with another configuration: " + "; ".join(diffs)
        )
    short = shortfalls(spec, state)
    if short:
        return TopicResult(name, TopicStatus.EXISTS, BELOW_SPEC + "; ".join(short))
    return TopicResult(name, TopicStatus.EXISTS)
