"""The Argo CD health check shipped for VersionSentinel (Lua, run here with lupa) maps each
phase, a stale observedGeneration and a refused spec as documented."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from lupa import LuaRuntime

SCRIPT = Path(__file__).resolve().parents[2] / "manifests" / "argocd" / "versionsentinel-health.lua"


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = LuaRuntime(unpack_returned_tuples=True)

    def table(v: Any) -> Any:
        if isinstance(v, dict):
            return lua.table_from({k: table(x) for k, x in v.items()})
        if isinstance(v, list):
            return lua.table_from([table(x) for x in v])
        return v

    lua.globals().obj = table(obj)
    hs = lua.execute(SCRIPT.read_text())
    return str(hs["status"]), str(hs["message"])


def sentinel(phase: str | None, generation: int = 2, observed: int | None = 2, **st: Any) -> Any:
    status = {"phase": phase, "message": "m", **st}
    if observed is not None:
        status["observedGeneration"] = observed
    return {"metadata": {"generation": generation}, "status": status}


@pytest.mark.parametrize(
    ("phase", "expected"),
    [
        ("Pending", "Progressing"),
        ("Progressing", "Progressing"),
        ("Paused", "Suspended"),
        ("Promoted", "Healthy"),
        ("Aborted", "Degraded"),
        ("RolledBack", "Degraded"),
    ],
)
def test_phases(phase: str, expected: str) -> None:
    assert health(sentinel(phase))[0] == expected


def test_a_spec_not_yet_observed_is_progressing() -> None:
    assert health(sentinel("Promoted", generation=3, observed=2))[0] == "Progressing"
    assert health({"metadata": {"generation": 1}})[0] == "Progressing"


def test_a_refused_spec_is_degraded_with_its_reason() -> None:
    bad = sentinel(
        "Progressing",
        conditions=[
            {"type": "Degraded", "status": "True", "reason": "InvalidWeight", "message": "x"}
        ],
    )
    assert health(bad) == ("Degraded", "InvalidWeight: x")
