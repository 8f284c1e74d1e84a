#!/usr/bin/env bash
# Build helm from the Go module proxy (no package of it is available here), once; cached.
# Output: $CACHE/helm-$HELM_VERSION/bin/helm. Prints the binary's path last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/helm-$HELM_VERSION"
if [[ -x "$out/bin/helm" ]]; then
  echo "$out/bin/helm"
  exit 0
fi
command -v go >/dev/null || { echo "[helm] error: the go toolchain is required" >&2; exit 1; }
mkdir -p "$out/bin"
echo "[helm] $(date +%H:%M:%S) building helm.sh/helm/v3/cmd/helm@$HELM_VERSION (a few minutes, once)" >&2
GOBIN="$out/bin.tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >"$out/build.log" 2>&1 || {
  echo "[helm] error: the build failed; last lines of $out/build.log:" >&2
  tail -20 "$out/build.log" >&2
  exit 1
}
mv "$out/bin.tmp/helm" "$out/bin/helm" && rmdir "$out/bin.tmp"
echo "[helm] $(date +%H:%M:%S) built: $("$out/bin/helm" version --short)" >&2
echo "$out/bin/helm"
