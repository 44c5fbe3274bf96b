#!/usr/bin/env bash
# Run the demo: three short trainings, their warnings, TensorBoard runs in runs/demo, and the
# commands to run next (with .venv/bin/, where gradwatch and tensorboard are installed).
# Sets up .venv (if missing) with only what the demo needs: gradwatch, its runtime
# dependencies and the `examples` extra (matplotlib, for `gradwatch compare --png`), at the
# versions pinned for CI (torch 2.13.0). scripts/test.sh adds the development tools to the
# same .venv; running the demo after it installs nothing new. --no-compile: byte-compiling all
# of torch at install time costs more than compiling, on first import, the part the demo uses.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --no-compile -c constraints-dev.txt -e ".[examples]"
.venv/bin/python -m examples.demo "$@"
[ "${VIRTUAL_ENV:-}" = "$PWD/.venv" ] || echo "(or run 'source .venv/bin/activate' once, then call them without .venv/bin/)"
