"""The chart on a real cluster, as hack/e2e/chart.sh installs it (`make e2e-node`, `make
e2e-kind`): the operator's pods Available through their real probes, holding the Lease with
the ServiceAccount's credentials; the sidecar beside a Gateway stand-in answering on the
pod's loopback; failover to the second replica; `helm upgrade` rolling the pods; `helm
uninstall` keeping the CRDs and the resources. The tests run in file order and build on each
other (the last one uninstalls the release)."""

from __future__ import annotations

import calendar
import json
import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent.parent
NS = os.environ.get("QMTL_E2E_NAMESPACE", "qmtl-system")
RELEASE = os.environ.get("QMTL_E2E_RELEASE", "qmtl-dagmanager")
HELM = os.environ.get("QMTL_E2E_HELM", "")
LEASE = "qmtl-dagmanager-operator"
T = TypeVar("T")

pytestmark = pytest.mark.chart


@pytest.fixture(scope="module", autouse=True)
def _installed() -> None:
    if not HELM:
        pytest.fail(
            "tests/chart runs on a cluster where hack/e2e/chart.sh installed the chart "
            "(make e2e-node or make e2e-kind), which sets QMTL_E2E_HELM",
            pytrace=False,
        )


def kubectl(*args: str, check: bool = True, timeout: float = 120) -> str:
    r = subprocess.run(
        ["kubectl", *args], capture_output=True, text=True, check=False, timeout=timeout
    )
    if check and r.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} failed:\n{r.stdout}{r.stderr}")
    return r.stdout


def get(kind: str, name: str = "", ns: str = NS, selector: str = "") -> Any:
    args = ["-n", ns, "get", kind, *([name] if name else []), "-o", "json"]
    if selector:
        args += ["-l", selector]
    return json.loads(kubectl(*args))


def until(probe: Callable[[], T | None], timeout: float, what: str) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def operator_pods() -> list[dict[str, Any]]:
    pods = get("pods", selector="app.kubernetes.io/component=operator")["items"]
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


def ready(pod: dict[str, Any]) -> bool:
    conds = (pod.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def holder() -> str:
    spec = get("lease", LEASE).get("spec") or {}
    return str(spec.get("holderIdentity") or "")


def figure(line: str) -> None:
    """A measured figure of this run, for the script to print at the end."""
    out = Path(os.environ.get("QMTL_E2E_FIGURES", ROOT / ".stack" / "e2e-figures.txt"))
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write(line + "\n")


def helm(*args: str) -> str:
    r = subprocess.run([HELM, *args], capture_output=True, text=True, check=False, timeout=600)
    assert r.returncode == 0, f"helm {' '.join(args)} failed:\n{r.stdout}{r.stderr}"
    return r.stdout


@pytest.fixture(scope="module")
def workspace() -> Iterator[str]:
    """A namespace for this module's StrategyDAGs, removed at the end (finalizers lifted
    first: the last test uninstalls the operator that would have cleared them)."""
    ns = f"chart-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    yield ns
    for name in get("strategydags", ns=ns)["items"]:
        kubectl(
            "-n",
            ns,
            "patch",
            "strategydag",
            name["metadata"]["name"],
            "--type=merge",
            "-p",
            '{"metadata":{"finalizers":[]}}',
            check=False,
        )
    kubectl("delete", "namespace", ns, "--wait=false", check=False)


def apply_strategy(ns: str) -> str:
    doc = yaml.safe_load((ROOT / "manifests" / "samples" / "strategydag.yaml").read_text())
    name = f"chart-{uuid.uuid4().hex[:6]}"
    doc["metadata"] = {"name": name, "namespace": ns}
    doc["spec"]["strategyId"] = name
    subprocess.run(
        ["kubectl", "apply", "-f", "-"], input=yaml.safe_dump(doc), text=True, check=True
    )
    return name


def strategy_ready(ns: str, name: str) -> bool:
    obj = get("strategydag", name, ns=ns)
    conds = (obj.get("status") or {}).get("conditions") or []
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


def test_operator_pods_pass_their_probes_and_one_holds_the_lease() -> None:
    deploy = get("deployment", RELEASE)
    assert deploy["status"].get("availableReplicas") == 2
    pods = operator_pods()
    assert len(pods) == 2 and all(ready(p) for p in pods)
    for pod in pods:
        c = pod["spec"]["containers"][0]
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/healthz"
        assert all(s["restartCount"] == 0 for s in pod["status"]["containerStatuses"])
        # logs in from its ServiceAccount: no kubeconfig anywhere, the projected token mounted
        assert pod["spec"]["serviceAccountName"] == RELEASE
        assert not any(e["name"] == "KUBECONFIG" for e in c.get("env", []))
    names = {p["metadata"]["name"] for p in pods}
    assert until(lambda: holder() in names, 60, "an operator pod holding the Lease")
    leader = holder()
    # the process: uid 10001, a read-only root, nothing but /tmp writable, no capabilities
    out = kubectl(
        "-n",
        NS,
        "exec",
        leader,
        "--",
        "python3",
        "-c",
        "import os, pathlib\n"
        "print(os.getuid(), os.getgid())\n"
        "st = pathlib.Path('/proc/self/status').read_text().splitlines()\n"
        "print([l.split()[1] for l in st if l.startswith('CapEff')][0])\n"
        "pathlib.Path('/tmp/probe').write_text('x')\n"
        "try:\n"
        "    pathlib.Path('/opt/probe').write_text('x')\n"
        "    print('root writable')\n"
        "except OSError as e:\n"
        "    print('root read-only', e.errno)\n",
    )
    uid_line, caps, root = out.strip().splitlines()
    assert uid_line == "10001 10001"
    assert int(caps, 16) == 0
    assert root == "root read-only 30"  # EROFS


def test_the_sidecar_answers_the_gateway_on_the_pods_loopback() -> None:
    pods = get("pods", selector="app=gateway-standin")["items"]
    pods = [p for p in pods if not p["metadata"].get("deletionTimestamp")]
    assert len(pods) == 1 and ready(pods[0])
    pod = pods[0]["metadata"]["name"]
    statuses = {s["name"]: s for s in pods[0]["status"]["containerStatuses"]}
    assert statuses["dagmanager"]["ready"] and statuses["dagmanager"]["restartCount"] == 0
    strategy = f"gw-{uuid.uuid4().hex[:6]}"
    out = kubectl(
        "-n",
        NS,
        "exec",
        pod,
        "-c",
        "gateway",
        "--",
        "dagmanager",
        "diff",
        "--target",
        "127.0.0.1:50051",
        "--file",
        "/etc/gateway/dag.json",
        "--strategy",
        strategy,
        "--output",
        "json",
    )
    reply = json.loads(out)
    nodes = reply["nodes"]
    assert nodes and all(n["topic"] for n in nodes if n["node_type"] != "TagQueryNode"), reply
    # from the pod's own IP (what any other pod would use): only the probe ports answer
    probe = (
        "import socket\n"
        "ip = socket.gethostbyname(socket.gethostname())\n"
        "for port in (50051, 8001, 50052, 8002):\n"
        "    s = socket.socket()\n"
        "    s.settimeout(2)\n"
        "    print(port, s.connect_ex((ip, port)) == 0)\n"
        "    s.close()\n"
    )
    got = kubectl("-n", NS, "exec", pod, "-c", "gateway", "--", "python3", "-c", probe)
    assert got.split() == ["50051", "False", "8001", "False", "50052", "True", "8002", "True"]
    # the probes kept passing: no restart after several liveness periods
    time.sleep(max(0.0, 25 - age_seconds(pods[0])))
    again = get("pod", pod)
    assert all(s["restartCount"] == 0 for s in again["status"]["containerStatuses"])
    assert ready(again)


def test_cli_verbs_run_in_the_image_beside_the_sidecar() -> None:
    """The image's CLI, run where an operator would run it: in the Gateway's pod, against the
    sidecar on loopback and, with the sidecar's settings, against the stack itself."""
    pod = next(
        p["metadata"]["name"]
        for p in get("pods", selector="app=gateway-standin")["items"]
        if not p["metadata"].get("deletionTimestamp")
    )

    def run(container: str, *argv: str) -> str:
        return kubectl("-n", NS, "exec", pod, "-c", container, "--", "dagmanager", *argv)

    plan = json.loads(
        run("gateway", "diff", "--dry-run", "--file", "/etc/gateway/dag.json", "--output", "json")
    )
    assert plan["nodes"]
    assert "CREATE CONSTRAINT" in run("gateway", "export-schema")
    stats = run("gateway", "queue-stats", "--target", "127.0.0.1:50051")
    for line in stats.splitlines():  # "<messages>  <topic>"
        count, topic = line.split()
        assert int(count) >= 0 and topic
    gc = json.loads(run("gateway", "gc", "--dry-run", "--target", "127.0.0.1:8001"))
    assert isinstance(gc, dict) and gc, gc
    # the sidecar's own settings reach the real graph: the schema step is idempotent
    out = run("dagmanager", "--config", "/etc/dagmanager/dagmanager.yaml", "neo4j-init")
    assert out.startswith(("schema ready on bolt://", "schema ready on bolt+s://"))


def age_seconds(pod: dict[str, Any]) -> float:
    started = time.strptime(pod["status"]["startTime"], "%Y-%m-%dT%H:%M:%SZ")
    return time.time() - calendar.timegm(started)


def test_the_chart_installs_the_alert_rules_and_the_dashboard(tmp_path: Path) -> None:
    """The PrometheusRule (accepted by the apiserver against the Prometheus Operator's real
    CRD schema) holds the rule file with the runbook links filled in, and promtool accepts
    what the cluster stores; the dashboard ConfigMap holds the dashboard; the operator has a
    ServiceMonitor."""
    runbooks = os.environ.get("QMTL_E2E_RUNBOOKS", "")
    assert runbooks, "hack/e2e/chart.sh sets QMTL_E2E_RUNBOOKS"
    rule = get("prometheusrule", RELEASE)
    raw = ROOT / "charts" / "qmtl-dagmanager" / "files" / "rules" / "qmtl-dagmanager.rules.yaml"
    want = yaml.safe_load(raw.read_text().replace("@RUNBOOKS@", runbooks))
    groups = rule["spec"]["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert set(alerts) == {r["alert"] for g in want["groups"] for r in g["rules"] if "alert" in r}
    assert alerts["QueueCreateErrors"]["labels"]["severity"] == "critical"
    assert alerts["DiffDurationHigh"]["annotations"]["runbook_url"] == (
        f"{runbooks}/DiffDurationHigh.md"
    )
    stored = tmp_path / "stored.rules.yaml"
    stored.write_text(yaml.safe_dump({"groups": groups}))
    promtool = subprocess.run(
        ["bash", str(ROOT / "hack" / "stack" / "build-promtool.sh")],
        capture_output=True, text=True, check=True,
    ).stdout.split()[-1]  # fmt: skip
    check = subprocess.run(
        [promtool, "check", "rules", str(stored)], capture_output=True, text=True, check=False
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert f"SUCCESS: {sum(len(g['rules']) for g in want['groups'])} rules found" in check.stdout
    board = get("configmap", f"{RELEASE}-dashboard")
    dashboard = json.loads(board["data"]["qmtl-dagmanager.json"])
    assert dashboard["uid"] == "qmtl-dagmanager"
    links = {lk["url"] for p in dashboard["panels"] for lk in p.get("links", [])}
    assert f"{runbooks}/CrossContextCacheHit.md" in links
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    monitor = get("servicemonitor", RELEASE)
    assert monitor["spec"]["endpoints"], monitor["spec"]


def test_killing_the_leader_fails_over_to_the_second_replica(workspace: str) -> None:
    leader = holder()
    standby = next(
        p["metadata"]["name"] for p in operator_pods() if p["metadata"]["name"] != leader
    )
    t0 = time.monotonic()
    kubectl("-n", NS, "delete", "pod", leader, "--grace-period=0", "--force", "--wait=false")
    try:
        until(lambda: holder() == standby, 120, f"{standby} taking the Lease")
    except AssertionError as e:
        state = kubectl("-n", NS, "get", "lease,pods", "-o", "wide", check=False)
        logs = kubectl("-n", NS, "logs", standby, "--tail=40", check=False)
        raise AssertionError(f"{e}\n{state}\n{standby}'s log:\n{logs}") from e
    took = time.monotonic() - t0
    figure(f"failover: {standby} took the Lease {took:.1f} s after {leader} was killed")
    name = apply_strategy(workspace)
    until(lambda: strategy_ready(workspace, name), 120, "a StrategyDAG Ready under the new leader")
    # the Deployment replaces the killed pod: two replicas again
    until(
        lambda: get("deployment", RELEASE)["status"].get("availableReplicas") == 2,
        180,
        "two operator replicas again",
    )


def test_helm_upgrade_with_changed_values_rolls_the_pods() -> None:
    before = {p["metadata"]["name"] for p in operator_pods()}
    t0 = time.monotonic()
    helm(
        "upgrade",
        RELEASE,
        str(ROOT / "charts" / "qmtl-dagmanager"),
        "-n",
        NS,
        "--reuse-values",
        "--set",
        "operator.logLevel=debug",
    )

    def rolled() -> bool:
        pods = operator_pods()
        names = {p["metadata"]["name"] for p in pods}
        return len(pods) == 2 and not names & before and all(ready(p) for p in pods)

    until(rolled, 240, "the upgraded pods Ready")
    figure(f"helm upgrade: both operator pods replaced and Ready in {time.monotonic() - t0:.1f} s")
    for pod in operator_pods():
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        assert env["QMTL_LOG_LEVEL"] == "debug"
    until(lambda: holder() in {p["metadata"]["name"] for p in operator_pods()}, 120, "the Lease")


def test_helm_uninstall_keeps_the_crds_and_the_resources(workspace: str) -> None:
    name = apply_strategy(workspace)
    until(lambda: strategy_ready(workspace, name), 120, "a StrategyDAG Ready")
    helm("uninstall", RELEASE, "-n", NS, "--wait", "--timeout", "180s")
    assert kubectl("-n", NS, "get", "deployment", RELEASE, check=False).strip() == ""
    crds = json.loads(kubectl("get", "crd", "-o", "json"))["items"]
    names = {c["metadata"]["name"] for c in crds}
    assert {"strategydags.qmtl.io", "versionsentinels.qmtl.io"} <= names
    kept = {o["metadata"]["name"] for o in get("strategydags", ns=workspace)["items"]}
    assert name in kept
