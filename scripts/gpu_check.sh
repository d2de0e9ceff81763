#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: the CUDA-gated tests, the sanitizer, then the speed figures, in at most
# 8 minutes on one GPU, with a Markdown report and its raw JSON rewritten as each pass completes (a run cut short
# still reports the passes that finished).
#
#   bash scripts/gpu_check.sh                       # report: benchmarks/GPU_CHECK.md and benchmarks/GPU_CHECK.json
#   GPU_CHECK_OUT=/some/dir bash scripts/gpu_check.sh   # report, per-pass logs and JSON there (or pass the folder as $1)
#
# Interpreter: $PYTHON if set, else .venv/bin/python when present, else python3 with the repository on PYTHONPATH
# (the project need not be installed). Wheels in a .whl/ folder (scripts/gpu_wheels.sh fills it: jsonargparse,
# torchao) are installed into a temporary folder put on PYTHONPATH first.
#
# Before anything else it prints the interpreter, torch, CUDA, the driver and the GPUs. It exits non-zero when torch
# cannot be imported, or when nvidia-smi lists GPUs but torch sees none; with neither GPUs nor CUDA it says so in one
# line and exits 0. Passes, by value (each capped in seconds; override by environment; the whole run stops starting
# passes when GPU_CHECK_TOTAL_S=460 would be exceeded; GPU_CHECK_PASSES=tests,offload runs only those):
#   1. tests          every CUDA-gated test (scripts/cuda_tests.py), with the count of those skipped and why
#                                                                                                 GPU_CHECK_TESTS_S=140
#   2. memory-vs-plan peak GPU and pinned memory of offloaded forwards vs the plan (benchmarks/gpu_memory_vs_plan.py)
#                                                                                                 GPU_CHECK_MEMORY_S=40
#   3. sanitizer      the stream tests under PyTorch's CUDA sanitizer in every thread (stream-order races of the
#                     prefetch and pipeline threads, tests/csan_all_threads.py) and compute-sanitizer's racecheck
#                     (shared-memory races in kernels) where installed; BIGMODEL_PLANT_RACE=1 removes every
#                     Stream.wait_event and must make this pass fail                                GPU_CHECK_SAN_S=60
#   4. offload        pinned host-to-device bandwidth, transfer share, prefetch overlap (GPT-2 fp16,
#                     benchmarks/gpu_offload.py)                                                 GPU_CHECK_OFFLOAD_S=35
#   5. bigmodel       a 20B-shaped bf16 model that does not fit the GPU budget: decode and prefill with CPU offload,
#                     ours vs accelerate, pinned bandwidth share (benchmarks/gpu_bigmodel.py)     GPU_CHECK_BIG_S=110
#   6. vs-accelerate  the same comparison on GPT-2 (124M), one interpreter (gpu_bigmodel.py --shape gpt2)
#                                                                                                GPU_CHECK_COMPARE_S=30
#   7. pipeline       micro-batch pipelining (one GPU: the cost of splitting; benchmarks/pipeline_bench.py)
#                                                                                               GPU_CHECK_PIPELINE_S=25
# Exit status: 0 when every pass succeeded, 1 otherwise (the report says which), 2/3 for the start-up errors above.
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${1:-${GPU_CHECK_OUT:-benchmarks}}"
# GPU_CHECK_PASSES picks passes by name (default: all, in this order)
PASSES="${GPU_CHECK_PASSES:-tests,memory-vs-plan,sanitizer,offload,bigmodel,vs-accelerate,pipeline}"

if [ -z "${PYTHON:-}" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "gpu_check: error: no Python interpreter '$PYTHON' (set PYTHON=/path/to/python)" >&2
  exit 2
fi
# The repository (the project, examples, benchmarks) and scripts/ (the cuda_tests plugin) are importable from here.
export PYTHONPATH="$ROOT:$ROOT/scripts${PYTHONPATH:+:$PYTHONPATH}"
WORK="$(mktemp -d)"
# benchmarks/gpu_bigmodel.py deletes its scratch checkpoint itself; a pass killed hard would leave it in RAM
trap 'rm -rf "$WORK" /dev/shm/lbm_gpu_bigmodel_* "${TMPDIR:-/tmp}"/lbm_gpu_bigmodel_*' EXIT

# --- 0. What this machine is, before anything else ---------------------------------------------------------------
NVSMI=""
if command -v nvidia-smi >/dev/null 2>&1; then
  NVSMI="$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null || true)"
fi
export GPU_CHECK_NVSMI="$NVSMI" GPU_CHECK_COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
"$PYTHON" - "$WORK/env.json" <<'EOF'
import datetime, json, os, platform, sys

gpus = [line.split(",")[0].strip() for line in os.environ["GPU_CHECK_NVSMI"].splitlines() if line.strip()]
driver = os.environ["GPU_CHECK_NVSMI"].splitlines()[0].split(",")[-1].strip() if gpus else "none (no nvidia-smi GPU)"
env = {"python": f"{platform.python_version()} ({sys.executable})", "driver": driver, "gpus_nvidia_smi": gpus,
       "commit": os.environ["GPU_CHECK_COMMIT"], "date": datetime.datetime.now(datetime.timezone.utc).isoformat()}
try:
    import torch
except Exception as error:  # a CUDA build without its libraries raises OSError, not only ImportError
    print(f"gpu_check: python {env['python']}, torch: NOT IMPORTABLE, driver {driver}, nvidia-smi GPUs: {gpus or 'none'}")
    reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    print(f"gpu_check: error: {sys.executable} cannot import torch ({type(error).__name__}: {reason}); install a CUDA "
          "build of torch or set PYTHON to an interpreter that has one", file=sys.stderr)
    sys.exit(2)
visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = [torch.cuda.get_device_name(i) for i in range(visible)]
env.update(torch=torch.__version__, cuda=torch.version.cuda or "none (a CPU build)", gpus_torch=f"{visible} x {names[0]}" if names else "none")
print(f"gpu_check: python {env['python']}, torch {env['torch']}, CUDA {env['cuda']}, driver {driver}, "
      f"nvidia-smi GPUs: {', '.join(gpus) or 'none'}; torch sees {visible}{': ' + ', '.join(names) if names else ''}")
json.dump(env, open(sys.argv[1], "w"), indent=2)
if gpus and not visible:
    why = ("this torch is a CPU build (torch.version.cuda is None)" if torch.version.cuda is None else
           f"this torch is built for CUDA {torch.version.cuda}: check the driver supports it, and CUDA_VISIBLE_DEVICES")
    print(f"gpu_check: error: nvidia-smi lists {len(gpus)} GPU(s) ({', '.join(gpus)}) but torch {torch.__version__} "
          f"sees none: {why}", file=sys.stderr)
    sys.exit(3)
sys.exit(0 if visible else 10)
EOF
rc=$?
if [ $rc -eq 10 ]; then
  echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check on this machine."
  exit 0
elif [ $rc -ne 0 ]; then
  exit "$rc"
fi

LOGS="$OUT/gpu_check"
mkdir -p "$LOGS"
rm -f "$LOGS"/*
cp "$WORK/env.json" "$LOGS/env.json"

# --- Wheels the machine lacks (.whl/, from scripts/gpu_wheels.sh) ------------------------------------------------
if compgen -G ".whl/*.whl" >/dev/null; then
  SITE="$WORK/site"
  if ! "$PYTHON" -m pip install -q --no-index --no-deps --disable-pip-version-check --target "$SITE" .whl/*.whl; then
    echo "gpu_check: pip could not install .whl/ (above); unpacking the wheels instead"
    for wheel in .whl/*.whl; do "$PYTHON" -m zipfile -e "$wheel" "$SITE"; done  # a wheel is a site-packages zip
  fi
  export PYTHONPATH="$SITE:$PYTHONPATH"
  echo "gpu_check: installed for this run from .whl/: $(cd .whl && ls *.whl | sed 's/-py.*//; s/-cp.*//' | tr '\n' ' ')"
fi

STATUS=0
DEADLINE=$((SECONDS + ${GPU_CHECK_TOTAL_S:-460}))
report() { "$PYTHON" scripts/gpu_check_report.py "$LOGS" "$OUT" "$PASSES"; }
report

# run_pass NAME CAP COMMAND...: run with a time cap (shortened to what is left of the total), record the result and
# seconds, then rewrite the report; the output goes to $LOGS/NAME.log
run_pass() {
  local name="$1" cap="$2"
  shift 2
  case ",$PASSES," in *",$name,"*) ;; *) return 1;; esac
  local left=$((DEADLINE - SECONDS - 5))
  if [ "$left" -lt 15 ]; then
    echo "gpu_check: pass '$name' not run: the total time (${GPU_CHECK_TOTAL_S:-460}s) is spent"
    STATUS=1
    return 1
  fi
  [ "$cap" -gt "$left" ] && cap=$left
  local began=$SECONDS rc result="ok"
  echo "gpu_check: pass '$name' (at most ${cap}s): $*"
  timeout --kill-after=5 "$cap" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result="TIMED OUT after ${cap}s"; STATUS=1
  elif [ $rc -ne 0 ]; then result="FAILED (exit $rc)"; STATUS=1; fi
  local took=$((SECONDS - began))
  "$PYTHON" -c 'import json, sys; print(json.dumps(dict(zip(("name", "command", "result", "seconds", "cap"),
                 (sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))))))' \
    "$name" "$*" "$result" "$took" "$cap" >>"$LOGS/passes.jsonl"
  echo "gpu_check: pass '$name': $result in ${took}s"
}

# section NAME: the pass's excerpt for the report (stdin), then the report is rewritten
section() { cat >"$LOGS/$1.section.md"; report; }
fenced() { echo '```'; cat; echo '```'; }

# A test that hangs (a deadlock) fails alone instead of eating the pass's cap, where pytest-timeout is installed.
PER_TEST=()
"$PYTHON" -c "import pytest_timeout" 2>/dev/null && PER_TEST=(--timeout "${GPU_CHECK_TEST_TIMEOUT_S:-60}")

# 1. Every CUDA-gated test; a module that fails to collect loses its tests but not the others'.
if run_pass tests "${GPU_CHECK_TESTS_S:-140}" env CUDA_TESTS_SUMMARY="$LOGS/tests.json" \
  "$PYTHON" -m pytest -p cuda_tests -p no:cacheprovider -q -rfEs ${PER_TEST[@]+"${PER_TEST[@]}"} --continue-on-collection-errors \
  tests/; then
  grep -E '^cuda_tests:' "$LOGS/tests.log" || echo "gpu_check: the tests pass wrote no summary (see $LOGS/tests.log)"
  { grep -E '^cuda_tests:' "$LOGS/tests.log"; grep -E '^(FAILED|ERROR)|(passed|failed|error|deselected).* in [0-9.]+s' \
    "$LOGS/tests.log" | tail -n 30; } | fenced | section tests
fi

# 2. Peak GPU and pinned memory of real offloaded forwards against the plan's simulated figures.
if run_pass memory-vs-plan "${GPU_CHECK_MEMORY_S:-40}" "$PYTHON" -m benchmarks.gpu_memory_vs_plan \
  --json "$LOGS/memory-vs-plan.json"; then
  grep -E '^(gpu_memory_vs_plan|\|)' "$LOGS/memory-vs-plan.log" | section memory-vs-plan
fi

# 3. The stream-heavy CUDA-gated tests under a race detector.
STREAM_TESTS=(tests/test_gpu_correctness_integration.py tests/test_dispatch.py tests/test_pipeline.py)
# racecheck sees shared-memory hazards inside a kernel only, and TORCH_CUDA_SANITIZER alone the importing thread only:
# BIGMODEL_CSAN_ALL_THREADS=1 puts the latter in every thread (the prefetch and pipeline copies run in workers). The
# canary test_the_sanitizer_catches_a_prefetched_copy_read_without_a_wait plants a race and must see it reported.
SANITIZER=(env TORCH_CUDA_SANITIZER=1 BIGMODEL_CSAN_ALL_THREADS=1)
if command -v compute-sanitizer >/dev/null 2>&1; then
  SANITIZER=(compute-sanitizer --tool racecheck --error-exitcode 1 --target-processes all "${SANITIZER[@]}")
fi
if run_pass sanitizer "${GPU_CHECK_SAN_S:-60}" "${SANITIZER[@]}" \
  "$PYTHON" -m pytest -p cuda_tests -p no:cacheprovider -q -rfE ${PER_TEST[@]+"${PER_TEST[@]}"} "${STREAM_TESTS[@]}"; then
  [ "${SANITIZER[0]}" = env ] && echo "(no compute-sanitizer: stream order checked, shared memory in kernels not)" \
    >>"$LOGS/sanitizer.log"
  grep -E '^(FAILED|ERROR)|passed|failed|error|RACECHECK|hazard|CSAN|not found' "$LOGS/sanitizer.log" | tail -n 25 \
    | fenced | section sanitizer
fi

# 4. Pinned host-to-device bandwidth, the share an offloaded forward gets, prefetch overlap (GPT-2).
if run_pass offload "${GPU_CHECK_OFFLOAD_S:-35}" "$PYTHON" -m benchmarks.gpu_offload --repeats 5 \
  --json "$LOGS/offload.json"; then
  grep -E '^(GPU offload|\||$)' "$LOGS/offload.log" | head -n 8 | section offload
fi

# 5. The figures a user wants: a 20B-shaped bf16 model with most of it in RAM, ours vs accelerate.
if run_pass bigmodel "${GPU_CHECK_BIG_S:-110}" "$PYTHON" -m benchmarks.gpu_bigmodel --shape 20b \
  --json "$LOGS/bigmodel.json"; then
  grep -E '^(gpu_bigmodel|\|)' "$LOGS/bigmodel.log" | section bigmodel
fi

# 6. The same comparison on GPT-2 (small: a quick cross-check, in one interpreter).
if run_pass vs-accelerate "${GPU_CHECK_COMPARE_S:-30}" "$PYTHON" -m benchmarks.gpu_bigmodel --shape gpt2 \
  --json "$LOGS/vs-accelerate.json"; then
  grep -E '^(gpu_bigmodel|\|)' "$LOGS/vs-accelerate.log" | section vs-accelerate
fi

# 7. Micro-batch pipelining (with one GPU there is nothing to overlap: it reports the cost of splitting).
if run_pass pipeline "${GPU_CHECK_PIPELINE_S:-25}" "$PYTHON" -m benchmarks.pipeline_bench --preset gpt2 --batch 16; then
  tail -n 6 "$LOGS/pipeline.log" | fenced | section pipeline
fi

echo "gpu_check: report written to $OUT/GPU_CHECK.md and $OUT/GPU_CHECK.json; logs in $LOGS"
exit $STATUS
