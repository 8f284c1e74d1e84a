"""Helpers of the local-stack script (it is run, not imported, elsewhere)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "hack" / "stack" / "stack.py"


def load_stack() -> ModuleType:
    spec = importlib.util.spec_from_file_location("stack_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["stack_script"] = module
    spec.loader.exec_module(module)
    return module


def test_kafka_cluster_ids_never_look_like_flags() -> None:
    stack = load_stack()
    ids = {stack.kafka_cluster_id() for _ in range(20_000)}
    assert len(ids) == 20_000
    assert not any(i.startswith("-") for i in ids)
    assert all(len(i) == 22 for i in ids)
