"""Loads the compiled kernels (calibfast._C). Without them calibfast still works on the pure-torch
kernels, after one warning that says why; CALIBFAST_REQUIRE_NATIVE=1 makes that an error (CI sets
it)."""

import json
import os
import warnings

import torch

_C = None
load_error = None
build_info = {}

try:
    with open(os.path.join(os.path.dirname(__file__), "_build_info.json")) as _f:
        build_info = json.load(_f)
except (OSError, ValueError):
    build_info = {}


def _require_native():
    v = os.environ.get("CALIBFAST_REQUIRE_NATIVE", "")
    return v.strip().lower() not in ("", "0", "false", "no", "off")


def load():
    global _C, load_error
    try:
        from . import _C as mod  # noqa: F401  (registers the CPU/CUDA kernels)
        _C = mod
    except Exception as e:  # ImportError, or an undefined symbol from an ABI mismatch
        built = (f"built for torch {build_info['torch']} (CUDA {build_info.get('torch_cuda')})"
                 if build_info else "never built (no _build_info.json)")
        load_error = (f"calibfast: the compiled kernels did not load ({type(e).__name__}: {e}); "
                      f"{built}, running with torch {torch.__version__} (CUDA {torch.version.cuda}). "
                      "Using the pure-torch kernels. Rebuild with "
                      "`pip install --no-build-isolation -e .`.")
        if _require_native():
            raise ImportError(load_error) from e
        warnings.warn(load_error, RuntimeWarning, stacklevel=3)
        return
    if _require_native() and torch.version.cuda and build_info.get("cuda_kernels") is False \
            and os.environ.get("CALIBFAST_REQUIRE_CUDA_KERNELS"):
        raise ImportError("calibfast: CALIBFAST_REQUIRE_CUDA_KERNELS is set but the build has no CUDA kernels")


def native_backends():
    """Which devices run compiled kernels, e.g. {'cpu': True, 'cuda': False}."""
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return {
        "cpu": has("calibfast::channel_stats_update", "CPU"),
        "cuda": has("calibfast::channel_stats_update", "CUDA"),
    }


def cpu_capability():
    """The instruction set the CPU kernels use ('avx512', 'avx2', 'base'), or None without them."""
    return _C.cpu_capability() if _C is not None else None
