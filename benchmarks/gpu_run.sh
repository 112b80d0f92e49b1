#!/usr/bin/env bash
# One call on the offline GPU machine (see ../shared/gpu/README.md): GPU tests, `attnzoo check`, and a quick
# benchmark run, with every log and result under $OUT so they come back. From the repository root:
#   ../shared/gpu/fetch-wheels.sh            (here, once: peers' wheels into .whl/, carried to the GPU)
#   device run --carry .whl: bash benchmarks/gpu_run.sh
# Then copy $OUT/results/<gpu>/ into benchmarks/results/<gpu>/ and run `python -m benchmarks.report`.
# Env: SUITES (default "attention decode"), TEST_TIMEOUT (s, default 240), BENCH_TIMEOUT (s, default 300).
# At most 8 files come back from $OUT: 3 logs + per suite a JSON and a PNG + RESULTS.md, so 2 suites a call.
set -uo pipefail
OUT=${OUT:-/tmp/attnzoo-out}
mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PWD:/tmp/site
fi
{ nvidia-smi; python3 -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)"; } \
  > "$OUT/check.log" 2>&1
timeout 120 python3 -m attnzoo.cli check --no-progress >> "$OUT/check.log" 2>&1
echo "check rc=$?" >> "$OUT/check.log"
ATTNZOO_HYPOTHESIS_PROFILE=gpu timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -x -p no:cacheprovider \
  > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?" >> "$OUT/pytest.log"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-300}" python3 -m benchmarks --quick --suite ${SUITES:-attention decode} \
  --out "$OUT/results" > "$OUT/bench.log" 2>&1
echo "bench rc=$?" >> "$OUT/bench.log"
tail -n 3 "$OUT/check.log" "$OUT/pytest.log" "$OUT/bench.log"
