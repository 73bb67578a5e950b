"""The fused per-channel statistics op: native kernels against the pure-torch reference."""

import math

import pytest
import torch

import calibfast
from calibfast import ChannelStats
from calibfast import _reference

from conftest import DEVICES, native_on

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Sums: the kernels add at most 64 values in float32 before going to float64 (CPU) or per thread
# partials of 64 values (CUDA); the error of such a partial is below 64 * 2^-24 of the magnitude
# of what it adds, so 1e-5 of sum |x| (the scale of every partial) bounds it. float64 input is
# accumulated in float64 throughout.
SUM_RTOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-12}


def _make(shape, dtype, device, kind="normal", scale=1.0):
    g = torch.Generator().manual_seed(hash((tuple(shape), str(dtype), kind)) % (2 ** 31))
    x = torch.randn(*shape, generator=g, dtype=torch.float64) * scale
    if kind == "heavy":
        x = x * torch.exp(2 * torch.randn(*shape, generator=g, dtype=torch.float64))
    return x.to(dtype).to(device)


def _special(x):
    """Plants NaN, +-Inf, +-0, subnormals and huge values at fixed spots."""
    flat = x.view(-1) if x.is_contiguous() else None
    if flat is None or flat.numel() < 16:
        return x
    dt = x.dtype
    info = torch.finfo(dt)
    vals = [float("nan"), float("inf"), -float("inf"), 0.0, -0.0, info.tiny / 4 if dt != torch.bfloat16 else info.tiny,
            -info.tiny, info.max, -info.max, float("nan")]
    n = flat.numel()
    for i, v in enumerate(vals):
        flat[(i * 7919 + 3) % n] = v
    return x


def _ref_state(x, axis):
    s = ChannelStats(axis=axis, backend="reference")
    s.update(x)
    return s


def assert_stats_match(a, b, dtype, what=""):
    """a: native, b: reference."""
    for name in ("min", "max", "absmin", "absmax"):
        ta, tb = getattr(a, name).cpu(), getattr(b, name).cpu()
        assert torch.equal(ta, tb), f"{what}{name}: {ta} != {tb}"
    for name in ("count", "nan_count", "inf_count"):
        ta, tb = getattr(a, name).cpu(), getattr(b, name).cpu()
        assert torch.equal(ta, tb), f"{what}{name}: {ta} != {tb}"
    if a.bins and b.bins:
        assert torch.equal(a.hist_exp.cpu(), b.hist_exp.cpu()), f"{what}hist_exp: {a.hist_exp} != {b.hist_exp}"
        assert torch.equal(a.hist.cpu(), b.hist.cpu()), f"{what}hist differs"
    if a.channel_bins and b.channel_bins:
        assert torch.equal(a.channel_hist_exp.cpu(), b.channel_hist_exp.cpu()), f"{what}channel_hist_exp differs"
        assert torch.equal(a.channel_hist.cpu(), b.channel_hist.cpu()), f"{what}channel_hist differs"
    rtol = SUM_RTOL[dtype]
    scale = b.sum_abs.cpu()
    for name in ("sum", "sum_abs"):
        ta, tb = getattr(a, name).cpu(), getattr(b, name).cpu()
        assert ((ta == tb) | ((ta - tb).abs() <= rtol * scale)).all(), f"{what}{name}: {ta} vs {tb}"
    ta, tb = a.sum_sq.cpu(), b.sum_sq.cpu()
    assert ((ta == tb) | ((ta - tb).abs() <= rtol * tb.abs())).all(), f"{what}sum_sq: {ta} vs {tb}"


# (shape, axis, how to derive a view) — contiguous, odd, one element, empty, and views whose
# layouts exercise every kernel path (rows, runs, strided, collapsed/non-collapsible dims).
LAYOUTS = [
    ((7,), 0, None),
    ((1,), 0, None),
    ((1, 1), -1, None),
    ((0, 5), -1, None),
    ((5, 0), -1, None),
    ((0,), 0, None),
    ((33, 17), -1, None),
    ((33, 17), 0, None),
    ((64, 256), -1, None),
    # few channels in contiguous rows: the CPU kernel reads k rows as one (virtual channels), rest after
    ((4099, 64), -1, None),
    ((5, 203, 24), -1, None),
    ((1000, 7), -1, None),
    ((9000, 1), -1, None),
    ((3, 5, 67), -1, None),
    ((3, 5, 67), 1, None),
    ((3, 5, 67), 0, None),
    ((2, 3, 9, 11), 1, None),  # NCHW conv activation: runs
    ((2, 4, 3, 3), 1, "channels_last"),
    ((4, 6, 40), -1, "transpose01"),  # seq-first view of [T, B, H]: non-collapsible rows
    ((40, 24), -1, "t"),  # [N, C] view of a contiguous [C, N]: runs along the channel-major layout
    ((40, 24), -1, "step2"),  # every other channel: strided channels
    ((12, 50), -1, "rowstep"),  # every other row
    ((5, 7, 3, 2), 2, "permute"),
    ((3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3), 0, "deep"),  # more non-collapsible dims than the kernels walk
]


def _view(x, how):
    if how is None:
        return x
    if how == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if how == "transpose01":
        return x.transpose(0, 1)
    if how == "t":
        return x.t().contiguous().t()
    if how == "step2":
        return torch.cat([x, x], dim=-1)[:, ::2]
    if how == "rowstep":
        return torch.cat([x, x], dim=0)[::2]
    if how == "chstep2":  # every second channel of axis 1: NCHW runs that are not adjacent
        return torch.cat([x, x], dim=1)[:, ::2]
    if how == "permute":
        return x.permute(3, 1, 0, 2).contiguous().permute(2, 1, 3, 0)
    if how == "deep":
        # every dim strided by 2: no two dims collapse
        big = torch.zeros([2 * s for s in x.shape], dtype=x.dtype, device=x.device)
        v = big[tuple(slice(None, None, 2) for _ in x.shape)]
        v.copy_(x)
        return v
    raise AssertionError(how)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis,how", LAYOUTS, ids=lambda v: str(v))
@pytest.mark.parametrize("special", [False, True], ids=["finite", "special"])
def test_native_matches_reference(device, dtype, shape, axis, how, special):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    x = _make(shape, dtype, device)
    if special:
        x = _special(x)
    x = _view(x, how)
    a = ChannelStats(axis=axis).update(x)
    b = _ref_state(x, axis)
    assert_stats_match(a, b, dtype)
    # a second update accumulates onto the running state
    y = _make(shape, dtype, device, kind="heavy")
    y = _view(y, how)
    a.update(y)
    b.update(y)
    assert_stats_match(a, b, dtype, "second update: ")


@pytest.mark.parametrize("capability", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape,axis,how", [((67, 300), -1, None), ((2, 19, 50), 1, None), ((40, 24), -1, "step2"),
                                            ((5, 130), 0, None)], ids=str)
def test_every_cpu_instruction_set(monkeypatch, capability, dtype, shape, axis, how):
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    monkeypatch.setenv("CALIBFAST_CPU_CAPABILITY", capability)
    got = calibfast.cpu_capability()
    assert got in ("base", "avx2", "avx512")
    x = _special(_make(shape, dtype, "cpu", kind="heavy"))
    x = _view(x, how)
    assert_stats_match(ChannelStats(axis=axis).update(x), _ref_state(x, axis), dtype)


def _use_the_variant(monkeypatch, capability="avx2"):
    """Runs the rest of the test on the given variant of the CPU kernel, AVX2 by default (skips
    when the processor has not got it)."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    monkeypatch.setenv("CALIBFAST_CPU_CAPABILITY", capability)
    if calibfast.cpu_capability() != capability:
        pytest.skip(f"the processor has no {capability}")


def _on_the_baseline_variant_identically(monkeypatch, got, run, extra=()):
    """`run()` again on the baseline variant: identical results to `got` (the vector variant's),
    but sum x^2, which may differ by the fused multiply-add the baseline lacks."""
    monkeypatch.setenv("CALIBFAST_CPU_CAPABILITY", "base")
    want = run()
    for name in ("min", "max", "absmin", "absmax", "count", "nan_count", "inf_count", "sum", "sum_abs") + extra:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    torch.testing.assert_close(got.sum_sq, want.sum_sq, rtol=1e-6, atol=0)


@pytest.mark.parametrize("rows", [1, 7, 8, 9, 64, 65, 137])
@pytest.mark.parametrize("C", [16, 17, 32, 47, 4100])
def test_bfloat16_rows_sixteen_channels_a_step_equal_the_generic_loop(monkeypatch, rows, C):
    """The AVX2 / AVX-512 variants fold bfloat16 rows 16 channels a step, even and odd channels
    apart ("pair order", restored once per chunk of 64 rows); the baseline variant folds them one
    channel a lane. Same operations in the same order per value: min, max, abs-min, sums and
    counts are identical (sum x^2 may differ by the fused multiply-add the baseline lacks), with
    NaN and +-Inf on even and odd channels, chunks of 64 rows, 8-row blocks and their tails."""
    _use_the_variant(monkeypatch)
    g = torch.Generator().manual_seed(rows * 10007 + C)
    x = (torch.randn(rows, C, generator=g) * torch.logspace(-3, 3, C)).bfloat16()
    x[rows // 2, 1] = float("nan")  # odd channel
    x[0, 2] = float("inf")  # even channel
    x[:, min(C - 1, 13)] = -float("inf")  # a channel bad in every chunk
    x[rows - 1, C - 1] = float("nan")  # the last channel (in the n % 16 tail when C is not a multiple)
    run = lambda: ChannelStats().update(x).update(x[: max(1, rows // 3)] * 2)  # noqa: E731
    got = run()
    _on_the_baseline_variant_identically(monkeypatch, got, run)
    assert_stats_match(got, _ref_state(x, -1).update(x[: max(1, rows // 3)] * 2), torch.bfloat16)


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(2, 3, 23, 29), (1, 2, 32, 32), (3, 2, 64, 65), (1, 1, 1, 5000)], ids=str)
def test_long_runs_equal_the_generic_loop(monkeypatch, capability, dtype, shape):
    """NCHW maps of over 512 values are folded run by run into 16 lanes (value i into lane i % 16),
    a block of 1024 values at a time. The AVX2 variant folds bfloat16 and float16 runs in two
    passes of 8 lanes (vector registers; float16 widened by F16C), the AVX-512 variant in one pass
    of 16 and two full blocks together; the baseline variant lane by lane: the same values reach
    the same lanes in the same order, so min, max, abs-min, sums and counts are identical (sum x^2
    may differ by the baseline's unfused multiply-add), with NaN and +-Inf in a block (the first
    and the second of a pair), partial blocks of 1024 values and run tails of 1-15 values."""
    _use_the_variant(monkeypatch, capability)
    g = torch.Generator().manual_seed(sum(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    flat = x.view(shape[0], shape[1], -1)
    flat[0, 0, 17] = float("nan")
    flat[-1, -1, -1] = float("inf")  # in the last run's tail
    if shape[1] > 1:
        flat[0, 1, 1030 % flat.shape[-1]] = -float("inf")
    run = lambda: ChannelStats(axis=1, bins=256).update(x).update(x[:1] * 2)  # noqa: E731
    got = run()
    _on_the_baseline_variant_identically(monkeypatch, got, run, ("hist",))
    ref = ChannelStats(axis=1, bins=256, backend="reference").update(x).update(x[:1] * 2)
    assert_stats_match(got, ref, dtype)


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows,C,step", [(67, 300, 2), (9, 4100, 3), (130, 17, 5), (8, 8, 2)], ids=str)
def test_16bit_with_a_channel_stride_equals_the_generic_loop(monkeypatch, capability, dtype, rows, C, step):
    """16-bit rows whose channels are not adjacent (x[:, ::step]) are gathered 8 channels at a time
    into one vector and widened there (F16C for float16, a shift for bfloat16) in the AVX2 /
    AVX-512 variants, and value by value in the baseline variant: identical min, max, abs-min,
    sums, counts and histograms, NaN and +-Inf included, and the reference's results."""
    _use_the_variant(monkeypatch, capability)
    g = torch.Generator().manual_seed(rows * 31 + C)
    full = (torch.randn(rows, C * step, generator=g) * torch.logspace(-4, 4, C * step)).to(dtype)
    full[rows // 2, step] = float("nan")  # channel 1
    full[0, 0] = -float("inf")
    full[rows - 1, (C - 1) * step] = float("inf")  # the last channel (past the blocks of 8 when C % 8)
    x = full[:, ::step]
    assert x.stride(-1) == step
    run = lambda: ChannelStats(bins=512, channel_bins=64).update(x).update(x[: max(1, rows // 3)] * 2)  # noqa: E731
    got = run()
    _on_the_baseline_variant_identically(monkeypatch, got, run, ("hist", "channel_hist"))
    ref = ChannelStats(bins=512, channel_bins=64, backend="reference").update(x).update(x[: max(1, rows // 3)] * 2)
    assert_stats_match(got, ref, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_are_folded_in_channel_blocks_exactly(threads, dtype):
    """Rows of over 2 x 4096 channels are folded a block of channels at a time (the CPU kernel's
    kWideBlock): statistics, histogram and per-channel histograms as for any other shape."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _special(_make((37, 8195), dtype, "cpu", kind="heavy"))
        for bins, cbins in ((0, 0), (2048, 64)):
            a = ChannelStats(bins=bins, channel_bins=cbins).update(x).update(x[:20] * 3)
            r = ChannelStats(bins=bins, channel_bins=cbins, backend="reference").update(x).update(x[:20] * 3)
            assert_stats_match(a, r, dtype)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("capability", ["avx2", "avx512"])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype,shape", [(torch.float32, (100, 1031)), (torch.float32, (2, 300, 1040)),
                                         (torch.bfloat16, (170, 1031)), (torch.bfloat16, (300, 2080)),
                                         (torch.float16, (170, 1031)), (torch.float16, (2, 150, 2056))], ids=str)
def test_statistics_read_ahead_from_memory_equal_the_generic_loop(monkeypatch, capability, threads, dtype, shape):
    """Statistics alone (bins=0) of a task of at least 256 KiB (unit channel stride) read each row
    256 values ahead of the fold (the CPU kernel's kStatsPrefetchValues; float32 then folds 16
    channels a step in its own loop). The first shape of each dtype is over that size on one
    thread and under it on two, the second over it on both; C % 16 leaves a tail for the generic
    loop (1031, 2056). Min, max, abs-min, sums and counts identical to the baseline variant's,
    with NaN, +-Inf and huge values planted, and against the reference."""
    _use_the_variant(monkeypatch, capability)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _special(_make(shape, dtype, "cpu", kind="heavy"))
        x.view(-1, shape[-1])[::7, -1] = float("nan")  # the last channel, in the tail or the last step
        run = lambda: ChannelStats(bins=0).update(x).update(x * 3)  # noqa: E731
        got = run()
        assert_stats_match(got, ChannelStats(bins=0, backend="reference").update(x).update(x * 3), dtype)
        _on_the_baseline_variant_identically(monkeypatch, got, run)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("dtype,rows,C", [(torch.float32, 65539, 64), (torch.bfloat16, 37459, 224)], ids=str)
def test_few_channels_from_memory_use_long_virtual_rows_exactly(dtype, rows, C):
    """Inputs of 16 MB or more with few channels are read as virtual rows of >= 4096 values (the
    CPU kernel's kLongRow; smaller inputs use 512): same statistics and histogram."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    x = _special(_make((rows, C), dtype, "cpu", kind="heavy"))
    assert x.numel() * x.element_size() >= 16 << 20
    a = ChannelStats().update(x).update(x[: rows // 2])
    r = ChannelStats(backend="reference").update(x).update(x[: rows // 2])
    assert_stats_match(a, r, dtype)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("hw", [(7, 7), (3, 5), (16, 16)], ids=str)
def test_short_runs_of_nchw_inputs_exactly(threads, dtype, hw):
    """NCHW with small maps (each channel a run of 15 to 256 values per sample): read as rows of
    C x H x W virtual channels folded group by group into the channels (40 samples or more), or by
    short runs (5 samples; per-channel histograms). NaN/Inf/huge values in some runs go through
    the masked path; everything stays exact."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = _make((48, 37) + hw, dtype, "cpu", kind="heavy")
        x[3, 5, 0, 0] = float("nan")
        x[40, 5, -1, -1] = float("inf")
        x[20, 7] = torch.finfo(dtype).max
        x[7, 11, 1, 1] = -float("inf")
        for bins, cbins in ((0, 0), (2048, 0), (2048, 16)):  # (per-channel histograms: the run kernel)
            a = ChannelStats(axis=1, bins=bins, channel_bins=cbins).update(x).update(x[:5] * 2)
            r = ChannelStats(axis=1, bins=bins, channel_bins=cbins, backend="reference").update(x).update(x[:5] * 2)
            assert_stats_match(a, r, dtype)
    finally:
        torch.set_num_threads(old)


# Layouts for the tests below: rows (unit channel stride), channel axis 0 (strided channels), NCHW
# with large maps (runs), NCHW with small maps (grouped virtual channels), few channels.
_REDO_LAYOUTS = [((300, 70), -1), ((70, 300), 0), ((3, 5, 40, 40), 1), ((20, 70, 7, 7), 1), ((900, 3), -1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("shape,axis", _REDO_LAYOUTS, ids=str)
def test_tiny_values_keep_their_sums_of_squares(device, dtype, shape, axis):
    """Values so small that their squares fall below float's normal range (|x| < ~1e-19: the fast
    path's float partial sums would lose them to underflow) are summed in float64 like the
    reference: sum x^2 within the usual relative tolerance, channel by channel, whatever the
    magnitude. Channels of normal values beside them stay on the fast path and exact too."""
    x = _make(shape, dtype, device, kind="normal").double()
    C = shape[axis]
    exps = torch.tensor([0, 19, 21, 25, 30, 36, 44, 0, 160] * (C // 9 + 1))[:C].double()
    if dtype != torch.float64:
        exps = exps.clamp(max=38)  # (bfloat16's subnormals end at ~9e-41)
    view = [1] * x.dim()
    view[axis] = C
    x = (x * torch.pow(10.0, -exps).view(view).to(x.device)).to(dtype)
    # a channel of zeros but for one tiny value
    idx = [slice(None)] * x.dim()
    idx[axis] = 1 % C
    x[tuple(idx)] = 0
    x.view(-1)[0] = 0  # keep the planted value off the first element
    one = [0] * x.dim()
    one[axis] = 1 % C
    x[tuple(one)] = 3e-30 if dtype != torch.float64 else 3e-150
    for bins in (0, 2048):
        a = ChannelStats(axis=axis, bins=bins).update(x).update(x[:2] * 0.5 if axis != 0 else x * 0.5)
        r = ChannelStats(axis=axis, bins=bins, backend="reference").update(x)
        r.update(x[:2] * 0.5 if axis != 0 else x * 0.5)
        assert_stats_match(a, r, dtype, f"bins={bins} ")
        assert (a.sum_sq.cpu() > 0).all(), a.sum_sq


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,axis", _REDO_LAYOUTS, ids=str)
def test_a_nonfinite_channel_in_every_row_leaves_the_others_exact(device, dtype, shape, axis):
    """Masked attention scores hold -inf in some channels of every row: the chunk channels with a
    non-finite value are redone by the masked path (alone when they are few, with the whole chunk
    when many are), and every channel's statistics still match the reference."""
    x = _make(shape, dtype, device, kind="heavy")
    C = shape[axis]
    xc = x.movedim(axis, -1)  # a view: writes land in x
    xc[..., 7 % C] = -float("inf")
    every = lambda k: (torch.arange(xc[..., 0].numel(), device=x.device) % k == 0).view(xc.shape[:-1])
    xc[..., 9 % C][every(3)] = float("nan")
    xc[..., 11 % C][every(5)] = torch.finfo(dtype).max
    y = x.clone()
    y.movedim(axis, -1)[..., ::2] = float("nan")  # half the channels bad: whole-chunk redo
    for inp in (x, y):
        for bins in (0, 2048):
            a = ChannelStats(axis=axis, bins=bins).update(inp)
            r = ChannelStats(axis=axis, bins=bins, backend="reference").update(inp)
            assert_stats_match(a, r, dtype, f"bins={bins} ")
            assert (a.nan_count + a.inf_count).sum() > 0


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("samples,hw", [(1, (7, 7)), (2, (3, 5)), (3, (4, 4)), (5, (1, 17)), (7, (16, 31)),
                                        (13, (7, 7)), (20, (3, 5)), (3, (32, 17)), (4, (1, 8)), (6, (3, 3)),
                                        (9, (5, 5)), (3, (1, 7)), (5, (14, 14)), (2, (8, 59)), (2, (1, 473)),
                                        (3, (2, 5)), (2, (1, 11)), (4, (3, 7)), (3, (2, 11))],
                         ids=str)
def test_short_runs_channel_by_channel_exactly(threads, dtype, samples, hw):
    """NCHW with short runs (up to 512 values) taken channel by channel over tiles of 8 samples
    (fewer than 40 samples, or per-channel histograms): runs shorter than, equal to and longer than
    the 16 lanes, a lane budget reached within a tile (16 x 31), a partial last tile, tasks that
    start mid-channel (2 threads), runs just too long for it (32 x 17: one run at a time), NaN / Inf
    / huge values in some runs, a channel of tiny values; every statistic and histogram against the
    reference. The float-accumulating variant (ShortRunsV, 8 lanes, 8 channels reduced together,
    runs of 8 to 472 values): every tail length n % 8 from 0 to 7 (8, 9, 10, 11, 196, 21, 22, 15), groups
    of 8 channels cut by C = 37 and by the lane budget (14 x 14: two runs a flush), the longest run
    it takes (8 x 59 = 472 = 8 x 59 lanes) and the first it leaves to ShortRuns (473, and 7)."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        C = 37 if hw != (16, 31) else 71  # (7 x 71 x 496 values: tasks that start mid-channel)
        x = _make((samples, C) + hw, dtype, "cpu", kind="heavy")
        x[0, 5, 0, 0] = float("nan")
        x[-1, 6, -1, -1] = float("inf")
        x[samples // 2, 7] = torch.finfo(dtype).max
        x[:, 8] = x[:, 8] * 1e-30  # tiny squares: redone in float64
        for bins, cbins in ((0, 0), (2048, 0), (2048, 16)):
            a = ChannelStats(axis=1, bins=bins, channel_bins=cbins).update(x).update(x[:1] * 3)
            r = ChannelStats(axis=1, bins=bins, channel_bins=cbins, backend="reference").update(x).update(x[:1] * 3)
            assert_stats_match(a, r, dtype, f"bins={bins} cbins={cbins} ")
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("threads", [1, 2])
def test_short_runs_of_one_channel_span_tiles_exactly(threads):
    """One channel (a slice of an NCHW tensor): its short runs continue from tile to tile, so a
    flush comes from the lane budget or the remembered-runs limit, not from a channel change."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        base = _make((700, 2, 5, 5), torch.float32, "cpu", kind="heavy")
        base[3, 0, 1, 1] = float("nan")
        base[650, 0, 0, 0] = float("inf")
        x = base[:, :1]
        for bins, cbins in ((0, 0), (256, 8)):
            a = ChannelStats(axis=1, bins=bins, channel_bins=cbins).update(x)
            r = ChannelStats(axis=1, bins=bins, channel_bins=cbins, backend="reference").update(x)
            assert_stats_match(a, r, torch.float32)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("device", DEVICES)
def test_clear_in_place_equals_a_fresh_object(device):
    """_clear() (the integrations' scratch objects) forgets everything in the same tensors: what
    follows equals a fresh object's statistics and histograms, NaN/Inf counts and ranges included."""
    x = _special(_make((300, 40), torch.float32, device, kind="heavy") * 100)
    y = _make((77, 40), torch.float32, device) * 0.01
    for bins, cbins in ((0, 0), (256, 0), (256, 16)):
        s = ChannelStats(bins=bins, channel_bins=cbins).update(x).update(x * 3)
        f = s._f
        s._clear()
        assert s._f is f  # in place
        s.update(y)
        assert_stats_match(s, ChannelStats(bins=bins, channel_bins=cbins).update(y), torch.float32)
        assert_stats_match(s, ChannelStats(bins=bins, channel_bins=cbins, backend="reference").update(y),
                           torch.float32)


def test_slots_of_threads_that_ran_no_task_are_not_merged():
    """With more torch threads than tasks, some per-thread slots take no task: their buffers (kept
    between calls, so holding an earlier call's numbers) must not reach the state."""
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    old = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        ChannelStats().update(_make((64, 4000), torch.float32, "cpu", scale=1e6))  # fills the buffers
        x = _make((20, 4000), torch.float32, "cpu")  # 20 rows: channels split in 2 tasks, 4 slots
        assert_stats_match(ChannelStats().update(x), _ref_state(x, -1), torch.float32)
    finally:
        torch.set_num_threads(old)


def test_unknown_cpu_capability_is_an_error(monkeypatch):
    if not native_on("cpu"):
        pytest.skip("no native CPU kernel")
    monkeypatch.setenv("CALIBFAST_CPU_CAPABILITY", "sse9")
    with pytest.raises(RuntimeError, match="CALIBFAST_CPU_CAPABILITY"):
        ChannelStats().update(torch.ones(3, 4))


@pytest.mark.parametrize("device", DEVICES)
def test_values_are_per_channel(device):
    # channel c holds exactly the values c*10 + [0..rows): checks the axis is the channel axis,
    # not the sample axis, with known answers.
    rows, C = 37, 9
    x = (torch.arange(C, device=device) * 10).float() + torch.arange(rows, device=device).float()[:, None]
    x[5, 2] = float("nan")
    x[6, 3] = float("-inf")
    s = ChannelStats().update(x)
    ref_min = (torch.arange(C) * 10).float()
    ref_max = ref_min + rows - 1
    ref_max[2] = ref_max[2]  # NaN at a middle row leaves min/max unchanged
    assert torch.equal(s.min.cpu(), ref_min)
    assert torch.equal(s.max.cpu(), ref_max)
    assert torch.equal(s.count.cpu(), torch.full((C,), rows))
    assert s.nan_count.cpu().tolist() == [0, 0, 1, 0, 0, 0, 0, 0, 0]
    assert s.inf_count.cpu().tolist() == [0, 0, 0, 1, 0, 0, 0, 0, 0]
    exp_sum = torch.tensor([sum(c * 10 + r for r in range(rows) if not (c == 2 and r == 5 or c == 3 and r == 6))
                            for c in range(C)], dtype=torch.float64)
    assert torch.equal(s.sum.cpu(), exp_sum)
    assert torch.equal(s.finite_count.cpu(), torch.tensor([rows] * 2 + [rows - 1] * 2 + [rows] * 5))
    assert torch.allclose(s.mean.cpu(), exp_sum / s.finite_count.cpu().double())


@pytest.mark.parametrize("device", DEVICES)
def test_all_nonfinite_channel_keeps_identities(device):
    x = torch.full((10, 3), float("nan"), device=device)
    x[:, 1] = float("inf")
    x[0, 2] = -3.0
    s = ChannelStats().update(x)
    assert s.min.cpu().tolist() == [math.inf, math.inf, -3.0]
    assert s.max.cpu().tolist() == [-math.inf, -math.inf, -3.0]
    assert s.absmax.cpu().tolist() == [-math.inf, -math.inf, 3.0]
    assert s.nan_count.cpu().tolist() == [10, 0, 9]
    assert s.inf_count.cpu().tolist() == [0, 10, 0]
    assert s.sum.cpu().tolist() == [0.0, 0.0, -3.0]
    assert math.isnan(s.mean[0].item()) and s.mean[2].item() == -3.0


@pytest.mark.parametrize("device", DEVICES)
def test_mean_std_against_torch(device):
    x = _make((500, 33), torch.float32, device, scale=3.0) + 2.0
    s = ChannelStats().update(x[:200]).update(x[200:])
    xd = x.double().cpu()
    assert torch.allclose(s.mean.cpu(), xd.mean(0), rtol=1e-6, atol=1e-9)
    assert torch.allclose(s.std.cpu(), xd.std(0, unbiased=False), rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_and_merge_equal_whole(device):
    x = _special(_make((301, 45), torch.float32, device, kind="heavy"))
    whole = ChannelStats().update(x)
    parts = ChannelStats()
    for i in range(0, 301, 50):
        parts.update(x[i:i + 50])
    assert_stats_match(parts, whole, torch.float32)
    a = ChannelStats().update(x[:100])
    b = ChannelStats().update(x[100:])
    assert_stats_match(a.clone().merge(b), whole, torch.float32)
    assert_stats_match(b.merge(a), whole, torch.float32)


def test_merge_into_empty_and_with_empty():
    x = torch.randn(20, 4)
    s = ChannelStats().update(x)
    e = ChannelStats()
    e.merge(s)
    assert torch.equal(e.min, s.min) and torch.equal(e.count, s.count)
    before = s.state_dict()
    s.merge(ChannelStats())
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k])


def test_state_dict_round_trip_and_to():
    x = _special(_make((64, 12), torch.float32, "cpu", kind="heavy"))
    s = ChannelStats(axis=-1).update(x)
    d = s.state_dict()
    t = ChannelStats(axis=0).load_state_dict(d)
    assert t.axis == -1
    for k, v in t.state_dict().items():
        assert torch.equal(v, d[k]), k
    t.update(x)
    s.update(x)
    assert_stats_match(t, s, torch.float32)
    u = t.clone().to("cpu")
    assert torch.equal(u.sum, t.sum)


def test_load_state_dict_rejects_bad_dicts_without_change():
    s = ChannelStats().update(torch.randn(5, 3))
    before = s.state_dict()
    d = dict(before)
    del d["sum"]
    with pytest.raises(KeyError, match="sum"):
        s.load_state_dict(d)
    d = dict(before)
    d["max"] = torch.zeros(4)
    with pytest.raises(ValueError, match="max"):
        s.load_state_dict(d)
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k])


# ---- bad input: clear errors, state unchanged ---------------------------------------------------

@pytest.mark.parametrize("backend", ["dispatch", "reference"])
def test_bad_input_leaves_state_unchanged(backend):
    s = ChannelStats(axis=-1, backend=backend).update(torch.randn(8, 6))
    before = s.state_dict()
    with pytest.raises(ValueError, match=r"holds 6 channels.*7 channels"):
        s.update(torch.randn(8, 7))
    with pytest.raises(TypeError, match="floating-point.*torch.int64"):
        s.update(torch.ones(8, 6, dtype=torch.int64))
    with pytest.raises(TypeError, match="complex64"):
        s.update(torch.ones(8, 6, dtype=torch.complex64))
    with pytest.raises(TypeError, match="expects a tensor"):
        s.update([1.0] * 6)
    with pytest.raises(ValueError, match="0-d"):
        s.update(torch.tensor(1.0))
    s2 = ChannelStats(axis=3, backend=backend)
    with pytest.raises(IndexError, match="axis 3 is out of range.*rank 2"):
        s2.update(torch.randn(8, 6))
    assert not s2.initialized
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="holds 6 channels, the other holds 2"):
        s.merge(ChannelStats().update(torch.randn(3, 2)))
    for k, v in s.state_dict().items():
        assert torch.equal(v, before[k]), k


def _fresh_state(C, device="cpu", channel_bins=16):
    """The op's seven state tensors: fstate, dstate, istate, hist, hexp, chist, chexp."""
    s = ChannelStats(num_channels=C, device=device, bins=64, channel_bins=channel_bins)
    return [s._f, s._d, s._i, s._h, s._he, s._ch, s._che]


@pytest.mark.parametrize("impl", ["dispatch", "reference"])
def test_op_checks_its_arguments(impl):
    op = torch.ops.calibfast.channel_stats_update if impl == "dispatch" else _reference.channel_stats_update
    st = _fresh_state(4)
    before = [t.clone() for t in st]
    x = torch.randn(3, 4)
    with pytest.raises((RuntimeError, ValueError), match=r"shape \[3, 5\]"):
        op(torch.randn(3, 5), -1, *st)
    with pytest.raises((RuntimeError, TypeError), match="fstate must be"):
        op(x, -1, st[0].double(), *st[1:])
    with pytest.raises((RuntimeError, TypeError), match="floating-point"):
        op(x.int(), -1, *st)
    with pytest.raises((RuntimeError, IndexError), match="out of range"):
        op(x, 2, *st)
    for t, b in zip(st, before):
        assert torch.equal(t, b)


def test_unallocated_stats_raise_clearly():
    s = ChannelStats()
    with pytest.raises(RuntimeError, match="seen no tensor"):
        s.min
    with pytest.raises(ValueError, match="backend"):
        ChannelStats(backend="fast")


# ---- dispatcher integration -------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("channel_bins", [0, 16])
def test_opcheck(device, dtype, channel_bins):
    st = _fresh_state(16, device, channel_bins)
    for x, axis in ((torch.randn(8, 16, device=device, dtype=dtype), -1),
                    (torch.randn(2, 16, 5, device=device, dtype=dtype) * 100, 1)):
        torch.library.opcheck(torch.ops.calibfast.channel_stats_update, (x, axis, *st))


def _state_of(st):
    s = ChannelStats(bins=64, channel_bins=16)
    s._f, s._d, s._i, s._h, s._he, s._ch, s._che = st
    return s


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    st = _fresh_state(32, device)

    def step(x, st):
        y = torch.relu(x) * 2
        torch.ops.calibfast.channel_stats_update(y, -1, *st)
        return y.sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    x = torch.randn(10, 32, device=device)
    compiled(x, st)
    compiled(x * 10, st)
    ref = ChannelStats(bins=64, channel_bins=16, backend="reference")
    ref.update(torch.relu(x) * 2).update(torch.relu(x * 10) * 2)
    assert_stats_match(_state_of(st), ref, torch.float32)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_inductor(device):
    st = _fresh_state(8, device)

    @torch.compile(fullgraph=True)
    def step(x):
        torch.ops.calibfast.channel_stats_update(x * 3, -1, *st)

    x = torch.randn(6, 8, device=device)
    step(x)
    ref = ChannelStats(bins=64, channel_bins=16, backend="reference").update(x * 3)
    assert_stats_match(_state_of(st), ref, torch.float32)


# ---- more than 2^31 elements --------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["rows", "runs"])
def test_more_than_2_pow_31_elements(device, layout):
    if not native_on(device):
        pytest.skip(f"no native kernel for {device}")
    C = 8
    n = 2 ** 31 + 4 * C  # > 2^31 values; 4.3 GB in bfloat16
    rows = n // C
    shape = (rows, C) if layout == "rows" else (C, rows)  # runs: channel-major, axis 0
    axis = -1 if layout == "rows" else 0
    try:
        x = torch.zeros(shape, dtype=torch.bfloat16, device=device)
    except (RuntimeError, torch.cuda.OutOfMemoryError):
        pytest.skip("not enough memory for a 2^31-element tensor")

    def put(r, c, v):  # values planted past the 2^31st element, where 32-bit indexing would wrap
        if layout == "rows":
            x[r, c] = v
        else:
            x[c, r] = v

    put(rows - 1, 3, 5.0)
    put(rows - 2, 5, -7.0)
    put(rows - 3, 0, float("nan"))
    put(rows // 2, 1, float("inf"))
    s = ChannelStats(axis=axis).update(x)
    exp_min = torch.zeros(C)
    exp_min[5] = -7.0
    exp_max = torch.zeros(C)
    exp_max[3] = 5.0
    assert torch.equal(s.min.cpu(), exp_min)
    assert torch.equal(s.max.cpu(), exp_max)
    assert torch.equal(s.count.cpu(), torch.full((C,), rows))
    assert s.nan_count.cpu().tolist() == [1, 0, 0, 0, 0, 0, 0, 0]
    assert s.inf_count.cpu().tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    exp_sum = torch.zeros(C, dtype=torch.float64)
    exp_sum[3], exp_sum[5] = 5.0, -7.0
    assert torch.equal(s.sum.cpu(), exp_sum)
    assert s.sum_sq.cpu()[5].item() == 49.0
