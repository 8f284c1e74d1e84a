"""ControlBus event payloads (contract §9), built from values; the time and ids come in.

The Gateway drops a message whose etag equals the previous one on the same (topic, key), so
every etag is derived from the content it describes.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import blake3

from qmtl_dagmanager.core.identity import canonical_json

QUEUE_TOPIC = "queue"
SENTINEL_WEIGHT_TOPIC = "sentinel_weight"


def _digest(value: Any) -> str:
    return blake3.blake3(canonical_json(value).encode()).hexdigest()[:16]


def queue_updated(
    tags: Iterable[str], interval: int, queues: Iterable[tuple[str, bool]], match_mode: str
) -> tuple[str, dict[str, Any]]:
    """(key, data) of a QueueUpdated event with the full set of queues for (tags, interval)."""
    tag_list = sorted(set(tags))
    entries = sorted({(q, bool(g)) for q, g in queues})
    mode = "all" if match_mode == "all" else "any"
    content = {"tags": tag_list, "interval": interval, "queues": entries, "match_mode": mode}
    data = {
        "type": "QueueUpdated",
        "tags": tag_list,
        "interval": int(interval),
        "queues": [{"queue": q, "global": g} for q, g in entries],
        "match_mode": mode,
        "version": 1,
        "etag": f"q:{'.'.join(tag_list)}:{interval}:{_digest(content)}",
    }
    return ",".join(tag_list), data


def queue_lifecycle(queue: str, action: str, reason: str) -> tuple[str, dict[str, Any]]:
    data = {
        "type": "QueueLifecycle",
        "queue": queue,
        "action": action,
        "reason": reason,
        "version": 1,
        "etag": f"l:{queue}:{action}:{_digest([queue, action, reason])}",
    }
    return queue, data


def sentinel_weight(
    sentinel_id: str, weight: float, sentinel_version: str, world_id: str
) -> tuple[str, dict[str, Any]]:
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"weight {weight} is outside [0, 1]")
    content = [sentinel_id, weight, sentinel_version, world_id]
    data = {
        "type": "SentinelWeightUpdated",
        "sentinel_id": sentinel_id,
        "weight": weight,
        "sentinel_version": sentinel_version,
        "world_id": world_id,
        "version": 1,
        "etag": f"w:{sentinel_id}:{_digest(content)}",
    }
    return sentinel_id, data


def cloud_event(
    event_type: str, data: dict[str, Any], *, event_id: str, time_iso: str, source: str
) -> dict[str, Any]:
    """A CloudEvents 1.0 structured envelope; `ts` and `idempotency_key` go into data."""
    body = {**data, "ts": time_iso, "idempotency_key": f"{data['etag']}"}
    return {
        "specversion": "1.0",
        "id": event_id,
        "source": source,
        "type": event_type,
        "time": time_iso,
        "datacontenttype": "application/json",
        "data": body,
    }
