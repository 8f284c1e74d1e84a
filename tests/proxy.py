"""A TCP proxy the tests control, in the spirit of Toxiproxy: pass traffic, add latency to
every chunk, or cut every connection and refuse new ones."""

from __future__ import annotations

import asyncio
import contextlib


class Proxy:
    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.latency = 0.0
        self.cut = False
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def start(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.sever()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def sever(self) -> None:
        """Cut every open connection (new ones are refused while `cut` is set)."""
        for w in list(self._conns):
            w.transport.abort()
        self._conns.clear()

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
            while data := await r.read(65536):
                if self.latency:
                    await asyncio.sleep(self.latency)
                if self.cut:
                    break
                w.write(data)
                await w.drain()
        w.transport.abort()

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.cut:
            w.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            w.transport.abort()
            return
        self._conns |= {w, uw}
        await asyncio.gather(self._pipe(r, uw), self._pipe(ur, w))
        self._conns -= {w, uw}
