#!/usr/bin/env bash
# Fill .whl/ with the wheels the borrowed GPU machine lacks (it has no network; the README's GPU section lists what it
# has), for scripts/gpu_check.sh to install into a temporary folder there:
#   - jsonargparse[signatures] and the dependencies the machine does not have (the CLI, and its tests, need it);
#   - torchao, the release pyproject.toml's `quantization` extra names, when it works with the machine's torch 2.11
#     (scripts/compat_check.sh runs the quantization tests with it); else none, and the GPU quantization tests skip
#     with "needs torchao".
# What is missing is worked out against .venv-compat/ (scripts/compat_check.sh builds it with the machine's exact
# pins): pip's dry run there lists what it would install. Without that venv, a list checked on 2026-12-06 is used.
# Prints each wheel and the total size, and fails when it is not well under the 64 MiB the repository travels in.
#
#   bash scripts/gpu_wheels.sh              # with torchao
#   GPU_WHEELS_TORCHAO=0 bash scripts/gpu_wheels.sh   # without
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
DEST=.whl
LIMIT_MIB=24
PY_VERSION=3.12  # the GPU machine's python3
PLATFORM=manylinux_2_28_x86_64
WANT=("jsonargparse[signatures]>=4.27")
[ "${GPU_WHEELS_TORCHAO:-1}" = "1" ] && WANT+=("torchao>=0.18,<0.19")
FALLBACK=(jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0 torchao==0.18.0)
quiet() { grep -v "is ignored: it is neither" >&2 || true; }  # this machine's pip config names local indexes

PINS=()
if [ -x .venv-compat/bin/python ]; then
  REPORT="$(mktemp)"
  trap 'rm -f "$REPORT"' EXIT
  PIP_CONSTRAINT="" .venv-compat/bin/python -m pip install -q --dry-run --report "$REPORT" "${WANT[@]}" 2> >(quiet) >/dev/null
  LISTED="$(.venv-compat/bin/python -c 'import json, sys
for item in json.load(open(sys.argv[1]))["install"]:
    print(item["metadata"]["name"] + "==" + item["metadata"]["version"])' "$REPORT")"
  mapfile -t PINS <<<"$LISTED"
  echo "gpu_wheels: missing from the GPU machine's packages (.venv-compat): ${PINS[*]:-nothing}"
else
  PINS=("${FALLBACK[@]}")
  [ "${GPU_WHEELS_TORCHAO:-1}" = "1" ] || PINS=("${PINS[@]:0:3}")
  echo "gpu_wheels: no .venv-compat (bash scripts/compat_check.sh --build-only builds it); using the list: ${PINS[*]}"
fi
for pin in "${PINS[@]}"; do
  case "$pin" in torch==*|nvidia-*|triton==*) echo "gpu_wheels: refusing to ship $pin (the machine has its own)" >&2; exit 2;; esac
done

rm -rf "$DEST"
mkdir -p "$DEST"
if [ ${#PINS[@]} -gt 0 ]; then
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" --platform "$PLATFORM" \
    -d "$DEST" "${PINS[@]}" 2> >(quiet)
fi
ls -l "$DEST" | awk 'NR > 1 {printf "gpu_wheels:   %8.1f KiB  %s\n", $5 / 1024, $9}'
TOTAL=$(du -sb "$DEST" | cut -f1)
echo "gpu_wheels: $DEST holds $(ls "$DEST" | wc -l) wheels, $((TOTAL / 1024)) KiB in all (limit ${LIMIT_MIB} MiB of the 64 MiB)"
if [ "$TOTAL" -gt $((LIMIT_MIB * 1024 * 1024)) ]; then
  echo "gpu_wheels: error: $DEST is over ${LIMIT_MIB} MiB" >&2
  exit 1
fi
