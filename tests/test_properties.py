"""Property tests: random shapes, axes, strides and batch splits."""

import pytest
import torch
from hypothesis import given, settings, HealthCheck
from hypothesis import strategies as st

from calibfast import ChannelStats

from conftest import native_on
from test_channel_stats import assert_stats_match

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


@st.composite
def tensors(draw):
    rank = draw(st.integers(1, 4))
    shape = draw(st.lists(st.integers(0, 9), min_size=rank, max_size=rank))
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()) and x.numel():
        # sprinkle non-finite values
        mask = torch.rand(*shape, generator=g) < 0.05
        x[mask] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    x = x.to(dtype)
    # a random view: permutation, then positive steps
    perm = draw(st.permutations(list(range(rank))))
    x = x.permute(*perm).contiguous().permute(*[perm.index(i) for i in range(rank)]) if draw(st.booleans()) else x
    if draw(st.booleans()):
        steps = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
        big = torch.zeros([s * k for s, k in zip(x.shape, steps)], dtype=dtype)
        v = big[tuple(slice(None, None, k) for k in steps)]
        v.copy_(x)
        x = v
    axis = draw(st.integers(-rank, rank - 1))
    return x, axis


@st.composite
def wide_tensors(draw):
    """Larger than tensors(): channel counts 8-40 and maps of up to 12 x 40, so that the 16-bit
    row paths (bfloat16 pairs of 16 channels, float16 8 channels a step) and the 8-lane short
    runs (runs of 8 values and more) are reached, with their tails."""
    layout = draw(st.sampled_from(["rows", "nchw", "nhwc"]))
    C = draw(st.integers(8, 40))
    n = draw(st.integers(1, 12))
    hw = draw(st.lists(st.integers(1, 40), min_size=0 if layout == "rows" else 1, max_size=2))
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 31 - 1)))
    shape = [n, C] + hw if layout == "nchw" else [n] + hw + [C]
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 1e3]))
    if draw(st.booleans()):
        mask = torch.rand(*shape, generator=g) < draw(st.sampled_from([0.001, 0.05]))
        x[mask] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    return x.to(dtype), 1 if layout == "nchw" else -1


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wide_tensors(), st.sampled_from([(0, 0), (2048, 0), (256, 16)]))
def test_native_equals_reference_on_wider_tensors(case, bins):
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    x, axis = case
    a = ChannelStats(axis=axis, bins=bins[0], channel_bins=bins[1]).update(x)
    b = ChannelStats(axis=axis, bins=bins[0], channel_bins=bins[1], backend="reference").update(x)
    assert_stats_match(a, b, x.dtype)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors())
def test_native_equals_reference_on_random_views(case):
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    x, axis = case
    a = ChannelStats(axis=axis).update(x)
    b = ChannelStats(axis=axis, backend="reference").update(x)
    assert_stats_match(a, b, x.dtype)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tensors(), st.data())
def test_chunked_updates_and_merges_equal_one_update(case, data):
    x, axis = case
    ax = axis % x.dim()
    # split along a non-channel dim when there is one, else the single dim is the channel axis
    split_dim = next((d for d in range(x.dim()) if d != ax), None)
    if split_dim is None:
        chunks = [x]
    else:
        n = x.shape[split_dim]
        cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=4)))
        bounds = [0] + cuts + [n]
        chunks = [x.narrow(split_dim, a, b - a) for a, b in zip(bounds[:-1], bounds[1:])]
    whole = ChannelStats(axis=axis).update(x)
    streamed = ChannelStats(axis=axis)
    for c in chunks:
        streamed.update(c)
    assert_stats_match(streamed, whole, x.dtype, "streamed: ")
    # merge of per-chunk stats, in a random order, equals the single pass
    order = data.draw(st.permutations(list(range(len(chunks)))))
    merged = ChannelStats(axis=axis)
    for i in order:
        merged.merge(ChannelStats(axis=axis).update(chunks[i]))
    assert_stats_match(merged, whole, x.dtype, "merged: ")
