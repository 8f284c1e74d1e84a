"""Shared by the benchmarks: the local stack's endpoints, a free port, open-loop load."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tests import conftest

ROOT = Path(__file__).resolve().parent.parent


def stack_env() -> dict[str, str]:
    """The environment, completed with `.stack/env` (written by `make stack-up`)."""
    out = dict(os.environ)
    path = ROOT / ".stack" / "env"
    if path.exists() and "NEO4J_URI" not in out:
        for line in path.read_text().splitlines():
            key, _, value = line.removeprefix("export ").partition("=")
            out[key] = value
    return out


def free_port() -> int:
    """A free port below the kernel's ephemeral range (tests/conftest.py says why)."""
    return conftest.free_port()


async def open_loop(
    rate: float,
    seconds: float,
    one: Callable[[int], Awaitable[None]],
    every_second: Callable[[float], None] = lambda elapsed: None,
) -> int:
    """Start `one(i)` at `rate` per second for `seconds`, whether or not earlier requests have
    finished (a slow server builds a backlog, as under a real client), calling `every_second`
    with the elapsed time about once a second; then wait for all. Returns how many started."""
    tasks: set[asyncio.Task[None]] = set()

    async def run(i: int) -> None:
        await one(i)

    start = time.perf_counter()
    i, next_tick = 0, start
    while time.perf_counter() - start < seconds:
        due = start + i / rate
        now = time.perf_counter()
        if due > now:
            await asyncio.sleep(due - now)
        task = asyncio.create_task(run(i))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
        now = time.perf_counter()
        if now >= next_tick:
            every_second(now - start)
            next_tick += 1.0
    await asyncio.gather(*tasks)
    return i
