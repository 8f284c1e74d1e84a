"""The operator process's composition root: settings, then the adapters and the use cases
(built once, by `bootstrap.build`), then one Kubernetes API client from the settings, then
the drivers (leader election, the kopf handlers, the resync and GC loops), run until stopped.

`dagmanager operator` (the image's operator command) and `operator/main.py` (a checkout)
both start here.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from pathlib import Path

import prometheus_client

from qmtl_dagmanager import bootstrap, logs
from qmtl_dagmanager.adapters.kube import KubeApi
from qmtl_dagmanager.adapters.kube_lease import LeaderElection, LeadershipLost
from qmtl_dagmanager.config import Settings, SettingsError, load
from qmtl_dagmanager.core import native
from qmtl_dagmanager.core.errors import DagManagerError
from qmtl_dagmanager.kube import operator

log = logging.getLogger("qmtl_dagmanager")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The operator's flags (shared by `dagmanager operator`)."""
    parser.add_argument(
        "--namespace",
        action="append",
        help="watch this namespace (repeatable); default: all namespaces",
    )
    parser.add_argument("--resync", type=float, default=300.0, help="resync period in seconds")
    parser.add_argument(
        "--sentinel-tick",
        type=float,
        default=1.0,
        help="seconds between VersionSentinel evaluations (pause and gate resolution)",
    )
    parser.add_argument(
        "--liveness",
        default="http://0.0.0.0:8080/healthz",
        help="liveness endpoint URL (kopf's probe)",
    )
    parser.add_argument(
        "--leader-election",
        choices=("lease", "none"),
        default="lease",
        help="lease: one active instance (a coordination.k8s.io Lease); none: act at once",
    )
    parser.add_argument("--lease-name", default="qmtl-dagmanager-operator", help="the Lease's name")
    parser.add_argument(
        "--lease-duration",
        type=float,
        default=15.0,
        help="seconds without renewal before a standby takes over (renewed every third)",
    )
    parser.add_argument(
        "--lease-namespace", help="the Lease's namespace (default: $POD_NAMESPACE or default)"
    )
    parser.add_argument(
        "--metrics-port", type=int, default=8081, help="Prometheus /metrics port (0: off)"
    )


async def run(settings: Settings, args: argparse.Namespace) -> int:
    """Wire the operator once and run it; 1 when the lease was lost (rejoin as a standby)."""
    container = bootstrap.build(settings)
    kube = KubeApi(settings.kubeconfig)
    log.info("operator starting (DAG parser: %s)", native.path())
    if args.metrics_port:
        prometheus_client.start_http_server(args.metrics_port, registry=container.metrics.registry)
    election = None
    if args.leader_election == "lease":
        election = LeaderElection(
            kube.coordination,
            args.lease_namespace or settings.pod_namespace or "default",
            args.lease_name,
            settings.pod_name or None,
            duration=args.lease_duration,
            renew_every=args.lease_duration / 3,
        )
    try:
        await operator.run(
            container,
            namespaces=args.namespace or None,
            resync_seconds=args.resync,
            sentinel_tick=args.sentinel_tick,
            liveness=args.liveness,
            election=election,
            kube=kube,
        )
    except LeadershipLost as e:
        log.error("%s; exiting so that this instance rejoins as a standby", e)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """`dagmanager-operator [--config F] [flags]`: the same as `dagmanager operator`."""
    parser = argparse.ArgumentParser(
        prog="dagmanager-operator", description="QMTL DAG Manager operator"
    )
    parser.add_argument("--config", type=Path, help="YAML settings (environment overrides it)")
    parser.add_argument("--log-level", help="override log_level")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        settings = load(args.config, os.environ)
    except SettingsError as e:
        sys.stderr.write(f"error: {e}\n")
        return 2
    logs.configure((args.log_level or settings.log_level).upper(), settings.log_format)
    try:
        return asyncio.run(run(settings, args))
    except KeyboardInterrupt:
        return 1
    except DagManagerError as e:
        sys.stderr.write(f"error: {e.reason}: {e.message}\n")
        return 3 if e.retryable else 1
