#!/usr/bin/env bash
# The GPU check, for a lent H100/H200 machine (see the device tool): builds calibfast with that
# machine's own torch, reports the kernels' resource usage and SASS, runs the test suite on CUDA
# (with each row kernel), runs the row kernels' check under compute-sanitizer, the benchmarks,
# Nsight Compute on the row kernels and the end-to-end LLaMA-shaped stack, and writes everything
# under $OUT (default benchmarks/results/gpu). Run from the repository root:
#
#     bash benchmarks/gpu_check.sh
#
# Knobs (environment), to fit a short lease:
#   GPU_STEPS         steps to run, in this order (default all): build tests tests_v2 sanitize bench ncu e2e
#                     (a second call on a warm machine can skip "build": the in-place build is kept)
#   GPU_TESTS         pytest selection (default the whole suite)
#   GPU_TEST_TIMEOUT, GPU_BENCH_TIMEOUT, GPU_TOOL_TIMEOUT   seconds per step (420, 180, 150)
#   GPU_BENCH_SHAPES  space-separated tokens x channels (default 16384x8192); GPU_BENCH_ARGS more
#                     arguments for bench_channel_stats.py
#   GPU_E2E_ARGS      arguments for e2e.py's LLaMA-shaped stack (defaults below)
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
STEPS=" ${GPU_STEPS:-build tests tests_v2 sanitize bench ncu e2e} "
TOOL_TIMEOUT=${GPU_TOOL_TIMEOUT:-150}
log() { echo "[gpu_check $(date +%T)] $*" | tee -a "$OUT/summary.txt"; }
want() { [[ "$STEPS" == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv > "$OUT/device.txt" 2>&1
$PY -c 'import torch; p=torch.cuda.get_device_properties(0); print("torch", torch.__version__, "cuda", torch.version.cuda, "|", p.name, p.multi_processor_count, "SMs")' >> "$OUT/device.txt" 2>&1
log "device: $(tr '\n' ' ' < "$OUT/device.txt"); steps:$STEPS"

# Build in place with the device's torch; Hopper only (sm_90) to keep the build short.
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} CALIBFAST_CUDA=1
export CALIBFAST_PTXAS_VERBOSE=1 MAX_JOBS=${MAX_JOBS:-16}
if want build; then
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
fi

export CALIBFAST_REQUIRE_NATIVE=1 CALIBFAST_EXPECT_CUDA_KERNELS=1
# the benchmarks and drivers import the in-place build
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if want tests; then
  timeout "${GPU_TEST_TIMEOUT:-420}" $PY -m pytest ${GPU_TESTS:-tests} -q -x -p no:cacheprovider > "$OUT/tests.log" 2>&1
  log "tests: rc=$? $(tail -1 "$OUT/tests.log")"
fi
# The same tests with the version 2 row kernel (opt-in until it has passed them here): every CUDA
# update of a kRows input it takes goes through it.
v2_ok=0
if want tests_v2; then
  CALIBFAST_CUDA_ROWS=2 timeout "${GPU_TEST_TIMEOUT:-420}" $PY -m pytest ${GPU_TESTS:-tests} -q -x -p no:cacheprovider \
    > "$OUT/tests_rows_v2.log" 2>&1
  rc=$?
  [ $rc = 0 ] && v2_ok=1
  log "tests with CALIBFAST_CUDA_ROWS=2: rc=$rc $(tail -1 "$OUT/tests_rows_v2.log")"
fi
# Both row kernels on small odd shapes against the reference, under the memory checker.
if want sanitize; then
  if command -v compute-sanitizer >/dev/null; then
    timeout "$TOOL_TIMEOUT" compute-sanitizer --tool memcheck --error-exitcode 3 \
      $PY benchmarks/gpu_profile.py --mode check > "$OUT/sanitizer.log" 2>&1
    log "compute-sanitizer memcheck, gpu_profile.py --mode check: rc=$? $(grep -E 'ERROR SUMMARY|check:' "$OUT/sanitizer.log" | tr '\n' ' ')"
  else
    log "compute-sanitizer not found: sanitize skipped"
  fi
fi

# torch.ao's HistogramObserver fails on bfloat16 CUDA tensors (torch.histc has no bfloat16 kernel
# there, torch 2.11), so it is left out for bfloat16
if want bench; then
  for dt in bfloat16 float32; do
    methods=""
    [ "$dt" = bfloat16 ] && methods="--methods calibfast calibfast_reference seed_torch torch_ao modelopt calibfast_hist calibfast_chist modelopt_hist sum_floor copy_floor calibfast_v2 calibfast_hist_v2"
    shapes=""
    for sh in ${GPU_BENCH_SHAPES:-16384x8192}; do shapes="$shapes --shape $sh"; done
    timeout "${GPU_BENCH_TIMEOUT:-180}" $PY benchmarks/bench_channel_stats.py --device cuda --dtype "$dt" \
      $shapes $methods ${GPU_BENCH_ARGS:-} --out "$OUT/gpu_channel_stats_$dt" > "$OUT/bench_$dt.log" 2>&1
    log "bench $dt: rc=$?"
  done
fi

# Nsight Compute on the steady updates (both versions, bfloat16 then float32, bins 0 then 2048;
# kernels in that order, the version in the kernel's name: rows_kernel / rows_kernel_v2).
if want ncu; then
  if command -v ncu >/dev/null; then
    timeout "$TOOL_TIMEOUT" ncu --clock-control none --nvtx --nvtx-include "profile/" \
      --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis \
      --section WarpStateStats --section SchedulerStats --section ComputeWorkloadAnalysis \
      $PY benchmarks/gpu_profile.py --mode profile > "$OUT/ncu.txt" 2>&1
    log "ncu: rc=$? $(grep -c 'rows_kernel' "$OUT/ncu.txt") kernel reports; DRAM throughput % lines: $(grep -E 'DRAM Throughput' "$OUT/ncu.txt" | awk '{print $NF}' | tr '\n' ' ')"
  else
    log "ncu not found: ncu skipped"
  fi
fi

# End to end on the LLaMA-shaped stack (issue 6, section 4): the row kernel version 2 if its tests
# passed in this run, else version 1. torch.ao's arm only in float32 (no bfloat16 histc on CUDA).
if want e2e; then
  [ $v2_ok = 1 ] && export CALIBFAST_CUDA_ROWS=2
  e2e_args=${GPU_E2E_ARGS:---hidden 4096 --intermediate 14336 --blocks 2 --tokens 8192 --llama-batches 4 --rounds 5}
  for dt in float32 bfloat16; do
    arms="plain noop calibfast calibfast_stats calibfast_noshare modelopt torch_ao smoothquant"
    [ "$dt" = bfloat16 ] && arms="plain noop calibfast calibfast_stats calibfast_noshare modelopt smoothquant"
    timeout "$TOOL_TIMEOUT" $PY benchmarks/e2e.py --device cuda --models llama --dtypes "$dt" --arms $arms \
      --no-scaling --no-plot --no-progress $e2e_args --out "$OUT/gpu_e2e_llama_$dt" > "$OUT/e2e_$dt.log" 2>&1
    log "e2e llama $dt (CALIBFAST_CUDA_ROWS=${CALIBFAST_CUDA_ROWS:-1}): rc=$?"
  done
fi
log "done"
