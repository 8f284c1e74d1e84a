"""The embedded event bus: keeps what was published, in order."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from qmtl_dagmanager.ports import Published


class MemoryEventBus:
    def __init__(self) -> None:
        self.published: list[Published] = []

    async def publish(self, topic: str, key: str, event: Mapping[str, Any]) -> None:
        self.published.append(Published(topic, key, dict(event)))

    def read(self, topic: str) -> list[Published]:
        return [p for p in self.published if p.topic == topic]

    async def close(self) -> None:
        return None
