#!/usr/bin/env bash
# Create .venv (if missing) and install gradwatch with the pinned development environment.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q -c constraints-dev.txt -e ".[dev]"
