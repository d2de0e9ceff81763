#!/usr/bin/env bash
# Create .venv (if missing), install lightning_bigmodel with its test extras, then write the demo models of the
# example configs into runs/ (`lightning-bigmodel demo`: offline; folders already there are kept, so a rerun is quick).
# torch is pinned through constraints.txt; set LBM_TORCH_CONSTRAINT=0 to keep a torch you installed yourself.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
args=(-q)
[ "${LBM_TORCH_CONSTRAINT:-1}" = "1" ] && args+=(-c constraints.txt)
.venv/bin/python -m pip install "${args[@]}" --upgrade pip >/dev/null
.venv/bin/python -m pip install "${args[@]}" -e ".[test]"
.venv/bin/lightning-bigmodel demo
