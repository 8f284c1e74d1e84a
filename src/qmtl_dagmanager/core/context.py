"""The compute context a DAG is diffed in: world, execution domain, as-of, partition.

Execution domains are normalised to backtest | dryrun | live | shadow; a backtest or dry-run
without `as_of` is downgraded to backtest in safe mode (contract §5).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from qmtl_dagmanager.core import identity


class Domain(StrEnum):
    BACKTEST = "backtest"
    DRYRUN = "dryrun"
    LIVE = "live"
    SHADOW = "shadow"


DOMAIN_ALIASES: dict[str, Domain] = {
    "": Domain.BACKTEST,
    "default": Domain.BACKTEST,
    "backtest": Domain.BACKTEST,
    "backtesting": Domain.BACKTEST,
    "offline": Domain.BACKTEST,
    "compute-only": Domain.BACKTEST,
    "validate": Domain.BACKTEST,
    "dryrun": Domain.DRYRUN,
    "dry-run": Domain.DRYRUN,
    "dry_run": Domain.DRYRUN,
    "paper": Domain.DRYRUN,
    "papertrade": Domain.DRYRUN,
    "paper-trade": Domain.DRYRUN,
    "sim": Domain.DRYRUN,
    "simulation": Domain.DRYRUN,
    "sandbox": Domain.DRYRUN,
    "live": Domain.LIVE,
    "prod": Domain.LIVE,
    "production": Domain.LIVE,
    "real": Domain.LIVE,
    "shadow": Domain.SHADOW,
}


class UnknownDomain(ValueError):
    pass


def normalize_domain(value: str | None) -> Domain:
    key = (value or "").strip().lower()
    try:
        return DOMAIN_ALIASES[key]
    except KeyError:
        known = ", ".join(sorted(k for k in DOMAIN_ALIASES if k))
        raise UnknownDomain(f"unknown execution domain {value!r} (known: {known})") from None


@dataclass(frozen=True, slots=True)
class ComputeContext:
    """A normalised compute context; `safe_mode_downgraded` says the domain was lowered."""

    world_id: str = ""
    execution_domain: Domain = Domain.BACKTEST
    as_of: str = ""
    partition: str = ""
    dataset_fingerprint: str = ""
    safe_mode_downgraded: bool = False

    def as_dict(self) -> dict[str, str]:
        """The context as plain strings (what the graph records for a strategy)."""
        return {
            "world_id": self.world_id,
            "execution_domain": self.execution_domain.value,
            "as_of": self.as_of,
            "partition": self.partition,
            "dataset_fingerprint": self.dataset_fingerprint,
        }

    def key_suffix(self) -> str:
        """What follows the node id in a ComputeKey's preimage (for hot loops)."""
        return identity.compute_key_suffix(
            self.world_id, self.execution_domain.value, self.as_of, self.partition
        )

    def key_for(self, nid: str) -> identity.ComputeKey:
        return identity.compute_key(
            nid, self.world_id, self.execution_domain.value, self.as_of, self.partition
        )


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def resolve(*layers: Mapping[str, Any] | None) -> ComputeContext:
    """Merge context layers, earliest winning per field (request, then DAG top-level, then
    DAG meta), normalise the domain, and apply the safe-mode downgrade."""
    fields = ("world_id", "execution_domain", "as_of", "partition", "dataset_fingerprint")
    merged: dict[str, str] = dict.fromkeys(fields, "")
    for layer in layers:
        if not layer:
            continue
        for f in fields:
            if not merged[f]:
                merged[f] = _text(layer.get(f))
    domain = normalize_domain(merged["execution_domain"])
    downgraded = False
    if domain is Domain.DRYRUN and not merged["as_of"]:
        domain, downgraded = Domain.BACKTEST, True
    return ComputeContext(
        world_id=merged["world_id"],
        execution_domain=domain,
        as_of=merged["as_of"],
        partition=merged["partition"],
        dataset_fingerprint=merged["dataset_fingerprint"],
        safe_mode_downgraded=downgraded,
    )
