#!/usr/bin/env python3
"""A real Kubernetes node on top of the local stack (`stack.py up --node` runs this):
containerd with runc and the CNI bridge, kubelet, kube-scheduler and kube-proxy, as plain
processes, like the servers. Needs root, Debian's containerd, runc and CNI plugins (installed
when missing), podman (for the images) and a C compiler (the pause binary).

    node.py up                start the node and wait until the Node is Ready
    node.py down              remove every pod sandbox, stop the processes, unmount, clean up
    node.py status            one line per process; exit 1 unless all are healthy
    node.py load IMAGE...     copy podman images into the node's containerd (`ctr import`)

State lives beside the stack's (.stack/): conf/node/, data/containerd, data/kubelet, logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import ssl
import subprocess
import sys
import time
from pathlib import Path

import stack
from stack import NODE_ADDRESS, NODE_BRIDGE, NODE_ORDER, NODE_POD_CIDR, STATE, StackError, say

NODE_NAME = "qmtl-node"
PAUSE_IMAGE = "localhost/qmtl-pause:1"
PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "/usr/lib/cni/bridge": "containernetworking-plugins",
    "podman": "podman",  # the images (make image) and the pause image
}
CONF = STATE / "conf" / "node"
# containerd's state holds sockets and mounts: short and off the project tree
RUN = Path("/run/qmtl-node")
CNI_BIN = Path("/usr/lib/cni")
CRICTL_VERSION = "v1.37.0"


def sock() -> Path:
    return RUN / "containerd.sock"


def crictl() -> list[str]:
    binary = stack.CACHE / f"crictl-{CRICTL_VERSION}" / "bin" / "crictl"
    return [str(binary), f"--runtime-endpoint=unix://{sock()}", "--timeout=30s"]


def ctr(*args: str) -> list[str]:
    return ["ctr", f"--address={sock()}", "--namespace=k8s.io", *args]


# --------------------------------------------------------------------------- prerequisites


def ensure_tools() -> None:
    if os.geteuid() != 0:
        raise StackError("a node needs root (mounts, cgroups, network namespaces)")
    missing = sorted(
        {pkg for tool, pkg in PACKAGES.items() if not (shutil.which(tool) or Path(tool).exists())}
    )
    if missing:
        say(f"installing {' '.join(missing)} (Debian packages)")
        install = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]
        try:
            stack.run(install)
        except StackError:  # a fresh machine: no package lists yet
            stack.run(["apt-get", "update", "-qq"])
            stack.run(install)
    for tool in ("podman", "cc", "go"):
        if shutil.which(tool) is None:
            raise StackError(f"`{tool}` is not on PATH (the node needs it; see README: Install)")
    binary = Path(crictl()[0])
    if not binary.exists():
        say(f"building crictl {CRICTL_VERSION} from the Go module proxy (once)")
        env = {**os.environ, "GOBIN": str(binary.parent), "CGO_ENABLED": "0"}
        r = subprocess.run(
            ["go", "install", f"sigs.k8s.io/cri-tools/cmd/crictl@{CRICTL_VERSION}"],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise StackError(f"building crictl failed:\n{r.stderr[-2000:]}")
    for b in ("kubelet", "kube-scheduler", "kube-proxy"):
        if not stack.kube_bin(b).exists():
            stack.run(["bash", str(stack.HERE / "build-kube.sh"), "--node"])
            break


def pause_archive() -> Path:
    """A one-file image holding the static pause binary, as a docker archive (cached)."""
    out = stack.CACHE / "pause-1"
    archive = out / "pause.tar"
    if archive.exists():
        return archive
    out.mkdir(parents=True, exist_ok=True)
    root = out / "rootfs"
    root.mkdir(exist_ok=True)
    stack.run(
        ["cc", "-static", "-Os", "-s", "-o", str(root / "pause"), str(stack.HERE / "pause.c")]
    )
    stack.run(["tar", "-C", str(root), "-cf", str(out / "rootfs.tar"), "pause"])
    env = podman_env()
    for argv in (
        [
            "podman",
            "import",
            "--change",
            'ENTRYPOINT ["/pause"]',
            str(out / "rootfs.tar"),
            PAUSE_IMAGE,
        ],
        ["podman", "save", "-o", str(archive) + ".part", PAUSE_IMAGE],
    ):
        r = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise StackError(f"{' '.join(argv)} failed:\n{r.stderr}")
    Path(str(archive) + ".part").rename(archive)
    return archive


def podman_env() -> dict[str, str]:
    return {
        **os.environ,
        "CONTAINERS_CONF": str(stack.PROJECT / "hack" / "image" / "containers.conf"),
    }


# --------------------------------------------------------------------------- configuration


def node_cert() -> None:
    """The kubelet's client certificate: user system:node:<name> in group system:nodes."""
    if not (STATE / "pki" / "kubelet.crt").exists():
        stack.pki_cert(
            "kubelet",
            f"/O=system:nodes/CN=system:node:{NODE_NAME}",
            "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
        )


def containerd_config() -> Path:
    data = STATE / "data"
    text = f"""version = 2
root = "{data / "containerd"}"
state = "{RUN / "state"}"
[grpc]
  address = "{sock()}"
[ttrpc]
  address = "{sock()}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{data / "containerd-opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  disable_apparmor = true
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        BinaryName = "{shutil.which("runc") or "runc"}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN}"
    conf_dir = "{CONF / "cni"}"
"""
    path = CONF / "containerd.toml"
    path.write_text(text)
    cni = CONF / "cni"
    cni.mkdir(exist_ok=True)
    net = {
        "cniVersion": "0.4.0",
        "name": "qmtl-pods",
        "plugins": [
            {
                "type": "bridge",
                "bridge": NODE_BRIDGE,
                "isGateway": True,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(data / "cni"),
                    "ranges": [[{"subnet": NODE_POD_CIDR, "gateway": NODE_ADDRESS}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }
    (cni / "10-qmtl-pods.conflist").write_text(json.dumps(net, indent=2))
    return path


def kubelet_config(ports: dict[str, int]) -> Path:
    pki = STATE / "pki"
    cfg = {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        # this machine's cgroups are v1 (a hybrid layout); the kubelet refuses that by default
        "failCgroupV1": False,
        "cgroupDriver": "cgroupfs",
        "containerRuntimeEndpoint": f"unix://{sock()}",
        "address": NODE_ADDRESS,
        "port": ports["kubelet"],
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": ports["kubelet_healthz"],
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(pki / "ca.crt")},
        },
        "authorization": {"mode": "AlwaysAllow"},
        "clusterDomain": "cluster.local",
        "resolvConf": "/etc/resolv.conf",
        "failSwapOn": False,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "syncFrequency": "10s",
        "fileCheckFrequency": "10s",
        "nodeStatusUpdateFrequency": "5s",
        "registerNode": True,
        "maxPods": 50,
    }
    path = CONF / "kubelet.yaml"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is YAML
    return path


def proxy_config(ports: dict[str, int], kubeconfig: Path) -> Path:
    cfg = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "hostnameOverride": NODE_NAME,
        "mode": "iptables",
        "clusterCIDR": NODE_POD_CIDR,
        "healthzBindAddress": f"127.0.0.1:{ports['proxy_healthz']}",
        "metricsBindAddress": f"127.0.0.1:{ports['proxy_metrics']}",
        # leave the machine's conntrack sysctls alone (not writable here)
        "conntrack": {"maxPerCore": 0, "min": 0},
    }
    path = CONF / "kube-proxy.yaml"
    path.write_text(json.dumps(cfg, indent=2))
    return path


# --------------------------------------------------------------------------- probes


def probe_containerd() -> str | None:
    r = subprocess.run(ctr("version"), capture_output=True, text=True, check=False)
    return None if r.returncode == 0 else (r.stderr.strip()[-200:] or "no answer")


def probe_node(api_port: int) -> str | None:
    body = stack.http_get(
        f"https://127.0.0.1:{api_port}/api/v1/nodes/{NODE_NAME}", stack.https_client_context()
    )
    for cond in json.loads(body).get("status", {}).get("conditions", []):
        if cond.get("type") == "Ready":
            return (
                None
                if cond.get("status") == "True"
                else f"Ready={cond.get('status')}: {cond.get('message')}"
            )
    return "no Ready condition yet"


def probe_http(url: str) -> str | None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # self-signed serving certificates
    stack.http_get(url, ctx)
    return None


def node_probes(ports: dict[str, int], api_port: int) -> dict[str, object]:
    return {
        "containerd": probe_containerd,
        "kube-scheduler": lambda: probe_http(f"https://127.0.0.1:{ports['scheduler']}/healthz"),
        "kubelet": lambda: probe_node(api_port),
        "kube-proxy": lambda: probe_http(f"http://127.0.0.1:{ports['proxy_healthz']}/healthz"),
    }


def load_ports() -> tuple[dict[str, int], int]:
    try:
        api_port = int(json.loads((STATE / "ports.json").read_text())["apiserver"])
    except (OSError, ValueError, KeyError) as e:
        raise StackError(f"no running stack: run `stack.py up --node` ({e})") from e
    try:
        ports = {k: int(v) for k, v in json.loads((CONF / "ports.json").read_text()).items()}
    except (OSError, ValueError):
        ports = {}
    return ports, api_port


# --------------------------------------------------------------------------- up / down


def up(timeout: float) -> None:
    t0 = time.monotonic()
    ensure_tools()
    ports, api_port = load_ports()
    if ports and all(stack.running_pid(n) for n in NODE_ORDER) and status(quiet=True):
        say("node already up")
        return
    if any(stack.running_pid(n) for n in NODE_ORDER):
        down()
    CONF.mkdir(parents=True, exist_ok=True)
    RUN.mkdir(parents=True, exist_ok=True)
    ports = {
        n: stack.free_port()
        for n in ("kubelet", "kubelet_healthz", "scheduler", "proxy_healthz", "proxy_metrics")
    }
    (CONF / "ports.json").write_text(json.dumps(ports))
    stack.node_bridge()
    node_cert()
    admin = STATE / "kubeconfig"  # the stack's own, with the admin certificate
    kubelet_kc = stack.write_kubeconfig(
        api_port, f"system:node:{NODE_NAME}", "kubelet", CONF / "kubelet.kubeconfig"
    )
    probes = node_probes(ports, api_port)

    stack.start("containerd", ["containerd", "--config", str(containerd_config())])
    stack.wait_until("containerd", probes["containerd"], timeout)  # type: ignore[arg-type]
    load_archive(pause_archive())

    stack.start(
        "kube-scheduler",
        [
            str(stack.kube_bin("kube-scheduler")),
            f"--kubeconfig={admin}",
            f"--authentication-kubeconfig={admin}",
            f"--authorization-kubeconfig={admin}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={ports['scheduler']}",
        ],
    )
    stack.start(
        "kubelet",
        [
            str(stack.kube_bin("kubelet")),
            f"--config={kubelet_config(ports)}",
            f"--kubeconfig={kubelet_kc}",
            f"--root-dir={STATE / 'data' / 'kubelet'}",
            f"--cert-dir={STATE / 'data' / 'kubelet-pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={NODE_ADDRESS}",
            "--v=1",
        ],
    )
    stack.start(
        "kube-proxy",
        [str(stack.kube_bin("kube-proxy")), f"--config={proxy_config(ports, admin)}", "--v=1"],
    )
    for name in ("kube-scheduler", "kubelet", "kube-proxy"):
        stack.wait_until(name, probes[name], timeout)  # type: ignore[arg-type]
    say(f"node {NODE_NAME} Ready at {NODE_ADDRESS} in {time.monotonic() - t0:.1f} s")


def load_archive(archive: Path) -> None:
    r = subprocess.run(
        ctr("images", "import", str(archive)), capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise StackError(f"ctr images import {archive.name} failed:\n{r.stderr}")


def load(images: list[str]) -> None:
    """Copy images from podman's store into the node's containerd."""
    out = STATE / "images"
    out.mkdir(parents=True, exist_ok=True)
    for image in images:
        t0 = time.monotonic()
        archive = out / (image.replace("/", "_").replace(":", "_") + ".tar")
        archive.unlink(missing_ok=True)
        r = subprocess.run(
            ["podman", "save", "-o", str(archive), image],
            env=podman_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        if r.returncode != 0:
            raise StackError(f"podman save {image} failed:\n{r.stderr}")
        load_archive(archive)
        archive.unlink()
        say(f"loaded {image} into the node in {time.monotonic() - t0:.1f} s")


def _mounts_under(*roots: Path) -> list[str]:
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].replace("\\040", " ")
        if any(point == str(r) or point.startswith(f"{r}/") for r in roots):
            points.append(point)
    return sorted(points, key=len, reverse=True)


def down() -> None:
    """Every pod sandbox removed through CRI (CNI teardown included) while containerd still
    runs, then the processes stopped, leftover mounts unmounted, kube-proxy's rules removed."""
    for name in ("kube-proxy", "kubelet", "kube-scheduler"):
        stack.stop(name)
    if stack.running_pid("containerd") is not None:
        for argv in ([*crictl(), "rmp", "--all", "--force"],):
            r = subprocess.run(argv, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                say(f"{' '.join(argv[:1] + argv[3:])}: {r.stderr.strip()[-300:]}")
        stack.stop("containerd")
    for point in _mounts_under(STATE, RUN):
        subprocess.run(["umount", "-l", point], capture_output=True, check=False)
    proxy = stack.kube_bin("kube-proxy")
    if proxy.exists():
        subprocess.run([str(proxy), "--cleanup"], capture_output=True, check=False)
    drop_kube_chains()
    subprocess.run(["ip", "link", "del", NODE_BRIDGE], capture_output=True, check=False)
    shutil.rmtree(RUN, ignore_errors=True)
    say("node down")


def drop_kube_chains() -> None:
    """The kubelet's own chains (KUBE-FIREWALL, KUBE-KUBELET-CANARY), which `kube-proxy
    --cleanup` leaves: the jumps into them, then the chains."""
    for tool in ("iptables", "ip6tables"):
        if shutil.which(tool) is None:
            continue
        for table in ("filter", "nat", "mangle"):
            rules = subprocess.run(
                [tool, "-t", table, "-S"], capture_output=True, text=True, check=False
            ).stdout.splitlines()
            chains = [r.split()[1] for r in rules if r.startswith("-N KUBE-")]
            for rule in rules:
                words = shlex.split(rule)
                if words[:1] == ["-A"] and not words[1].startswith("KUBE-") and "KUBE-" in rule:
                    subprocess.run(
                        [tool, "-t", table, "-D", *words[1:]], capture_output=True, check=False
                    )
            for chain in chains:
                subprocess.run([tool, "-t", table, "-F", chain], capture_output=True, check=False)
            for chain in chains:
                subprocess.run([tool, "-t", table, "-X", chain], capture_output=True, check=False)


def status(quiet: bool = False) -> bool:
    ports, api_port = load_ports()
    if not ports:
        if not quiet:
            print("node: not started")
        return False
    probes = node_probes(ports, api_port)
    healthy = True
    for name in NODE_ORDER:
        pid = stack.running_pid(name)
        if pid is None:
            state, healthy = "stopped", False
        else:
            try:
                reason = probes[name]()  # type: ignore[operator]
            except (OSError, ValueError, ssl.SSLError) as e:
                reason = f"{type(e).__name__}: {e}"
            state = "healthy" if not reason else f"unhealthy ({reason})"
            healthy = healthy and not reason
        if not quiet:
            print(f"{name:<24} {state:<10} pid={pid or '-':<8}")
    return healthy


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("up").add_argument("--timeout", type=float, default=180.0)
    sub.add_parser("down")
    sub.add_parser("status").add_argument("--quiet", action="store_true")
    sub.add_parser("load").add_argument("images", nargs="+")
    args = ap.parse_args()
    try:
        if args.cmd == "up":
            up(args.timeout)
        elif args.cmd == "down":
            down()
        elif args.cmd == "status":
            return 0 if status(args.quiet) else 1
        elif args.cmd == "load":
            load(args.images)
    except StackError as e:
        print(f"[node] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
