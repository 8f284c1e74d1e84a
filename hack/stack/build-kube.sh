#!/usr/bin/env bash
# Build the real kube-apiserver, kube-controller-manager and etcd from the Go module proxy.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every staging module with a
# local path. A tiny wrapper module requires the pinned release and replaces each staging module
# with its published v0.X.Y twin; the list is read from that release's own go.mod.
# Output: $CACHE/kube-$KUBERNETES_VERSION/bin/{kube-apiserver,kube-controller-manager,etcd}
# With --node it also builds what a real node needs: kubelet, kube-scheduler and kube-proxy.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
out="$CACHE/kube-$KUBERNETES_VERSION"
bins=(kube-apiserver kube-controller-manager etcd)
node_bins=(kubelet kube-scheduler kube-proxy)
[[ ${1:-} == --node ]] && bins+=("${node_bins[@]}")

done_all=1
for b in "${bins[@]}"; do [[ -x "$out/bin/$b" ]] || done_all=0; done
if [[ $done_all == 1 ]]; then
  echo "[kube] cached: $out/bin"
  exit 0
fi

command -v go >/dev/null || { echo "[kube] error: the go toolchain is required" >&2; exit 1; }
mkdir -p "$out/bin" "$out/wrapper"
cd "$out/wrapper"
log="$out/build.log"
: >"$log"
step() { echo "[kube] $(date +%H:%M:%S) $*"; }

step "resolving k8s.io/kubernetes@$KUBERNETES_VERSION"
gomod=$(go mod download -json "k8s.io/kubernetes@$KUBERNETES_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
[[ -f "$gomod" ]] || { echo "[kube] error: could not download k8s.io/kubernetes@$KUBERNETES_VERSION" >&2; exit 1; }
gover=$(awk '$1=="go"{print $2; exit}' "$gomod")
mapfile -t staging < <(awk '$2=="=>" && $3 ~ /^\.\/staging\// {print $1}' "$gomod")
step "release needs go $gover; ${#staging[@]} staging modules pinned to $KUBERNETES_STAGING_VERSION"

{
  echo "module qmtl.local/kubestack"
  echo
  echo "go $gover"
  echo
  echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
  echo
  echo "replace ("
  for m in "${staging[@]}"; do echo "	$m => $m $KUBERNETES_STAGING_VERSION"; done
  echo ")"
} >go.mod
rm -f go.sum

step "fetching modules (go get)"
pkgs=()
for b in "${bins[@]}"; do
  [[ $b == etcd ]] || pkgs+=("k8s.io/kubernetes/cmd/$b@$KUBERNETES_VERSION")
done
go get "${pkgs[@]}" >>"$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }
# etcd's server module is already in the build list; pin it as a direct requirement.
etcdver=$(go list -m -f '{{.Version}}' go.etcd.io/etcd/server/v3)
go get "go.etcd.io/etcd/server/v3@$etcdver" >>"$log" 2>&1 || { tail -30 "$log" >&2; exit 1; }

minor=${KUBERNETES_VERSION#v1.}; minor=${minor%%.*}
ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$KUBERNETES_VERSION \
 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor \
 -X k8s.io/component-base/version.gitTreeState=clean"
export CGO_ENABLED=0

build() { # name pkg
  if [[ -x "$out/bin/$1" ]]; then step "$1 cached"; return; fi
  step "compiling $1 (cold: several minutes on 2 cores; log: $log)"
  local start=$SECONDS
  go build -trimpath -ldflags "$ldflags" -o "$out/bin/$1.tmp" "$2" >>"$log" 2>&1 \
    || { tail -30 "$log" >&2; exit 1; }
  mv "$out/bin/$1.tmp" "$out/bin/$1"
  step "$1 built in $((SECONDS - start)) s"
}
build etcd go.etcd.io/etcd/server/v3
build kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build kube-controller-manager k8s.io/kubernetes/cmd/kube-controller-manager
for b in "${bins[@]}"; do
  case $b in kubelet|kube-scheduler|kube-proxy) build "$b" "k8s.io/kubernetes/cmd/$b" ;; esac
done
"$out/bin/kube-apiserver" --version
"$out/bin/etcd" --version | sed -n 1p  # sed reads to the end: no SIGPIPE under pipefail
