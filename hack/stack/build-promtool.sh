#!/usr/bin/env bash
# Build promtool from the Go module proxy, once; cached like helm. It checks and unit-tests the
# chart's Prometheus rules (make rules-test). Prints the binary's path last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
exec bash "$here/go-install.sh" promtool github.com/prometheus/prometheus/cmd/promtool \
  "$PROMETHEUS_MODULE_VERSION"
