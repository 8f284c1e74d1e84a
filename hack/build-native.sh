#!/usr/bin/env bash
# Build and install the native extension (src/native, module qmtl_native) into the venv.
#   hack/build-native.sh PYTHON
# Its crates come from Debian's packages (installed here when missing), the build backend
# (maturin) from PyPI. Without cargo the project still works on its Python path: a warning,
# except under CI=true, where a missing extension fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
CRATES=(librust-pyo3-dev librust-pyo3+extension-module-dev librust-blake3-dev)

fail() {
  if [[ "${CI:-}" == "true" ]]; then echo "[native] $1" >&2; exit 1; fi
  echo "[native] WARNING: $1; the DAG parser runs in Python only (slower)" >&2
  exit 0
}

command -v cargo >/dev/null || fail "cargo not found (install Rust: rustup or Debian's cargo)"
if [[ ! -d /usr/share/cargo/registry/pyo3-0.17.3 || ! -d /usr/share/cargo/registry/blake3-1.3.1 ]]; then
  echo "[native] installing the Debian crate packages: ${CRATES[*]}"
  SUDO=(); [[ $(id -u) == 0 ]] || SUDO=(sudo)
  "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${CRATES[@]}" >/dev/null \
    || { "${SUDO[@]}" apt-get update -qq && "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${CRATES[@]}" >/dev/null; } \
    || fail "could not install ${CRATES[*]}"
fi
echo "[native] building src/native (cargo, release; about a minute when cold)"
"$PY" -m pip install -q ./src/native || fail "the native build failed (output above)"
"$PY" -c "import qmtl_native" || fail "qmtl_native does not import"
echo "[native] qmtl_native installed"
