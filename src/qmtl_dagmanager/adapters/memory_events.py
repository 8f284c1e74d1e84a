"""The embedded event bus: keeps the most recent `history` events published, in order.

Nothing consumes it but tests and the embedded default's own inspection, so the history is
bounded: QueueUpdated events carry whole queue sets, and an unbounded log of them grows with
the square of the graph."""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from typing import Any

from qmtl_dagmanager.ports import Published

HISTORY = 10_000  # events kept by default (tests); the embedded sidecar keeps fewer


class MemoryEventBus:
    def __init__(self, history: int = HISTORY) -> None:
        self.published: deque[Published] = deque(maxlen=history)

    async def publish(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        self.published.append(Published(topic, key, dict(event)))

    def read(self, topic: str) -> list[Published]:
        return [p for p in self.published if p.topic == topic]

    async def close(self) -> None:
        return None
