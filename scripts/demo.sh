#!/usr/bin/env bash
# The main job: set up (scripts/setup.sh), then run a real federation on loopback (scripts/demo.py):
# a researcher server and three fednode processes, 10 rounds of Scaffold and 10 of FedAvg.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
