#!/usr/bin/env bash
# Sets up everything calibfast needs, idempotently: a virtual environment in .venv, the pinned
# requirements, and the compiled kernels (C++ always; CUDA when torch has CUDA and a toolkit is
# found). Safe to run again: it reuses what is there and rebuilds only what changed.
#   PYTHON=python3.11   the interpreter to make the venv with
#   CALIBFAST_CUDA=0|1  force the CUDA kernels off / on (on fails without a toolkit)
#   TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0"
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "[setup] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
stamp=.venv/.calibfast-requirements
if [ ! -f "$stamp" ] || ! cmp -s <(cat requirements.txt requirements-dev.txt) "$stamp"; then
  # torch's CUDA build and its libraries take ~6 GB in .venv; say so plainly rather than let pip
  # fail half-way with "No space left on device".
  need_kb=$((8 * 1024 * 1024))
  free_kb=$(df -Pk . | awk 'NR == 2 {print $4}')
  if [ -n "$free_kb" ] && [ "$free_kb" -lt "$need_kb" ] && [ ! -d .venv/lib/python*/site-packages/torch ]; then
    echo "[setup] not enough disk space: installing the requirements needs about 8 GB free in $(pwd)," \
         "$((free_kb / 1024)) MB are free (df -h .). Free some space and run this again." >&2
    exit 1
  fi
  echo "[setup] installing requirements (torch 2.14.1 and friends; about a minute the first time)"
  python -m pip install -q --upgrade pip
  python -m pip install -q -r requirements-dev.txt
  cat requirements.txt requirements-dev.txt > "$stamp"
fi

# Torch guesses CUDA_HOME=/usr/local when nvcc is not on PATH, and linking then fails.
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDA_HOME=/usr/local/cuda
fi
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;9.0"}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}

# Rebuild only when a source, setup.py or the torch version changed since the last build.
sig=$( (python -c 'import torch; print(torch.__version__)'; env | grep -E '^(CALIBFAST_(CUDA|NO_NATIVE|DEBUG)|TORCH_CUDA_ARCH_LIST|CUDA_HOME)=' | sort;
        cat setup.py csrc/*.h csrc/*.cpp csrc/*/*) | sha256sum | cut -d' ' -f1)
if [ "$(cat .venv/.calibfast-build 2>/dev/null)" != "$sig" ] || ! ls calibfast/_C*.so >/dev/null 2>&1; then
  echo "[setup] building calibfast's kernels (CUDA_HOME=${CUDA_HOME:-none}, archs $TORCH_CUDA_ARCH_LIST); log in .venv/build.log"
  start=$(date +%s)
  if ! python -m pip install -v --no-build-isolation --no-deps -e . > .venv/build.log 2>&1; then
    grep -E "error|Error" .venv/build.log | head -40 || true
    tail -40 .venv/build.log
    echo "[setup] build FAILED (full log: .venv/build.log)" >&2
    exit 1
  fi
  echo "$sig" > .venv/.calibfast-build
  echo "[setup] built in $(( $(date +%s) - start ))s: $(cat calibfast/_build_info.json | tr -d '\n ')"
fi
