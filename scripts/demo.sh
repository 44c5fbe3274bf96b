#!/usr/bin/env bash
# Set up (scripts/setup.sh) and run the demo: three short trainings, warnings, TensorBoard runs in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m examples.demo "$@"
