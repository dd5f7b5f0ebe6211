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
# The JavaScript node client (clients/js) and its tests: exact versions from the committed lockfile.
if command -v npm >/dev/null 2>&1; then
  (cd clients/js && npm ci --no-audit --no-fund --loglevel=error)
else
  echo "npm not found: the JavaScript node client tests will fail (install Node.js >= 18)" >&2
fi
.venv/bin/python -c "import fedcore, torch, grpc; print('fedstream environment ready: torch', torch.__version__, '| grpc', grpc.__version__)"
