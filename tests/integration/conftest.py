"""A running sidecar, twice: on the embedded backends and on the real stack."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest

from qmtl_dagmanager.client import GatewayClient
from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.sidecar import app
from tests.conftest import Stack
from tests.integration.kube_harness import cluster  # noqa: F401  (the operator fixture)


@dataclasses.dataclass
class Running:
    sidecar: app.Sidecar
    client: GatewayClient
    settings: Settings

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.sidecar.http_port}"


def real_settings(stack: Stack, **over: Any) -> Settings:
    return dataclasses.replace(
        Settings(),
        neo4j_uri=stack.neo4j_uri,
        neo4j_ssl_ca=stack.neo4j_ca,
        neo4j_user=stack.neo4j_user,
        neo4j_password=stack.neo4j_password,
        **stack.kafka_settings(),
        grpc_port=0,
        http_port=0,
        gc_interval_seconds=0,
        **over,
    )


@pytest.fixture(params=["embedded", pytest.param("real", marks=pytest.mark.integration)])
async def sidecar(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Running]:
    archive = str(tmp_path_factory.mktemp("archive"))
    if request.param == "embedded":
        settings = dataclasses.replace(
            Settings(), grpc_port=0, http_port=0, gc_interval_seconds=0, archive_dir=archive
        )
    else:
        settings = real_settings(request.getfixturevalue("stack"), archive_dir=archive)
    running = await app.start(settings)
    client = GatewayClient(f"127.0.0.1:{running.grpc_port}")
    yield Running(running, client, settings)
    await client.close()
    await running.stop(0)
