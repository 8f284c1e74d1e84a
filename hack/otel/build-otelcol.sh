#!/usr/bin/env bash
# Build an OpenTelemetry Collector (OTLP receiver, debug exporter) from the Go module proxy with
# the collector's own builder, once; cached like helm. Tests run it as the OTLP receiver of the
# traces and audit logs (tests/integration/test_tracing.py). Prints the binary's path last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=../stack/versions.env
source "$here/../stack/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/otelcol-$OTELCOL_VERSION"
if [[ -x "$out/bin/otelcol" ]]; then
  echo "$out/bin/otelcol"
  exit 0
fi
command -v go >/dev/null || { echo "[otelcol] error: the go toolchain is required" >&2; exit 1; }
rm -rf "$out/work" && mkdir -p "$out/work"
log="$out/build.log"
echo "[otelcol] $(date +%H:%M:%S) building the collector $OTELCOL_VERSION with its builder (a few minutes, once)" >&2
fail() {
  echo "[otelcol] error: $1; last lines of $log:" >&2
  tail -20 "$log" >&2
  exit 1
}
GOBIN="$out/work/bin" CGO_ENABLED=0 go install \
  "go.opentelemetry.io/collector/cmd/builder@$OTELCOL_VERSION" >"$log" 2>&1 || fail "the builder did not build"
sed -e "s/@VERSION@/$OTELCOL_VERSION/g" -e "s/@CONFMAP_VERSION@/$OTELCOL_CONFMAP_VERSION/g" \
  -e "s|@OUT@|$out/work/dist|" "$here/otelcol-manifest.yaml" >"$out/work/manifest.yaml"
CGO_ENABLED=0 "$out/work/bin/builder" --config "$out/work/manifest.yaml" >>"$log" 2>&1 || fail "the collector did not build"
mkdir -p "$out/bin" && mv "$out/work/dist/qmtl-otelcol" "$out/bin/otelcol"
rm -rf "$out/work"
echo "[otelcol] $(date +%H:%M:%S) built $OTELCOL_VERSION" >&2
echo "$out/bin/otelcol"
