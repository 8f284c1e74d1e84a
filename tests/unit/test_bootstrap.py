"""The shared wiring: the fake build is the real one on the twins, and each use case is
built once per process."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
from pathlib import Path

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.adapters.clock import ManualClock
from qmtl_dagmanager.adapters.memory_graph import MemoryGraphStore
from qmtl_dagmanager.adapters.memory_topics import MemoryTopicAdmin
from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.core.errors import CrossContextReuse
from qmtl_dagmanager.core.plan import Request
from tests.unit.dags import chain, encode


def test_services_are_built_once() -> None:
    c = bootstrap.build_fake()
    assert c.garbage() is c.garbage()
    assert c.diffs() is c.diffs()
    assert c.diffs(shed_load=False) is c.diffs(shed_load=False)
    assert c.diffs() is not c.diffs(shed_load=False)
    assert c.canary() is c.canary() and c.queues() is c.queues()


def test_the_fake_build_runs_a_diff_on_the_twins_with_the_given_clock() -> None:
    clock = ManualClock(1_000.0)
    c = bootstrap.build_fake(Settings(), clock)
    assert isinstance(c.graph, MemoryGraphStore) and isinstance(c.topics, MemoryTopicAdmin)
    assert c.clock is clock

    async def go() -> int:
        await c.start()
        try:
            out = await c.diffs().diff(Request("s1"), encode(chain(3)))
            return len(out.plan.nodes)
        finally:
            await c.close()

    assert asyncio.run(go()) == 3


def test_the_embedded_settings_build_the_same_twins() -> None:
    c = bootstrap.build(Settings())
    assert isinstance(c.graph, MemoryGraphStore) and isinstance(c.topics, MemoryTopicAdmin)
    asyncio.run(c.close())


def test_the_operator_root_runs_from_a_checkout() -> None:
    """`operator/main.py` starts the same root as `dagmanager operator`."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, str(root / "operator" / "main.py"), "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert "--leader-election" in out.stdout and "dagmanager-operator" in out.stdout
    bad = subprocess.run(
        [sys.executable, str(root / "operator" / "main.py"), "--config", str(root / "nope.yaml")],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert bad.returncode == 2 and "nope.yaml" in bad.stderr


def test_a_refused_cross_context_reuse_is_recorded_for_rollouts_unless_a_dry_run() -> None:
    clock = ManualClock(1_000.0)
    c = bootstrap.build_fake(Settings(), clock)
    nodes = encode(chain(3))

    async def go() -> tuple[int, int, float]:
        await c.start()
        try:
            await c.diffs().diff(Request("a", execution_domain="backtest", as_of="1"), nodes)
            other = Request("b", execution_domain="backtest", as_of="2")
            for dry in (True, False):
                with contextlib.suppress(CrossContextReuse):
                    await c.diffs().diff(other, nodes, dry_run=dry)
                if dry:
                    after_dry = await c.graph.cross_context_since(0)
            return (
                after_dry,
                await c.graph.cross_context_since(0),
                c.metrics.cross_context._value.get(),
            )
        finally:
            await c.close()

    after_dry, after_real, counted = asyncio.run(go())
    assert after_dry == 0  # a dry run holds no rollout back
    assert after_real == 3 and counted == 6  # the counter counts both refusals
