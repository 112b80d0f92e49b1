#!/usr/bin/env bash
# One call on the offline GPU machine (see ../shared/gpu/README.md), all of it under ONE deadline
# (GPU_RUN_DEADLINE seconds, default 540: the machine allows 10 minutes a command, less start-up and the
# copy back). From the repository root (no `pip install -e .` there: PYTHONPATH=$PWD):
#   ../shared/gpu/fetch-wheels.sh            (here, once: peers' wheels into .whl/, carried to the GPU)
#   device run --carry .whl: bash benchmarks/gpu_run.sh
# Steps, by value, each bounded by the time left (and each stops starting work at its own deadline, so
# what it measured is written, not lost to a kill):
#   1. headline benchmark (benchmarks/headline.py): attnzoo vs SDPA flash / cuDNN, bf16, head dim 128 --
#      every measurement appended to $OUT/headline.jsonl as soon as it is taken
#   2. `attnzoo check`, its rows printed case by case ($OUT/check.log)
#   3. a GPU pytest subset, ATTNZOO_HYPOTHESIS_PROFILE=ci ATTNZOO_AUTOTUNE=first ($OUT/pytest.log)
# Everything lands in $OUT (default /tmp/attnzoo-out), 5 files (the machine returns at most 8):
#   run.log  headline.jsonl  headline.log  check.log  pytest.log
# GPU_RUN_DRY=1: the same script on a CPU machine -- no timing, each step's plan / collection only, so
# every command, import and path is exercised (tests/benchmarks/test_gpu_run.py runs it in CI).
# Env: GPU_RUN_DEADLINE (s, 540), HEADLINE_SHARE (s the headline may use, 300), CHECK_SHARE (s, 90),
#      HEADLINE_AUTOTUNE (all | first: autotuning in the headline, default all), PYTEST_ARGS (the subset).
set -uo pipefail
START=$(date +%s)
DEADLINE=${GPU_RUN_DEADLINE:-540}
DRY=${GPU_RUN_DRY:-0}
OUT=${OUT:-/tmp/attnzoo-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
LOG="$OUT/run.log"
: > "$LOG"

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }
note() { echo "[$(( $(date +%s) - START ))s] $*" | tee -a "$LOG"; }
min() { if [ "$1" -lt "$2" ]; then echo "$1"; else echo "$2"; fi; }
# run NAME SECONDS LOGFILE CMD...: CMD under a hard timeout of SECONDS (SIGKILL 10 s after SIGTERM)
run() {
  local name=$1 secs=$2 logf=$3
  shift 3
  if [ "$secs" -le 5 ]; then
    note "$name: skipped, ${secs}s left"
    echo "skipped: ${secs}s left of the deadline" >> "$logf"
    return 0
  fi
  note "$name: start (${secs}s)"
  timeout -k 10 "$secs" "$@" >> "$logf" 2>&1
  local rc=$?
  note "$name: rc=$rc$( [ $rc -eq 124 ] && echo ' (timed out)')"
  return 0
}

if [ "$DRY" != "1" ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    >> "$LOG" 2>&1 && export PYTHONPATH=$PWD:/tmp/site
fi
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || echo "no nvidia-smi"
  $PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'gpu', torch.cuda.is_available())"
  git rev-parse HEAD 2>/dev/null; } >> "$LOG" 2>&1
DRYFLAG=""
[ "$DRY" = "1" ] && DRYFLAG="--dry-run"

# 1. headline: its own deadline stops new measurements; the hard timeout leaves 20 s to wrap up
H=$(min "${HEADLINE_SHARE:-300}" $(( $(left) - 150 )))
ATTNZOO_AUTOTUNE=${HEADLINE_AUTOTUNE:-all} run headline $(( H + 20 )) "$OUT/headline.log" \
  $PY -m benchmarks.headline $DRYFLAG --out "$OUT" --deadline-s "$H"

# 2. attnzoo check, case by case
C=$(min "${CHECK_SHARE:-90}" $(( $(left) - 90 )))
ATTNZOO_AUTOTUNE=first run check $(( C + 15 )) "$OUT/check.log" \
  $PY -m benchmarks.headline check $DRYFLAG --deadline-s "$C"

# 3. GPU tests: the kernels' property tests, bounded hypothesis profile, first autotune config only
# shellcheck disable=SC2206
TESTS=(${PYTEST_ARGS:-tests/attention/test_attention_triton.py tests/lightning/test_lightning_triton.py
       tests/knocking/test_knocking_triton.py tests/moh/test_moh_triton.py tests/moh/test_moh_router_triton.py
       tests/dma/test_dma_triton.py tests/modules/test_modules.py})
COLLECT=""
[ "$DRY" = "1" ] && COLLECT="--collect-only"
ATTNZOO_HYPOTHESIS_PROFILE=ci ATTNZOO_AUTOTUNE=first run pytest $(( $(left) - 5 )) "$OUT/pytest.log" \
  $PY -m pytest -q -p no:cacheprovider $COLLECT "${TESTS[@]}"

note "done in $(( $(date +%s) - START ))s of ${DEADLINE}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
tail -n 2 "$OUT/headline.log" "$OUT/check.log" "$OUT/pytest.log"
