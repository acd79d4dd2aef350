#!/usr/bin/env bash
# Create .venv (if needed) and install medseg into it, torch first.
#
# torch: 2.13.0 is installed unless the environment already has a torch. On Linux x86_64 it
# is the CPU build (torch==2.13.0+cpu, from PyTorch's own index when that can be reached, else
# from the configured index or wheelhouse): PyPI's plain Linux wheel is the CUDA build, several
# GB. A user with a GPU installs their CUDA build into .venv first, or sets MEDSEG_TORCH to the
# pip requirement they want (with PIP_EXTRA_INDEX_URL naming its index); either is kept.
set -euo pipefail
unset CDPATH  # an exported CDPATH sends `cd scripts/..` elsewhere, and cd then prints
# Ctrl-C during pip: pip ends with a status of 1 and bash would go on to the next line (the
# torch step's advice to set MEDSEG_TORCH, for one); stop here instead
trap 'echo "setup: interrupted; run it again to go on" >&2; exit 130' INT
cd "$(dirname "$0")/.."

# python3.11 when one runs, else python3: a python3.11 can be there and not run (pyenv's shim of
# a version that is installed but not selected)
if [ -z "${PYTHON:-}" ]; then
  PYTHON=python3
  if python3.11 -c "" 2>/dev/null; then
    PYTHON=python3.11
  fi
fi
VENV="${MEDSEG_VENV:-.venv}"
PY="$VENV/bin/python"

# a .venv is reused when its Python runs and is 3.10 or newer (one made by an old Python,
# or left without a working Python, is rebuilt); one without pip (`uv venv`, an interrupted
# setup) gets pip, keeping what it holds, such as a user's CUDA torch. Only a virtual
# environment (its pyvenv.cfg) is ever removed: MEDSEG_VENV may name any folder by mistake.
if [ -e "$VENV" ] && ! "$PY" -c "import sys; sys.exit(sys.version_info < (3, 10))" \
    2>/dev/null; then
  if [ ! -f "$VENV/pyvenv.cfg" ]; then
    echo "setup: $VENV exists and is not a Python virtual environment (no pyvenv.cfg):" \
      "move it away, or set MEDSEG_VENV to another place" >&2
    exit 1
  fi
  echo "setup: $VENV has no working Python 3.10 or newer: rebuilding it"
  rm -rf "$VENV"
fi
if [ ! -x "$PY" ]; then
  if ! command -v "$PYTHON" >/dev/null; then
    echo "setup: $PYTHON not found; install Python 3.11 or set PYTHON" >&2
    exit 1
  fi
  if ! "$PYTHON" -c "import sys; sys.exit(sys.version_info < (3, 10))" 2>/dev/null; then
    echo "setup: $PYTHON is not Python 3.10 or newer; install Python 3.11 or set PYTHON" >&2
    exit 1
  fi
  echo "setup: creating $VENV with $("$PYTHON" --version)"
  "$PYTHON" -m venv "$VENV"
fi
if ! "$PY" -c "import pip" 2>/dev/null; then
  echo "setup: $VENV has no pip: adding it"
  if ! "$PY" -m ensurepip --upgrade --default-pip >/dev/null; then
    echo "setup: cannot add pip to $VENV (on Debian/Ubuntu: apt install python3.11-venv)" >&2
    exit 1
  fi
fi

install_torch() {
  local spec="$1"
  local index=()
  # PyTorch's CPU index as the only index for this step, which installs torch and its own
  # dependencies: mixing it with PyPI (--extra-index-url) would let a name on either win
  if [ "$spec" = "torch==2.13.0+cpu" ] && "$PY" -c "
import urllib.request
urllib.request.urlopen('https://download.pytorch.org/whl/cpu/', timeout=5)" 2>/dev/null; then
    index=(--index-url https://download.pytorch.org/whl/cpu)
  fi
  echo "setup: installing $spec ${index[*]:-}"
  if ! "$PY" -m pip install --quiet ${index[@]+"${index[@]}"} "$spec"; then
    echo "setup: could not install $spec; set MEDSEG_TORCH to the torch requirement your" \
      "index offers (e.g. MEDSEG_TORCH=torch==2.13.0 for PyPI's CUDA build)" >&2
    exit 1
  fi
}

if [ -n "${MEDSEG_TORCH:-}" ]; then
  install_torch "$MEDSEG_TORCH"  # a no-op when .venv already has it
elif "$PY" -c "import torch" 2>/dev/null; then
  echo "setup: using the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
elif [ "$(uname -s)" = Linux ] && [ "$(uname -m)" = x86_64 ]; then
  install_torch "torch==2.13.0+cpu"
else
  install_torch "torch==2.13.0"  # macOS and Linux on ARM: PyPI's wheel is the CPU build
fi

# the installed torch pinned, so that no dependency's range can replace it (a newer release
# from an index is a CUDA build on Linux, and a user's own CUDA build must stay)
TORCH_VERSION="$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')"
# medseg needs torch 2.8 (MONAI 1.6's floor): an older one, kept, ended in pip's bare
# 'ResolutionImpossible'
if ! "$PY" -c "import sys; sys.exit(tuple(map(int, sys.argv[1].split('.')[:2])) < (2, 8))" \
    "$TORCH_VERSION" 2>/dev/null; then
  echo "setup: $VENV has torch $TORCH_VERSION, and medseg needs torch 2.8 or newer: install a" \
    "newer build into $VENV (or set MEDSEG_TORCH), or remove $VENV to get torch 2.13.0" >&2
  exit 1
fi
# pip takes half a minute to find that nothing is to be done: skip it when this checkout's
# pyproject.toml was installed with this torch and medseg's dependencies (test extra included)
# are all installed in versions it allows (one changed since, by hand or by another package's
# install, sends setup to pip); the requirements are read by pip's own parser
STAMP="$VENV/.medseg-setup"
WANTED="$(cksum < pyproject.toml) $(pwd) torch $TORCH_VERSION"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANTED" ] && "$PY" -c "
import importlib.metadata as m, medseg, sys
from pip._vendor.packaging.requirements import Requirement
for line in m.requires('medseg') or []:
    requirement = Requirement(line)
    if requirement.marker and not requirement.marker.evaluate({'extra': 'test'}):
        continue
    if not requirement.specifier.contains(m.version(requirement.name), prereleases=True):
        sys.exit(1)
sys.exit(medseg.__file__ is None)" 2>/dev/null; then
  echo "setup: medseg and its dependencies are installed"
  exit 0
fi
echo "setup: installing medseg and its dependencies"
rm -f "$STAMP"
"$PY" -m pip install --quiet -e ".[test]" "torch==$TORCH_VERSION"
echo "$WANTED" > "$STAMP"
