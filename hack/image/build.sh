#!/usr/bin/env bash
# `make image`: build operator/Dockerfile with podman, with no registry and no package index.
#   IMAGE       the tag to build (default qmtl-dagmanager:dev)
#   IMAGE_BASE  local (default): a Debian bookworm base made here by mmdebstrap from Debian's
#               packages and cached; or any image reference with python3 3.11 (for example
#               python:3.11.14-slim-bookworm where a registry is reachable)
# Wheels come from operator/wheelhouse, filled here by `pip download` at the pinned versions;
# the build runs with PIP_NO_INDEX=1. podman, runc and mmdebstrap are installed when missing.
# Prints progress; the image size and the build time at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."
IMAGE=${IMAGE:-qmtl-dagmanager:dev}
IMAGE_BASE=${IMAGE_BASE:-local}
CACHE=${QMTL_STACK_CACHE:-$HOME/.cache/qmtl-stack}
PY=${PY:-.venv/bin/python}
BASE_SUITE=bookworm
BASE_TAG=localhost/qmtl-base:$BASE_SUITE
# build backends the image's builds need (the runtime dependencies come from constraints.txt)
BUILD_WHEELS=(setuptools==84.2.1 wheel==0.45.1 maturin==1.16.0)
export CONTAINERS_CONF=$PWD/hack/image/containers.conf
step() { echo "[image] $(date +%H:%M:%S) $*"; }
start=$SECONDS

need=()
command -v podman >/dev/null || need+=(podman)
command -v runc >/dev/null || need+=(runc)
[[ $IMAGE_BASE != local ]] || command -v mmdebstrap >/dev/null || need+=(mmdebstrap)
if ((${#need[@]})); then
  step "installing ${need[*]} (Debian packages)"
  SUDO=(); [[ $(id -u) == 0 ]] || SUDO=(sudo)
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" uidmap >/dev/null \
    || { "${SUDO[@]}" apt-get update -qq \
         && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${need[@]}" uidmap >/dev/null; }
fi

if [[ $IMAGE_BASE == local ]]; then
  base_tar=$CACHE/image-base-$BASE_SUITE.tar
  if [[ ! -s $base_tar ]]; then
    step "building the base from Debian packages (mmdebstrap, about a minute)"
    mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates,passwd \
      --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
      --dpkgopt='path-include=/usr/share/doc/*/copyright' \
      --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
      --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
      "$BASE_SUITE" "$base_tar.part.tar" \
      "deb http://deb.debian.org/debian $BASE_SUITE main" \
      "deb http://deb.debian.org/debian $BASE_SUITE-updates main" \
      "deb http://deb.debian.org/debian-security $BASE_SUITE-security main"
    mv "$base_tar.part.tar" "$base_tar"
  fi
  # tagged by the tarball's digest: a rebuilt base is imported again, an unchanged one is not
  BASE_TAG=$BASE_TAG-$(sha256sum "$base_tar" | cut -c1-12)
  if ! podman image exists "$BASE_TAG"; then
    step "importing the base as $BASE_TAG"
    podman import --quiet --change 'CMD ["/bin/bash"]' "$base_tar" "$BASE_TAG" >/dev/null
  fi
  base=$BASE_TAG
else
  base=$IMAGE_BASE
fi

step "filling operator/wheelhouse (pip download, pinned by constraints.txt)"
deps=$("$PY" - <<'PY'
import tomllib
with open("pyproject.toml", "rb") as f:
    print("\n".join(tomllib.load(f)["project"]["dependencies"]))
PY
)
mapfile -t deps <<<"$deps"
"$PY" -m pip download -q --only-binary=:all: -d operator/wheelhouse -c constraints.txt \
  "${deps[@]}" "${BUILD_WHEELS[@]}"
step "$(find operator/wheelhouse -name '*.whl' | wc -l) wheels ready"

step "building $IMAGE on $base (podman, runc)"
podman build --quiet --network host -f operator/Dockerfile -t "$IMAGE" \
  --build-arg PYTHON_IMAGE="$base" --build-arg PIP_NO_INDEX=1 . >/dev/null
size=$(podman image inspect "$IMAGE" --format '{{.Size}}')
step "built $IMAGE: $((size / 1000000)) MB in $((SECONDS - start)) s"

# Run it as a restricted pod would: read-only root, every capability dropped, no privilege
# escalation. The process must be uid 10001 with no capabilities, /tmp its only writable place.
run=(podman run --rm --read-only --cap-drop=ALL --security-opt=no-new-privileges)
t0=$(date +%s%N)
"${run[@]}" "$IMAGE" --help >/dev/null
ms=$((($(date +%s%N) - t0) / 1000000))
got=$("${run[@]}" --entrypoint python3 "$IMAGE" -c '
import os, pathlib
caps = [l.split()[1] for l in pathlib.Path("/proc/self/status").read_text().splitlines()
        if l.startswith("CapEff")][0]
pathlib.Path("/tmp/x").write_text("x")
try:
    pathlib.Path("/opt/x").write_text("x")
    root = "writable"
except OSError:
    root = "read-only"
import qmtl_native
print(os.getuid(), os.getgid(), int(caps, 16), root)
')
[[ $got == "10001 10001 0 read-only" ]] \
  || { echo "[image] error: expected uid/gid 10001, no capabilities, a read-only root; got: $got" >&2; exit 1; }
step "checked: uid 10001, no capabilities, read-only root, native parser present; --help in $ms ms"
