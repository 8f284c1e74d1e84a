"""The ConfigMapStore twin: documents in a dict, for unit tests and the fake wiring."""

from __future__ import annotations

from collections.abc import Mapping

from qmtl_dagmanager.ports import Owner


class MemoryConfigMaps:
    def __init__(self) -> None:
        self.maps: dict[tuple[str, str], dict[str, str]] = {}
        self.owners: dict[tuple[str, str], Owner | None] = {}

    def read(self, namespace: str, name: str, key: str) -> str | None:
        return self.maps.get((namespace, name), {}).get(key)

    def upsert(
        self, namespace: str, name: str, data: Mapping[str, str], owner: Owner | None = None
    ) -> None:
        self.maps[(namespace, name)] = dict(data)
        self.owners[(namespace, name)] = owner
