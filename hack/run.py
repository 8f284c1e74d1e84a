"""`make run`: the whole product on one machine, with progress the whole way.

1. the cluster: $KUBECONFIG when set (with NEO4J_* and KAFKA_BOOTSTRAP_SERVERS from the
   environment), else the local stack (started if it is not running);
2. the CRDs; 3. `dagmanager operator` and `dagmanager server` (the sidecar) as processes, their
   logs in .stack/logs/; 4. the samples of manifests/samples/; 5. the StrategyDAG becoming Ready
   and the canary stepping to Promoted, line by line; then how to call the sidecar.
Ctrl-C stops the two processes (and the local stack, if this run started it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes import client, config

ROOT = Path(__file__).resolve().parent.parent
STACK = [sys.executable, str(ROOT / "hack" / "stack" / "stack.py")]
BIN = Path(sys.executable).parent / "dagmanager"
KEYS = ("KUBECONFIG", "NEO4J_URI", "NEO4J_USER", "NEO4J_PASSWORD", "KAFKA_BOOTSTRAP_SERVERS")


def say(msg: str) -> None:
    print(f"[run] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def stack_env() -> tuple[dict[str, str], bool]:
    """Endpoints, and whether this run started the local stack."""
    if all(os.environ.get(k) for k in KEYS):
        say(f"using the cluster of KUBECONFIG={os.environ['KUBECONFIG']}")
        return {k: os.environ[k] for k in KEYS}, False
    started = False
    if subprocess.run([*STACK, "status"], capture_output=True, check=False).returncode != 0:
        say("starting the local stack (etcd, kube-apiserver, Kafka, Neo4j; first run builds them)")
        subprocess.run([*STACK, "up"], check=True)
        started = True
    env: dict[str, str] = {}
    for line in (ROOT / ".stack" / "env").read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        env[key.strip()] = value.strip()
    say("local stack is up")
    return env, started


def apply(api: client.ApiClient, doc: dict[str, Any]) -> None:
    kind = doc["kind"]
    if kind == "CustomResourceDefinition":
        ext = client.ApiextensionsV1Api(api)
        try:
            # the client sends the manifest's dict as it is; the stub asks for the model
            ext.create_custom_resource_definition(cast(Any, doc))
        except client.ApiException as e:
            if e.status != 409:
                raise
            ext.patch_custom_resource_definition(doc["metadata"]["name"], doc)
        return
    group, version = doc["apiVersion"].split("/")
    plural = {"StrategyDAG": "strategydags", "VersionSentinel": "versionsentinels"}[kind]
    custom = client.CustomObjectsApi(api)
    try:
        custom.create_namespaced_custom_object(group, version, "default", plural, doc)
    except client.ApiException as e:
        if e.status != 409:
            raise
        custom.patch_namespaced_custom_object(
            group, version, "default", plural, doc["metadata"]["name"], doc
        )


def established(api: client.ApiClient, name: str) -> bool:
    crd = client.ApiextensionsV1Api(api).read_custom_resource_definition(name)
    assert crd.status is not None
    return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])


def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    log = ROOT / ".stack" / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(BIN), *args],
        env={**os.environ, **env},
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    say(f"{name} started (pid {proc.pid}, log {log.relative_to(ROOT)})")
    return proc


def wait_http(url: str, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with {proc.returncode}: see its log in .stack/logs/")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2):
            say(f"{what} is up ({url})")
            return
        time.sleep(0.5)
    raise SystemExit(f"{what} did not answer {url} within {timeout:.0f} s")


def follow(api: client.ApiClient) -> None:
    """One line per change of the samples' state, until the canary is promoted."""
    custom = client.CustomObjectsApi(api)
    last: dict[str, str] = {}
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        for plural in ("strategydags", "versionsentinels"):
            items = cast(
                dict[str, Any],
                custom.list_namespaced_custom_object("qmtl.io", "v1alpha1", "default", plural),
            )
            for item in items["items"]:
                st = item.get("status") or {}
                if plural == "strategydags":
                    ready: dict[str, Any] = next(
                        (c for c in st.get("conditions") or [] if c["type"] == "Ready"), {}
                    )
                    line = (
                        f"StrategyDAG {item['metadata']['name']}: Ready={ready.get('status', '?')} "
                        f"({ready.get('reason', 'waiting')}), nodes {st.get('nodes', {})}"
                    )
                else:
                    line = (
                        f"VersionSentinel {item['metadata']['name']}: {st.get('phase', 'Pending')} "
                        f"weight {st.get('currentWeight', 0)} % (stable "
                        f"{st.get('stableWeight', 100)} %) - {st.get('message', '')}"
                    )
                key = f"{plural}/{item['metadata']['name']}"
                if last.get(key) != line:
                    last[key] = line
                    say(line)
                if plural == "versionsentinels" and st.get("phase") == "Promoted":
                    return
        time.sleep(1)
    say("the canary did not reach Promoted within 5 minutes: see .stack/logs/operator.log")


def main() -> int:
    env, started_stack = stack_env()
    os.environ["KUBECONFIG"] = env["KUBECONFIG"]
    api = config.new_client_from_config(config_file=env["KUBECONFIG"])
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        apply(api, crd)
        while not established(api, crd["metadata"]["name"]):
            time.sleep(0.3)
        say(f"CRD {crd['metadata']['name']} installed")
    procs: list[subprocess.Popen[bytes]] = []

    def stop(*_: Any) -> None:
        say("stopping")
        for p in procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(30)
        if started_stack:
            subprocess.run([*STACK, "down"], check=False)
        say("stopped")
        sys.exit(0)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    settings = {"QMTL_ARCHIVE_DIR": str(ROOT / ".stack" / "archive")}
    procs.append(
        start(
            "operator",
            ["operator", "--liveness", "http://127.0.0.1:8080/healthz", "--metrics-port", "8081"],
            {**env, **settings},
        )
    )
    wait_http("http://127.0.0.1:8080/healthz", "operator", procs[0])
    procs.append(start("sidecar", ["server"], {**env, **settings}))
    wait_http("http://127.0.0.1:8001/status", "sidecar", procs[1])
    for path in sorted((ROOT / "manifests" / "samples").glob("*.yaml")):
        apply(api, yaml.safe_load(path.read_text()))
        say(f"applied {path.relative_to(ROOT)}")
    follow(api)
    dag = ROOT / "tests" / "data" / "sample-dag.json"
    print(
        f"""
The operator and the sidecar are running (Ctrl-C stops them).
  .venv/bin/dagmanager diff --target 127.0.0.1:50051 --file {dag.relative_to(ROOT)} --world w1
  .venv/bin/dagmanager diff --file {dag.relative_to(ROOT)} --dry-run --output mermaid
  curl -s 127.0.0.1:8001/status ; curl -s 127.0.0.1:8081/metrics | grep dagmanager_
  KUBECONFIG={env["KUBECONFIG"]} kubectl get sdag,vsn
""",
        flush=True,
    )
    while all(p.poll() is None for p in procs):
        time.sleep(1)
    say("a process exited: see .stack/logs/")
    stop()
    return 1


if __name__ == "__main__":
    sys.exit(main())
