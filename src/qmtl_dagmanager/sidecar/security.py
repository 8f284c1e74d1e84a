"""Who may call the sidecar, and how hard.

- Bearer tokens: HS256 JWTs checked against `grpc_jwt_key` (signature, `exp` required,
  `nbf`, and `aud` / `iss` when configured); the standard health service stays open for
  kubelet probes. A failure is UNAUTHENTICATED with the reason.
- TLS and mutual TLS from PEM files that are re-read when they change (no restart).
- Malformed messages (bytes that are not the method's protobuf, invalid UTF-8 in a string
  field) are INVALID_ARGUMENT, never INTERNAL or UNKNOWN.
- Rate limits (token buckets) and one audit line per diff and per destructive call.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeAlias, cast

import grpc
import orjson
from blake3 import blake3

audit_log = logging.getLogger("qmtl_dagmanager.audit")
log = logging.getLogger(__name__)
OPEN_PREFIXES = ("/grpc.health.v1.Health/",)
AUDITED = {
    "/qmtl.services.dagmanager.DiffService/Diff": "diff",
    "/qmtl.services.dagmanager.AdminService/RedoDiff": "redo-diff",
    "/qmtl.services.dagmanager.AdminService/Cleanup": "cleanup",
}
LEEWAY = 30.0
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class AuthError(Exception):
    pass


def _b64(part: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except (binascii.Error, ValueError) as e:
        raise AuthError("the token is not base64url") from e


def verify_jwt(
    token: str, key: bytes, *, now: float, audience: str = "", issuer: str = ""
) -> dict[str, Any]:
    """The claims of a valid HS256 token; AuthError says why otherwise."""
    parts = token.split(".")
    if len(parts) != 3:
        raise AuthError("the token is not a JWT (three dot-separated parts)")
    try:
        header, claims = orjson.loads(_b64(parts[0])), orjson.loads(_b64(parts[1]))
    except orjson.JSONDecodeError as e:
        raise AuthError("the token's header or claims are not JSON") from e
    if not isinstance(header, dict) or header.get("alg") != "HS256":
        raise AuthError("only HS256 tokens are accepted")
    expected = hmac.new(key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
    if not hmac.compare_digest(expected, _b64(parts[2])):
        raise AuthError("bad signature")
    if not isinstance(claims, dict):
        raise AuthError("the claims are not an object")
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if not isinstance(exp, int | float) or isinstance(exp, bool):
        raise AuthError("the token has no exp")
    if now > exp + LEEWAY:
        raise AuthError("the token has expired")
    if isinstance(nbf, int | float) and now + LEEWAY < nbf:
        raise AuthError("the token is not valid yet")
    if audience:
        aud = claims.get("aud")
        auds = aud if isinstance(aud, list) else [aud]
        if audience not in auds:
            raise AuthError(f"the token is not for audience {audience}")
    if issuer and claims.get("iss") != issuer:
        raise AuthError(f"the token is not from issuer {issuer}")
    return claims


def sign_jwt(claims: dict[str, Any], key: bytes) -> str:
    """An HS256 token (for clients and tests)."""

    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = enc(orjson.dumps({"alg": "HS256", "typ": "JWT"}))
    body = enc(orjson.dumps(claims))
    sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(sig)}"


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


class SecurityInterceptor(grpc.aio.ServerInterceptor):
    """Authentication, malformed-message handling and audit lines, for every method."""

    def __init__(self, jwt_key: str = "", audience: str = "", issuer: str = "") -> None:
        self._key = jwt_key.encode() if jwt_key else b""
        self._audience, self._issuer = audience, issuer

    def _who(self, method: str, context: Any) -> str:
        peer = str(context.peer() or "unknown")
        if not self._key or method.startswith(OPEN_PREFIXES):
            return peer
        metadata = dict(context.invocation_metadata() or ())
        value = str(metadata.get("authorization", ""))
        if not value.lower().startswith("bearer "):
            raise AuthError("missing `authorization: Bearer <token>` metadata")
        claims = verify_jwt(
            value[7:].strip(),
            self._key,
            now=time.time(),
            audience=self._audience,
            issuer=self._issuer,
        )
        return f"{claims.get('sub', '?')}@{peer}"

    async def _admit(self, method: str, request: Any, context: Any) -> str:
        if isinstance(request, _Malformed):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"MalformedRequest: {request.error}"
            )
        try:
            return self._who(method, context)
        except AuthError as e:
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

        def audit(who: str, request: Any, outcome: str, started: float) -> None:
            if action is None:
                return
            strategy = getattr(request, "strategy_id", "") or getattr(request, "sentinel_id", "")
            digest = dag_hash(request.dag_json) if getattr(request, "dag_json", "") else ""
            audit_log.info(
                "%s by %s: strategy=%s dag=%s outcome=%s",
                action,
                who,
                strategy,
                digest or "-",
                outcome,
                extra={
                    "audit": action,
                    "who": who,
                    "strategy": strategy,
                    "dag_hash": digest,
                    "outcome": outcome,
                    "ms": round((time.perf_counter() - started) * 1000, 1),
                },
            )

        def outcome_of(context: Any, error: BaseException | None) -> str:
            code = context.code() if hasattr(context, "code") else None
            if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
                return str(code.name)
            return "OK" if error is None else type(error).__name__

        if handler.unary_unary is not None:
            inner_uu = handler.unary_unary

            async def unary(request: Any, context: Any) -> Any:
                who = await self._admit(method, request, context)
                started, error = time.perf_counter(), None
                try:
                    return await inner_uu(request, context)
                except BaseException as e:
                    error = e
                    raise
                finally:
                    audit(who, request, outcome_of(context, error), started)

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
                try:
                    async for item in inner_us(request, context):
                        yield item
                except BaseException as e:
                    error = e
                    raise
                finally:
                    audit(who, request, outcome_of(context, error), started)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=safe(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return cast(Handler, handler)


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
