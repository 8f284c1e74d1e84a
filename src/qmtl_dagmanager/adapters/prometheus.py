"""One PromQL expression evaluated by a Prometheus-compatible HTTP API (`/api/v1/query`),
reduced to one number: a scalar as is, an instant vector by its largest sample (the
conservative reading of a load or error metric). Used for the broker load that throttles GC
and for the analysis gates of canary rollouts."""

from __future__ import annotations

import math

import aiohttp
import orjson

from qmtl_dagmanager.core.errors import Unavailable


class PrometheusQuery:
    def __init__(self, base_url: str, query: str, timeout: float = 5.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"{base_url!r}: the Prometheus URL must start with http:// or https://"
            )
        if not query.strip():
            raise ValueError("the PromQL query is empty")
        self.url = base_url.rstrip("/") + "/api/v1/query"
        self.query = query
        self._timeout = aiohttp.ClientTimeout(total=timeout)

    def _fail(self, why: str) -> Unavailable:
        return Unavailable(f"{self.query!r} at {self.url}: {why}", reason="MetricUnavailable")

    async def value(self) -> float:
        try:
            async with (
                aiohttp.ClientSession(timeout=self._timeout) as session,
                session.get(self.url, params={"query": self.query}) as resp,
            ):
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise self._fail(f"{type(e).__name__}: {e}") from e
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self._fail(f"HTTP {status}, not JSON") from None
        if status != 200 or not isinstance(doc, dict) or doc.get("status") != "success":
            error = doc.get("error") if isinstance(doc, dict) else None
            raise self._fail(f"HTTP {status}: {error or 'the query failed'}")
        return self._reduce(doc.get("data"))

    def _reduce(self, data: object) -> float:
        if not isinstance(data, dict):
            raise self._fail("no data in the answer")
        kind, result = data.get("resultType"), data.get("result")
        samples: list[object] = []
        if kind == "scalar" and isinstance(result, list) and len(result) == 2:
            samples = [result[1]]
        elif kind == "vector" and isinstance(result, list):
            samples = [r.get("value", [None, None])[1] for r in result if isinstance(r, dict)]
        else:
            raise self._fail(f"unsupported result type {kind!r} (want scalar or vector)")
        values: list[float] = []
        for raw in samples:
            try:
                v = float(str(raw))
            except ValueError:
                raise self._fail(f"sample {raw!r} is not a number") from None
            if not math.isnan(v):
                values.append(v)
        if not values:
            raise self._fail("the query returned no samples")
        return max(values)
