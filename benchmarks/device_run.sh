#!/usr/bin/env bash
# One call on the GPU machine: the GPU tests, then benchmarks, everything under $OUT.
#   bash benchmarks/device_run.sh "gpt2-124m" "llama-1b:quick" ...
# Each argument is a shape from benchmarks/models.py, ":quick" for 200 serving requests
# (the workload is 1,000). BENCH_TIMEOUT caps each shape (default 300 s): a full
# llama-1b or opt-1.3b run with HF took about 240 s on an H100, llama-7b about 400 s.
# HF's figures are reused from benchmarks/results where device and workload match.
set -o pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/mii-bench}
mkdir -p "$OUT"
if [ -z "$SKIP_GPU_TESTS" ]; then
  timeout 560 python -m pytest -m gpu -q -x -p no:cacheprovider tests/test_gpu.py tests/test_gpu_shapes.py \
    tests/test_kernels_gpu.py tests/test_quant_kernels_gpu.py 2>&1 | grep -v "^\s*$" | tail -25 | tee "$OUT/gpu_tests.txt"
fi
for spec in "$@"; do
  name=${spec%%:*}
  quick=""; [ "$spec" != "$name" ] && quick="--quick"
  timeout "${BENCH_TIMEOUT:-300}" python -m benchmarks.run --models "$name" $quick --out "$OUT" \
    --hf-from benchmarks/results 2>&1 | grep -v Warning | tail -4 | cut -c1-1500
done
ls "$OUT"
