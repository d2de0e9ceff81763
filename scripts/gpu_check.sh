#!/usr/bin/env bash
# One command for a machine with a CUDA GPU: every CUDA-gated test, then the GPU benchmark cases, in under
# 8 minutes on one GPU, with a short Markdown report.
#
#   bash scripts/gpu_check.sh                  # report: benchmarks/GPU_CHECK.md
#   bash scripts/gpu_check.sh /path/report.md  # report elsewhere
#
# Without CUDA it prints one line and exits 0. Passes (each capped in seconds, override by environment):
#   1. tests      CUDA-gated tests (a skipif "needs CUDA/GPU/NCCL" mark; scripts/cuda_tests.py)  GPU_CHECK_TESTS_S=240
#   2. offload    pinned host-to-device bandwidth, transfer share, prefetch overlap
#                 (benchmarks/gpu_offload.py)                                                   GPU_CHECK_OFFLOAD_S=60
#   3. pipeline   micro-batch pipelining (benchmarks/pipeline_bench.py; one GPU: overhead only) GPU_CHECK_PIPELINE_S=40
#   4. vs-accelerate  cpu-offloaded decode/prefill of GPT-2 (124M), ours vs accelerate vs plain
#                 (benchmarks/run.py --quick --sizes gpt2)                                      GPU_CHECK_COMPARE_S=120
#   5. sanitizer  the stream-heavy CUDA-gated tests again with TORCH_CUDA_SANITIZER=1             GPU_CHECK_CSAN_S=90
#   6. memory-vs-plan  peak GPU and pinned memory of offloaded forwards vs simulate_memory's plan
#                 (benchmarks/gpu_memory_vs_plan.py)                                            GPU_CHECK_MEMORY_S=60
# Exit status: 0 when every pass succeeded, 1 otherwise (the report says which).
set -u

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
  if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False): nothing to check on this machine."
  exit 0
fi

REPORT="${1:-benchmarks/GPU_CHECK.md}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
STATUS=0
ROWS=""
SECTIONS=""
START=$SECONDS

# run_pass NAME LIMIT_S COMMAND...: run with a time cap, record status and seconds; output goes to $WORK/NAME.log
run_pass() {
  local name="$1" limit="$2"
  shift 2
  local began=$SECONDS rc
  echo "gpu_check: pass '$name' (at most ${limit}s): $*"
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  local took=$((SECONDS - began)) result="ok"
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then result="TIMED OUT after ${limit}s"; STATUS=1
  elif [ $rc -ne 0 ]; then result="FAILED (exit $rc)"; STATUS=1; fi
  ROWS+="| $name | \`$*\` | $result | $took |"$'\n'
  echo "gpu_check: pass '$name': $result in ${took}s"
}

# section TITLE TEXT: a report section
section() { SECTIONS+=$'\n'"## $1"$'\n\n'"$2"$'\n'; }

# 1. Every CUDA-gated test.
run_pass tests "${GPU_CHECK_TESTS_S:-240}" env PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" -m pytest -p cuda_tests -q -rfEs tests/
section "CUDA-gated tests" "$(grep -E '^(FAILED|ERROR|SKIPPED)|passed|failed|error' "$WORK/tests.log" | tail -n 25)"

# 2. Pinned host-to-device bandwidth, the share an offloaded forward gets, prefetch overlap.
run_pass offload "${GPU_CHECK_OFFLOAD_S:-60}" "$PYTHON" -m benchmarks.gpu_offload --json "$WORK/gpu_offload.json"
section "Offloaded forwards: pinned bandwidth and prefetch overlap" "$(grep -E '^(GPU offload|\||$)' "$WORK/offload.log" | head -n 8; tail -n 3 "$WORK/offload.log" | grep -iE 'error|needs' || true)"

# 3. Micro-batch pipelining (with one GPU there is nothing to overlap: it reports the cost of splitting).
run_pass pipeline "${GPU_CHECK_PIPELINE_S:-40}" "$PYTHON" -m benchmarks.pipeline_bench --preset gpt2 --batch 16
section "Micro-batch pipeline" "$(echo '```'; tail -n 6 "$WORK/pipeline.log"; echo '```')"

# 4. cpu-offloaded decode/prefill of GPT-2 against accelerate and plain PyTorch (few iterations: ratios, not records).
run_pass vs-accelerate "${GPU_CHECK_COMPARE_S:-120}" "$PYTHON" -m benchmarks.run --quick --sizes gpt2 \
  --libs plain,accelerate,ours --no-micro --timeout 60 --out "$WORK/RESULTS_GPU.md" --cache-dir "$WORK/bench"
if [ -f "$WORK/RESULTS_GPU.md" ]; then
  section "cpu-offloaded decode/prefill vs accelerate (GPT-2 124M, quick)" \
    "$(awk '/^## Targets/{on=1} /^## Headline/{on=2} on==1 || on==2 {print}' "$WORK/RESULTS_GPU.md" | head -n 60)"
else
  section "cpu-offloaded decode/prefill vs accelerate" "$(tail -n 15 "$WORK/vs-accelerate.log")"
fi

# 5. The stream-heavy CUDA-gated tests again under PyTorch's CUDA sanitizer (CSAN): a kernel reading or writing a
#    tensor another stream uses without an event or record_stream between them fails the test it runs in.
run_pass sanitizer "${GPU_CHECK_CSAN_S:-90}" env TORCH_CUDA_SANITIZER=1 PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" \
  "$PYTHON" -m pytest -p cuda_tests -q -rfE tests/test_gpu_correctness_integration.py tests/test_dispatch.py \
  tests/test_pipeline.py
section "CUDA-gated stream tests under TORCH_CUDA_SANITIZER=1" "$(grep -E '^(FAILED|ERROR)|passed|failed|error|CSAN' "$WORK/sanitizer.log" | tail -n 25)"

# 6. Peak GPU and pinned memory of real offloaded forwards against the plan's simulated figures.
run_pass memory-vs-plan "${GPU_CHECK_MEMORY_S:-60}" "$PYTHON" -m benchmarks.gpu_memory_vs_plan
section "Peak GPU and pinned memory against the plan" "$(grep -E '^(gpu_memory_vs_plan|\|)' "$WORK/memory-vs-plan.log")"

GPU="$("$PYTHON" -c 'import torch; print(f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")')"
TORCH="$("$PYTHON" -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda)')"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
mkdir -p "$(dirname "$REPORT")"
{
  echo "# GPU check"
  echo
  echo "\`bash scripts/gpu_check.sh\` on $(date -u +%Y-%m-%d), commit $COMMIT: $GPU, torch $TORCH; $((SECONDS - START)) s in all."
  echo
  echo "| pass | command | result | seconds |"
  echo "| --- | --- | --- | --- |"
  printf '%s' "$ROWS"
  printf '%s\n' "$SECTIONS"
} >"$REPORT"
echo "gpu_check: report written to $REPORT ($((SECONDS - START)) s)"
exit $STATUS
