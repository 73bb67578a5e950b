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
