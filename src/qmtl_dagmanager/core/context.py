"""The compute context a DAG is diffed in: world, execution domain, as-of, partition.

Execution domains are normalised to backtest | dryrun | live | shadow; a backtest or dry-run
without `as_of` is downgraded to backtest in safe mode (contract §5).
"""

from __future__ import annotations

import re
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


# Tokens after lower-casing and removing spaces, `_` and `-` (as the Gateway compares them).
DOMAIN_TOKENS: dict[str, Domain] = {
    **dict.fromkeys(
        (
            "backtest",
            "backtesting",
            "compute",
            "computeonly",
            "offline",
            "sandbox",
            "validate",
            "validation",
        ),
        Domain.BACKTEST,
    ),
    **dict.fromkeys(
        (
            "dryrun",
            "dryrunmode",
            "papermode",
            "paper",
            "papertrade",
            "papertrading",
            "papertrader",
            "sim",
            "simulation",
            "simulated",
        ),
        Domain.DRYRUN,
    ),
    **dict.fromkeys(("live", "prod", "production"), Domain.LIVE),
    "shadow": Domain.SHADOW,
}
_SEGMENTS = re.compile(r"[/:]")
_NOISE = re.compile(r"[\s_-]+")


def normalize_domain(value: str | None) -> str:
    """The canonical domain of an alias (`paper` → dryrun, `prod` → live, …); the first
    `/`- or `:`-separated segment that is an alias wins. Missing or `default` is backtest;
    a value that is no alias is kept, lower-cased (it still separates compute keys)."""
    text = (value or "").strip().lower()
    if text in ("", "default"):
        return Domain.BACKTEST.value
    for segment in _SEGMENTS.split(text):
        hit = DOMAIN_TOKENS.get(_NOISE.sub("", segment))
        if hit is not None:
            return hit.value
    return text


@dataclass(frozen=True, slots=True)
class ComputeContext:
    """A normalised compute context; `safe_mode_downgraded` says the domain was lowered."""

    world_id: str = ""
    execution_domain: str = Domain.BACKTEST.value
    as_of: str = ""
    partition: str = ""
    dataset_fingerprint: str = ""
    safe_mode_downgraded: bool = False

    def as_dict(self) -> dict[str, str]:
        """The context as plain strings (what the graph records for a strategy)."""
        return {
            "world_id": self.world_id,
            "execution_domain": self.execution_domain,
            "as_of": self.as_of,
            "partition": self.partition,
            "dataset_fingerprint": self.dataset_fingerprint,
        }

    def key_suffix(self) -> str:
        """What follows the node id in a ComputeKey's preimage (for hot loops)."""
        return identity.compute_key_suffix(
            self.world_id, self.execution_domain, self.as_of, self.partition
        )

    def key_for(self, nid: str) -> identity.ComputeKey:
        return identity.compute_key(
            nid, self.world_id, self.execution_domain, self.as_of, self.partition
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
    raw_domain = merged["execution_domain"].strip().lower()
    domain = normalize_domain(raw_domain)
    # Safe mode: with no domain decided, or a backtest or dry-run without `as_of`, the
    # context runs (and is keyed) as a backtest.
    downgraded = raw_domain in ("", "default") or (
        domain in (Domain.BACKTEST, Domain.DRYRUN) and not merged["as_of"]
    )
    if downgraded:
        domain = Domain.BACKTEST.value
    return ComputeContext(
        world_id=merged["world_id"],
        execution_domain=domain,
        as_of=merged["as_of"],
        partition=merged["partition"],
        dataset_fingerprint=merged["dataset_fingerprint"],
        safe_mode_downgraded=downgraded,
    )
