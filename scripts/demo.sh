#!/usr/bin/env bash
# README command 1: set everything up, then run `medseg demo` (extra arguments are passed on).
# medseg runs in the caller's folder, so that a relative --out (and the default medseg_demo/)
# lands where the caller is, as the paths it prints say.
set -euo pipefail
unset CDPATH  # an exported CDPATH sends `cd scripts/..` elsewhere, and cd then prints
REPO="$(cd "$(dirname "$0")/.." && pwd)"
bash "$REPO/scripts/setup.sh"
VENV="${MEDSEG_VENV:-.venv}"
case "$VENV" in
  /*) ;;
  *) VENV="$REPO/$VENV" ;;  # setup.sh reads a relative MEDSEG_VENV in the checkout
esac
exec "$VENV/bin/medseg" demo "$@"
