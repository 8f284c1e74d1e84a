"""Kubernetes-style status conditions and timestamps, shared by both custom resources' status
renderers (pure functions)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

# fields that change on every render without changing what the status says
VOLATILE = frozenset({"lastTransitionTime", "lastReconcileTime"})


def iso(t: float | None) -> str | None:
    """An epoch time as RFC 3339 UTC with microseconds (None stays None)."""
    if t is None:
        return None
    return datetime.datetime.fromtimestamp(t, datetime.UTC).isoformat(timespec="microseconds")


def epoch(text: object) -> float | None:
    """The inverse of `iso`; empty is None."""
    if not text:
        return None
    return datetime.datetime.fromisoformat(str(text)).timestamp()


def condition(
    kind: str,
    ok: bool,
    reason: str,
    message: str,
    now: str,
    generation: int,
    previous: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """One condition; `lastTransitionTime` moves only when the status flips."""
    status = "True" if ok else "False"
    changed = previous is None or previous.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message[:1000],
        "lastTransitionTime": now
        if changed or previous is None
        else previous.get("lastTransitionTime", now),
        "observedGeneration": generation,
    }


def conditions(
    old: Mapping[str, Any] | None,
    now: str,
    generation: int,
    kinds: Mapping[str, tuple[bool, str, str]],
) -> list[dict[str, Any]]:
    """The conditions `kinds` (type → (ok, reason, message)), in order, against `old`'s."""
    before = {c.get("type"): c for c in (old or {}).get("conditions") or []}
    return [condition(k, *v, now, generation, before.get(k)) for k, v in kinds.items()]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _plain(v) for k, v in value.items() if v is not None and k not in VOLATILE}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def same(old: Mapping[str, Any] | None, new: Mapping[str, Any]) -> bool:
    """Whether writing `new` over `old` would change what the status says: equal once null
    and absent fields are alike (a merge patch deletes nulls) and timestamps are ignored."""
    return bool(_plain(dict(old or {})) == _plain(dict(new)))
