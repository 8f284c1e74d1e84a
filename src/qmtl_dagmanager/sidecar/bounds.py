"""How long the sidecar waits for work it cannot hurry: an answer, a probe. Past the bound the
caller goes on without it; the work finishes in the background (its error read, never left
unretrieved)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from qmtl_dagmanager.core.errors import DagManagerError

T = TypeVar("T")


def _retrieve(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def within(work: Awaitable[T], deadline: float) -> T:
    """`work`'s result if it comes within `deadline` seconds, else TimeoutError with the work
    left to finish in the background. A caller that is cancelled cancels the work too (as an
    awaited call would be): what must outlive its caller protects itself (`diff_work`)."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), deadline)
    except asyncio.CancelledError:
        task.cancel()
        raise
    except TimeoutError:
        task.add_done_callback(_retrieve)
        raise


async def reachable(probe: Awaitable[object], deadline: float) -> bool:
    """Whether `probe` answered (truthy, without a typed error) within `deadline` seconds."""
    try:
        return bool(await within(probe, deadline))
    except (TimeoutError, DagManagerError):
        return False
