"""Full garbage collections run between diffs, never automatically inside one."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
import weakref

from prometheus_client import CollectorRegistry, Histogram

from qmtl_dagmanager.heap import NEVER, FullCollections


def pauses() -> tuple[Histogram, CollectorRegistry]:
    registry = CollectorRegistry()
    return Histogram("pauses", "test", registry=registry), registry


def count(registry: CollectorRegistry) -> float:
    return registry.get_sample_value("pauses_count") or 0.0


async def stop_after_a_collection(task: asyncio.Task[None], registry: CollectorRegistry) -> None:
    """Wait (at most 2 s) until the task has collected once, then stop it."""
    deadline = time.monotonic() + 2.0
    while count(registry) < 1 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def test_install_turns_automatic_full_collections_off_and_back_on() -> None:
    before = gc.get_threshold()
    hist, _ = pauses()
    fc = FullCollections(lambda: False, hist)
    fc.install()
    try:
        assert gc.get_threshold() == (before[0], before[1], NEVER)
    finally:
        fc.uninstall()
    assert gc.get_threshold() == before


def test_collections_wait_for_an_idle_moment() -> None:
    hist, registry = pauses()
    busy = True
    fc = FullCollections(lambda: busy, hist, every=0.01, max_delay=60)

    async def scenario() -> None:
        nonlocal busy
        task = asyncio.create_task(fc.run())
        await asyncio.sleep(0.2)
        assert count(registry) == 0  # a diff is running: no pause now
        busy = False
        await stop_after_a_collection(task, registry)

    before = gc.get_threshold()
    asyncio.run(scenario())
    assert count(registry) >= 1
    assert gc.get_threshold() == before  # restored when the task ends


def test_a_process_that_is_never_idle_still_collects() -> None:
    hist, registry = pauses()
    fc = FullCollections(lambda: True, hist, every=0.01, max_delay=0.05)

    async def scenario() -> None:
        await stop_after_a_collection(asyncio.create_task(fc.run()), registry)

    asyncio.run(scenario())
    assert count(registry) >= 1


def test_cyclic_garbage_is_still_freed() -> None:
    hist, _ = pauses()
    fc = FullCollections(lambda: False, hist)

    class Cell:
        other: object = None

    fc.install()
    try:
        a, b = Cell(), Cell()
        a.other, b.other = b, a
        alive = len([o for o in gc.get_objects() if isinstance(o, Cell)])
        del a, b
        fc.collect()
        assert len([o for o in gc.get_objects() if isinstance(o, Cell)]) == alive - 2
    finally:
        fc.uninstall()


def test_survivors_are_frozen_and_thawed_every_so_often() -> None:
    hist, _ = pauses()
    fc = FullCollections(lambda: False, hist, thaw_every=3)

    class Cell:
        other: object = None

    fc.install()
    try:
        a, b = Cell(), Cell()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        fc.collect()  # the pair survives: frozen, not walked by the next collections
        assert gc.get_freeze_count() > 0
        del a, b  # cyclic garbage, but frozen
        fc.collect()
        assert gone() is not None  # waits for the thaw
        fc.collect()  # the third run thaws first: everything is walked, the pair goes
        assert gone() is None
    finally:
        fc.uninstall()
    assert gc.get_freeze_count() == 0
