"""Histograms of |x|: exact, batch- and order-independent, mergeable, bounded memory."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import calibfast
from calibfast import ChannelStats
from calibfast import _reference

from conftest import DEVICES, native_on
from test_channel_stats import LAYOUTS, _make, _special, _view, assert_stats_match

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]


def _oracle_hist(x, axis, bins, e, per_channel=False):
    """Independent count: floor(|x| * bins / 2^e) in float64 (exact for every input dtype)."""
    xm = x.movedim(axis, -1).reshape(-1, x.shape[axis]).double().cpu()
    a = xm.abs()
    fin = torch.isfinite(xm)
    if not per_channel:
        idx = torch.floor(a * bins / 2.0 ** e)
        ok = fin & (idx < bins)
        return torch.bincount(idx[ok].long(), minlength=bins)
    C = xm.shape[1]
    out = torch.zeros(C, bins, dtype=torch.int64)
    for c in range(C):
        idx = torch.floor(a[:, c] * bins / 2.0 ** float(e[c]))
        ok = fin[:, c] & (idx < bins)
        out[c] = torch.bincount(idx[ok].long(), minlength=bins)
    return out


def _check_against_reference_and_oracle(device, dtype, shape, axis, how, bins, channel_bins):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    x = _view(_special(_make(shape, dtype, device, kind="heavy")), how)
    y = _view(_make(shape, dtype, device, scale=40.0), how)  # grows the ranges
    a = ChannelStats(axis=axis, bins=bins, channel_bins=channel_bins)
    b = ChannelStats(axis=axis, bins=bins, channel_bins=channel_bins, backend="reference")
    for t in (x, y, x):
        a.update(t)
        b.update(t)
        assert_stats_match(a, b, dtype)
    if x.numel() == 0:
        return
    seen = torch.stack([x, y, x])  # the three updates, channel axis shifted by one
    if bins:
        e = int(a.hist_exp)
        assert torch.equal(a.hist.cpu(), _oracle_hist(seen, axis % x.dim() + 1, bins, e))
    ce = a.channel_hist_exp.cpu()
    assert torch.equal(a.channel_hist.cpu(), _oracle_hist(seen, axis % x.dim() + 1, channel_bins, ce, True))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis,how", LAYOUTS, ids=lambda v: str(v))
def test_native_histograms_match_reference_and_oracle(device, dtype, shape, axis, how):
    _check_against_reference_and_oracle(device, dtype, shape, axis, how, 64, 16)


def test_range_invariant_and_counts():
    x = torch.randn(500, 32) * 7
    s = ChannelStats(bins=2048, channel_bins=128).update(x)
    amax = float(s.absmax.max())
    assert s.hist_max / 2 <= amax < s.hist_max  # at least half the bins cover [0, amax]
    assert int(s.hist.sum()) == x.numel()
    cm = s.channel_hist_max
    assert torch.all(cm / 2 <= s.absmax.double()) and torch.all(s.absmax.double() < cm)
    assert torch.equal(s.channel_hist.sum(1), s.finite_count)
    assert float(s.hist_max) == 2.0 ** int(s.hist_exp)


def test_nonfinite_values_are_not_binned():
    x = torch.tensor([[1.0, float("nan")], [float("inf"), -2.0], [-float("inf"), 0.5]])
    s = ChannelStats(bins=8, channel_bins=4).update(x)
    assert int(s.hist.sum()) == 3
    assert s.channel_hist.sum(1).tolist() == [1, 2]
    # range 4 (2 < 4): bin width 0.5 -> 1.0 in bin 2, 2.0 in bin 4, 0.5 in bin 1
    assert s.hist.tolist() == [0, 1, 1, 0, 1, 0, 0, 0]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("backend", ["dispatch", "reference"])
def test_a_channel_without_finite_values_gets_no_range(device, dtype, backend):
    """NaN / Inf only (an all-masked channel, a NaN batch): the channel's abs-max stays -inf and its
    range stays empty, instead of saturating to 2^128 -- which left that channel's histogram (or a
    one-channel tensor's whole histogram) in bin 0 for good, and made merge() differ from one pass
    (hypothesis found [[-1.1e-3], [3.1e-5], [nan]] split before the NaN)."""
    if backend == "dispatch" and not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    nan, inf = float("nan"), float("inf")
    x = torch.tensor([[1.0, nan, 3.0], [2.0, -inf, 0.5], [-1.5, nan, 0.25]], dtype=dtype, device=device)
    s = ChannelStats(bins=16, channel_bins=8, backend=backend).update(x)
    assert int(s.hist_exp) == 2
    assert s.channel_hist_exp.tolist() == [2, _reference.EMPTY_EXP, 2]
    assert s.channel_hist[1].sum() == 0 and s.channel_hist_max[1] == 0
    # the channel's first finite values get the range they need, binned as in a fresh object
    y = torch.tensor([[0.5, 6.0, 1.0]], dtype=dtype, device=device)
    s.update(y)
    assert s.channel_hist_exp.tolist() == [2, 3, 2]
    assert s.channel_hist[1].tolist() == [0, 0, 0, 0, 0, 0, 1, 0]
    # a single channel: a NaN batch before or after leaves the histogram as without it
    a, b = torch.tensor([[-1.1224e-03], [3.1176e-05]]), torch.tensor([[nan]])
    a, b = a.to(dtype=dtype, device=device), b.to(dtype=dtype, device=device)
    only = ChannelStats(axis=1, backend=backend).update(b)
    assert int(only.hist_exp) == _reference.EMPTY_EXP and only.hist.sum() == 0 and only.hist_max == 0
    whole = ChannelStats(axis=1, backend=backend).update(torch.cat([a, b]))
    for first, second in ((a, b), (b, a)):
        merged = ChannelStats(axis=1).merge(ChannelStats(axis=1, backend=backend).update(first))
        merged.merge(ChannelStats(axis=1, backend=backend).update(second))
        streamed = ChannelStats(axis=1, backend=backend).update(first).update(second)
        for t in (merged, streamed):
            assert int(t.hist_exp) == int(whole.hist_exp) == -9
            assert torch.equal(t.hist, whole.hist)


def test_all_zero_and_tiny_data():
    s = ChannelStats(bins=16).update(torch.zeros(10, 3))
    assert int(s.hist_exp) == _reference.MIN_EXP and s.hist[0] == 30
    s.update(torch.full((2, 3), 1e-40, dtype=torch.float64))  # below float32 range
    assert s.hist[0] == 36
    s.update(torch.full((1, 3), 3.0))
    assert int(s.hist_exp) == 2 and s.hist[0] == 36 and s.hist[12] == 3


@pytest.mark.parametrize("device", DEVICES)
def test_growth_by_many_octaves_in_one_batch(device):
    x = torch.randn(200, 8, device=device) * 1e-3
    y = torch.randn(200, 8, device=device) * 1e6  # ~30 doublings: everything seen so far lands in bin 0
    s = ChannelStats(bins=32, channel_bins=8).update(x).update(y)
    r = ChannelStats(bins=32, channel_bins=8, backend="reference").update(x).update(y)
    assert_stats_match(s, r, torch.float32)
    assert int(s.hist[0]) >= 200 * 8 and int(s.channel_hist[:, 0].sum()) >= 200 * 8
    assert torch.equal(s.hist, ChannelStats(bins=32).update(torch.cat([y, x])).hist)


# Inputs large enough for several threads (> 2^16 values), whose |x| grows along the rows: the
# CPU kernel bins the global histogram in one pass, each thread widening its own range as larger
# values arrive (merging its bins) and the threads' counts merged at the end, so threads finish
# at different ranges. The counts must still be those of the final range, bit for bit.
GROWTH_LAYOUTS = [
    ((4096, 96), -1, None),         # few channels: virtual rows
    ((1536, 700), -1, None),        # row kernel
    ((1536, 700), -1, "step2"),     # strided channels
    ((96, 4096), 0, None),          # channel axis first: contiguous runs
    ((6, 96, 33, 40), 1, None),     # N x C x H x W
]


def _growing(shape, axis, dtype, seed, zeros_first=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g, dtype=torch.float64)
    # the magnitude grows along the first non-channel dimension, over ~40 octaves (from zeros):
    # the first rows, which the CPU kernel samples for an empty histogram's provisional range,
    # say little about the rest
    d = 1 if axis % len(shape) == 0 else 0
    ramp = torch.exp2(torch.linspace(-20.0, 20.0, shape[d], dtype=torch.float64))
    if zeros_first:
        ramp[: max(1, shape[d] // 16)] = 0.0
    view = [1] * len(shape)
    view[d] = shape[d]
    return (x * ramp.view(view)).to(dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis,how", GROWTH_LAYOUTS, ids=lambda v: str(v))
def test_range_growing_inside_one_update_is_exact(device, dtype, shape, axis, how):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    x = _special(_growing(shape, axis, dtype, 1)).to(device)
    x = _view(x, how)
    y = _view(_growing(shape, axis, dtype, 2).flip(1 if axis % len(shape) == 0 else 0).to(device), how)
    for bins in (2048, 64):
        a = ChannelStats(axis=axis, bins=bins)
        b = ChannelStats(axis=axis, bins=bins, backend="reference")
        seen = []
        for t in (x, y * 3):  # the second one grows a non-empty histogram
            a.update(t)
            b.update(t)
            seen.append(t)
            assert torch.equal(a.hist.cpu(), b.hist.cpu()) and torch.equal(a.hist_exp.cpu(), b.hist_exp.cpu())
            oracle = _oracle_hist(torch.stack(seen), axis % x.dim() + 1, bins, int(a.hist_exp))
            assert torch.equal(a.hist.cpu(), oracle)
            assert int(oracle.sum()) > 0.5 * t.numel() * len(seen)  # (float16: |x| > 65504 is Inf)
        # an empty histogram whose sampled rows are small but not zero
        z = _view(_growing(shape, axis, dtype, 3, zeros_first=False).to(device), how)
        a = ChannelStats(axis=axis, bins=bins).update(z)
        b = ChannelStats(axis=axis, bins=bins, backend="reference").update(z)
        assert torch.equal(a.hist.cpu(), b.hist.cpu()) and torch.equal(a.hist_exp.cpu(), b.hist_exp.cpu())
        assert torch.equal(a.hist.cpu(), _oracle_hist(z.unsqueeze(0), axis % x.dim() + 1, bins, int(a.hist_exp)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_first_update_with_outliers_outside_the_sampled_rows(dtype):
    # 70000 x 4: the first rows (the sample) are in [0, 1); one value far out late in the tensor
    x = (torch.rand(70000, 4, dtype=torch.float64) * 0.99)
    x[-5, 2] = -1000.0
    x[-3, 1] = float("nan")
    x = x.to(dtype)
    a = ChannelStats(bins=2048).update(x)
    b = ChannelStats(bins=2048, backend="reference").update(x)
    assert int(a.hist_exp) == 10 and torch.equal(a.hist, b.hist)
    assert int(a.hist.sum()) == x.numel() - 1 and int(a.hist[2000]) == 1  # bins of 1024 / 2048
    assert torch.equal(a.hist, _oracle_hist(x.unsqueeze(0), 2, 2048, 10))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beyond", [1, 300, 5000, 60000])
@pytest.mark.parametrize("first", [False, True])
@pytest.mark.parametrize("shape,axis", [((4096, 24), -1), ((1024, 700), -1), ((16, 24, 300), 1), ((700, 90), 0),
                                        ((3, 40, 700), 1), ((2, 8, 64, 64), 1)])
def test_values_beyond_a_growing_range_are_binned_exactly(dtype, beyond, first, shape, axis):
    # The range grows inside an update: by a second update whose `beyond` values lie far outside
    # the first one's range, or (first=True) in a first update whose sampled rows (the first
    # 1/64) are all small. The values beyond the old range are kept while the input is read (up
    # to a cap per thread: 60000 exceeds it in at least one of two threads, and the input is
    # then read a second time) and binned with the final range: either way the counts must be
    # the reference's, bit for bit. The last two shapes are NCHW runs (fewer than 40 samples),
    # whose first update samples every 64th run.
    g = torch.Generator().manual_seed(beyond + 7 * first)
    x1 = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.9).to(dtype)
    x2 = torch.rand(shape, generator=g, dtype=torch.float64) * 0.9
    flat = x2.view(-1)
    n = x2.numel()
    lo = n // 32 if first else 0  # keep the sampled rows small (rows are the leading dims here)
    if axis == 0:
        lo = 0 if not first else n // 32  # dim 0 is the channel axis: rows are columns; no sample
    pos = lo + torch.randperm(n - lo, generator=g)[:beyond]
    sign = torch.where(torch.rand(len(pos), generator=g) < 0.5, -1.0, 1.0).double()
    flat[pos] = sign * torch.exp2(torch.randint(0, 21, (len(pos),), generator=g).double()) * \
        (1.0 + torch.rand(len(pos), generator=g, dtype=torch.float64))
    flat[pos[: len(pos) // 100]] = float("nan")
    x2 = x2.to(dtype)
    a = ChannelStats(axis=axis, bins=2048)
    b = ChannelStats(axis=axis, bins=2048, backend="reference")
    for x in ((x2,) if first else (x1, x2)):
        a.update(x)
        b.update(x)
    assert int(a.hist_exp) == int(b.hist_exp) >= 1  # grew from [0, 1)
    assert torch.equal(a.hist, b.hist)
    nan = len(pos) // 100
    assert int(a.hist.sum()) == (1 if first else 2) * n - nan


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beyond", [1, 300, 60000])
@pytest.mark.parametrize("shape,axis", [((2048, 40), -1), ((900, 33), 0), ((3, 40, 700), 1), ((5, 6, 7, 40), -1)])
def test_values_beyond_growing_channel_ranges_are_binned_exactly(dtype, beyond, shape, axis):
    # Per-channel histograms: every channel has a range after update 1; update 2 puts `beyond`
    # values far outside their channel's range (channels grow by different numbers of octaves,
    # some not at all). Kept and binned after the pass (or, past the per-thread cap, read a
    # second time): per-channel and global counts must equal the reference's, bit for bit.
    g = torch.Generator().manual_seed(beyond + 11)
    x1 = (torch.rand(shape, generator=g, dtype=torch.float64) * 0.9).to(dtype)
    x2 = torch.rand(shape, generator=g, dtype=torch.float64) * 0.9
    flat = x2.view(-1)
    pos = torch.randperm(flat.numel(), generator=g)[:beyond]
    flat[pos] = torch.exp2(torch.randint(0, 12, (len(pos),), generator=g).double()) * \
        (1.0 + torch.rand(len(pos), generator=g, dtype=torch.float64))
    flat[pos[: len(pos) // 50]] = float("inf")
    x2 = x2.to(dtype)
    a = ChannelStats(axis=axis, bins=512, channel_bins=64)
    b = ChannelStats(axis=axis, bins=512, channel_bins=64, backend="reference")
    for x in (x1, x2):
        a.update(x)
        b.update(x)
    assert torch.equal(a.channel_hist_exp, b.channel_hist_exp)
    assert int(a.channel_hist_exp.max()) >= 1  # some channel grew from [0, 1)
    assert torch.equal(a.channel_hist, b.channel_hist)
    assert torch.equal(a.hist, b.hist)
    assert int(a.channel_hist.sum()) == 2 * x1.numel() - len(pos) // 50


def test_float64_values_just_below_a_power_of_two_follow_the_float32_range():
    # 1 - 2^-40 rounds to 1.0 in float32 (the state's amax): the range is [0, 2), not [0, 1)
    x = torch.full((70000, 3), 1.0 - 2.0 ** -40, dtype=torch.float64)
    x[:100] = 0.25
    a = ChannelStats(bins=16).update(x)
    b = ChannelStats(bins=16, backend="reference").update(x)
    assert int(a.hist_exp) == 1 and torch.equal(a.hist, b.hist)
    assert int(a.hist[7]) == 3 * (70000 - 100) and int(a.hist[2]) == 300


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_counts_do_not_depend_on_batching_or_order(data):
    n = data.draw(st.integers(1, 300))
    C = data.draw(st.integers(1, 9))
    dtype = data.draw(st.sampled_from(DTYPES))
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2 ** 31 - 1)))
    scales = torch.tensor([10.0 ** data.draw(st.integers(-3, 3)) for _ in range(n)])
    x = (torch.randn(n, C, generator=g, dtype=torch.float64) * scales[:, None]).to(dtype)
    cuts = sorted(data.draw(st.lists(st.integers(0, n), max_size=5)))
    bounds = [0] + cuts + [n]
    chunks = [x[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    order = data.draw(st.permutations(list(range(len(chunks)))))
    whole = ChannelStats(bins=64, channel_bins=8).update(x)
    streamed = ChannelStats(bins=64, channel_bins=8)
    merged = ChannelStats(bins=64, channel_bins=8)
    for i in order:
        streamed.update(chunks[i])
        merged.merge(ChannelStats(bins=64, channel_bins=8).update(chunks[i]))
    for s in (streamed, merged):
        assert torch.equal(s.hist, whole.hist) and torch.equal(s.hist_exp, whole.hist_exp)
        assert torch.equal(s.channel_hist, whole.channel_hist)
        assert torch.equal(s.channel_hist_exp, whole.channel_hist_exp)


def test_bad_bins_and_merge_mismatch_leave_state_unchanged():
    for bad in (3, 1, 1000, -2):
        with pytest.raises(ValueError, match="power of two"):
            ChannelStats(bins=bad)
    with pytest.raises(ValueError, match="channel_bins"):
        ChannelStats(channel_bins=100)
    a = ChannelStats(bins=64).update(torch.randn(10, 4))
    b = ChannelStats(bins=128).update(torch.randn(10, 4))
    sa, sb = a.state_dict(), b.state_dict()
    with pytest.raises(ValueError, match="bins=64.*bins=128"):
        a.merge(b)
    for s, d in ((a, sa), (b, sb)):
        for k, v in s.state_dict().items():
            assert torch.equal(v, d[k]), k
    with pytest.raises(RuntimeError, match="channel_bins"):
        a.channel_hist
    with pytest.raises(RuntimeError, match="bins=0"):
        ChannelStats(bins=0).update(torch.ones(2, 2)).hist


def test_op_rejects_bad_histogram_arguments():
    op = torch.ops.calibfast.channel_stats_update
    s = ChannelStats(num_channels=4)
    x = torch.randn(3, 4)
    with pytest.raises(RuntimeError, match="power-of-two"):
        op(x, -1, s._f, s._d, s._i, torch.zeros(100, dtype=torch.int64), s._he, s._ch, s._che)
    with pytest.raises(RuntimeError, match="hexp must be int64"):
        op(x, -1, s._f, s._d, s._i, s._h, torch.zeros(3, dtype=torch.int64), s._ch, s._che)
    with pytest.raises(RuntimeError, match="chist must have shape"):
        op(x, -1, s._f, s._d, s._i, s._h, s._he, torch.zeros(5, 8, dtype=torch.int64), s._che)
    assert int(s.hist.sum()) == 0 and int(s.count.sum()) == 0


def test_state_dict_round_trip_with_histograms():
    s = ChannelStats(bins=32, channel_bins=8).update(torch.randn(50, 6) * 3)
    t = ChannelStats().load_state_dict(s.state_dict())
    assert t.bins == 32 and t.channel_bins == 8
    x = torch.randn(20, 6) * 100
    s.update(x)
    t.update(x)
    assert_stats_match(t, s, torch.float32)


# Per-channel histograms of rows with channel_bins <= 2048 are binned in two steps on the CPU: the
# rows' indices buffered as offsets into tiles of 16 channels' counters, then scattered a tile at a
# time (ChannelTiles; 4096 bins and more keep the one-step path). These shapes fill the buffer
# several times in one update (600 x 2061: 254 rows a buffer; 40 x 16390: wide rows taken 4096
# channels at a time, 31 rows a buffer, while rows are added 8 at a time), end on a partial tile
# (2061 = 128 x 16 + 13; 1029), and read strided channels and non-collapsible rows.
TILED_LAYOUTS = [
    ((600, 2061), -1, None),
    ((40, 16390), -1, None),
    # the growth pass (histograms only) adds a chunk of 64 rows at a time to a 31-row buffer
    ((100, 16390), -1, None),
    ((300, 1029), -1, "step2"),
    ((24, 40, 100), -1, "transpose01"),
    # NCHW runs: from 128 values a run, each channel's counters are kept twice (a run alternates
    # between the copies); shorter runs keep one
    ((3, 24, 127), 1, None),
    ((3, 24, 128), 1, None),
    ((5, 40, 16, 16), 1, None),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channel_bins", [1024, 2048])
@pytest.mark.parametrize("shape,axis,how", TILED_LAYOUTS, ids=lambda v: str(v))
def test_per_channel_histograms_in_tiles_match_reference_and_oracle(device, dtype, channel_bins, shape, axis, how):
    _check_against_reference_and_oracle(device, dtype, shape, axis, how, 64, channel_bins)


# Per-channel histograms of short NCHW runs (maps under 128 values, one copy of the counters) are
# binned in two steps on the CPU too (RunTiles): offsets into a buffer region per tile of 16
# channels, scattered a tile at a time; the adjacent runs of a sample are binned as one row, with
# per-value ranges (non-adjacent runs, and ranges over 2048 values, run by run). These shapes refill
# the regions within an update (48 x 512 x 7 x 7: 20 samples a region, 24 a thread), end on a
# partial tile (C = 1000, 37), cut tiles between the two threads' tasks, take maps under 8 values
# (2 x 2), runs that are not adjacent (every second channel) and runs too long for the
# expanded arrays (10 x 10). The second update grows every range (values beyond it kept, then
# binned), and bins = 0 leaves the per-channel histograms alone.
SHORT_RUN_LAYOUTS = [
    ((48, 512, 7, 7), None),
    ((60, 1000, 3, 3), None),
    ((9, 37, 3, 3), None),
    ((16, 40, 2, 2), None),
    ((8, 64, 5, 5), "chstep2"),
    ((4, 24, 10, 10), None),
]


@pytest.mark.parametrize("capability", ["base", "avx2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bins,channel_bins", [(64, 256), (0, 2048)], ids=str)
@pytest.mark.parametrize("shape,how", SHORT_RUN_LAYOUTS, ids=lambda v: str(v))
def test_per_channel_histograms_of_short_runs_match_reference_and_oracle(monkeypatch, capability, dtype, bins,
                                                                          channel_bins, shape, how):
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    monkeypatch.setenv("CALIBFAST_CPU_CAPABILITY", capability)
    if calibfast.cpu_capability() != capability:
        pytest.skip(f"the processor has no {capability}")
    _check_against_reference_and_oracle("cpu", dtype, shape, 1, how, bins, channel_bins)


# A task that is alone in binning its channels (one thread, or two threads that split the channels
# because the rows are few) and scatters its buffered rows once adds each tile's counters into the
# state right after scattering it, from L1, and reuses the first tile's counters for the next
# (ChannelTiles::scatter, Slot::own_channels). These shapes take that path on 1 and 2 threads with
# a partial last tile (16390 = 1024 x 16 + 6; 1029; 2061), wide rows cut into blocks of channels
# (16390), a buffer that holds all the rows of a block (200 rows, 256 bins), and one that does not
# (600 x 2061: 600 rows, more than the 256 bins, scattered in several batches: the flush path).
FEW_ROW_LAYOUTS = [
    ((200, 16390), -1, 256),
    ((300, 1029), -1, 2048),
    ((600, 2061), -1, 256),
    ((12, 30, 1100), -1, 512),  # rows of a 3-d view
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,axis,channel_bins", FEW_ROW_LAYOUTS, ids=lambda v: str(v))
def test_per_channel_tiles_added_from_l1_match_reference_and_oracle(threads, dtype, shape, axis, channel_bins):
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_against_reference_and_oracle("cpu", dtype, shape, axis, None, 64, channel_bins)
    finally:
        torch.set_num_threads(old)


# Rows of at least 256 KiB a task (kPrefetchMinBytes) prefetch their next 8 rows while the global
# histogram's scatter runs, through their own loops (16 values a step, bfloat16 / float16 patterns
# 32 a step): widths that leave tails of both, rows not a multiple of 8, rows of a 3-d view; the
# two small ones just over the gate on one thread and under it on two.
PREFETCH_LAYOUTS = [
    ((100, 1031), -1, torch.float32),
    ((170, 1031), -1, torch.bfloat16),
    ((1100, 2053), -1, torch.float32),
    ((2, 601, 2053), -1, torch.float32),
    ((2100, 2053), -1, torch.bfloat16),
    ((2100, 2059), -1, torch.float16),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape,axis,dtype", PREFETCH_LAYOUTS, ids=lambda v: str(v))
def test_global_histogram_of_rows_from_memory_matches_reference_and_oracle(threads, shape, axis, dtype):
    if not native_on("cpu"):
        pytest.skip("no native kernel for cpu")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _special(_make(shape, dtype, "cpu", kind="heavy"))
        y = _make(shape, dtype, "cpu", scale=40.0)  # grows the range
        a = ChannelStats(axis=axis, bins=2048)
        b = ChannelStats(axis=axis, bins=2048, backend="reference")
        for t in (x, y, x, x):
            a.update(t)
            b.update(t)
            assert_stats_match(a, b, dtype)
        seen = torch.stack([x, y, x, x])
        assert torch.equal(a.hist, _oracle_hist(seen, axis % x.dim() + 1, 2048, int(a.hist_exp)))
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,axis,how", [((200, 517), -1, None), ((64, 40, 33), -1, "transpose01")],
                         ids=lambda v: str(v))
def test_per_channel_histograms_past_the_tiles_match_reference_and_oracle(device, dtype, shape, axis, how):
    # 4096 bins a channel: tile offsets would not fit 16 bits; the one-step path bins these rows
    _check_against_reference_and_oracle(device, dtype, shape, axis, how, 64, 4096)


# 16-bit inputs of at least 2^20 values take the CPU kernel's pattern-table path (|x| bit
# patterns counted, turned into bins once the call's range is known); smaller ones bin directly.
LARGE_LAYOUTS = [
    ((2048, 512), -1, None),
    ((2, 64, 96, 96), 1, None),  # NCHW conv activation: runs
    ((2, 64, 96, 96), 1, "channels_last"),
    ((2048, 512), -1, "rowstep"),
    ((2080, 512), -1, "t"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,axis,how", LARGE_LAYOUTS, ids=lambda v: str(v))
def test_large_16bit_histograms_match_reference_and_oracle(device, dtype, shape, axis, how):
    _check_against_reference_and_oracle(device, dtype, shape, axis, how, 2048, 4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bins", [2, 2048, 1 << 16])
def test_every_16bit_pattern_is_binned_like_the_reference(device, dtype, bins):
    """All 65536 bit patterns (subnormals, every exponent, +-0, +-Inf, NaNs), 17 times over: the
    table path and the direct path agree with the reference bin for bin."""
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    pats = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)
    x = pats.repeat(17).reshape(-1, 256).to(device)  # 17 * 2^16 > 2^20 values: table path on the CPU
    small = pats[::64].reshape(-1, 16).to(device)  # 1024 values: direct path
    for t in (x, small):
        a = ChannelStats(bins=bins).update(t)
        b = ChannelStats(bins=bins, backend="reference").update(t)
        assert_stats_match(a, b, dtype)
        assert int(a.hist.sum()) == int(torch.isfinite(t).sum())
