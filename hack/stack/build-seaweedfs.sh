#!/usr/bin/env bash
# Build SeaweedFS's `weed` (its S3 gateway is the stack's object store) from the Go module
# proxy, once; cached. Its go.mod has replace directives, so it is built inside a copy of the
# module rather than with `go install`. Output: $CACHE/seaweedfs-$SEAWEEDFS_VERSION/bin/weed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/seaweedfs-$SEAWEEDFS_VERSION"
if [[ -x "$out/bin/weed" ]]; then
  echo "[s3] weed $SEAWEEDFS_VERSION cached"
  exit 0
fi
command -v go >/dev/null || { echo "[s3] error: the go toolchain is required" >&2; exit 1; }
mkdir -p "$out/bin"
module="github.com/seaweedfs/seaweedfs@$SEAWEEDFS_VERSION"
echo "[s3] $(date +%H:%M:%S) fetching $module"
dir=$(cd /tmp && go mod download -json "$module" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p')
[[ -d "$dir" ]] || { echo "[s3] error: go mod download gave no directory" >&2; exit 1; }
src=$(mktemp -d)
trap 'rm -rf "$src"' EXIT
cp -r "$dir/." "$src" && chmod -R u+w "$src"
echo "[s3] $(date +%H:%M:%S) compiling weed (cold: about 4 minutes on 2 cores; log: $out/build.log)"
(cd "$src" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/bin/weed.tmp" ./weed) \
  >"$out/build.log" 2>&1 || {
  echo "[s3] error: the build failed; last lines of $out/build.log:" >&2
  tail -20 "$out/build.log" >&2
  exit 1
}
mv "$out/bin/weed.tmp" "$out/bin/weed"
echo "[s3] $(date +%H:%M:%S) built: $("$out/bin/weed" version | head -1)"
