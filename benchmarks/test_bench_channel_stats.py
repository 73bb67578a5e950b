"""pytest-benchmark tests of calibfast's fused per-channel statistics op against the usual ways of
getting per-channel statistics (same methods as bench_channel_stats.py, smaller default shape).

    python -m pytest benchmarks/test_bench_channel_stats.py --benchmark-enable   # time them
    python -m pytest benchmarks/test_bench_channel_stats.py                      # run once each

pyproject's addopts pass --benchmark-disable, so without --benchmark-enable every benchmarked
function runs once (a quick smoke test). Environment overrides:
    CALIBFAST_BENCH_SHAPE=2048x4096   CALIBFAST_BENCH_DEVICE=cpu|cuda
"""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_channel_stats as bcs  # noqa: E402

SHAPE = bcs.parse_shape(os.environ.get("CALIBFAST_BENCH_SHAPE", "2048x4096"))
DEVICE = os.environ.get("CALIBFAST_BENCH_DEVICE", "cpu")
DTYPES = ["float32", "bfloat16"]

if DEVICE == "cuda" and not torch.cuda.is_available():
    pytest.skip("CALIBFAST_BENCH_DEVICE=cuda but no CUDA device", allow_module_level=True)

_inputs = {}


def _input(dtype):
    if dtype not in _inputs:
        _inputs[dtype] = bcs.make_input(SHAPE, bcs.DTYPES[dtype], DEVICE)
    return _inputs[dtype]


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module", autouse=True)
def _sanity():
    """Nothing is benchmarked unless calibfast's compiled op agrees with the reference (including
    NaN/Inf handling)."""
    for dt in DTYPES:
        bcs.check_nonfinite(DEVICE, bcs.DTYPES[dt])
        x = _input(dt)
        methods, _ = bcs.make_methods(x, ["calibfast"])
        bcs.sanity_check(x, methods)
    yield
    _inputs.clear()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", list(bcs.METHODS))
def test_channel_stats(benchmark, method, dtype):
    import calibfast
    if method == "calibfast" and not calibfast.native_backends().get(DEVICE):
        pytest.skip(f"calibfast has no compiled kernel for {DEVICE}")
    x = _input(dtype)
    methods, skipped = bcs.make_methods(x, [method])
    if method in skipped:
        pytest.skip(skipped[method])
    fn, result = methods[method]

    def run():
        fn()
        _sync()

    benchmark.group = f"channel stats {'x'.join(map(str, SHAPE))} {dtype} {DEVICE}"
    benchmark.extra_info.update(method=bcs.METHODS[method], dtype=dtype, shape=list(SHAPE), device=DEVICE,
                                bytes=bcs.nbytes(x), torch_threads=torch.get_num_threads())
    if method == "calibfast_reference":
        # Slow (hundreds of ms a call on a small CPU): keep the rounds few.
        benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
    else:
        benchmark(run)
    # What it computed agrees with the reference (calibfast's objects have folded x in many times,
    # so they are covered by the module's sanity fixture instead).
    if result is not None and not method.startswith("calibfast"):
        bcs.sanity_check(x, {method: (fn, result)})
