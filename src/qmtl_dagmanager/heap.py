"""Python's full garbage collections, moved off the response path.

CPython runs a full (generation 2) collection on its own once the objects promoted since the
last one exceed a quarter of the long-lived heap. A full collection walks every tracked object,
and the embedded graph store and the caches hold several per stored node: at 10k stored nodes
one pause measured 65-98 ms, more than a Diff's whole budget, and it grows with the graph.

`FullCollections` turns the automatic full collection off (young generations stay automatic:
they are short) and runs it itself, at a moment when no diff is running (`busy()` is false),
or after `max_delay` seconds regardless: `every` seconds after the last one, or later when the
last pause was long, so that pauses take at most `PAUSE_SHARE` of the time (a 400 ms pause of
a 50k-node embedded graph every 20 s; a 20 ms one every 5 s). Cyclic garbage a diff leaves
(tasks, futures, tracebacks) lives that much longer: under 50 diffs/s about 2 MB a second,
so RSS runs a few tens of MB higher.

Full collections are kept short by freezing (`gc.freeze`) what survived the last one: the
next walks only what was made since. At start that is the process itself (modules, functions,
classes, clients: some 80k objects, a 35 ms walk on the project's VM, far more while Kafka and
Neo4j share the cores); later it is what the caches took in (1k-node plans and parsed nodes).
Cyclic garbage among frozen objects would wait, so every `thaw_every` collections the frozen
set is released and walked once, at an idle moment like the others.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from collections.abc import Callable

from prometheus_client import Histogram

log = logging.getLogger(__name__)
NEVER = 1_000_000_000  # a generation-2 threshold that automatic collection never reaches
IDLE_POLL = 0.02  # seconds between looks for an idle moment
PAUSE_SHARE = 0.02  # at most this share of the time in full collections


class FullCollections:
    def __init__(
        self,
        busy: Callable[[], bool],
        pauses: Histogram,
        *,
        every: float = 5.0,
        max_delay: float = 120.0,
        thaw_every: int = 60,
    ) -> None:
        self._busy = busy
        self._pauses = pauses
        self.every = every
        self.max_delay = max_delay
        self.thaw_every = thaw_every
        self._runs = 0
        self._saved: tuple[int, int, int] | None = None

    def install(self) -> None:
        """Stop automatic full collections in this process (young ones stay automatic)."""
        if self._saved is None:
            self._saved = gc.get_threshold()
            gc.set_threshold(self._saved[0], self._saved[1], NEVER)

    def uninstall(self) -> None:
        gc.unfreeze()
        if self._saved is not None:
            gc.set_threshold(*self._saved)
            self._saved = None

    def collect(self) -> float:
        """One full collection now of what is not frozen (of everything every `thaw_every`
        runs), then freeze what survived; returns its pause in seconds."""
        started = time.perf_counter()
        self._runs += 1
        if self._runs % self.thaw_every == 0:
            gc.unfreeze()
        found = gc.collect()
        gc.freeze()
        pause = time.perf_counter() - started
        self._pauses.observe(pause)
        log.debug("full garbage collection: %d objects freed in %.1f ms", found, pause * 1000)
        return pause

    async def run(self) -> None:
        """Until cancelled: wait, then collect at the first idle moment (or after
        `max_delay`)."""
        self.install()
        try:
            wait = self.every
            while True:
                await asyncio.sleep(wait)
                deadline = time.monotonic() + self.max_delay
                # polls a bounded wait for an idle moment (no event marks one)
                while self._busy() and time.monotonic() < deadline:  # noqa: ASYNC110
                    await asyncio.sleep(IDLE_POLL)
                wait = max(self.every, self.collect() / PAUSE_SHARE)
        finally:
            self.uninstall()
