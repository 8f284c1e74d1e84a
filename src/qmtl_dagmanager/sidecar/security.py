"""Who may call the sidecar, and how hard.

- Bearer tokens: JWTs checked by `tokens.TokenVerifier` (shared HS256 keys and a JWKS, both
  rotating); the standard health service stays open for kubelet probes. A failure is
  UNAUTHENTICATED with the reason.
- TLS and mutual TLS from PEM files that are re-read when they change (no restart).
- Malformed messages (bytes that are not the method's protobuf, invalid UTF-8 in a string
  field) are INVALID_ARGUMENT, never INTERNAL or UNKNOWN.
- Rate limits (token buckets) and one audit line per diff and per destructive call.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import grpc
from blake3 import blake3

from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.services import diff_work
from qmtl_dagmanager.sidecar.errors import code_for
from qmtl_dagmanager.sidecar.tokens import AuthError, TokenVerifier

audit_log = logging.getLogger("qmtl_dagmanager.audit")
log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
AUDITED = {
    "/qmtl.services.dagmanager.DiffService/Diff": "diff",
    "/qmtl.services.dagmanager.AdminService/RedoDiff": "redo-diff",
    "/qmtl.services.dagmanager.AdminService/Cleanup": "cleanup",
}
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


@dataclass
class RateLimit:
    """A token bucket: `rate` calls per second, bursts up to `burst`."""

    rate: float
    burst: float = 0.0
    clock: Callable[[], float] = time.monotonic
    _tokens: float = field(default=-1.0)
    _at: float = 0.0

    def allow(self) -> bool:
        now = self.clock()
        cap = max(self.burst, self.rate, 1.0)
        if self._tokens < 0:
            self._tokens, self._at = cap, now
        self._tokens = min(cap, self._tokens + (now - self._at) * self.rate)
        self._at = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return True
        return False


def redact(uri: str) -> str:
    """A URI without the password of its user-info part (for log lines)."""
    scheme, sep, rest = uri.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return uri
    userinfo, _, host = rest.partition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


@dataclass(frozen=True)
class _Malformed:
    error: str


def dag_hash(dag_json: str) -> str:
    return blake3(dag_json.encode("utf-8", "replace")).hexdigest()[:16]


class _Audit:
    """The audit line of one audited method (none for the others)."""

    def __init__(self, action: str | None) -> None:
        self.action = action

    def line(
        self, who: str, request: Any, outcome: str, started: float, caller: str = "answered"
    ) -> None:
        if self.action is None:
            return
        strategy = getattr(request, "strategy_id", "") or getattr(request, "sentinel_id", "")
        digest = dag_hash(request.dag_json) if getattr(request, "dag_json", "") else ""
        audit_log.info(
            "%s by %s: strategy=%s dag=%s outcome=%s caller=%s",
            self.action,
            who,
            strategy,
            digest or "-",
            outcome,
            caller,
            extra={
                "audit": self.action,
                "who": who,
                "strategy": strategy,
                "dag_hash": digest,
                "outcome": outcome,
                "caller": caller,
                "ms": round((time.perf_counter() - started) * 1000, 1),
            },
        )

    def finish(
        self,
        who: str,
        request: Any,
        context: Any,
        error: BaseException | None,
        started: float,
        work: list[asyncio.Future[object]],
    ) -> None:
        """The audit line of a call. A caller that left (the Gateway cancels after its
        budget) gets the outcome of the work it waited for, which goes on without it:
        recorded when that work ends, with `caller=left after N ms`."""
        if not isinstance(error, asyncio.CancelledError) or not work:
            self.line(who, request, _outcome(context, error), started)
            return
        left = f"left after {(time.perf_counter() - started) * 1000:.0f} ms"

        def ended(f: asyncio.Future[object]) -> None:
            self.line(who, request, work_outcome(f), started, left)

        if work[-1].done():
            ended(work[-1])
        else:
            work[-1].add_done_callback(ended)


def _outcome(context: Any, error: BaseException | None) -> str:
    code = context.code() if hasattr(context, "code") else None
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return str(code.name)
    return "OK" if error is None else type(error).__name__


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, malformed-message handling and audit lines, for every method."""

    def __init__(self, tokens: TokenVerifier | None = None, metrics: Metrics | None = None) -> None:
        self._tokens = tokens if tokens is not None and tokens.enabled else None
        self._metrics = metrics

    async def _who(self, method: str, context: Any) -> str:
        peer = str(context.peer() or "unknown")
        if self._tokens is None or method.startswith(OPEN_PREFIXES):
            return peer
        metadata = dict(context.invocation_metadata() or ())
        value = str(metadata.get("authorization", ""))
        if not value.lower().startswith("bearer "):
            raise AuthError("missing `authorization: Bearer <token>` metadata")
        claims = await self._tokens.verify(value[7:].strip())
        return f"{claims.get('sub', '?')}@{peer}"

    async def _admit(self, method: str, request: Any, context: Any) -> str:
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"MalformedRequest: {request.error}"
            )
        try:
            return await self._who(method, context)
        except AuthError as e:
            if self._metrics is not None:
                self._metrics.unauthenticated.inc()
            log.warning("refused %s from %s: %s", method, context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"Unauthenticated: {e}")
            raise  # not reached: abort raises

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler: Any = await continuation(details)
        if handler is None:
            return None
        method = str(details.method)
        action = AUDITED.get(method)

        def safe(deserialize: Callable[[bytes], Any] | None) -> Callable[[bytes], Any]:
            def parse(data: bytes) -> Any:
                if deserialize is None:
                    return data
                try:
                    return deserialize(data)
                except Exception as e:  # noqa: BLE001 - any parse failure is the client's
                    return _Malformed(f"{type(e).__name__}: {e}"[:300])

            return parse

        audit = _Audit(action)

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                who = await self._admit(method, request, context)
                started, error = time.perf_counter(), None
                work: list[asyncio.Future[object]] = []
                token = diff_work.joined.set(work)
                try:
                    return await inner_uu(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    diff_work.joined.reset(token)
                    audit.finish(who, request, context, error, started, work)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None:
            inner_us = handler.unary_stream

            async def stream(request: Any, context: Any) -> AsyncIterator[Any]:
                who = await self._admit(method, request, context)
                started, error = time.perf_counter(), None
                work: list[asyncio.Future[object]] = []
                diff_work.joined.set(work)  # the generator runs in the call's own task
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    audit.finish(who, request, context, error, started, work)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return cast(Handler, handler)


def work_outcome(fut: asyncio.Future[object]) -> str:
    """How a diff's work ended, as its caller would have been answered."""
    if fut.cancelled():
        return "Cancelled"
    error = fut.exception()
    if error is None:
        return "OK"
    return code_for(error).name


class ReloadingCredentials:
    """Server TLS from PEM files, re-read on the next handshake after any of them changes."""

    def __init__(self, cert: str, key: str, client_ca: str = "") -> None:
        self.files = [f for f in (cert, key, client_ca) if f]
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._stamp = self._mtimes()
        self.reloads = 0

    def _mtimes(self) -> tuple[float, ...]:
        return tuple(os.stat(f).st_mtime_ns for f in self.files)

    def _config(self) -> Any:
        with open(self.key, "rb") as k, open(self.cert, "rb") as c:
            pair = (k.read(), c.read())
        ca = None
        if self.client_ca:
            with open(self.client_ca, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def _fetch(self) -> Any:
        try:
            stamp = self._mtimes()
        except OSError as e:
            log.warning("TLS files unreadable, keeping the current ones: %s", e)
            return None
        if stamp == self._stamp:
            return None
        try:
            config = self._config()
        except OSError as e:
            log.warning("TLS files unreadable, keeping the current ones: %s", e)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate reloaded from %s", self.cert)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(), self._fetch, require_client_authentication=bool(self.client_ca)
        )
