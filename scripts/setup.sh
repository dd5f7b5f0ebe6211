#!/usr/bin/env bash
# Create ./.venv with everything fedstream needs (torch CPU first, then the package with its test extra).
# Idempotent: re-running only installs what is missing. Usage: bash scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
# torch first, with a range the local CPU build (2.13.0) satisfies, so nothing pulls CUDA wheels later.
.venv/bin/python -m pip install --quiet "torch>=2.2,<2.14"
.venv/bin/python -m pip install --quiet -e ".[torch,test]"
.venv/bin/python -c "import fedcore, torch, grpc; print('fedstream environment ready: torch', torch.__version__, '| grpc', grpc.__version__)"
