#!/usr/bin/env bash
# Build promtool from the Go module proxy, once; cached like helm. It checks and unit-tests the
# chart's Prometheus rules (make rules-test). Prints the binary's path last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/promtool-$PROMETHEUS_MODULE_VERSION"
if [[ -x "$out/bin/promtool" ]]; then
  echo "$out/bin/promtool"
  exit 0
fi
command -v go >/dev/null || { echo "[promtool] error: the go toolchain is required" >&2; exit 1; }
mkdir -p "$out"
echo "[promtool] $(date +%H:%M:%S) building github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION (a few minutes, once)" >&2
GOBIN="$out/bin.tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_MODULE_VERSION" >"$out/build.log" 2>&1 || {
  echo "[promtool] error: the build failed; last lines of $out/build.log:" >&2
  tail -20 "$out/build.log" >&2
  exit 1
}
mkdir -p "$out/bin" && mv "$out/bin.tmp/promtool" "$out/bin/promtool" && rmdir "$out/bin.tmp"
echo "[promtool] $(date +%H:%M:%S) built: $("$out/bin/promtool" --version 2>&1 | head -1)" >&2
echo "$out/bin/promtool"
