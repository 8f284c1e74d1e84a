"""Neo4j over TLS: the local stack's Bolt port accepts only TLS, the product reaches it with
`bolt+s://` and the CA from `neo4j_ssl_ca`, and a plaintext client or a certificate from
another CA is refused with a clear, typed error."""

from __future__ import annotations

from pathlib import Path

import pytest

from qmtl_dagmanager.adapters.neo4j_graph import Neo4jGraphStore
from qmtl_dagmanager.config import SettingsError, load
from qmtl_dagmanager.core.errors import Unavailable
from tests.conftest import Stack
from tests.tls import ca

pytestmark = pytest.mark.integration


def tls_stack(stack: Stack) -> str:
    if not stack.neo4j_uri.startswith("bolt+s://") or not stack.neo4j_ca:
        pytest.fail(f"the stack's Neo4j does not serve TLS: {stack.neo4j_uri}")
    return stack.neo4j_uri.removeprefix("bolt+s://")


async def test_the_graph_is_reached_over_tls_with_the_configured_ca(stack: Stack) -> None:
    tls_stack(stack)
    store = Neo4jGraphStore(
        stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=stack.neo4j_ca
    )
    try:
        await store.init_schema()
        assert (await store.counts()) is not None
    finally:
        await store.close()


async def test_plaintext_and_a_foreign_ca_are_refused(stack: Stack, tmp_path: Path) -> None:
    address = tls_stack(stack)
    plain = Neo4jGraphStore(f"bolt://{address}", stack.neo4j_user, stack.neo4j_password)
    try:
        with pytest.raises(Unavailable) as e:
            await plain.init_schema()
        assert e.value.reason == "Neo4jUnavailable"
    finally:
        await plain.close()
    other, _ = ca(tmp_path, "not-the-neo4j-ca")
    foreign = Neo4jGraphStore(
        stack.neo4j_uri, stack.neo4j_user, stack.neo4j_password, ca=str(other)
    )
    try:
        with pytest.raises(Unavailable) as e:
            await foreign.init_schema()
        assert "certificate" in str(e.value).lower() or "ssl" in str(e.value).lower(), e.value
    finally:
        await foreign.close()


def test_a_ca_without_a_tls_uri_is_a_settings_error(stack: Stack) -> None:
    address = tls_stack(stack)
    with pytest.raises(SettingsError, match="neo4j_ssl_ca"):
        load(None, {"NEO4J_URI": f"bolt://{address}", "NEO4J_SSL_CA": stack.neo4j_ca})
    with pytest.raises(SettingsError, match="no such file"):
        load(None, {"NEO4J_URI": stack.neo4j_uri, "NEO4J_SSL_CA": "/nonexistent/ca.pem"})
