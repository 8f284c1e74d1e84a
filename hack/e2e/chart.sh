#!/usr/bin/env bash
# The end-to-end steps shared by `make e2e-node` and `make e2e-kind`, once the cluster, the
# image and the backends exist: the chart installed the way a platform team does, a Gateway
# stand-in with the sidecar beside it, then tests/e2e (samples Ready, canary promoted, the
# sidecar agreeing) and tests/chart (probes, Lease, alert rules and dashboard, failover,
# upgrade, uninstall).
# Reads: KUBECONFIG, HELM, IMAGE_REPOSITORY, IMAGE_TAG, NEO4J_URI, NEO4J_PASSWORD,
#        KAFKA_BOOTSTRAP, S3_ENDPOINT, S3_ACCESS_KEY, S3_SECRET_KEY; PY (default .venv/bin/python);
#        for Kafka over SASL_SSL also KAFKA_SECURITY_PROTOCOL, KAFKA_SASL_MECHANISM,
#        KAFKA_SASL_USERNAME/PASSWORD (the sidecar), KAFKA_OPERATOR_USER/PASSWORD, KAFKA_SSL_CA;
#        NEO4J_SSL_CA for a bolt+s:// NEO4J_URI
set -euo pipefail
cd "$(dirname "$0")/../.."
: "${KUBECONFIG:?}" "${HELM:?}" "${IMAGE_REPOSITORY:?}" "${IMAGE_TAG:?}" "${NEO4J_URI:?}"
: "${NEO4J_PASSWORD:?}" "${KAFKA_BOOTSTRAP:?}" "${S3_ACCESS_KEY:?}" "${S3_SECRET_KEY:?}"
PY=${PY:-.venv/bin/python}
NS=qmtl-system
RELEASE=qmtl-dagmanager
step() { echo "[e2e] $(date +%H:%M:%S) $*"; }
export KUBECONFIG

step "namespace $NS and the Secrets the chart reads"
kubectl create namespace "$NS" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" create secret generic qmtl-dagmanager-neo4j \
  --from-literal=neo4j-password="$NEO4J_PASSWORD" --from-literal=neo4j-auth="neo4j/$NEO4J_PASSWORD" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
kubectl -n "$NS" create secret generic qmtl-dagmanager-s3 \
  --from-literal=access-key="$S3_ACCESS_KEY" --from-literal=secret-key="$S3_SECRET_KEY" \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
backend_values=()
if [[ -n "${NEO4J_SSL_CA:-}" ]]; then
  step "Neo4j over TLS: its CA as a Secret"
  kubectl -n "$NS" create secret generic qmtl-dagmanager-neo4j-ca --from-file=ca.crt="$NEO4J_SSL_CA" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  backend_values+=(--set neo4j.caSecret=qmtl-dagmanager-neo4j-ca)
fi
if [[ "${KAFKA_SECURITY_PROTOCOL:-plaintext}" == SASL_SSL || "${KAFKA_SECURITY_PROTOCOL:-}" == sasl_ssl ]]; then
  : "${KAFKA_OPERATOR_USER:?}" "${KAFKA_OPERATOR_PASSWORD:?}" "${KAFKA_SASL_USERNAME:?}" "${KAFKA_SASL_PASSWORD:?}" "${KAFKA_SSL_CA:?}"
  step "Kafka over SASL_SSL: the two principals' passwords and the brokers' CA as Secrets"
  kubectl -n "$NS" create secret generic qmtl-dagmanager-kafka \
    --from-literal=operator-password="$KAFKA_OPERATOR_PASSWORD" \
    --from-literal=sidecar-password="$KAFKA_SASL_PASSWORD" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  kubectl -n "$NS" create secret generic qmtl-dagmanager-kafka-ca --from-file=ca.crt="$KAFKA_SSL_CA" \
    --dry-run=client -o yaml | kubectl apply -f - >/dev/null
  backend_values+=(
    --set kafka.security.protocol=sasl_ssl
    --set kafka.security.saslMechanism="${KAFKA_SASL_MECHANISM:-SCRAM-SHA-512}"
    --set kafka.security.operatorUser="$KAFKA_OPERATOR_USER"
    --set kafka.security.sidecarUser="$KAFKA_SASL_USERNAME"
    --set kafka.security.existingSecret=qmtl-dagmanager-kafka
    --set kafka.security.caSecret=qmtl-dagmanager-kafka-ca
  )
fi

step "the Prometheus Operator's PrometheusRule and ServiceMonitor CRDs (the chart's alerts)"
kubectl apply --server-side -f "$(bash hack/e2e/monitoring-crds.sh)" >/dev/null
RUNBOOKS=https://git.example.invalid/qmtl/dagmanager/docs/runbooks  # checked by tests/chart
export QMTL_E2E_RUNBOOKS=$RUNBOOKS

# the values of this run; tests/chart upgrades with --reuse-values
values=(
  --set image.repository="$IMAGE_REPOSITORY" --set image.tag="$IMAGE_TAG"
  --set image.pullPolicy=Never
  --set operator.replicas=2
  --set neo4j.existingSecret=qmtl-dagmanager-neo4j --set neo4j.uri="$NEO4J_URI"
  --set kafka.bootstrapServers="$KAFKA_BOOTSTRAP" --set kafka.topicProfile=development
  --set archive.s3.endpoint="${S3_ENDPOINT:-}"
  --set metrics.prometheusRule.enabled=true --set metrics.serviceMonitor.enabled=true
  --set metrics.prometheusRule.runbookBaseUrl="$RUNBOOKS"
  "${backend_values[@]}"
)
# CRDs that exist without the release's ownership (applied by hand or by an earlier tool) are
# adopted, as Helm requires, instead of failing the install
for f in charts/qmtl-dagmanager/files/crds/*.yaml; do
  crd=$("$PY" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["metadata"]["name"])' "$f")
  if kubectl get crd "$crd" >/dev/null 2>&1; then
    kubectl annotate crd "$crd" --overwrite meta.helm.sh/release-name="$RELEASE" \
      meta.helm.sh/release-namespace="$NS" >/dev/null
    kubectl label crd "$crd" --overwrite app.kubernetes.io/managed-by=Helm >/dev/null
  fi
done
rm -f .stack/e2e-figures.txt
step "helm install $RELEASE (2 operator replicas)"
"$HELM" upgrade --install "$RELEASE" charts/qmtl-dagmanager --namespace "$NS" "${values[@]}"

step "the Gateway stand-in with the sidecar container"
kubectl -n "$NS" create configmap gateway-standin-dag --from-file=dag.json=tests/data/sample-dag.json \
  --dry-run=client -o yaml | kubectl apply -f - >/dev/null
sed -e "s|__IMAGE__|$IMAGE_REPOSITORY:$IMAGE_TAG|g" -e "s|__PULL_POLICY__|Never|g" \
  manifests/e2e/gateway-standin.yaml | kubectl apply -f -

step "waiting for the operator and the stand-in (real probes)"
t0=$SECONDS
kubectl -n "$NS" rollout status "deployment/$RELEASE" --timeout=300s
kubectl -n "$NS" rollout status deployment/gateway-standin --timeout=300s
step "both Available in $((SECONDS - t0)) s"

port=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
kubectl -n "$NS" port-forward deployment/gateway-standin "$port:50051" >/dev/null &
forward=$!
trap 'kill $forward 2>/dev/null || true' EXIT
for _ in $(seq 50); do (: </dev/tcp/127.0.0.1/"$port") 2>/dev/null && break; sleep 0.2; done

step "tests/e2e and tests/chart"
QMTL_E2E_SIDECAR=127.0.0.1:$port QMTL_E2E_HELM=$HELM QMTL_E2E_RELEASE=$RELEASE \
  QMTL_E2E_NAMESPACE=$NS "$PY" -m pytest -q -p no:cacheprovider tests/e2e tests/chart
step "figures of this run:"
sed 's/^/  /' .stack/e2e-figures.txt 2>/dev/null || true
