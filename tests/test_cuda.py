"""CUDA-only behaviour: no host synchronisation, CUDA-graph capture, streams and devices."""

import pytest
import torch

import calibfast
from calibfast import ChannelStats

from test_channel_stats import assert_stats_match

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _native_cuda():
    if not calibfast.native_backends()["cuda"]:
        pytest.skip("no native CUDA kernel in this build")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,axis", [((4096, 4096), -1), ((8, 64, 28, 28), 1), ((1000, 3), -1)], ids=str)
def test_update_never_synchronises(dtype, shape, axis):
    _native_cuda()
    x = torch.randn(shape, device="cuda", dtype=dtype)
    s = ChannelStats(axis=axis)
    s.update(x)  # first call allocates the state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            s.update(x)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ref = ChannelStats(axis=axis, backend="reference")
    for _ in range(4):
        ref.update(x)
    assert_stats_match(s, ref, dtype)


def test_cuda_graph_capture_and_replay():
    _native_cuda()
    x = torch.randn(2048, 1024, device="cuda", dtype=torch.bfloat16)
    s = ChannelStats(num_channels=1024, device="cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        s.update(x)  # warm up on the side stream, as graph capture wants
    torch.cuda.current_stream().wait_stream(stream)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        s.update(x)
    for _ in range(5):
        g.replay()
    torch.cuda.synchronize()
    ref = ChannelStats(backend="reference")
    for _ in range(6):  # the warm-up and 5 replays (capturing runs nothing)
        ref.update(x)
    assert_stats_match(s, ref, torch.bfloat16)


def test_unaligned_and_odd_views_on_cuda():
    _native_cuda()
    base = torch.randn(4097 * 33 + 1, device="cuda", dtype=torch.bfloat16)
    x = base[1:].view(33, 4097)  # misaligned start, odd channel count: scalar loads
    s = ChannelStats().update(x)
    assert_stats_match(s, ChannelStats(backend="reference").update(x), torch.bfloat16)


def test_merge_across_devices():
    _native_cuda()
    x = torch.randn(300, 17)
    a = ChannelStats().update(x[:100])
    b = ChannelStats().update(x[100:].cuda())
    a.merge(b)
    ref = ChannelStats(backend="reference").update(x)
    assert_stats_match(a, ref, torch.float32)
    with pytest.raises(ValueError, match="cuda"):
        a.update(x.cuda())


# ---- the version 2 row kernel (opt-in: CALIBFAST_CUDA_ROWS=2) ----------------------------------
# Cases for its paths: whole steps and a guarded tail (rows not a multiple of 8 warps x kU), one
# tile and many, channel counts just above a tile, 3-D inputs (collapsed to 2-D rows), planted
# NaN/Inf/huge values (float64 side path), a histogram in shared memory (2048 bins) and one in
# global memory (8192 bins), and range growth between updates.
V2_CASES = [((4096, 1024), torch.bfloat16), ((1000, 8), torch.float32), ((37, 132), torch.float16),
            ((3, 5, 256), torch.bfloat16), ((70001, 4), torch.float32), ((129, 4100), torch.float16)]


def _kernel_names(fn):
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events() if e.device_type.name == "CUDA"}


@pytest.mark.parametrize("bins", [0, 2048, 8192])
@pytest.mark.parametrize("shape,dtype", V2_CASES, ids=str)
def test_rows_kernel_v2_matches_reference(monkeypatch, shape, dtype, bins):
    _native_cuda()
    from test_channel_stats import _special
    monkeypatch.setenv("CALIBFAST_CUDA_ROWS", "2")
    g = torch.Generator().manual_seed(7)
    x = torch.randn(shape, generator=g)
    x[..., ::17] *= 300.0  # a few wide channels
    x = _special(x.to(dtype)).cuda()
    n = x.shape[0]
    s = ChannelStats(bins=bins)
    ref = ChannelStats(bins=bins, backend="reference")
    for part in (x[: max(1, n // 3)] / 64, x[max(1, n // 3):], x):  # the range grows twice
        s.update(part)
        ref.update(part)
    assert_stats_match(s, ref, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_rows_kernel_v2_keeps_tiny_squares(monkeypatch, dtype):
    """Values below 2^-60 skip version 2's float partial sums (their squares would underflow):
    sum x^2 matches the float64 reference channel by channel, from normal values down to 1e-38."""
    _native_cuda()
    monkeypatch.setenv("CALIBFAST_CUDA_ROWS", "2")
    g = torch.Generator().manual_seed(3)
    exps = torch.tensor([0.0, 17, 19, 21, 25, 30, 36, 38] * 16)  # 128 channels
    x = (torch.randn(1000, 128, generator=g, dtype=torch.float64) * torch.pow(10.0, -exps)).to(dtype).cuda()
    s = ChannelStats(bins=2048).update(x)
    ref = ChannelStats(bins=2048, backend="reference").update(x)
    assert_stats_match(s, ref, dtype)
    assert (s.sum_sq.cpu() > 0).all()


def test_rows_kernel_v2_is_the_kernel_that_runs(monkeypatch):
    """The environment switch selects the kernel (so the test above tests version 2)."""
    _native_cuda()
    monkeypatch.setenv("CALIBFAST_CUDA_ROWS", "1")  # (gpu_check.sh also runs the suite with 2 set)
    x = torch.randn(512, 1024, device="cuda", dtype=torch.bfloat16)
    s = ChannelStats().update(x)
    v1 = _kernel_names(lambda: s.update(x))
    monkeypatch.setenv("CALIBFAST_CUDA_ROWS", "2")
    v2 = _kernel_names(lambda: s.update(x))
    assert any("rows_kernel" in k and "rows_kernel_v2" not in k for k in v1), v1
    assert not any("rows_kernel_v2" in k for k in v1), v1
    assert any("rows_kernel_v2" in k for k in v2), v2
    # inputs it does not take fall back to version 1: per-channel histograms, odd channel counts
    sc = ChannelStats(channel_bins=64).update(x)
    assert not any("rows_kernel_v2" in k for k in _kernel_names(lambda: sc.update(x)))
    xo = torch.randn(512, 1023, device="cuda", dtype=torch.bfloat16)
    so = ChannelStats().update(xo)
    assert not any("rows_kernel_v2" in k for k in _kernel_names(lambda: so.update(xo)))
