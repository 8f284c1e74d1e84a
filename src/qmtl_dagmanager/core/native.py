"""The optional Rust hot path (`src/native`, module `qmtl_native`) for parsing and planning.

The Python core is the reference: the extension returns exactly what the Python code would,
or declines a node, which Python then reads itself (so errors always come from Python). When
the extension is not installed, or `enabled` is set False, everything runs in Python.
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType
from typing import Any

from qmtl_dagmanager.core import identity


def _load() -> ModuleType | None:
    try:
        return importlib.import_module("qmtl_native")
    except ImportError:  # not built: the Python path alone
        return None


_ext = _load()
_CONTEXT_KEYS = sorted(identity.CONTEXT_KEYS)  # the params keys NodeIDs drop: one list, here

available = _ext is not None
enabled = available  # tests and benchmarks switch it to compare both paths


def path() -> str:
    """Which path parses DAGs, for the startup log line."""
    if enabled:
        return "native"
    return "python" if available else "python (the native extension is not installed)"


def read_nodes(
    raw_nodes: list[Any],
    verify: bool,
    max_tags: int,
    max_depth: int,
    max_text: int,
    node_cls: type,
) -> tuple[list[Any], int, list[int] | None] | None:
    """The compute nodes the extension could read (None where Python must), how many it
    declined, and, when it read them all and every input names one of them, their
    topological order (None on a cycle); None when the extension is off or the DAG repeats
    a node id."""
    if not enabled or _ext is None:
        return None
    result: tuple[list[Any], int, list[int] | None] | None = _ext.read_nodes(
        raw_nodes, verify, max_tags, max_depth, max_text, node_cls, _CONTEXT_KEYS
    )
    return result


def compute_keys(node_ids: Sequence[str], suffix: str) -> list[str] | None:
    """`blake3:` + BLAKE3 hex of each `<node id><suffix>`; None when the extension is off."""
    if not enabled or _ext is None:
        return None
    keys: list[str] = _ext.compute_keys(list(node_ids), suffix)
    return keys
