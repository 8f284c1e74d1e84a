"""Memory of the operator with many StrategyDAGs: `dagmanager operator` runs as its own process
on the local stack; the bench applies `--count` StrategyDAGs of `--nodes` nodes, waits until
all are Ready, lets a resync pass over them, and reads the process's resident set (VmRSS) and
its peak (VmHWM) from /proc at each step. Everything it applies is deleted again.

    python bench/operator_rss.py [--count 1000] [--nodes 10] [--resync 60]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any, cast

import orjson
from kubernetes import client, config
from kubernetes.client.rest import RESTResponseType

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import backend_env, free_port, stack_env  # noqa: E402
from bench.operator_bench import bodies_for, install_crds, ready_count  # noqa: E402
from qmtl_dagmanager.api.v1alpha1 import strategydag  # noqa: E402

GOAL_MB = 150


def memory(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a process in MB."""
    fields: dict[str, float] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields["VmRSS"], fields["VmHWM"]


def count_items(custom: client.CustomObjectsApi, ns: str) -> int:
    raw = cast(  # not preloaded: the client answers with the HTTP response
        RESTResponseType,
        custom.list_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL, _preload_content=False
        ),
    )
    return len(orjson.loads(raw.data)["items"])


def alive(url: str) -> bool:
    """Whether the operator's liveness endpoint answers (kopf is up and watching)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def delete(custom: client.CustomObjectsApi, ns: str, name: str) -> None:
    with contextlib.suppress(client.ApiException):  # never created, or gone already
        custom.delete_namespaced_custom_object(
            strategydag.GROUP, strategydag.VERSION, ns, strategydag.PLURAL, name
        )


async def until(predicate: Any, limit: float, what: str, proc: subprocess.Popen[bytes]) -> None:
    start = time.perf_counter()
    while not await asyncio.to_thread(predicate):
        if proc.poll() is not None:
            raise SystemExit(f"the operator exited with {proc.returncode} while {what}")
        if time.perf_counter() - start > limit:
            raise SystemExit(f"timed out after {limit:.0f} s waiting for {what}")
        await asyncio.sleep(2.0)


def line(step: str, pid: int, started: float) -> None:
    rss, peak = memory(pid)
    print(
        f"[rss] {time.perf_counter() - started:6.0f} s  {step:<34} RSS {rss:6.1f} MB  "
        f"(peak {peak:6.1f} MB)",
        flush=True,
    )


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--resync", type=float, default=60.0, help="the operator's resync period")
    args = ap.parse_args()
    e = stack_env()
    api_client = config.new_client_from_config(config_file=e["KUBECONFIG"])
    install_crds(api_client)
    core = client.CoreV1Api(api_client)
    custom = client.CustomObjectsApi(api_client)
    ns = f"rss-{uuid.uuid4().hex[:6]}"
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name=ns)))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("NEO4J_", "KAFKA_"))},
        "KUBECONFIG": e["KUBECONFIG"],
        **backend_env(e),
        "QMTL_GC_INTERVAL_SECONDS": "0",
        "QMTL_LOG_LEVEL": "warning",
    }
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "qmtl_dagmanager.cli",
            "operator",
            "--namespace",
            ns,
            "--leader-election",
            "none",
            "--resync",
            str(args.resync),
            "--liveness",
            liveness,
        ],
        env=env,
    )
    print(
        f"[rss] machine: {platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}; {args.count} StrategyDAGs x {args.nodes} nodes, "
        f"resync {args.resync:g} s",
        flush=True,
    )
    started = time.perf_counter()
    bodies = bodies_for(args.count, args.nodes, uuid.uuid4().hex[:6])
    try:
        await until(lambda: alive(liveness), 60, "starting", proc)
        line("idle, watching", proc.pid, started)
        for i in range(0, len(bodies), 100):
            await asyncio.gather(
                *(
                    asyncio.to_thread(
                        custom.create_namespaced_custom_object,
                        strategydag.GROUP,
                        strategydag.VERSION,
                        ns,
                        strategydag.PLURAL,
                        b,
                    )
                    for b in bodies[i : i + 100]
                )
            )
            print(f"[rss] applied {i + 100}/{len(bodies)}", flush=True)
        line(f"{args.count} applied", proc.pid, started)
        await until(lambda: ready_count(custom, ns) >= args.count, 1800, "waiting for Ready", proc)
        line(f"all {args.count} Ready", proc.pid, started)
        await asyncio.sleep(args.resync * 1.5)
        line("after a resync of all", proc.pid, started)
        rss, peak = memory(proc.pid)
        print(
            f"[rss] operator with {args.count} StrategyDAGs: RSS {rss:.1f} MB, peak "
            f"{peak:.1f} MB (goal <= {GOAL_MB} MB)",
            flush=True,
        )
    finally:
        for i in range(0, len(bodies), 100):
            await asyncio.gather(
                *(
                    asyncio.to_thread(delete, custom, ns, b["metadata"]["name"])
                    for b in bodies[i : i + 100]
                )
            )
        with contextlib.suppress(SystemExit):
            await until(lambda: count_items(custom, ns) == 0, 900, "finalizers", proc)
        proc.terminate()
        proc.wait(60)
        core.delete_namespace(ns)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
