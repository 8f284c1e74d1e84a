"""End to end, the way users run the product: the samples of manifests/samples/ applied to a
cluster, the operator making them Ready and promoting the canary, the Gateway's calls answered
by the sidecar from the same graph.

Two modes. By default (CI): the local stack, with `dagmanager operator` and `dagmanager server`
started here as processes. With QMTL_E2E_SIDECAR=HOST:PORT (and KUBECONFIG): a cluster where
the chart is installed and a sidecar is reachable, as `make e2e-kind` sets up.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, cast

import orjson
import pytest
import yaml
from kubernetes import client, config

from qmtl_dagmanager.client import GatewayClient
from tests.conftest import clear_cross_context_hits, free_port

ROOT = Path(__file__).resolve().parent.parent.parent
BIN = Path(sys.executable).parent / "dagmanager"
GROUP, VERSION = "qmtl.io", "v1alpha1"


@dataclasses.dataclass
class Product:
    api: client.ApiClient
    namespace: str
    sidecar: str

    @property
    def custom(self) -> client.CustomObjectsApi:
        return client.CustomObjectsApi(self.api)

    def apply(self, doc: dict[str, Any]) -> None:
        plural = {"StrategyDAG": "strategydags", "VersionSentinel": "versionsentinels"}
        self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, plural[doc["kind"]], doc
        )

    def get(self, plural: str, name: str) -> dict[str, Any]:
        return dict(
            cast(
                dict[str, Any],
                self.custom.get_namespaced_custom_object(
                    GROUP, VERSION, self.namespace, plural, name
                ),
            )
        )

    def exists(self, plural: str, name: str) -> bool:
        try:
            self.get(plural, name)
        except client.ApiException as e:
            if e.status == 404:
                return False
            raise
        return True


async def until(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(predicate)
        if got:
            return got
        await asyncio.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def sample(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "manifests" / "samples" / name).read_text())
    return doc


@contextlib.contextmanager
def processes(env: dict[str, str], tmp: Path) -> Iterator[str]:
    """The operator and the sidecar as processes on the local stack; yields the gRPC target."""
    grpc, http, live, metrics = free_port(), free_port(), free_port(), free_port()
    common = {
        **os.environ,
        **env,
        "QMTL_ARCHIVE_DIR": str(tmp / "archive"),
        "QMTL_GRPC_PORT": str(grpc),
        "QMTL_HTTP_PORT": str(http),
        "QMTL_GC_INTERVAL_SECONDS": "0",
    }
    # the children keep their own descriptors of the log files
    with (tmp / "operator.log").open("wb") as op_log, (tmp / "sidecar.log").open("wb") as sc_log:
        procs = [
            subprocess.Popen(
                [
                    str(BIN),
                    "operator",
                    f"--liveness=http://127.0.0.1:{live}/healthz",
                    f"--metrics-port={metrics}",
                    "--lease-name=qmtl-e2e",
                ],
                env=common,
                stdout=op_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
            subprocess.Popen(
                [str(BIN), "server"],
                env=common,
                stdout=sc_log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
        ]
    try:
        for url in (f"http://127.0.0.1:{live}/healthz", f"http://127.0.0.1:{http}/status"):
            deadline = time.monotonic() + 60
            while True:
                assert all(p.poll() is None for p in procs), (tmp / "operator.log").read_text()
                with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
                    break
                assert time.monotonic() < deadline, f"{url} did not answer"
                time.sleep(0.3)
        yield f"127.0.0.1:{grpc}"
    finally:
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            p.wait(30)


@pytest.fixture
async def product(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Product]:
    external = os.environ.get("QMTL_E2E_SIDECAR")
    with contextlib.ExitStack() as stack:
        if external:
            kubeconfig = os.environ["KUBECONFIG"]
            target = external
        else:
            s = request.getfixturevalue("stack")
            clear_cross_context_hits(s)  # other tests' refusals would halt the canary
            kubeconfig = s.kubeconfig
            env = {
                "KUBECONFIG": s.kubeconfig,
                **s.neo4j_env,
                "NEO4J_USER": s.neo4j_user,
                "NEO4J_PASSWORD": s.neo4j_password,
                **s.kafka_process_env(),
            }
            api = config.new_client_from_config(config_file=kubeconfig)
            ext = client.ApiextensionsV1Api(api)
            for path in sorted((ROOT / "crds").glob("*.yaml")):
                crd = yaml.safe_load(path.read_text())
                with contextlib.suppress(client.ApiException):
                    ext.create_custom_resource_definition(crd)
            target = stack.enter_context(processes(env, tmp_path))
        api = config.new_client_from_config(config_file=kubeconfig)
        ns = f"e2e-{uuid.uuid4().hex[:6]}"
        client.CoreV1Api(api).create_namespace(
            client.V1Namespace(metadata=client.V1ObjectMeta(name=ns))
        )
        try:
            yield Product(api, ns, target)
        finally:
            client.CoreV1Api(api).delete_namespace(ns)
            api.close()


async def test_samples_become_ready_the_canary_promotes_and_the_sidecar_agrees(
    product: Product,
) -> None:
    sdag = sample("strategydag.yaml")
    strategy = f"e2e-{uuid.uuid4().hex[:6]}"
    sdag["spec"]["strategyId"] = strategy  # a fresh strategy in a shared graph
    product.apply(sdag)
    name = sdag["metadata"]["name"]

    def ready() -> dict[str, Any] | None:
        obj = product.get("strategydags", name)
        conds = (obj.get("status") or {}).get("conditions") or []
        ok = any(c["type"] == "Ready" and c["status"] == "True" for c in conds)
        return obj if ok else None

    obj = await until(ready, 90, "the StrategyDAG Ready")
    topics = obj["status"]["topics"]
    assert len(topics) == 3

    canary = copy.deepcopy(sample("versionsentinel-canary.yaml"))
    canary["spec"]["strategyId"] = strategy
    for step in canary["spec"]["steps"]:  # the sample's 10 s pauses, shortened for the test
        step["pause"] = "1s" if "pause" in step else step.get("pause", 0)
    product.apply(canary)

    def promoted() -> dict[str, Any] | None:
        st = product.get("versionsentinels", canary["metadata"]["name"]).get("status") or {}
        return st if st.get("phase") == "Promoted" else None

    st = await until(promoted, 90, "the canary Promoted")
    assert [h["weight"] for h in st["history"]][:3] == [10, 50, 100]

    gateway = GatewayClient(product.sidecar)
    try:
        doc = orjson.loads((ROOT / "tests" / "data" / "sample-dag.json").read_bytes())
        reply = await gateway.diff(strategy, orjson.dumps(doc), world_id="w1")
        namespace = next(iter(topics.values())).rsplit(".", 1)[0]
        assert reply.topics_by_node(namespace) == topics  # the operator's topics, reused
        queues = await gateway.get_queues(["BTC"], 60, "any")
        assert {q for q, _ in queues} & {t.rsplit(".", 1)[1] for t in topics.values()}
        status = await gateway.status()
        assert status["neo4j"] == "ok"
    finally:
        await gateway.close()

    product.custom.delete_namespaced_custom_object(
        GROUP, VERSION, product.namespace, "strategydags", name
    )
    await until(lambda: not product.exists("strategydags", name), 60, "the finalizer")
