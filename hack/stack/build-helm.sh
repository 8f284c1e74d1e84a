#!/usr/bin/env bash
# Build helm from the Go module proxy (no package of it is available here), once; cached.
# Output: $CACHE/helm-$HELM_VERSION/bin/helm. Prints the binary's path last.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
exec bash "$here/go-install.sh" helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION"
