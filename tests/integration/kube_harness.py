"""The operator in-process against the real kube-apiserver, Neo4j and Kafka: the `cluster`
fixture (a namespace, every CRD, an operator holding a Lease) and helpers to drive it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from kubernetes import client, config

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.adapters import kube as kubeapi
from qmtl_dagmanager.adapters.kube_lease import LeaderElection
from qmtl_dagmanager.api.v1alpha1 import strategydag, versionsentinel
from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.kube import operator
from tests.conftest import Stack

ROOT = Path(__file__).resolve().parent.parent.parent


@dataclasses.dataclass
class Cluster:
    custom: client.CustomObjectsApi
    core: client.CoreV1Api
    namespace: str
    container: bootstrap.Container

    settings: Settings = dataclasses.field(default_factory=Settings)
    lease_duration: float = 10.0
    lease_namespace: str = ""  # default: the watched namespace
    _stop: asyncio.Event | None = None
    _task: asyncio.Task[None] | None = None
    _ran: bool = False

    async def start_operator(self) -> None:
        """Run the operator in-process (a fresh container each time, as a restart would; the
        first run uses the one the fixture built, which the operator closes when it stops)."""
        if self._ran:
            self.container = bootstrap.build(self.settings)
        self._ran = True
        self._stop, ready = asyncio.Event(), asyncio.Event()
        self._task = asyncio.create_task(
            operator.run(
                self.container,
                namespaces=[self.namespace],
                resync_seconds=2,
                sentinel_tick=0.5,
                stop=self._stop,
                ready=ready,
                election=LeaderElection(
                    kubeapi.coordination,
                    self.lease_namespace or self.namespace,
                    duration=self.lease_duration,
                ),
            )
        )
        await asyncio.wait_for(ready.wait(), 60)

    async def stop_operator(self) -> None:
        assert self._stop is not None and self._task is not None
        self._stop.set()
        with contextlib.suppress(asyncio.CancelledError):  # kopf ends its tasks by cancelling
            await asyncio.wait_for(self._task, 30)
        assert self._task.done()

    async def ready(self, name: str, timeout: float = 60) -> dict[str, Any]:
        """The resource, once its Ready condition is True."""
        got: dict[str, Any] = await until(
            lambda: condition(self.get(name), "Ready").get("status") == "True" and self.get(name),
            timeout,
            f"{name} Ready",
        )
        return got

    async def all_deleted(self, timeout: float = 60) -> None:
        """Every StrategyDAG of the namespace is gone (finalizers done)."""
        await until(
            lambda: (
                not cast(
                    dict[str, Any],
                    self.custom.list_namespaced_custom_object(
                        strategydag.GROUP, strategydag.VERSION, self.namespace, strategydag.PLURAL
                    ),
                )["items"]
            ),
            timeout,
            "deletion",
        )

    def create(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{strategydag.GROUP}/{strategydag.VERSION}",
            "kind": strategydag.KIND,
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, self.namespace, strategydag.PLURAL, body
        )

    def get(self, name: str) -> dict[str, Any]:
        return dict(
            cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(
                    strategydag.GROUP, strategydag.VERSION, self.namespace, strategydag.PLURAL, name
                ),
            )
        )

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            strategydag.GROUP,
            strategydag.VERSION,
            self.namespace,
            strategydag.PLURAL,
            name,
            {"spec": spec},
        )

    def delete(self, name: str) -> None:
        self.custom.delete_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, self.namespace, strategydag.PLURAL, name
        )

    def create_sentinel(self, name: str, spec: dict[str, Any]) -> None:
        body = {
            "apiVersion": f"{strategydag.GROUP}/{strategydag.VERSION}",
            "kind": versionsentinel.KIND,
            "metadata": {"name": name},
            "spec": spec,
        }
        self.custom.create_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, self.namespace, versionsentinel.PLURAL, body
        )

    def sentinel(self, name: str) -> dict[str, Any]:
        return dict(
            cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(
                    strategydag.GROUP,
                    strategydag.VERSION,
                    self.namespace,
                    versionsentinel.PLURAL,
                    name,
                ),
            )
        )

    def patch_sentinel(self, name: str, body: dict[str, Any]) -> None:
        self.custom.patch_namespaced_custom_object(
            strategydag.GROUP,
            strategydag.VERSION,
            self.namespace,
            versionsentinel.PLURAL,
            name,
            body,
        )

    def act(self, name: str, action: str) -> None:
        """The action annotation, made unique so that a repeated action counts again."""
        value = f"{action}:{uuid.uuid4().hex[:6]}"
        self.patch_sentinel(
            name, {"metadata": {"annotations": {versionsentinel.ACTION_ANNOTATION: value}}}
        )

    async def phase(self, name: str, phase: str, timeout: float = 60) -> dict[str, Any]:
        got: dict[str, Any] = await until(
            lambda: (
                (self.sentinel(name).get("status") or {}).get("phase") == phase
                and self.sentinel(name)
            ),
            timeout,
            f"{name} {phase}",
        )
        return got

    def events(self, name: str) -> list[str]:
        evs = self.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={name}"
        )
        return [f"{e.reason}: {e.message}" for e in evs.items]


async def until(predicate: Callable[[], Any], timeout: float = 60, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = await asyncio.to_thread(predicate)
        if last:
            return last
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def condition(obj: dict[str, Any], kind: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c["type"] == kind:
            return dict(c)
    return {}


@pytest.fixture
async def cluster(
    stack: Stack, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> AsyncIterator[Cluster]:
    monkeypatch.setenv("KUBECONFIG", stack.kubeconfig)
    api_client = config.new_client_from_config(config_file=stack.kubeconfig)
    ext = client.ApiextensionsV1Api(api_client)
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        try:
            # the client sends the manifest's dict as it is; the stub asks for the model
            ext.create_custom_resource_definition(cast(Any, crd))
        except client.ApiException as e:
            if e.status != 409:
                raise
            ext.patch_custom_resource_definition(crd["metadata"]["name"], crd)
        name: str = crd["metadata"]["name"]

        def established(name: str = name) -> bool:
            status = ext.read_custom_resource_definition(name).status
            assert status is not None
            return any(
                c.type == "Established" and c.status == "True" for c in status.conditions or []
            )

        await until(established, what=f"CRD {name} established")
    core = client.CoreV1Api(api_client)
    ns = f"op-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    settings = dataclasses.replace(
        Settings(),
        neo4j_uri=stack.neo4j_uri,
        neo4j_ssl_ca=stack.neo4j_ca,
        neo4j_user=stack.neo4j_user,
        neo4j_password=stack.neo4j_password,
        **stack.kafka_settings("operator"),  # the operator's own principal
        archive_dir=str(tmp_path / "archive"),
    )
    cl = Cluster(client.CustomObjectsApi(api_client), core, ns, bootstrap.build(settings))
    cl.settings = settings
    await cl.start_operator()
    try:
        yield cl
    finally:
        listed = cast(
            dict[str, Any],
            cl.custom.list_namespaced_custom_object(
                strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL
            ),
        )
        for item in listed["items"]:
            with contextlib.suppress(client.ApiException):
                cl.delete(item["metadata"]["name"])
        with contextlib.suppress(AssertionError):
            await cl.all_deleted(30)
        await cl.stop_operator()
        core.delete_namespace(ns)
        api_client.close()


def spec_of(doc: dict[str, Any], strategy: str, **extra: Any) -> dict[str, Any]:
    return {
        "strategyId": strategy,
        "worldId": "w1",
        "dag": {"schemaVersion": "v1", "nodes": doc["nodes"], "meta": doc.get("meta", {})},
        **extra,
    }
