#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 machine (see the device tool): builds calibfast with that
# machine's own torch, reports the kernels' resource usage and SASS, runs the test suite on CUDA,
# runs the benchmarks, and writes everything under $OUT (default benchmarks/results/gpu).
# Run from the repository root:  bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/device.txt" 2>&1
$PY -c 'import torch; p=torch.cuda.get_device_properties(0); print("torch", torch.__version__, "cuda", torch.version.cuda, "|", p.name, p.multi_processor_count, "SMs")' >> "$OUT/device.txt" 2>&1
log "device: $(tr '\n' ' ' < "$OUT/device.txt")"

# Build in place with the device's torch; Hopper only (sm_90) to keep the build short.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CALIBFAST_CUDA=1
export CALIBFAST_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16}
start=$(date +%s)
if ! $PY setup.py build_ext --inplace > "$OUT/build.log" 2>&1; then
  log "BUILD FAILED"; tail -60 "$OUT/build.log"; exit 1
fi
log "built in $(( $(date +%s) - start ))s"
# ptxas resource report (registers, spills, stack) of every kernel
grep -E "Compiling entry|Used [0-9]+ registers|spill|stack frame" "$OUT/build.log" | sed 's/^ *//' > "$OUT/ptxas.txt"
log "ptxas: $(grep -c 'Used' "$OUT/ptxas.txt") kernels; lines with non-zero spills: $(grep -E 'spill' "$OUT/ptxas.txt" | grep -vc ' 0 bytes spill stores, 0 bytes spill loads')"
SO=$(ls calibfast/_C*.so | head -1)
if command -v cuobjdump >/dev/null; then
  cuobjdump -sass "$SO" > "$OUT/sass.txt" 2>&1
  log "SASS: 128-bit global loads (LDG.E.128): $(grep -c 'LDG.E.128' "$OUT/sass.txt"), 64-bit (LDG.E.64): $(grep -c 'LDG.E.64' "$OUT/sass.txt"), local memory ops (LDL/STL): $(grep -cE 'LDL|STL' "$OUT/sass.txt")"
  gzip -f "$OUT/sass.txt"
fi

export CALIBFAST_REQUIRE_NATIVE=1 CALIBFAST_EXPECT_CUDA_KERNELS=1
# GPU_TESTS: pytest selection (default the whole suite); GPU_TEST_TIMEOUT / GPU_BENCH_TIMEOUT in
# seconds, GPU_BENCH_SHAPES (space-separated, default 16384x8192) and GPU_BENCH_ARGS to fit a
# short lease.
timeout "${GPU_TEST_TIMEOUT:-420}" $PY -m pytest ${GPU_TESTS:-tests} -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1
log "tests: rc=$? $(tail -1 "$OUT/tests.log")"
# The same tests with the version 2 row kernel (opt-in until it has passed them here): every CUDA
# update of a kRows input it takes goes through it.
CALIBFAST_CUDA_ROWS=2 timeout "${GPU_TEST_TIMEOUT:-420}" $PY -m pytest ${GPU_TESTS:-tests} -q -x -p no:cacheprovider \
  > "$OUT/tests_rows_v2.log" 2>&1
log "tests with CALIBFAST_CUDA_ROWS=2: rc=$? $(tail -1 "$OUT/tests_rows_v2.log")"

# the benchmarks import the in-place build; torch.ao's HistogramObserver fails on bfloat16 CUDA
# tensors (torch.histc has no bfloat16 kernel there, torch 2.11), so it is left out for bfloat16
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
for dt in bfloat16 float32; do
  methods=""
  [ "$dt" = bfloat16 ] && methods="--methods calibfast calibfast_reference seed_torch torch_ao modelopt calibfast_hist calibfast_chist modelopt_hist sum_floor copy_floor calibfast_v2 calibfast_hist_v2"
  shapes=""
  for sh in ${GPU_BENCH_SHAPES:-16384x8192}; do shapes="$shapes --shape $sh"; done
  timeout "${GPU_BENCH_TIMEOUT:-180}" $PY benchmarks/bench_channel_stats.py --device cuda --dtype "$dt" \
    $shapes $methods ${GPU_BENCH_ARGS:-} --out "$OUT/gpu_channel_stats_$dt" > "$OUT/bench_$dt.log" 2>&1
  log "bench $dt: rc=$?"
done
log "done"
