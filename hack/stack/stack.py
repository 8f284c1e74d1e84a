#!/usr/bin/env python3
"""The local stack of real servers, as plain processes: etcd, kube-apiserver,
kube-controller-manager, Kafka (KRaft), Neo4j and an S3-compatible object store (SeaweedFS).

    stack.py up [--timeout SECONDS] [--node] [--brokers 1|3]
                                      build or fetch what is missing, then start everything;
                                      --node adds a real node (containerd, kubelet,
                                      kube-scheduler, kube-proxy: node.py) and opens the
                                      servers to its pods on the node address; --brokers 3
                                      runs Kafka as three KRaft nodes (kafka, kafka-2, kafka-3)
    stack.py down                     stop exactly the processes `up` started (by PID)
    stack.py status                   one line per server; exit 1 unless all are healthy
    stack.py stop NAME                stop one server of a running stack (fault tests)
    stack.py kill NAME                SIGKILL it instead: a crash, no clean shutdown
    stack.py start NAME               start it again, same command, data and port
    stack.py kafka-leader             the Kafka node that is the active KRaft controller

Standard library only, so it runs before the project's virtualenv exists.
State lives in $QMTL_STACK_DIR (default: <project>/.stack): pki/, logs/, data/, pids/,
kubeconfig and env. Artefacts are cached under $QMTL_STACK_CACHE (default ~/.cache/qmtl-stack).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import dataclasses
import functools
import json
import os
import resource
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import kafka_wire  # noqa: E402  (beside this script)

PROJECT = HERE.parent.parent
STATE = Path(os.environ.get("QMTL_STACK_DIR", PROJECT / ".stack"))
CACHE = Path(os.environ.get("QMTL_STACK_CACHE", Path.home() / ".cache" / "qmtl-stack"))
ORDER = ("etcd", "kube-apiserver", "kube-controller-manager", "kafka", "neo4j", "s3")
# started by node.py on `up --node`, stopped (in reverse) before the servers above
NODE_ORDER = ("containerd", "kube-scheduler", "kubelet", "kube-proxy")
# The node's address: a bridge the pods' network hangs off (node.py's CNI uses it as the
# gateway). The servers listen there too in node mode, so pods reach them at NODE_ADDRESS.
NODE_BRIDGE = "qmtl0"
NODE_ADDRESS = "10.244.0.1"
NODE_POD_CIDR = "10.244.0.0/24"
S3_ACCESS_KEY = "qmtl-local"
S3_BUCKET = "qmtl-archives"
NEO4J_USER = "neo4j"
# Kafka principals: the stack's super users, the product's two, and one with no ACLs
KAFKA_ADMIN, KAFKA_CONTROLLER = "admin", "controller"
KAFKA_OPERATOR, KAFKA_SIDECAR, KAFKA_NOACL = "qmtl-operator", "qmtl-sidecar", "qmtl-noacl"
PRODUCT_TOPIC_OPERATIONS = (
    "CREATE",
    "DESCRIBE",
    "DESCRIBE_CONFIGS",
    "ALTER_CONFIGS",
    "DELETE",
    "READ",
    "WRITE",
)
MIN_FREE_DISK = 3 * 1024**3


class StackError(RuntimeError):
    """A failure the user can act on; the message says what and where to look."""


def say(msg: str) -> None:
    print(f"[stack] {time.strftime('%H:%M:%S')} {msg}", flush=True)


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for raw in (HERE / "versions.env").read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


# --------------------------------------------------------------------------- artefacts


def ensure_artefacts() -> None:
    """Run the three build/fetch scripts concurrently (the Go build is CPU-bound, the
    Maven fetches network-bound), streaming their progress lines."""
    jobs = [
        [str(HERE / "build-kube.sh")],
        [str(HERE / "build-seaweedfs.sh")],
        [str(HERE / "fetch-jars.sh"), "kafka"],
        [str(HERE / "fetch-jars.sh"), "neo4j"],
    ]
    procs = [
        subprocess.Popen(["bash", *j], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for j in jobs
    ]

    def pump(p: subprocess.Popen[str]) -> None:
        assert p.stdout is not None
        for line in p.stdout:
            print(line.rstrip(), flush=True)

    threads = [threading.Thread(target=pump, args=(p,), daemon=True) for p in procs]
    for t in threads:
        t.start()
    failed = [" ".join(j) for j, p in zip(jobs, procs, strict=True) if p.wait() != 0]
    for t in threads:
        t.join()
    if failed:
        raise StackError(f"building or fetching failed: {', '.join(failed)} (see output above)")


def kube_bin(name: str) -> Path:
    return CACHE / f"kube-{versions()['KUBERNETES_VERSION']}" / "bin" / name


def _cached(prefix: str) -> Path:
    """The complete artefact folder fetch-jars.sh made for this version (keyed by its
    dependency list too)."""
    found = sorted(CACHE.glob(f"{prefix}-*/.complete"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise StackError(f"no complete {prefix} artefacts under {CACHE}")
    return found[-1].parent


def weed_bin() -> Path:
    return CACHE / f"seaweedfs-{versions()['SEAWEEDFS_VERSION']}" / "bin" / "weed"


def kafka_home() -> Path:
    v = versions()
    return _cached(f"kafka-{v['KAFKA_SCALA']}-{v['KAFKA_VERSION']}")


def neo4j_home() -> Path:
    return _cached(f"neo4j-{versions()['NEO4J_VERSION']}")


# --------------------------------------------------------------------------- processes


def proc_starttime(pid: int) -> str | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # field 22 (starttime) counted after the ")" that closes the command name
    return stat.rsplit(")", 1)[1].split()[19]


def pid_file(name: str) -> Path:
    return STATE / "pids" / f"{name}.json"


def running_pid(name: str) -> int | None:
    """The PID recorded for `name` if that very process (same start time) is alive."""
    try:
        rec = json.loads(pid_file(name).read_text())
    except (OSError, ValueError):
        return None
    pid = int(rec["pid"])
    if proc_starttime(pid) != rec["starttime"]:
        return None
    return pid


OPEN_FILES = 262_144  # Kafka keeps a file open per partition segment: 50k topics and more


def _more_files(pid: int) -> None:
    """Raise a server's open-file limit just after its start, before it opens its data (the
    hard limit too when allowed, as root; else up to the hard limit)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in ((OPEN_FILES, max(hard, OPEN_FILES)), (hard, hard)):
        try:
            resource.prlimit(pid, resource.RLIMIT_NOFILE, limit)
            return
        except (ValueError, OSError):
            continue


def start(
    name: str, argv: list[str], cwd: Path | None = None, env: dict[str, str] | None = None
) -> int:
    log = STATE / "logs" / f"{name}.log"
    with log.open("ab") as fh:
        p = subprocess.Popen(
            argv,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            env={**os.environ, **(env or {})},
            start_new_session=True,  # its own process group: `down` signals exactly it
        )
    _more_files(p.pid)
    starttime = proc_starttime(p.pid)
    record = {"argv": argv, "cwd": str(cwd) if cwd else None, "env": env or {}}
    pid_file(name).write_text(json.dumps({"pid": p.pid, "starttime": starttime, **record}))
    # kept after `stop NAME`, so that `start NAME` restarts exactly the same server
    (STATE / "pids" / f"{name}.cmd.json").write_text(json.dumps(record))
    shown = log.relative_to(PROJECT) if log.is_relative_to(PROJECT) else log
    say(f"{name} started (pid {p.pid}, log {shown})")
    return p.pid


def stop(name: str, grace: float = 30.0, *, kill: bool = False) -> None:
    """SIGTERM, then SIGKILL after `grace` seconds; with `kill`, SIGKILL at once (a crash:
    no clean shutdown, no goodbye to peers). Returns once the process is gone."""
    pid = running_pid(name)
    pid_file(name).unlink(missing_ok=True)
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL if kill else signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while _alive(pid):
        if time.monotonic() > deadline:
            say(f"{name} ignored SIGTERM for {grace:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            deadline = float("inf")
        time.sleep(0.2)
    say(f"{name} {'killed' if kill else 'stopped'} (pid {pid})")


def _alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie child of ours is reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    if state == "Z":
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, os.WNOHANG)
        return False
    return True


def log_tail(name: str, lines: int = 25) -> str:
    try:
        text = (STATE / "logs" / f"{name}.log").read_text(errors="replace").splitlines()
    except OSError:
        return "(no log)"
    return "\n".join("    " + line for line in text[-lines:])


def wait_until(name: str, probe: Callable[[], str | None], timeout: float) -> None:
    """Poll `probe` (None = ready, otherwise the reason it is not) until the deadline,
    failing at once if the process died."""
    deadline = time.monotonic() + timeout
    reason = "no answer yet"
    started = time.monotonic()
    last_note = started
    while time.monotonic() < deadline:
        if running_pid(name) is None:
            raise StackError(f"{name} exited during start-up. Last log lines:\n{log_tail(name)}")
        try:
            reason = probe() or ""
        except (OSError, ValueError, ssl.SSLError) as e:
            reason = f"{type(e).__name__}: {e}"
        if not reason:
            say(f"{name} ready after {time.monotonic() - started:.1f} s")
            return
        if time.monotonic() - last_note > 15:
            say(f"{name} not ready yet ({reason})")
            last_note = time.monotonic()
        time.sleep(0.25)
    raise StackError(
        f"{name} not ready within {timeout:.0f} s: {reason}. Last log lines:\n{log_tail(name)}"
    )


_HANDED_OUT: set[int] = set()


def ephemeral_range() -> tuple[int, int]:
    """The range the kernel takes client ports from (ip_local_port_range)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_port() -> int:
    """A free port outside the kernel's ephemeral range.

    A port the kernel hands out as ephemeral can be taken by any outgoing connection the moment
    its server is down (a restart in a fault test, or the gap between choosing and binding), and
    the server then fails with "Address already in use". Ports below the range never are. The
    stack takes 10000-21999; the tests' own servers take 22000 up to the range (tests/conftest.py).
    """
    low, high = ephemeral_range()
    start, stop = (10000, 22000) if low > 23000 else (high + 1, 65536)
    for _ in range(500):
        port = start + secrets.randbelow(stop - start)
        if port in _HANDED_OUT:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))  # noqa: S104 (a probe: closed at once)
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise StackError(f"no free port found in {start}-{stop - 1}")


# --------------------------------------------------------------------------- probes


def https_client_context() -> ssl.SSLContext:
    pki = STATE / "pki"
    ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
    ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
    return ctx


def http_get(url: str, ctx: ssl.SSLContext | None = None, timeout: float = 3.0) -> str:
    with urllib.request.urlopen(url, timeout=timeout, context=ctx) as r:
        return str(r.read().decode())


def probe_etcd(port: int) -> str | None:
    body = http_get(f"http://127.0.0.1:{port}/health")
    return None if json.loads(body).get("health") == "true" else f"health: {body}"


def probe_apiserver(port: int) -> str | None:
    body = http_get(f"https://127.0.0.1:{port}/readyz", https_client_context())
    return None if body.strip() == "ok" else f"readyz: {body[:200]}"


def probe_kcm(port: int) -> str | None:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # its serving certificate is self-signed at start-up
    body = http_get(f"https://127.0.0.1:{port}/healthz", ctx)
    return None if body.strip() == "ok" else f"healthz: {body[:200]}"


def kafka_users() -> dict[str, str]:
    """The SCRAM users of the stack's Kafka and their passwords (made by `up`)."""
    return dict(json.loads((STATE / "kafka-users.json").read_text()))


def kafka_metadata(port: int, timeout: float = 3.0) -> dict[str, object]:
    """A real Metadata request over the SASL_SSL listener, logged in as the admin: returns the
    cluster id, controller id and brokers the broker reports."""
    users = kafka_users()
    ca = str(STATE / "pki" / "ca.crt")
    with kafka_wire.connect(port, KAFKA_ADMIN, users[KAFKA_ADMIN], ca, timeout=timeout) as c:
        return kafka_wire.metadata(c)


def kafka_acls() -> list[kafka_wire.Acl]:
    """What the product's principals may do, and nothing more (README: Security)."""
    out = []
    for user in (KAFKA_OPERATOR, KAFKA_SIDECAR):
        who = f"User:{user}"
        for op in PRODUCT_TOPIC_OPERATIONS:
            out.append(kafka_wire.Acl(who, kafka_wire.TOPIC, "*", kafka_wire.LITERAL, op))
        out.append(kafka_wire.Acl(who, kafka_wire.GROUP, "qmtl-", kafka_wire.PREFIXED, "READ"))
        out.append(
            kafka_wire.Acl(who, kafka_wire.CLUSTER, "kafka-cluster", kafka_wire.LITERAL, "DESCRIBE")
        )
    return out


def grant_kafka_acls(port: int, timeout: float) -> None:
    users = kafka_users()
    ca = str(STATE / "pki" / "ca.crt")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with kafka_wire.connect(port, KAFKA_ADMIN, users[KAFKA_ADMIN], ca) as c:
                kafka_wire.create_acls(c, kafka_acls())
            return
        except (OSError, kafka_wire.WireError) as e:
            if time.monotonic() > deadline:
                raise StackError(f"kafka: could not create the ACLs: {e}") from e
            time.sleep(0.5)


def probe_kafka(port: int, brokers: int = 1) -> str | None:
    """Ready once this node answers Metadata as the admin and names `brokers` brokers (a
    node restarted alone into a cluster with others down counts as ready with itself)."""
    md = kafka_metadata(port)
    seen = md["brokers"]
    assert isinstance(seen, list)
    if not seen:
        return "no brokers in metadata yet"
    if brokers > 1 and not any(b.endswith(f":{port}") for b in seen):
        return f"this broker is not in the metadata yet ({len(seen)} of {brokers})"
    return None


def bolt_handshake(port: int, timeout: float = 3.0) -> str:
    """The Bolt handshake: magic preamble and four proposed versions; returns the agreed one."""
    proposal = bytes.fromhex("6060B017") + bytes.fromhex("00000805000004040000000400000003")
    ctx = ssl.create_default_context(cafile=str(STATE / "pki" / "ca.crt"))  # TLS is required
    with (
        socket.create_connection(("127.0.0.1", port), timeout=timeout) as raw,
        ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s,
    ):
        s.sendall(proposal)
        agreed = kafka_wire.recv(s, 4)
    if agreed == b"\x00\x00\x00\x00":
        raise ValueError("server accepted none of the proposed Bolt versions")
    return f"{agreed[3]}.{agreed[2]}"


def probe_neo4j(port: int) -> str | None:
    log = (STATE / "logs" / "neo4j.log").read_text(errors="replace")
    if "READY neo4j" not in log:
        return "launcher has not reported READY"
    bolt_handshake(port)
    return None


# --------------------------------------------------------------------------- set-up


def run(argv: list[str], cwd: Path | None = None) -> None:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise StackError(f"command failed: {' '.join(argv)}\n{r.stdout}{r.stderr}")


def pki_key(name: str) -> None:
    """An RSA key pki/<name>.key."""
    run(["openssl", "genrsa", "-out", str(STATE / "pki" / f"{name}.key"), "2048"])


def pki_cert(name: str, subj: str, ext: str) -> None:
    """A key and a certificate pki/<name>.{key,crt} signed by the stack's CA."""
    pki = STATE / "pki"
    pki_key(name)
    run(
        [
            "openssl",
            "req",
            "-new",
            "-key",
            str(pki / f"{name}.key"),
            "-out",
            str(pki / f"{name}.csr"),
            "-subj",
            subj,
        ]
    )
    (pki / f"{name}.ext").write_text(ext)
    run(
        [
            "openssl",
            "x509",
            "-req",
            "-in",
            str(pki / f"{name}.csr"),
            "-CA",
            str(pki / "ca.crt"),
            "-CAkey",
            str(pki / "ca.key"),
            "-CAcreateserial",
            "-out",
            str(pki / f"{name}.crt"),
            "-days",
            "3650",
            "-extfile",
            str(pki / f"{name}.ext"),
        ]
    )


def make_pki() -> None:
    pki = STATE / "pki"
    pki.mkdir(parents=True)
    pki_key("ca")
    run(
        [
            "openssl",
            "req",
            "-x509",
            "-new",
            "-key",
            str(pki / "ca.key"),
            "-out",
            str(pki / "ca.crt"),
            "-days",
            "3650",
            "-subj",
            "/CN=qmtl-local-stack-ca",
        ]
    )
    pki_cert(
        "apiserver",
        "/CN=kube-apiserver",
        "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    pki_cert(
        "admin",
        "/O=system:masters/CN=qmtl-admin",
        "extendedKeyUsage=clientAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    pki_key("sa")
    run(["openssl", "rsa", "-in", str(pki / "sa.key"), "-pubout", "-out", str(pki / "sa.pub")])
    pki_cert(
        "neo4j",
        "/CN=neo4j",
        f"subjectAltName=IP:127.0.0.1,IP:{NODE_ADDRESS},DNS:localhost\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    bolt = pki / "neo4j-bolt"  # the layout of a Neo4j SSL policy directory
    (bolt / "trusted").mkdir(parents=True)
    (bolt / "revoked").mkdir()
    shutil.copy(pki / "neo4j.key", bolt / "private.key")
    shutil.copy(pki / "neo4j.crt", bolt / "public.crt")
    pki_cert(
        "kafka",
        "/CN=kafka",
        f"subjectAltName=IP:127.0.0.1,IP:{NODE_ADDRESS},DNS:localhost\n"
        "extendedKeyUsage=serverAuth\nkeyUsage=digitalSignature,keyEncipherment\n",
    )
    run(
        [
            "openssl",
            "pkcs12",
            "-export",
            "-in",
            str(pki / "kafka.crt"),
            "-inkey",
            str(pki / "kafka.key"),
            "-certfile",
            str(pki / "ca.crt"),
            "-name",
            "kafka",
            "-out",
            str(pki / "kafka.p12"),
            "-passout",
            f"pass:{kafka_users()['keystore']}",
        ]
    )


def write_kubeconfig(
    port: int, user: str = "qmtl-admin", cert: str = "admin", path: Path | None = None
) -> Path:
    """A kubeconfig for `user`, authenticated by the client certificate pki/<cert>.{crt,key}
    (default: the admin, at STATE/kubeconfig)."""
    pki = STATE / "pki"

    def b64(p: str) -> str:
        return base64.b64encode((pki / p).read_bytes()).decode()

    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "qmtl-local",
                "cluster": {
                    "server": f"https://127.0.0.1:{port}",
                    "certificate-authority-data": b64("ca.crt"),
                },
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate-data": b64(f"{cert}.crt"),
                    "client-key-data": b64(f"{cert}.key"),
                },
            }
        ],
        "contexts": [
            {
                "name": "qmtl-local",
                "context": {"cluster": "qmtl-local", "user": user, "namespace": "default"},
            }
        ],
        "current-context": "qmtl-local",
    }
    path = path or STATE / "kubeconfig"
    path.write_text(json.dumps(cfg, indent=2))  # JSON is valid YAML
    path.chmod(0o600)
    return path


def kafka_config(
    port: int, cport: int, node_port: int = 0, node_id: int = 1, voters: str = ""
) -> Path:
    """KRaft broker+controller on loopback (with `voters`, node `node_id` of a static
    quorum of several; else a single dynamic controller). Clients reach a SASL_SSL listener
    (SCRAM-SHA-512, the stack's CA) and the StandardAuthorizer checks ACLs; the controller
    listener takes SASL/PLAIN from the broker itself. With `node_port`, a second SASL_SSL
    listener (NODE) on the node address that advertises that address, for clients in pods."""
    name = kafka_name(node_id)
    data = STATE / "data" / name
    conf = STATE / "conf"
    users = kafka_users()
    replicas = len(voters.split(",")) if voters else 1
    quorum = (
        f"controller.quorum.voters={voters}"
        if voters
        else f"controller.quorum.bootstrap.servers=127.0.0.1:{cport}"
    )
    listeners = f"SASL_SSL://127.0.0.1:{port},CONTROLLER://127.0.0.1:{cport}"
    protocols = "SASL_SSL:SASL_SSL,CONTROLLER:SASL_PLAINTEXT"
    scram = (
        "org.apache.kafka.common.security.scram.ScramLoginModule required "
        f'username="{KAFKA_ADMIN}" password="{users[KAFKA_ADMIN]}";'
    )
    plain = users[KAFKA_CONTROLLER]
    secured = [
        f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={scram}",
    ]
    if node_port:
        listeners += f",NODE://{NODE_ADDRESS}:{node_port}"
        protocols += ",NODE:SASL_SSL"
        secured.append(f"listener.name.node.scram-sha-512.sasl.jaas.config={scram}")
    (conf / f"{name}.properties").write_text(
        "\n".join(
            [
                "process.roles=broker,controller",
                f"node.id={node_id}",
                quorum,
                f"listeners={listeners}",
                f"advertised.listeners={listeners}",
                "controller.listener.names=CONTROLLER",
                "inter.broker.listener.name=SASL_SSL",
                f"listener.security.protocol.map={protocols}",
                "sasl.enabled.mechanisms=SCRAM-SHA-512",
                "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
                *secured,
                "sasl.mechanism.controller.protocol=PLAIN",
                "listener.name.controller.sasl.enabled.mechanisms=PLAIN",
                "listener.name.controller.plain.sasl.jaas.config="
                "org.apache.kafka.common.security.plain.PlainLoginModule required "
                f'username="{KAFKA_CONTROLLER}" password="{plain}" '
                f'user_{KAFKA_CONTROLLER}="{plain}";',
                "ssl.keystore.type=PKCS12",
                f"ssl.keystore.location={STATE / 'pki' / 'kafka.p12'}",
                f"ssl.keystore.password={users['keystore']}",
                "ssl.truststore.type=PEM",  # the broker's own SASL_SSL client (inter-broker)
                f"ssl.truststore.location={STATE / 'pki' / 'ca.crt'}",
                "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                f"super.users=User:{KAFKA_ADMIN};User:{KAFKA_CONTROLLER}",
                "allow.everyone.if.no.acl.found=false",
                f"log.dirs={data}",
                "num.partitions=1",
                f"offsets.topic.replication.factor={replicas}",
                "offsets.topic.num.partitions=1",
                f"transaction.state.log.replication.factor={replicas}",
                f"transaction.state.log.min.isr={min(replicas, 2)}",
                f"share.coordinator.state.topic.replication.factor={replicas}",
                f"share.coordinator.state.topic.min.isr={min(replicas, 2)}",
                "group.initial.rebalance.delay.ms=0",
                "auto.create.topics.enable=false",
                "delete.topic.enable=true",
                # a deleted topic's files (and their descriptors) go after 1 s, not 60: where
                # the open-file limit cannot be raised (a container's 20k), the benchmarks'
                # create-and-delete cycles would otherwise exhaust it
                "file.delete.delay.ms=1000",
                "",
            ]
        )
    )
    (conf / "kafka-log4j2.properties").write_text(
        "\n".join(
            [
                "status = error",
                "appender.console.type = Console",
                "appender.console.name = STDOUT",
                "appender.console.layout.type = PatternLayout",
                "appender.console.layout.pattern = [%d] %p %m (%c)%n",
                "rootLogger.level = WARN",
                "rootLogger.appenderRef.stdout.ref = STDOUT",
                "logger.server.name = kafka.server.KafkaRaftServer",
                "logger.server.level = INFO",
                "",
            ]
        )
    )
    return conf / f"{name}.properties"


def kafka_name(node_id: int) -> str:
    """The server name (pid file, log, data directory) of Kafka node `node_id`."""
    return "kafka" if node_id == 1 else f"kafka-{node_id}"


def kafka_nodes(ports: Ports) -> list[tuple[str, int, int]]:
    """(server name, client port, controller port) of every Kafka node, node 1 first."""
    nodes = [("kafka", ports.kafka, ports.kafka_controller)]
    nodes += [(kafka_name(i + 2), p, c) for i, (p, c) in enumerate(ports.kafka_peers)]
    return nodes


def servers(ports: Ports | None) -> tuple[str, ...]:
    """The stack's servers in start order (more Kafka nodes after the first)."""
    extra = tuple(n for n, _, _ in kafka_nodes(ports)[1:]) if ports else ()
    i = ORDER.index("kafka") + 1
    return (*ORDER[:i], *extra, *ORDER[i:])


def kafka_cluster_id() -> str:
    """A random Kafka cluster id (URL-safe base64 of 16 bytes). Like Kafka's own
    Uuid.randomUuid, never one that starts with '-', which a command line reads as a flag."""
    while True:
        cid = base64.urlsafe_b64encode(secrets.token_bytes(16)).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


def java_opts_neo4j() -> list[str]:
    opens = [
        "java.base/java.nio",
        "java.base/java.io",
        "java.base/sun.nio.ch",
        "java.base/java.lang",
        "java.base/java.util",
        "java.base/java.util.concurrent",
        "java.base/java.net",
    ]
    return [
        *(f"--add-opens={o}=ALL-UNNAMED" for o in opens),
        "--add-exports=java.base/sun.nio.ch=ALL-UNNAMED",
        "-Dio.netty.tryReflectionSetAccessible=true",
        "-Xms512m",
        "-Xmx1g",
        "-XX:+UseG1GC",
    ]


def neo4j_config(port: int, node: bool = False) -> Path:
    path = STATE / "conf" / "neo4j.conf"
    listen = "0.0.0.0" if node else "127.0.0.1"  # noqa: S104 (node mode: pods connect)
    path.write_text(
        "\n".join(
            [
                "server.config.strict_validation.enabled=false",
                "server.bolt.enabled=true",
                f"server.bolt.listen_address={listen}:{port}",
                f"server.bolt.advertised_address=127.0.0.1:{port}",
                "dbms.security.auth_enabled=true",
                # Bolt only over TLS, with a certificate of the stack's CA
                "server.bolt.tls_level=REQUIRED",
                "dbms.ssl.policy.bolt.enabled=true",
                f"dbms.ssl.policy.bolt.base_directory={STATE / 'pki' / 'neo4j-bolt'}",
                "dbms.ssl.policy.bolt.private_key=private.key",
                "dbms.ssl.policy.bolt.public_certificate=public.crt",
                "dbms.ssl.policy.bolt.client_auth=NONE",
                "server.memory.pagecache.size=256m",
                "db.tx_log.rotation.retention_policy=100M size",
                "dbms.usage_report.enabled=false",
                "",
            ]
        )
    )
    return path


@dataclass
class Ports:
    etcd: int
    etcd_peer: int
    apiserver: int
    kcm: int
    kafka: int
    kafka_controller: int
    neo4j: int
    s3: int
    s3_internal: list[int]  # master, volume, filer (each with its gRPC port), s3 gRPC, admin
    kafka_node: int = 0  # the NODE listener on NODE_ADDRESS (node mode only)
    # Kafka nodes 2, 3, ... (client port, controller port); empty: a single broker
    kafka_peers: list[list[int]] = dataclasses.field(default_factory=list)
    node: bool = False


def s3_command(ports: Ports, secret: str) -> list[str]:
    """`weed mini` (master, volume, filer and the S3 gateway in one process), every port
    chosen by us, the S3 API signed with one identity, no WebDAV, Iceberg or admin UI."""
    config = STATE / "conf" / "s3.json"
    identity = {
        "name": "qmtl",
        "credentials": [{"accessKey": S3_ACCESS_KEY, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    config.write_text(json.dumps({"identities": [identity]}))
    config.chmod(0o600)
    m, mg, v, vg, f, fg, sg, ap, apg = ports.s3_internal
    return [
        str(weed_bin()),
        "mini",
        f"-dir={STATE / 'data' / 's3'}",
        "-ip=127.0.0.1",
        f"-ip.bind={'0.0.0.0' if ports.node else '127.0.0.1'}",  # noqa: S104 (node: pods)
        f"-master.port={m}",
        f"-master.port.grpc={mg}",
        f"-volume.port={v}",
        f"-volume.port.grpc={vg}",
        f"-filer.port={f}",
        f"-filer.port.grpc={fg}",
        f"-s3.port={ports.s3}",
        f"-s3.port.grpc={sg}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
        f"-s3.config={config}",
        f"-bucket={S3_BUCKET}",
        "-webdav=false",
        "-admin.ui=false",
        f"-admin.port={ap}",
        f"-admin.port.grpc={apg}",
        "-master.telemetry=false",
    ]


def probe_s3(port: int) -> str | None:
    """The S3 API answers (403 to an unsigned request is an answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=3):
            return None
    except urllib.error.HTTPError as e:
        return None if e.code in (403, 400) else f"HTTP {e.code}"
    except OSError as e:
        return str(e)


def write_env(ports: Ports, password: str, s3_secret: str) -> dict[str, str]:
    """The endpoints and credentials of a started stack, in STATE/env (mode 600)."""
    users = kafka_users()
    env = {
        "KUBECONFIG": str(STATE / "kubeconfig"),
        "NEO4J_URI": f"bolt+s://127.0.0.1:{ports.neo4j}",
        "NEO4J_SSL_CA": str(STATE / "pki" / "ca.crt"),
        "NEO4J_USER": NEO4J_USER,
        "NEO4J_PASSWORD": password,
        "KAFKA_BOOTSTRAP_SERVERS": ",".join(f"127.0.0.1:{p}" for _, p, _ in kafka_nodes(ports)),
        "QMTL_STACK_KAFKA_BROKERS": str(len(kafka_nodes(ports))),
        "KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "KAFKA_SASL_USERNAME": KAFKA_SIDECAR,
        "KAFKA_SASL_PASSWORD": users[KAFKA_SIDECAR],
        "KAFKA_SSL_CA": str(STATE / "pki" / "ca.crt"),
        # the operator's own principal, the stack's super user (tests act as the world with
        # it) and a principal without ACLs
        "QMTL_STACK_KAFKA_OPERATOR_USER": KAFKA_OPERATOR,
        "QMTL_STACK_KAFKA_OPERATOR_PASSWORD": users[KAFKA_OPERATOR],
        "QMTL_STACK_KAFKA_ADMIN_USER": KAFKA_ADMIN,
        "QMTL_STACK_KAFKA_ADMIN_PASSWORD": users[KAFKA_ADMIN],
        "QMTL_STACK_KAFKA_NOACL_USER": KAFKA_NOACL,
        "QMTL_STACK_KAFKA_NOACL_PASSWORD": users[KAFKA_NOACL],
        "QMTL_S3_ENDPOINT": f"http://127.0.0.1:{ports.s3}",
        "QMTL_S3_ACCESS_KEY": S3_ACCESS_KEY,
        "QMTL_S3_SECRET_KEY": s3_secret,
        "QMTL_S3_BUCKET": S3_BUCKET,
    }
    if ports.node:
        env["QMTL_NODE_ADDRESS"] = NODE_ADDRESS
        env["QMTL_NODE_NEO4J_URI"] = f"bolt+s://{NODE_ADDRESS}:{ports.neo4j}"
        env["QMTL_NODE_KAFKA_BOOTSTRAP_SERVERS"] = f"{NODE_ADDRESS}:{ports.kafka_node}"
        env["QMTL_NODE_S3_ENDPOINT"] = f"http://{NODE_ADDRESS}:{ports.s3}"
    (STATE / "env").write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    (STATE / "env").chmod(0o600)
    return env


def _node_mode() -> bool:
    try:
        return bool(json.loads((STATE / "ports.json").read_text()).get("node"))
    except (OSError, ValueError):
        return False


def node_script(*args: str) -> int:
    """Run node.py (the real node on top of this stack) with its output streamed."""
    return subprocess.run([sys.executable, str(HERE / "node.py"), *args], check=False).returncode


def _recorded_ports() -> Ports | None:
    try:
        return Ports(**json.loads((STATE / "ports.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _reuse_running(node: bool, brokers: int = 1) -> bool:
    """True if a healthy stack of the asked kind runs already; else stop what runs."""
    recorded = _recorded_ports()
    same_brokers = recorded is not None and 1 + len(recorded.kafka_peers) == brokers
    every = servers(recorded)
    if all(running_pid(n) for n in every) and same_brokers and status(quiet=True):
        if not node:
            say(f"already up; source {STATE / 'env'}")
            return True
        if _node_mode():
            if node_script("up") != 0:
                raise StackError("the node did not start (output above)")
            return True
        say("up without a node: restarting it in node mode")
        down()
    if any(running_pid(n) for n in (*every, *NODE_ORDER)):
        say("a partial stack (or one of another shape) is running: stopping it first")
        down()
    return False


def make_kafka_users() -> None:
    """Passwords for the Kafka principals (and the broker's keystore), in STATE (mode 600)."""
    users = {
        u: secrets.token_hex(16)
        for u in (KAFKA_ADMIN, KAFKA_CONTROLLER, KAFKA_OPERATOR, KAFKA_SIDECAR, KAFKA_NOACL)
    }
    path = STATE / "kafka-users.json"
    path.write_text(json.dumps({**users, "keystore": secrets.token_hex(16)}))
    path.chmod(0o600)


def start_kafka(ports: Ports) -> None:
    """Format each node's KRaft log (with the SCRAM users) and start the brokers."""
    users = kafka_users()
    nodes = kafka_nodes(ports)
    voters = (
        ",".join(f"{i + 1}@127.0.0.1:{c}" for i, (_, _, c) in enumerate(nodes))
        if len(nodes) > 1
        else ""
    )
    cluster_id = kafka_cluster_id()
    for i, (name, port, cport) in enumerate(nodes):
        kconf = kafka_config(port, cport, ports.kafka_node if i == 0 else 0, i + 1, voters)
        _start_kafka_node(name, kconf, cluster_id, users, standalone=not voters)


def _start_kafka_node(
    name: str, kconf: Path, cluster_id: str, users: dict[str, str], *, standalone: bool
) -> None:
    kjava = [
        "java",
        "-Xms256m",
        # a node of three holds a replica of every topic and fetches for each: the fault
        # suite leaves thousands of partitions per node (768 MB ran out, seen)
        "-Xmx1536m",
        "-XX:+UseG1GC",
        f"-Dlog4j2.configurationFile={STATE / 'conf' / 'kafka-log4j2.properties'}",
        "-cp",
        str(kafka_home() / "lib" / "*"),
    ]
    run(
        [
            *kjava,
            "kafka.tools.StorageTool",
            "format",
            "-t",
            cluster_id,
            "-c",
            str(kconf),
            *(["--standalone"] if standalone else []),
            *(
                arg
                for u in (KAFKA_ADMIN, KAFKA_OPERATOR, KAFKA_SIDECAR, KAFKA_NOACL)
                for arg in ("--add-scram", f"SCRAM-SHA-512=[name={u},password={users[u]}]")
            ),
        ]
    )
    start(name, [*kjava, "kafka.Kafka", str(kconf)])


def allocate_ports(node: bool, brokers: int) -> Ports:
    """Free ports for every server of the stack (and the data directories of extra brokers)."""
    names = [
        f.name
        for f in dataclasses.fields(Ports)
        if f.name not in ("s3_internal", "kafka_node", "node", "kafka_peers")
    ]
    ports = Ports(
        **{n: free_port() for n in names},
        s3_internal=[free_port() for _ in range(9)],
        kafka_node=free_port() if node else 0,
        node=node,
        kafka_peers=[[free_port(), free_port()] for _ in range(brokers - 1)],
    )
    return ports


def preflight(node: bool, brokers: int) -> None:
    """Refuse at once what cannot start: a shape the stack does not run, no disk, no tools."""
    if brokers not in (1, 3):
        raise StackError(f"--brokers {brokers}: the stack runs 1 or 3 Kafka brokers")
    if node and brokers != 1:
        raise StackError("node mode runs one Kafka broker (its NODE listener)")
    free = shutil.disk_usage(CACHE.parent if CACHE.parent.exists() else Path.home()).free
    if free < MIN_FREE_DISK:
        raise StackError(f"only {free / 1024**3:.1f} GiB free on disk; the stack needs 3 GiB")
    for tool in ("openssl", "java", "go", "mvn"):
        if shutil.which(tool) is None:
            raise StackError(f"`{tool}` is not on PATH (see README: Local stack)")


def up(timeout: float, node: bool = False, brokers: int = 1) -> None:
    t0 = time.monotonic()
    if _reuse_running(node, brokers):
        return
    preflight(node, brokers)

    ensure_artefacts()
    t_built = time.monotonic()

    if STATE.exists():
        shutil.rmtree(STATE)
    dirs = ("logs", "pids", "conf", "data/etcd", "data/neo4j", "data/s3")
    for d in (*dirs, *(f"data/{kafka_name(i + 1)}" for i in range(brokers))):
        (STATE / d).mkdir(parents=True, exist_ok=True)
    make_kafka_users()
    make_pki()
    ports = allocate_ports(node, brokers)
    (STATE / "ports.json").write_text(json.dumps(ports.__dict__))
    pki = STATE / "pki"
    password = secrets.token_urlsafe(18)
    s3_secret = secrets.token_urlsafe(24)

    try:
        if node:
            node_bridge()
        # Kafka and Neo4j are independent of Kubernetes: start the JVMs first, they are slowest.
        start_kafka(ports)

        classes = next(neo4j_home().glob("classes-*"))
        start(
            "neo4j",
            [
                "java",
                *java_opts_neo4j(),
                "-cp",
                f"{neo4j_home() / 'lib' / '*'}:{classes}",
                "Neo4jLauncher",
                str(STATE / "data" / "neo4j"),
                str(neo4j_config(ports.neo4j, node)),
                password,
            ],
        )

        start("s3", s3_command(ports, s3_secret))

        start(
            "etcd",
            [
                str(kube_bin("etcd")),
                "--name=qmtl-local",
                f"--data-dir={STATE / 'data' / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{ports.etcd}",
                f"--advertise-client-urls=http://127.0.0.1:{ports.etcd}",
                f"--listen-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{ports.etcd_peer}",
                f"--initial-cluster=qmtl-local=http://127.0.0.1:{ports.etcd_peer}",
                "--unsafe-no-fsync",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        wait_until("etcd", lambda: probe_etcd(ports.etcd), timeout)

        start(
            "kube-apiserver",
            [
                str(kube_bin("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{ports.etcd}",
                f"--secure-port={ports.apiserver}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                f"--cert-dir={pki}",
                "--service-cluster-ip-range=10.96.0.0/24",
                "--service-account-issuer=https://kubernetes.default.svc",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true",
                "--profiling=false",
                *apiserver_mode_flags(node),
            ],
        )
        wait_until("kube-apiserver", lambda: probe_apiserver(ports.apiserver), timeout)
        kubeconfig = write_kubeconfig(ports.apiserver)

        start(
            "kube-controller-manager",
            [
                str(kube_bin("kube-controller-manager")),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                f"--controllers={','.join(kcm_controllers(node))}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false",
                "--leader-elect=false",
                "--bind-address=127.0.0.1",
                f"--secure-port={ports.kcm}",
            ],
        )
        wait_until("kube-controller-manager", lambda: probe_kcm(ports.kcm), timeout)
        for name, port, _ in kafka_nodes(ports):
            wait_until(name, functools.partial(probe_kafka, port, brokers), timeout)
        grant_kafka_acls(ports.kafka, timeout)
        wait_until("neo4j", lambda: probe_neo4j(ports.neo4j), timeout)
        wait_until("s3", lambda: probe_s3(ports.s3), timeout)
    except (StackError, OSError, StopIteration) as e:
        say("start-up failed: stopping what was started")
        down()
        raise StackError(str(e) or type(e).__name__) from e

    env = write_env(ports, password, s3_secret)
    if node and node_script("up") != 0:
        raise StackError("the node did not start (output above); `stack.py down` stops all")
    say(
        f"stack up in {time.monotonic() - t0:.1f} s "
        f"(build/fetch {t_built - t0:.1f} s, start {time.monotonic() - t_built:.1f} s)"
    )
    for k, v in env.items():
        print(f"  {k}={v}")
    print(f"  source {STATE / 'env'}   # then: kubectl get namespaces")


def node_bridge() -> None:
    """The node's bridge with NODE_ADDRESS, made before the servers that listen on it (root)."""
    if (
        subprocess.run(
            ["ip", "link", "show", NODE_BRIDGE], capture_output=True, check=False
        ).returncode
        != 0
    ):
        run(["ip", "link", "add", NODE_BRIDGE, "type", "bridge"])
    shown = subprocess.run(
        ["ip", "-4", "addr", "show", NODE_BRIDGE], capture_output=True, text=True, check=False
    )
    if f"{NODE_ADDRESS}/" not in shown.stdout:
        run(["ip", "addr", "add", f"{NODE_ADDRESS}/24", "dev", NODE_BRIDGE])
    run(["ip", "link", "set", NODE_BRIDGE, "up"])
    say(f"node bridge {NODE_BRIDGE} at {NODE_ADDRESS}")


def apiserver_mode_flags(node: bool) -> list[str]:
    """Loopback only, no ServiceAccount admission, no endpoints; or, for a real node: every
    address (pods reach it through the `kubernetes` Service), ServiceAccount tokens in pods,
    the Node authorizer for the kubelet, and the kubelet reached with the admin certificate."""
    pki = STATE / "pki"
    if not node:
        return [
            "--bind-address=127.0.0.1",
            "--advertise-address=127.0.0.1",
            "--authorization-mode=RBAC",
            "--disable-admission-plugins=ServiceAccount",
            "--endpoint-reconciler-type=none",
        ]
    return [
        "--bind-address=0.0.0.0",
        f"--advertise-address={NODE_ADDRESS}",
        "--authorization-mode=Node,RBAC",
        "--enable-admission-plugins=NodeRestriction",
        f"--kubelet-client-certificate={pki / 'admin.crt'}",
        f"--kubelet-client-key={pki / 'admin.key'}",
        "--kubelet-preferred-address-types=InternalIP",
    ]


def kcm_controllers(node: bool) -> list[str]:
    base = ["namespace", "garbagecollector", "serviceaccount", "serviceaccount-token"]
    if not node:
        return base
    # what Deployments, Services and projected ServiceAccount tokens need on a real node
    return [
        *base,
        "deployment",
        "replicaset",
        "endpointslice",
        "endpointslicemirroring",
        "root-ca-cert-publisher",
        "podgc",
        "nodelifecycle",  # lifts the not-ready taint the kubelet registers with
    ]


def probes(ports: Ports) -> dict[str, Callable[[], str | None]]:
    return {
        "etcd": lambda: probe_etcd(ports.etcd),
        "kube-apiserver": lambda: probe_apiserver(ports.apiserver),
        "kube-controller-manager": lambda: probe_kcm(ports.kcm),
        **{
            name: functools.partial(probe_kafka, port, len(kafka_nodes(ports)))
            for name, port, _ in kafka_nodes(ports)
        },
        "neo4j": lambda: probe_neo4j(ports.neo4j),
        "s3": lambda: probe_s3(ports.s3),
    }


def _known(name: str) -> None:
    known = servers(_recorded_ports())
    if name not in known:
        raise StackError(f"unknown server {name!r}: one of {', '.join(known)}")


def stop_one(name: str, *, kill: bool = False) -> None:
    _known(name)
    if running_pid(name) is None:
        say(f"{name} is not running")
        return
    stop(name, kill=kill)


def kafka_leader() -> str:
    """The server name of the active KRaft controller, as the running nodes last recorded it
    (each node's `__cluster_metadata-0/quorum-state`; the highest epoch wins)."""
    ports = _recorded_ports()
    if ports is None:
        raise StackError("no stack state: run `stack.py up` first")
    best: tuple[int, int] | None = None
    for name, _, _ in kafka_nodes(ports):
        if running_pid(name) is None:
            continue
        path = STATE / "data" / name / "__cluster_metadata-0" / "quorum-state"
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        leader, epoch = int(state.get("leaderId", -1)), int(state.get("leaderEpoch", -1))
        if leader >= 0 and (best is None or epoch > best[1]):
            best = (leader, epoch)
    if best is None:
        raise StackError("no running Kafka node knows a controller leader (quorum lost?)")
    return kafka_name(best[0])


def start_one(name: str, timeout: float) -> None:
    """Start one stopped server of a stack that was brought up, with its recorded command."""
    _known(name)
    try:
        ports = Ports(**json.loads((STATE / "ports.json").read_text()))
        record = json.loads((STATE / "pids" / f"{name}.cmd.json").read_text())
    except (OSError, ValueError, TypeError) as e:
        raise StackError(f"no recorded command for {name}: run `stack.py up` first ({e})") from e
    if running_pid(name) is None:
        cwd = Path(record["cwd"]) if record.get("cwd") else None
        start(name, list(record["argv"]), cwd=cwd, env=dict(record.get("env") or {}))
    wait_until(name, probes(ports)[name], timeout)


def down() -> None:
    if not (STATE / "pids").exists():
        say("nothing to stop")
        return
    if any(pid_file(n).exists() for n in NODE_ORDER):
        node_script("down")
    for name in reversed(servers(_recorded_ports())):
        stop(name)


def status(quiet: bool = False) -> bool:
    try:
        ports = Ports(**json.loads((STATE / "ports.json").read_text()))
    except (OSError, ValueError, TypeError):
        if not quiet:
            print("stack: not started (no state in .stack/)")
        return False
    checks = probes(ports)
    where = {
        "etcd": f"http://127.0.0.1:{ports.etcd}",
        "kube-apiserver": f"https://127.0.0.1:{ports.apiserver}",
        "kube-controller-manager": f"https://127.0.0.1:{ports.kcm}",
        **{n: f"127.0.0.1:{p}" for n, p, _ in kafka_nodes(ports)},
        "neo4j": f"bolt+s://127.0.0.1:{ports.neo4j}",
        "s3": f"http://127.0.0.1:{ports.s3}",
    }
    healthy = True
    for name in servers(ports):
        pid = running_pid(name)
        if pid is None:
            state = "stopped"
            healthy = False
        else:
            try:
                reason = checks[name]()
            except (OSError, ValueError, ssl.SSLError) as e:
                reason = f"{type(e).__name__}: {e}"
            state = "healthy" if not reason else f"unhealthy ({reason})"
            healthy = healthy and not reason
        if not quiet:
            print(f"{name:<24} {state:<10} pid={pid or '-':<8} {where[name]}")
    if ports.node:
        healthy = node_script("status", *(["--quiet"] if quiet else [])) == 0 and healthy
    return healthy


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    upp = sub.add_parser("up")
    upp.add_argument("--timeout", type=float, default=180.0)
    upp.add_argument(
        "--node",
        action="store_true",
        default=os.environ.get("QMTL_STACK_NODE") == "1",
        help="also a real node (node.py); QMTL_STACK_NODE=1 is the same",
    )
    upp.add_argument(
        "--brokers",
        type=int,
        default=int(os.environ.get("QMTL_STACK_KAFKA_BROKERS") or 1),
        help="Kafka brokers: 1 (default) or 3, a KRaft quorum of three (fault tests)",
    )
    sub.add_parser("down")
    sub.add_parser("status")
    sub.add_parser("kafka-metadata")
    kafkas = tuple(kafka_name(i) for i in (2, 3))
    sub.add_parser("stop").add_argument("name", choices=(*ORDER, *kafkas))
    sub.add_parser("kill", help="SIGKILL one server (a crash)").add_argument(
        "name", choices=(*ORDER, *kafkas)
    )
    sub.add_parser("kafka-leader", help="the Kafka node that is the active KRaft controller")
    one = sub.add_parser("start")
    one.add_argument("name", choices=(*ORDER, *kafkas))
    one.add_argument("--timeout", type=float, default=120.0)
    args = ap.parse_args()
    try:
        if args.cmd == "up":
            up(args.timeout, args.node, args.brokers)
        elif args.cmd == "down":
            down()
        elif args.cmd == "status":
            return 0 if status() else 1
        elif args.cmd == "stop":
            stop_one(args.name)
        elif args.cmd == "kill":
            stop_one(args.name, kill=True)
        elif args.cmd == "kafka-leader":
            print(kafka_leader())
        elif args.cmd == "start":
            start_one(args.name, args.timeout)
        elif args.cmd == "kafka-metadata":
            ports = json.loads((STATE / "ports.json").read_text())
            print(json.dumps(kafka_metadata(int(ports["kafka"]))))
    except StackError as e:
        print(f"[stack] error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
