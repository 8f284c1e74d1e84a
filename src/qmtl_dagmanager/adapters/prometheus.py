"""One PromQL expression evaluated by a Prometheus-compatible HTTP API (`/api/v1/query`),
reduced to one number: a scalar as is, an instant vector by its largest sample (the
conservative reading of a load or error metric). Used for the broker load that throttles GC
and for the analysis gates of canary rollouts."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import aiohttp
import orjson

from qmtl_dagmanager.core.errors import Unavailable


def _checked(base_url: str, query: str) -> str:
    if not base_url.startswith(("http://", "https://")):
        raise ValueError(f"{base_url!r}: the Prometheus URL must start with http:// or https://")
    if not query.strip():
        raise ValueError("the PromQL query is empty")
    return base_url.rstrip("/") + "/api/v1/query"


class Prometheus:
    """The `MetricQuery` port: instant queries over one HTTP session (made on first use in
    the running event loop, and again if the loop changes)."""

    def __init__(self, timeout: float = 5.0) -> None:
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def _client(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        if self._session is None or self._session.closed or self._loop is not loop:
            # a session of a loop that has ended cannot be closed from this one; a
            # process runs one loop, so this happens only between tests
            self._session = aiohttp.ClientSession(timeout=self._timeout)
            self._loop = loop
        return self._session

    async def value(self, base_url: str, query: str) -> float:
        url = _checked(base_url, query)

        def fail(why: str) -> Unavailable:
            return Unavailable(f"{query!r} at {url}: {why}", reason="MetricUnavailable")

        try:
            async with self._client().get(url, params={"query": query}) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise fail(f"{type(e).__name__}: {e}") from e
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise fail(f"HTTP {status}, not JSON") from None
        if status != 200 or not isinstance(doc, dict) or doc.get("status") != "success":
            error = doc.get("error") if isinstance(doc, dict) else None
            raise fail(f"HTTP {status}: {error or 'the query failed'}")
        return _reduce(doc.get("data"), fail)

    async def close(self) -> None:
        if self._session is not None and not self._session.closed:
            await self._session.close()
        self._session = None


class PrometheusQuery:
    """The `LoadGauge` port: one fixed query (checked now) on a `Prometheus` client."""

    def __init__(
        self, base_url: str, query: str, timeout: float = 5.0, client: Prometheus | None = None
    ) -> None:
        self.url = _checked(base_url, query)
        self.base_url, self.query = base_url, query
        self._owned = client is None  # closed here only if made here
        self._client = client or Prometheus(timeout)

    async def value(self) -> float:
        return await self._client.value(self.base_url, self.query)

    async def close(self) -> None:
        if self._owned:
            await self._client.close()


def _reduce(data: object, fail: Callable[[str], Unavailable]) -> float:
    if not isinstance(data, dict):
        raise fail("no data in the answer")
    kind, result = data.get("resultType"), data.get("result")
    samples: list[object] = []
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        samples = [result[1]]
    elif kind == "vector" and isinstance(result, list):
        samples = [r.get("value", [None, None])[1] for r in result if isinstance(r, dict)]
    else:
        raise fail(f"unsupported result type {kind!r} (want scalar or vector)")
    values: list[float] = []
    for raw in samples:
        try:
            v = float(str(raw))
        except ValueError:
            raise fail(f"sample {raw!r} is not a number") from None
        if not math.isnan(v):
            values.append(v)
    if not values:
        raise fail("the query returned no samples")
    return max(values)
