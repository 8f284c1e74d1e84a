#!/usr/bin/env bash
# The Prometheus Operator's PrometheusRule and ServiceMonitor CRDs, generated with
# controller-gen from the operator's published API module (both from the Go module proxy),
# once; cached. The chart's PrometheusRule and ServiceMonitor are then validated by a real
# apiserver against the real schemas (hack/e2e/chart.sh). Prints the directory of the CRDs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../stack/versions.env
source "$here/../stack/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/monitoring-crds-$PROMETHEUS_OPERATOR_APIS_VERSION"
if [[ -s "$out/crds/monitoring.coreos.com_prometheusrules.yaml" ]]; then
  echo "$out/crds"
  exit 0
fi
log="$CACHE/monitoring-crds.log"
mkdir -p "$CACHE"
fail() { echo "[crds] error: $1; last lines of $log:" >&2; tail -20 "$log" >&2; exit 1; }
echo "[crds] $(date +%H:%M:%S) controller-gen $CONTROLLER_TOOLS_VERSION over monitoring APIs $PROMETHEUS_OPERATOR_APIS_VERSION (once)" >&2
work=$(mktemp -d)
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT
GOBIN="$work/bin" CGO_ENABLED=0 go install \
  "sigs.k8s.io/controller-tools/cmd/controller-gen@$CONTROLLER_TOOLS_VERSION" >"$log" 2>&1 ||
  fail "controller-gen did not build"
mod=github.com/prometheus-operator/prometheus-operator/pkg/apis/monitoring
dir=$(go mod download -json "$mod@$PROMETHEUS_OPERATOR_APIS_VERSION" | sed -n 's/.*"Dir": "\(.*\)".*/\1/p')
[[ -n "$dir" ]] || fail "the API module could not be downloaded"
cp -r "$dir" "$work/apis" && chmod -R u+w "$work/apis"
(cd "$work/apis" && go mod download >>"$log" 2>&1 &&
  "$work/bin/controller-gen" crd:crdVersions=v1,maxDescLen=0 paths=./v1/... \
    output:crd:dir="$work/crds" >>"$log" 2>&1) || fail "controller-gen failed"
mkdir -p "$out/crds"
cp "$work/crds/monitoring.coreos.com_prometheusrules.yaml" \
  "$work/crds/monitoring.coreos.com_servicemonitors.yaml" "$out/crds/"
echo "[crds] $(date +%H:%M:%S) generated" >&2
echo "$out/crds"
