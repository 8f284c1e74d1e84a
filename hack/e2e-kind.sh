#!/usr/bin/env bash
# `make e2e-kind`: the end-to-end suite on a kind cluster. Needs a running Docker engine.
#  1. kind and helm (built once from the Go module proxy, cached);
#  2. a kind cluster `qmtl-e2e` (kept for the next run; `kind delete cluster -n qmtl-e2e`);
#  3. the image from operator/Dockerfile, loaded into the cluster;
#  4. Neo4j, Kafka and a Gateway stand-in with the sidecar (manifests/e2e/backends.yaml);
#  5. the chart, pointing at them; 6. tests/e2e against the cluster and the sidecar.
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

step "installing the chart"
"$helm" upgrade --install qmtl-dagmanager charts/qmtl-dagmanager --namespace qmtl-system \
  --set image.repository=qmtl-dagmanager --set image.tag=e2e --set image.pullPolicy=Never \
  --set neo4j.existingSecret=qmtl-dagmanager-neo4j \
  --set neo4j.uri=bolt://neo4j.qmtl-system.svc:7687 \
  --set kafka.bootstrapServers=kafka.qmtl-system.svc:9092 \
  --set kafka.topicProfile=development
step "starting Neo4j, Kafka and the Gateway stand-in"
kubectl apply -f manifests/e2e/backends.yaml
kubectl -n qmtl-system rollout status statefulset/neo4j --timeout=300s
kubectl -n qmtl-system rollout status statefulset/kafka --timeout=300s
kubectl -n qmtl-system rollout restart deployment/qmtl-dagmanager deployment/gateway-standin
kubectl -n qmtl-system rollout status deployment/qmtl-dagmanager --timeout=300s
kubectl -n qmtl-system rollout status deployment/gateway-standin --timeout=300s

step "running tests/e2e"
kubectl -n qmtl-system port-forward deployment/gateway-standin 15051:50051 >/dev/null &
forward=$!
trap 'kill $forward 2>/dev/null || true' EXIT
sleep 2
QMTL_E2E_SIDECAR=127.0.0.1:15051 .venv/bin/python -m pytest -q tests/e2e
