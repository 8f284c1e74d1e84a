"""Leader election on a real Lease: one holder at a time, hand-over on release, take-over
after expiry, and the operator standing by (answering its liveness URL) until it leads."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes import client, config

from qmtl_dagmanager import bootstrap
from qmtl_dagmanager.adapters.kube_lease import LeaderElection, LeadershipLost
from qmtl_dagmanager.config import Settings
from qmtl_dagmanager.kube import operator
from tests.conftest import Stack, free_port


@dataclasses.dataclass
class Leases:
    api: client.ApiClient
    namespace: str
    name: str

    def election(self, who: str, duration: float = 3.0) -> LeaderElection:
        return LeaderElection(
            lambda: client.CoordinationV1Api(self.api),
            self.namespace,
            self.name,
            who,
            duration=duration,
            renew_every=duration / 3,
            retry_every=0.2,
        )

    def renewed_at(self) -> object:
        lease = client.CoordinationV1Api(self.api).read_namespaced_lease(self.name, self.namespace)
        return lease.spec.renew_time if lease.spec else None

    async def renewals(self, count: int, timeout: float) -> None:
        """Until the holder has renewed the lease `count` times (polled, with a deadline)."""
        deadline = time.monotonic() + timeout
        last, seen = self.renewed_at(), 0
        while seen < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"the lease was renewed {seen} of {count} times")
            await asyncio.sleep(0.1)
            now = self.renewed_at()
            if now != last:
                last, seen = now, seen + 1

    def holder(self) -> str | None:
        lease = client.CoordinationV1Api(self.api).read_namespaced_lease(self.name, self.namespace)
        return lease.spec.holder_identity if lease.spec else None


@pytest.fixture
def leases(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Leases]:
    monkeypatch.setenv("KUBECONFIG", stack.kubeconfig)
    api = config.new_client_from_config(config_file=stack.kubeconfig)
    leases = Leases(api, "default", f"lease-{uuid.uuid4().hex[:6]}")
    yield leases
    with contextlib.suppress(client.ApiException):
        client.CoordinationV1Api(api).delete_namespaced_lease(leases.name, leases.namespace)
    api.close()


def leading(election: LeaderElection) -> bool:
    """Whether it holds the lease now: read through a call, so that mypy keeps no narrowing
    of `is_leader` from an earlier assert across the awaits that change it."""
    return election.is_leader


def leader(container: bootstrap.Container) -> float | None:
    return container.metrics.registry.get_sample_value("operator_leader")


async def test_one_holder_then_hand_over_on_release(leases: Leases) -> None:
    a, b = leases.election("a"), leases.election("b")
    await asyncio.wait_for(a.acquire(), 10)
    assert leases.holder() == "a" and a.is_leader
    waiting = asyncio.create_task(b.acquire())  # b tries every 0.2 s
    renewing = asyncio.create_task(a.hold())
    await leases.renewals(2, 10)  # two renewals by a: many tries by b, each refused
    assert not waiting.done() and not leading(b)
    renewing.cancel()
    await a.release()
    started = time.monotonic()
    await asyncio.wait_for(waiting, 5)
    assert leases.holder() == "b" and leading(b)
    assert time.monotonic() - started < 1.5  # released: no need to wait for expiry


async def test_a_silent_holder_is_taken_over_after_expiry_and_notices(leases: Leases) -> None:
    a, b = leases.election("a", duration=2.0), leases.election("b", duration=2.0)
    await a.acquire()
    started = time.monotonic()
    await asyncio.wait_for(b.acquire(), 10)  # a never renews: it has "crashed"
    assert time.monotonic() - started >= 2.0
    assert leases.holder() == "b"
    with pytest.raises(LeadershipLost):
        await asyncio.wait_for(a.hold(), 10)  # a comes back: its renewal finds b
    assert not a.is_leader


async def test_after_a_crash_the_watching_standby_wins_over_a_newcomer(
    leases: Leases,
) -> None:
    """The leader dies; a replacement starts a moment later (a Deployment's new pod). The
    replica that was standing by has watched the renewals and takes the lease first."""
    a = leases.election("a", duration=2.0)
    standby = leases.election("standby", duration=2.0)
    await a.acquire()
    renewing = asyncio.create_task(a.hold())
    waiting = asyncio.create_task(standby.acquire())
    await leases.renewals(2, 10)
    renewing.cancel()  # a crashes: no release, its last renewal stands
    with contextlib.suppress(asyncio.CancelledError):
        await renewing
    # the replacement starts at once: its first read is as fresh as the standby's can be
    newcomer = asyncio.create_task(leases.election("newcomer", duration=2.0).acquire())
    await asyncio.wait_for(waiting, 10)
    assert leases.holder() == "standby"
    await asyncio.sleep(0.6)
    assert not newcomer.done() and leases.holder() == "standby"
    newcomer.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await newcomer


async def test_operator_stands_by_until_it_holds_the_lease(
    leases: Leases, stack: Stack, tmp_path: Path
) -> None:
    settings = dataclasses.replace(
        Settings(),
        neo4j_uri=stack.neo4j_uri,
        neo4j_ssl_ca=stack.neo4j_ca,
        neo4j_user=stack.neo4j_user,
        neo4j_password=stack.neo4j_password,
        **stack.kafka_settings(),
        archive_dir=str(tmp_path),
        gc_interval_seconds=0,
    )
    other = leases.election("other")
    await other.acquire()
    port = free_port()
    stop, ready = asyncio.Event(), asyncio.Event()
    container = bootstrap.build(settings)
    task = asyncio.create_task(
        operator.run(
            container,
            namespaces=["default"],
            liveness=f"http://127.0.0.1:{port}/healthz",
            stop=stop,
            ready=ready,
            election=leases.election("me"),
        )
    )

    def probe() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            body: bytes = r.read()  # typeshed types urlopen's answer as Any
            return body.decode()

    deadline = time.monotonic() + 10
    answer = ""
    while time.monotonic() < deadline and not answer:
        with contextlib.suppress(OSError):
            answer = await asyncio.to_thread(probe)
        await asyncio.sleep(0.1)
    assert '"standby"' in answer  # alive while standing by
    assert not ready.is_set() and leader(container) == 0
    await other.release()
    await asyncio.wait_for(ready.wait(), 30)  # now it leads and kopf runs
    assert leases.holder() == "me" and leader(container) == 1
    stop.set()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert leases.holder() is None  # released on a clean stop
