#!/usr/bin/env bash
# go-install.sh NAME MODULE/CMD VERSION: build one command from the Go module proxy, once, into
# $CACHE/NAME-VERSION/bin/NAME (static, stripped); cached. Prints the binary's path last.
# Used by build-helm.sh and build-promtool.sh.
set -euo pipefail
name=$1 pkg=$2 version=$3
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/$name-$version"
if [[ -x "$out/bin/$name" ]]; then
  echo "$out/bin/$name"
  exit 0
fi
command -v go >/dev/null || { echo "[$name] error: the go toolchain is required" >&2; exit 1; }
mkdir -p "$out"
echo "[$name] $(date +%H:%M:%S) building $pkg@$version (a few minutes, once)" >&2
GOBIN="$out/bin.tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "$pkg@$version" \
  >"$out/build.log" 2>&1 || {
  echo "[$name] error: the build failed; last lines of $out/build.log:" >&2
  tail -20 "$out/build.log" >&2
  exit 1
}
mkdir -p "$out/bin" && mv "$out/bin.tmp/$name" "$out/bin/$name" && rmdir "$out/bin.tmp"
echo "[$name] $(date +%H:%M:%S) built $version" >&2
echo "$out/bin/$name"
