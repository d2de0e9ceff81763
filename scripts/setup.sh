#!/usr/bin/env bash
# Create .venv (if missing) and install lightning_bigmodel with its test extras.
# torch is pinned through constraints.txt; set LBM_TORCH_CONSTRAINT=0 to keep a torch you installed yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
args=(-q)
[ "${LBM_TORCH_CONSTRAINT:-1}" = "1" ] && args+=(-c constraints.txt)
.venv/bin/python -m pip install "${args[@]}" --upgrade pip >/dev/null
.venv/bin/python -m pip install "${args[@]}" -e ".[test]"
