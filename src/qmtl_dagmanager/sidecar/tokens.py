"""Bearer-token verification with key rotation (PyJWT does the cryptography).

Two kinds of keys, usable together:

- HS256 shared keys: `grpc_jwt_key` (one key, or several separated by commas) and
  `grpc_jwt_keys_file` (one key per line, re-read when the file changes, as a mounted Secret
  does). During a rotation both the old and the new key verify.
- RS256 / ES256 public keys from a JWKS (`grpc_jwks_url`): fetched at start, refreshed every
  `grpc_jwks_refresh_seconds`, and when a token names a `kid` the set lacks (one fetch in
  flight at a time, at most one every `MIN_REFETCH` seconds: such a token waits for the next
  one rather than fail). A failed fetch keeps the keys already known.

A key only verifies its own family: shared keys never check an RS/ES token and JWKS keys
never check an HS token (no algorithm confusion). `exp` is required; `nbf`, `aud` and `iss`
are checked with `grpc_jwt_leeway_seconds` of clock skew.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import jwt
import orjson

from qmtl_dagmanager.config import JWT_ALGORITHMS, Settings, split_list
from qmtl_dagmanager.metrics import Metrics

log = logging.getLogger(__name__)
SHARED_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
PUBLIC_ALGORITHMS = JWT_ALGORITHMS - SHARED_ALGORITHMS
MIN_REFETCH = 1.0  # seconds between fetches triggered by unknown key ids
MIN_SHARED_KEY = 32  # bytes, for HS256 (RFC 7518 section 3.2)
FILE_CHECK = 1.0  # seconds between looks at the shared-keys file


class AuthError(Exception):
    """Why a token was refused (the text goes back to the caller)."""


def sign_jwt(
    claims: dict[str, Any], key: bytes | str, *, algorithm: str = "HS256", kid: str = ""
) -> str:
    """A signed token (for clients and tests); `key` is a shared secret or a PEM private key."""
    headers = {"kid": kid} if kid else None
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)


@dataclass
class TokenConfig:
    shared_keys: Sequence[str] = ()
    keys_file: str = ""
    jwks_url: str = ""
    jwks_ca: str = ""
    algorithms: Sequence[str] = ("HS256", "RS256", "ES256")
    audience: str = ""
    issuer: str = ""
    leeway: float = 30.0
    refresh_seconds: float = 300.0

    @property
    def enabled(self) -> bool:
        return bool(self.shared_keys or self.keys_file or self.jwks_url)

    @classmethod
    def of(cls, s: Settings) -> TokenConfig:
        return cls(
            shared_keys=split_list(s.grpc_jwt_key),
            keys_file=s.grpc_jwt_keys_file,
            jwks_url=s.grpc_jwks_url,
            jwks_ca=s.grpc_jwks_ca,
            algorithms=split_list(s.grpc_jwt_algorithms),
            audience=s.grpc_jwt_audience,
            issuer=s.grpc_jwt_issuer,
            leeway=float(s.grpc_jwt_leeway_seconds),
            refresh_seconds=float(s.grpc_jwks_refresh_seconds),
        )


def split_keys(text: str) -> list[str]:
    """Keys from a comma- or newline-separated text (blank entries and `#` lines skipped)."""
    out = []
    for line in text.replace(",", "\n").splitlines():
        key = line.strip()
        if key and not key.startswith("#"):
            out.append(key)
    return out


@dataclass
class _KeysFile:
    path: str
    keys: list[bytes] = field(default_factory=list)
    stamp: tuple[int, int, int] = (-1, -1, -1)
    checked: float = -1e9

    def current(self, now: float, *, force: bool = False) -> list[bytes]:
        if now - self.checked < FILE_CHECK and not force:
            return self.keys
        self.checked = now
        try:
            st = os.stat(self.path)  # follows the symlink a Secret volume swaps
            stamp = (st.st_mtime_ns, st.st_ino, st.st_size)
            if stamp != self.stamp:
                with open(self.path, encoding="utf-8") as f:
                    keys = [k.encode() for k in split_keys(f.read())]
                if not keys and self.keys:
                    log.warning("%s holds no keys: keeping the %d known", self.path, len(self.keys))
                else:
                    if self.stamp[0] != -1:
                        log.info("JWT keys reloaded from %s (%d keys)", self.path, len(keys))
                    self.keys = keys
                self.stamp = stamp
        except OSError as e:
            log.warning("JWT keys file unreadable, keeping the %d known: %s", len(self.keys), e)
        return self.keys


class TokenVerifier:
    """Checks bearer tokens; `start` fetches the JWKS and keeps it fresh until `close`."""

    def __init__(
        self,
        config: TokenConfig,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._algorithms = [a.strip() for a in config.algorithms if a.strip()]
        unknown = set(self._algorithms) - SHARED_ALGORITHMS - PUBLIC_ALGORITHMS
        if unknown:
            raise ValueError(f"grpc_jwt_algorithms: unsupported {', '.join(sorted(unknown))}")
        self._shared = [k.encode() for k in config.shared_keys]
        for i, key in enumerate(self._shared):
            if len(key) < MIN_SHARED_KEY:
                log.warning(
                    "shared JWT key %d of grpc_jwt_key is %d bytes: RFC 7518 asks for at least %d",
                    i + 1,
                    len(key),
                    MIN_SHARED_KEY,
                )
        self._file = _KeysFile(config.keys_file) if config.keys_file else None
        self._jwks: dict[str, jwt.PyJWK] = {}
        self._anonymous: list[jwt.PyJWK] = []  # JWKS keys without a kid
        self._fetched_at = -1e9
        self._fetching: asyncio.Task[None] | None = None
        self._refresher: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        if self._file is not None:
            self._file.current(self._clock())

    @property
    def enabled(self) -> bool:
        return self.config.enabled

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._jwks)

    async def start(self) -> None:
        if not self.config.jwks_url:
            return
        ctx: ssl.SSLContext | bool = True
        if self.config.jwks_ca:
            ctx = ssl.create_default_context(cafile=self.config.jwks_ca)
        self._session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=5), connector=aiohttp.TCPConnector(ssl=ctx)
        )
        await self.refresh()
        if not self._jwks and not self._anonymous:
            log.warning(
                "no keys from %s yet: RS/ES tokens fail until a fetch works", self.config.jwks_url
            )
        self._refresher = asyncio.create_task(self._refresh_forever())

    async def close(self) -> None:
        for task in (self._refresher, self._fetching):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._session is not None:
            await self._session.close()

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(max(self.config.refresh_seconds, 1.0))
            await self.refresh()

    async def refresh(self) -> None:
        """Fetch the JWKS once (joins a fetch already in flight)."""
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.create_task(self._fetch())
        await asyncio.shield(self._fetching)

    async def _fetch(self) -> None:
        if self._session is None:
            return
        url = self.config.jwks_url
        self._fetched_at = self._clock()
        try:
            async with self._session.get(url) as resp:
                if resp.status != 200:
                    raise ValueError(f"HTTP {resp.status}")
                body = await resp.read()
            keys, anonymous = self._parse(orjson.loads(body))
        except (aiohttp.ClientError, TimeoutError, ValueError, jwt.PyJWKError) as e:
            self._count("failed")
            log.warning("JWKS fetch from %s failed, keeping %d keys: %s", url, len(self._jwks), e)
            return
        added = sorted(set(keys) - set(self._jwks))
        removed = sorted(set(self._jwks) - set(keys))
        self._jwks, self._anonymous = keys, anonymous
        self._count("ok")
        if self._metrics is not None:
            self._metrics.jwks_keys.set(len(keys) + len(anonymous))
        if added or removed:
            log.info(
                "JWKS from %s: %d keys (added %s, removed %s)",
                url,
                len(keys),
                ", ".join(added) or "-",
                ", ".join(removed) or "-",
            )

    def _parse(self, data: Any) -> tuple[dict[str, jwt.PyJWK], list[jwt.PyJWK]]:
        if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
            raise ValueError("not a JWKS (an object with a `keys` list)")
        keys: dict[str, jwt.PyJWK] = {}
        anonymous: list[jwt.PyJWK] = []
        for raw in data["keys"]:
            if not isinstance(raw, dict) or raw.get("use", "sig") != "sig":
                continue
            if raw.get("kty") == "oct":
                continue  # shared secrets do not belong in a published key set
            try:
                key = jwt.PyJWK(raw)
            except jwt.PyJWKError as e:
                log.warning("JWKS key %s skipped: %s", raw.get("kid", "?"), e)
                continue
            kid = raw.get("kid")
            if isinstance(kid, str) and kid:
                keys[kid] = key
            else:
                anonymous.append(key)
        return keys, anonymous

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.jwks_refreshes.labels(outcome).inc()

    async def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; AuthError says why otherwise."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.DecodeError as e:
            raise AuthError(f"the token is not a JWT ({e})") from e
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self._algorithms:
            accepted = ", ".join(self._algorithms)
            raise AuthError(f"algorithm {alg!r} is not accepted (accepted: {accepted})")
        if alg in SHARED_ALGORITHMS:
            keys: list[Any] = self._shared_keys()
            if not keys:
                raise AuthError(f"{alg} tokens are not accepted here (no shared key is set)")
        else:
            keys = await self._public_keys(header.get("kid"), alg)
        claims = self._first(token, keys, alg)
        if claims is None and alg in SHARED_ALGORITHMS and self._file is not None:
            # a key added to the file a moment ago: look again now rather than in FILE_CHECK
            fresh = [k for k in self._shared_keys(force=True) if k not in keys]
            claims = self._first(token, fresh, alg)
        if claims is None:
            raise AuthError("bad signature")
        return claims

    def _first(self, token: str, keys: list[Any], alg: str) -> dict[str, Any] | None:
        """The claims under the first key whose signature matches; None when none does."""
        for key in keys:
            try:
                return self._decode(token, key, alg)
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as e:
                raise AuthError(_reason(e)) from e
        return None

    def _shared_keys(self, *, force: bool = False) -> list[bytes]:
        keys = list(self._shared)
        if self._file is not None:
            now = self._clock()
            keys += [k for k in self._file.current(now, force=force) if k not in keys]
        return keys

    async def _public_keys(self, kid: Any, alg: str) -> list[Any]:
        if not self.config.jwks_url:
            raise AuthError(f"{alg} tokens are not accepted here (no JWKS is set)")
        if isinstance(kid, str) and kid:
            if kid not in self._jwks:
                wait = self._fetched_at + MIN_REFETCH - self._clock()
                if wait > 0:
                    await asyncio.sleep(wait)
                if kid not in self._jwks:
                    await self.refresh()
            key = self._jwks.get(kid)
            if key is None:
                raise AuthError(f"unknown key id {kid!r} (not in the JWKS)")
            return [key]
        if not self._anonymous and not self._jwks:
            raise AuthError("no JWKS keys are known yet")
        return [*self._anonymous, *self._jwks.values()]

    def _decode(self, token: str, key: Any, alg: str) -> dict[str, Any]:
        c = self.config
        claims: dict[str, Any] = jwt.decode(
            token,
            key,
            algorithms=[alg],
            audience=c.audience or None,
            issuer=c.issuer or None,
            leeway=c.leeway,
            options={"require": ["exp"], "verify_aud": bool(c.audience)},
        )
        return claims


def _reason(e: jwt.PyJWTError) -> str:
    if isinstance(e, jwt.ExpiredSignatureError):
        return "the token has expired"
    if isinstance(e, jwt.ImmatureSignatureError):
        return "the token is not valid yet (nbf)"
    if isinstance(e, jwt.InvalidAudienceError):
        return f"the token is not for this audience ({e})"
    if isinstance(e, jwt.InvalidIssuerError):
        return f"the token is not from the expected issuer ({e})"
    if isinstance(e, jwt.MissingRequiredClaimError):
        return f"the token has no {e.claim}"
    return f"invalid token: {e}"
