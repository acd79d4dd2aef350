#!/usr/bin/env bash
# README command 1: set everything up, then run `medseg demo` (extra arguments are passed on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec "${MEDSEG_VENV:-.venv}/bin/medseg" demo "$@"
