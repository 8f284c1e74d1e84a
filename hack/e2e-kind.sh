#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end suite on a kind cluster. Needs a running Docker engine.
#  1. kind and helm (built once from the Go module proxy, cached);
#  2. a kind cluster `qmtl-e2e` (kept for the next run; `kind delete cluster -n qmtl-e2e`);
#  3. the image from operator/Dockerfile, loaded into the cluster;
#  4. Neo4j and Kafka in the cluster (manifests/e2e/backends.yaml);
#  5. hack/e2e/chart.sh, shared with `make e2e-node`: the chart pointing at them, the Gateway
#     stand-in with the sidecar, tests/e2e and tests/chart.
set -euo pipefail
cd "$(dirname "$0")/.."
source hack/stack/versions.env
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
KIND_VERSION=${KIND_VERSION:-v0.33.0}
step() { echo "[e2e-kind] $(date +%H:%M:%S) $*"; }

docker info >/dev/null 2>&1 || { echo "[e2e-kind] error: no Docker engine answers (docker info)" >&2; exit 1; }
kind="$CACHE/kind-$KIND_VERSION/bin/kind"
if [[ ! -x $kind ]]; then
  step "building sigs.k8s.io/kind@$KIND_VERSION (once)"
  GOBIN="$(dirname "$kind")" go install "sigs.k8s.io/kind@$KIND_VERSION"
fi
helm=$(bash hack/stack/build-helm.sh)
cluster=qmtl-e2e
kubeconfig="$PWD/.stack/kind-kubeconfig"
mkdir -p .stack
if ! "$kind" get clusters | grep -qx "$cluster"; then
  step "creating the kind cluster $cluster"
  "$kind" create cluster --name "$cluster" --wait 120s
fi
"$kind" get kubeconfig --name "$cluster" >"$kubeconfig"
export KUBECONFIG=$kubeconfig

step "building the image"
docker build -f operator/Dockerfile -t qmtl-dagmanager:e2e .
"$kind" load docker-image qmtl-dagmanager:e2e --name "$cluster"

password=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
kubectl create namespace qmtl-system --dry-run=client -o yaml | kubectl apply -f -
kubectl -n qmtl-system create secret generic qmtl-dagmanager-neo4j \
  --from-literal=neo4j-password="$password" --from-literal=neo4j-auth="neo4j/$password" \
  --dry-run=client -o yaml | kubectl apply -f -
step "starting Neo4j and Kafka in the cluster"
kubectl apply -f manifests/e2e/backends.yaml
kubectl -n qmtl-system rollout status statefulset/neo4j --timeout=300s
kubectl -n qmtl-system rollout status statefulset/kafka --timeout=300s

# the same steps and tests as `make e2e-node` (hack/e2e/chart.sh). No object store runs in
# kind: archives (GC of sentinel and trade_exec queues) are not exercised here.
HELM=$helm IMAGE_REPOSITORY=qmtl-dagmanager IMAGE_TAG=e2e \
  NEO4J_URI=bolt://neo4j.qmtl-system.svc:7687 NEO4J_PASSWORD=$password \
  KAFKA_BOOTSTRAP=kafka.qmtl-system.svc:9092 S3_ENDPOINT="" \
  S3_ACCESS_KEY=unused S3_SECRET_KEY=unused bash hack/e2e/chart.sh
