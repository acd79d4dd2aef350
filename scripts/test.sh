#!/usr/bin/env bash
# README command 2: set everything up, then run ruff and the whole test suite.
set -euo pipefail
unset CDPATH  # an exported CDPATH sends `cd scripts/..` elsewhere, and cd then prints
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${MEDSEG_VENV:-.venv}"
"$VENV/bin/ruff" check medseg tests benchmarks
exec "$VENV/bin/python" -m pytest "$@"
