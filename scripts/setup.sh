#!/usr/bin/env bash
# Create .venv (if needed) and install medseg into it, torch first.
#
# torch: 2.13.0 is installed unless the environment already has a torch; on Linux the CPU
# build from PyTorch's own index when that can be reached, else what the configured index
# offers (a user with a GPU installs their CUDA build into .venv first, or sets MEDSEG_TORCH
# to the pip requirement they want, e.g. MEDSEG_TORCH="torch==2.13.0" with their own index).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${MEDSEG_VENV:-.venv}"
TORCH_SPEC="${MEDSEG_TORCH:-torch==2.13.0}"

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
if "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
else
  # PyPI's Linux torch wheel is the CUDA build (several GB of CUDA packages): on Linux, take
  # the CPU build from PyTorch's own index when it can be reached (a machine that reaches
  # only a package mirror gets what the mirror offers, as before)
  TORCH_INDEX=()
  if [ -z "${MEDSEG_TORCH:-}" ] && [ "$(uname -s)" = Linux ] && "$PY" -c "
import urllib.request
urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    # the only index for this step, which installs torch and its own dependencies: mixing
    # it with PyPI (--extra-index-url) would let a name on either index win
    TORCH_INDEX=(--index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "setup: installing $TORCH_SPEC ${TORCH_INDEX[*]:-}"
  "$PY" -m pip install --quiet ${TORCH_INDEX[@]+"${TORCH_INDEX[@]}"} "$TORCH_SPEC"
fi
echo "setup: installing medseg and its dependencies"
"$PY" -m pip install --quiet -e ".[test]"
