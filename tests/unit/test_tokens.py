"""Bearer-token checks: shared-key lists, the keys file, a JWKS with rotation and unknown key
ids, claim checks with leeway, and the algorithm-confusion and `none` attacks."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from qmtl_dagmanager.config import load
from qmtl_dagmanager.metrics import Metrics
from qmtl_dagmanager.sidecar.tokens import AuthError, TokenConfig, TokenVerifier, sign_jwt
from tests.jwks import Issuer, pem, serving

ONE, TWO = "key-one-0123456789abcdef0123456789", "key-two-0123456789abcdef0123456789"


def claims(**over: Any) -> dict[str, Any]:
    return {"sub": "gateway", "exp": time.time() + 60, **over}


@pytest.fixture
async def issuer() -> AsyncIterator[Issuer]:
    async with serving() as it:
        yield it


Make = Callable[..., Awaitable[TokenVerifier]]


@pytest.fixture
async def verifier() -> AsyncIterator[Make]:
    made: list[TokenVerifier] = []

    async def make(metrics: Metrics | None = None, **over: Any) -> TokenVerifier:
        v = TokenVerifier(TokenConfig(**over), metrics or Metrics())
        made.append(v)
        await v.start()
        return v

    yield make
    for v in made:
        await v.close()


async def refused(v: TokenVerifier, token: str) -> str:
    with pytest.raises(AuthError) as e:
        await v.verify(token)
    return str(e.value)


async def test_a_list_of_shared_keys_all_verify(verifier: Make) -> None:
    v = await verifier(
        shared_keys=["old-key-0123456789abcdef0123456789", "new-key-0123456789abcdef0123456789"]
    )
    for key in ("old-key-0123456789abcdef0123456789", "new-key-0123456789abcdef0123456789"):
        assert (await v.verify(sign_jwt(claims(), key)))["sub"] == "gateway"
    assert (
        await refused(v, sign_jwt(claims(), "a-third-key-0123456789abcdef012345"))
        == "bad signature"
    )


async def test_the_keys_file_is_reread_when_it_changes(tmp_path: Path, verifier: Make) -> None:
    path = tmp_path / "keys"
    path.write_text(f"# current\n{ONE}\n")
    v = await verifier(keys_file=str(path))
    await v.verify(sign_jwt(claims(), ONE))
    assert await refused(v, sign_jwt(claims(), TWO)) == "bad signature"
    staged = tmp_path / "keys.new"  # as a Secret volume does: a new file swapped in
    staged.write_text(f"{ONE}\n{TWO}\n")
    os.replace(staged, path)
    await v.verify(sign_jwt(claims(), TWO))  # at once: a bad signature looks again
    await v.verify(sign_jwt(claims(), ONE))
    staged.write_text(f"{TWO}\n")
    os.replace(staged, path)
    await v.verify(sign_jwt(claims(), TWO))
    v._file.checked = -1e9  # type: ignore[union-attr]  # past FILE_CHECK
    assert await refused(v, sign_jwt(claims(), ONE)) == "bad signature"
    staged.write_text("\n")  # an emptied file keeps the keys known
    os.replace(staged, path)
    v._file.checked = -1e9  # type: ignore[union-attr]
    await v.verify(sign_jwt(claims(), TWO))


async def test_claims_are_checked_with_leeway(verifier: Make) -> None:
    key = "shared-key-0123456789abcdef0123456"
    v = await verifier(shared_keys=[key], audience="dagmanager", issuer="idp", leeway=30)
    ok = {"aud": "dagmanager", "iss": "idp"}
    now = time.time()
    await v.verify(sign_jwt(claims(**ok, exp=now - 10), key))  # within the leeway
    await v.verify(sign_jwt(claims(**ok, nbf=now + 10), key))
    assert await refused(v, sign_jwt(claims(**ok, exp=now - 60), key)) == "the token has expired"
    assert "not valid yet" in await refused(v, sign_jwt(claims(**ok, nbf=now + 60), key))
    assert "audience" in await refused(v, sign_jwt(claims(aud="other", iss="idp"), key))
    assert "issuer" in await refused(v, sign_jwt(claims(aud="dagmanager", iss="x"), key))
    no_exp = sign_jwt({"sub": "gateway", **ok}, key)
    assert await refused(v, no_exp) == "the token has no exp"
    assert "not a JWT" in await refused(v, "abc")


async def test_algorithm_none_and_unlisted_algorithms_are_refused(verifier: Make) -> None:
    key = "shared-key-0123456789abcdef0123456"
    v = await verifier(shared_keys=[key], algorithms=["HS256"])
    unsigned = jwt.encode(claims(), "", algorithm="none")
    assert "algorithm 'none' is not accepted" in await refused(v, unsigned)
    assert "HS512" in await refused(v, sign_jwt(claims(), key * 2, algorithm="HS512"))


async def test_jwks_keys_verify_and_rotate(issuer: Issuer, verifier: Make) -> None:
    rsa_a, ec_b = issuer.add_rsa("a"), issuer.add_ec("b")
    v = await verifier(jwks_url=issuer.url, refresh_seconds=3600)
    assert v.key_ids == ["a", "b"]
    await v.verify(sign_jwt(claims(), pem(rsa_a), algorithm="RS256", kid="a"))
    await v.verify(sign_jwt(claims(), pem(ec_b), algorithm="ES256", kid="b"))
    # the issuer publishes a new key and signs with it at once: the unknown kid fetches
    rsa_c = issuer.add_rsa("c")
    fetches = issuer.fetches
    await v.verify(sign_jwt(claims(), pem(rsa_c), algorithm="RS256", kid="c"))
    assert issuer.fetches == fetches + 1
    # a retired key stops verifying after the next fetch
    del issuer.keys["a"]
    await v.refresh()
    old = sign_jwt(claims(), pem(rsa_a), algorithm="RS256", kid="a")
    assert await refused(v, old) == "unknown key id 'a' (not in the JWKS)"
    # a token signed by a stranger under a known kid fails its signature
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = sign_jwt(claims(), pem(stranger), algorithm="RS256", kid="c")
    assert await refused(v, forged) == "bad signature"


async def test_unknown_kids_fetch_at_most_once_a_second(issuer: Issuer, verifier: Make) -> None:
    issuer.add_rsa("a")
    v = await verifier(jwks_url=issuer.url, refresh_seconds=3600)
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    fetches, started = issuer.fetches, time.monotonic()
    for i in range(3):
        tok = sign_jwt(claims(), pem(stranger), algorithm="RS256", kid=f"nope-{i}")
        assert "unknown key id" in await refused(v, tok)
    # three unknown kids cost at most one fetch per second since the last one
    assert issuer.fetches - fetches <= int(time.monotonic() - started) + 1


async def test_a_failed_fetch_keeps_the_known_keys(issuer: Issuer, verifier: Make) -> None:
    key = issuer.add_rsa("a")
    metrics = Metrics()
    v = await verifier(metrics, jwks_url=issuer.url, refresh_seconds=3600)
    issuer.failing = True
    await v.refresh()
    await v.verify(sign_jwt(claims(), pem(key), algorithm="RS256", kid="a"))
    assert metrics.jwks_refreshes.labels("failed")._value.get() == 1
    assert metrics.jwks_refreshes.labels("ok")._value.get() == 1


async def test_no_algorithm_confusion_between_families(issuer: Issuer, verifier: Make) -> None:
    """An HS256 token whose secret is the issuer's public key (the classic confusion attack)
    meets no shared key; a JWKS never lends its keys to HS tokens."""
    key = issuer.add_rsa("a")
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    v = await verifier(jwks_url=issuer.url, refresh_seconds=3600)
    forged = _hs_with_raw_key(public)
    assert "no shared key" in await refused(v, forged)
    both = await verifier(jwks_url=issuer.url, shared_keys=["shared-key-0123456789abcdef0123456"])
    assert await refused(both, forged) == "bad signature"


def _hs_with_raw_key(secret: bytes) -> str:
    """An HS256 token signed with arbitrary bytes (PyJWT refuses PEM keys for HMAC)."""

    def enc(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    head = enc(b'{"alg":"HS256","typ":"JWT","kid":"a"}')
    body = enc(b'{"sub":"x","exp":9999999999}')
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{enc(sig)}"


async def test_refusals_without_keys_of_that_family(verifier: Make) -> None:
    v = await verifier(shared_keys=["shared-key-0123456789abcdef0123456"])
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    tok = sign_jwt(claims(), pem(key), algorithm="RS256", kid="a")
    assert "no JWKS is set" in await refused(v, tok)


async def test_settings_give_a_key_list_and_the_checks(verifier: Make) -> None:
    s = load(
        None,
        {
            "QMTL_GRPC_JWT_KEY": f"{ONE}, {TWO}",
            "QMTL_GRPC_JWT_ALGORITHMS": "HS256",
            "QMTL_GRPC_JWT_LEEWAY_SECONDS": "0",
            "QMTL_GRPC_JWT_AUDIENCE": "dagmanager",
        },
    )
    config = TokenConfig.of(s)
    assert list(config.shared_keys) == [ONE, TWO] and config.leeway == 0.0
    v = await verifier(**vars(config))
    for key in (ONE, TWO):
        await v.verify(sign_jwt(claims(aud="dagmanager"), key))
    late = sign_jwt(claims(aud="dagmanager", exp=time.time() - 2), ONE)
    assert await refused(v, late) == "the token has expired"  # no leeway
