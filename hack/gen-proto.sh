#!/usr/bin/env bash
# Regenerate the gRPC stubs (and their type stubs) from proto/ into src/ (or into $1).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-src}
py=${PYTHON:-.venv/bin/python}
export PATH="$(dirname "$py"):$PATH"  # protoc-gen-mypy lives beside the interpreter
mkdir -p "$out/qmtl_dagmanager/pb"
"$py" -m grpc_tools.protoc -I proto \
  --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" --mypy_grpc_out="$out" \
  proto/qmtl_dagmanager/pb/dagmanager.proto
[[ -f "$out/qmtl_dagmanager/pb/__init__.py" ]] || echo '"""Generated gRPC stubs: regenerate with `make proto`, never edit."""' > "$out/qmtl_dagmanager/pb/__init__.py"
