"""Range searches over |x| histograms (calibfast.ranges): native kernels against the pure-torch
reference, against the raw data, and (compat mode) against ModelOpt's own functions."""

import inspect
import math

import pytest
import torch

from calibfast import _ops
from calibfast import _reference_ranges as R
from calibfast.ranges import ENTROPY_LEVELS, FORMATS, hist_amax, modelopt_amax

from conftest import native_on

needs_native = pytest.mark.skipif(not native_on("cpu"), reason="the compiled CPU kernels are not built")

try:  # ModelOpt is optional: only the compatibility tests need it
    from modelopt.torch.quantization import tensor_quant as _mo_tq
    from modelopt.torch.quantization.calib import histogram as _mo_hist
except Exception as e:  # pragma: no cover - depends on the environment
    _mo_hist = None
    _MO_ERR = f"modelopt does not import: {type(e).__name__}: {e}"
else:
    _MO_ERR = ""
needs_modelopt = pytest.mark.skipif(_mo_hist is None, reason=_MO_ERR)


# ---- data and histograms ------------------------------------------------------------------------

def _data(kind, n, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, generator=g, dtype=torch.float64)
    if kind == "heavy":  # activations with outliers
        return z * torch.exp(torch.randn(n, generator=g, dtype=torch.float64))
    if kind == "normal":
        return z
    if kind == "relu":  # half exact zeros
        return torch.relu(z) * 3
    if kind == "uniform":
        return torch.rand(n, generator=g, dtype=torch.float64) * 5 - 2
    if kind == "outlier":  # a few huge values far from the bulk
        x = z.clone()
        x[:3] = torch.tensor([400.0, -350.0, 300.0], dtype=torch.float64)
        return x
    raise ValueError(kind)


KINDS = ["heavy", "normal", "relu", "uniform", "outlier"]


def _hist(x, bins):
    """calibfast's layout: counts of |x| in `bins` bins over [0, 2^e), e the smallest with max < 2^e."""
    a = x.abs()
    e = math.floor(math.log2(float(a.max()))) + 1
    hmax = 2.0 ** e
    w = hmax / bins
    idx = torch.floor(a / w).to(torch.int64).clamp(max=bins - 1)
    return torch.bincount(idx, minlength=bins), hmax


def _mo_calibrator_hist(x, grow=1.25):
    """A histogram filled by ModelOpt's HistogramCalibrator in two batches, the second one's max
    `grow` times the first's (its bins grow past 2048; float32 counts)."""
    cal = _mo_hist.HistogramCalibrator()
    first, second = x.float().chunk(2)
    cal.collect(first)
    cal.collect(second / second.abs().max() * first.abs().max() * grow)
    return cal


# ---- native against the reference --------------------------------------------------------------

def _assert_same_or_tied(got, want, amaxs, errs, rtol=1e-9, what=""):
    """The native and reference searches agree, or pick candidates whose errors are equal to rtol
    (their float64 sums differ in order only)."""
    got, want = float(got), float(want)
    if got == want:
        return
    cand = amaxs.to(torch.float32)
    ig = (cand == got).nonzero()
    iw = (cand == want).nonzero()
    assert ig.numel() and iw.numel(), f"{what}: {got} / {want} are not candidates"
    eg, ew = float(errs[ig[0, 0]]), float(errs[iw[0, 0]])
    assert abs(eg - ew) <= rtol * abs(ew), f"{what}: native {got} (err {eg}) vs reference {want} (err {ew})"


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("bins", [512, 2048])
def test_percentile_native_equals_reference(kind, bins):
    h, hmax = _hist(_data(kind, 50_000, 1), bins)
    w = torch.tensor(hmax / bins, dtype=torch.float64)
    for p in (50.0, 99.0, 99.9, 99.99, 100.0, 1e-6):
        got = _ops.hist_amax_percentile(h, w, p)
        want = R.hist_amax_percentile(h, w, p)
        assert torch.equal(got, want), (kind, p, got, want)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_mse_native_matches_reference(kind, fmt):
    h, hmax = _hist(_data(kind, 50_000, 2), 512)
    w = hmax / 512
    got = _ops.hist_amax_mse(h, torch.tensor(w, dtype=torch.float64), fmt)
    amaxs, errs = R.mse_curve(h.double(), w, fmt)
    want = amaxs[int(torch.argmin(errs))]
    _assert_same_or_tied(got, want, amaxs, errs, what=f"{kind}/{fmt}")


@needs_native
@pytest.mark.parametrize("fmt", ["int8", "fp8_e4m3", "fp8_e5m2"])
def test_mse_native_matches_reference_sparse(fmt):
    # Few non-empty bins: the rounding grid (fp8 rounding included) decides the error.
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        h = torch.zeros(256, dtype=torch.int64)
        idx = torch.randint(0, 256, (6,), generator=g)
        h[idx] = torch.randint(1, 1000, (6,), generator=g)
        got = _ops.hist_amax_mse(h, torch.tensor(0.125, dtype=torch.float64), fmt)
        amaxs, errs = R.mse_curve(h.double(), 0.125, fmt)
        _assert_same_or_tied(got, amaxs[int(torch.argmin(errs))], amaxs, errs, what=f"seed {seed}")


@needs_native
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", ["int8", "uint8", "int4"])
def test_entropy_native_matches_reference(kind, fmt):
    h, hmax = _hist(_data(kind, 50_000, 3), 512)
    w = hmax / 512
    L = ENTROPY_LEVELS[fmt]
    got = _ops.hist_amax_entropy(h, torch.tensor(w, dtype=torch.float64), L, False)
    want = R.hist_amax_entropy(h, torch.tensor(w, dtype=torch.float64), L, False)
    amaxs, kl = R.entropy_curve(h.double(), w, L)
    if amaxs.numel() == 0:
        assert torch.equal(got, want)
        return
    _assert_same_or_tied(got, want, amaxs, kl, rtol=1e-9, what=f"{kind}/{fmt}")


@needs_native
def test_entropy_edge_cases_native_equals_reference():
    w = torch.tensor(1.0, dtype=torch.float64)
    cases = {
        "fits in the levels": torch.tensor([5, 0, 3] + [0] * 200),
        "one bin": torch.tensor([0] * 300 + [7]),
        "spike at the top": torch.tensor([1] * 10 + [0] * 300 + [1000]),
        "empty below 128": torch.tensor([0] * 150 + [4, 5, 6]),
        "dense": torch.arange(1, 400),
    }
    for name, h in cases.items():
        got = _ops.hist_amax_entropy(h, w, 128, False)
        want = R.hist_amax_entropy(h, w, 128, False)
        assert torch.equal(got, want), (name, got, want)


@needs_native
@pytest.mark.parametrize("kind", KINDS)
def test_entropy_ignore_zero_spike_native_matches_reference(kind):
    h, hmax = _hist(_data(kind, 50_000, 3), 512)
    w = torch.tensor(hmax / 512, dtype=torch.float64)
    got = _ops.hist_amax_entropy(h, w, 128, True)
    want = R.hist_amax_entropy(h, w, 128, True)
    h2 = h.double().clone()
    h2[0] = h2[1]
    amaxs, kl = R.entropy_curve(h2, float(w), 128)
    if amaxs.numel() == 0:
        assert torch.equal(got, want)
    else:
        _assert_same_or_tied(got, want, amaxs, kl, what=kind)


def test_entropy_zero_spike():
    # ReLU outputs: half the values are exact zeros. As TensorRT describes it the spike in bin 0
    # pulls the range far down; with ignore_zero_spike the range lands near the mse optimum.
    x = _data("relu", 200_000, 1)
    h, hmax = _hist(x, 2048)
    keep = float(hist_amax(h, hmax, "entropy"))
    skip = float(hist_amax(h, hmax, "entropy", ignore_zero_spike=True))
    a = x.abs()
    errs = _raw_mse(a, torch.tensor([keep, skip, float(hist_amax(h, hmax, "mse"))], dtype=torch.float64), "int8")
    assert keep < 0.6 * skip
    assert errs[1] < 1.1 * errs[2] < errs[0] / 50


# ---- against the raw data ------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [50.0, 99.0, 99.9, 99.99])
def test_percentile_within_one_bin_of_quantile(kind, p):
    x = _data(kind, 100_000, 4)
    h, hmax = _hist(x, 2048)
    w = hmax / 2048
    got = float(hist_amax(h, hmax, "percentile", percentile=p))
    a = x.abs().sort().values
    # The guarantee: at least p% of the values are <= the result, and the result is less than one
    # bin above the nearest-rank percentile (the smallest value with p% at or below it).
    rank = int(((torch.arange(1, a.numel() + 1, dtype=torch.float64) * 100.0) >= p * a.numel()).to(torch.int8).argmax())
    nearest = float(a[rank])
    assert nearest <= got < nearest + w, (got, nearest, w)
    assert float((a <= got).double().mean()) * 100 >= p
    # torch.quantile interpolates at rank p * (n - 1): it differs from the nearest rank by at most
    # the gap between the order statistics around them, which in a sparse tail can exceed a bin.
    q = float(torch.quantile(a, p / 100))
    lo_rank = math.floor(p / 100 * (a.numel() - 1))
    gap = float(a[max(rank, lo_rank + 1)] - a[min(rank, lo_rank)])
    assert abs(got - q) <= w + gap, (got, q, w, gap)
    if gap < w / 4:  # dense there: the one-bin bound itself
        assert abs(got - q) <= w, (got, q, w)


def _raw_fake_quant(a, amax, fmt):
    """|x| [n] fake-quantized with each amax [m, 1]: [m, n]."""
    spec = R.FORMATS[fmt]
    if spec[0] == "int":
        L = spec[1]
        return torch.round(torch.clamp(a * (L / amax), max=L)) * (amax / L)
    dt, fmax = spec[1], spec[2]
    y = (a * (fmax / amax)).float().clamp(max=fmax)
    return y.to(dt).double() * (amax / fmax)


def _raw_mse(a, amaxs, fmt):
    out = []
    for part in amaxs.split(256):
        q = _raw_fake_quant(a[None, :], part[:, None], fmt)
        out.append(((a[None, :] - q) ** 2).mean(1))
    return torch.cat(out)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("fmt", FORMATS)
def test_mse_within_one_percent_of_brute_force(kind, fmt):
    x = _data(kind, 8_000, 5)
    a = x.abs()
    h, hmax = _hist(x, 2048)
    got = hist_amax(h, hmax, "mse", fmt=fmt).double()
    # Brute force over the raw data: every bin edge up to the max.
    w = hmax / 2048
    K = int(torch.nonzero(h)[-1]) + 1
    cands = torch.arange(1, K + 1, dtype=torch.float64) * w
    best = float(_raw_mse(a, cands, fmt).min())
    reached = float(_raw_mse(a, got.reshape(1), fmt)[0])
    assert reached <= 1.01 * best, (float(got), reached, best)


# ---- ModelOpt compatibility ------------------------------------------------------------------------

def _mo_args(h, e):
    """What HistogramCalibrator.compute_amax hands its functions: int32 counts, numpy edges."""
    return h.to(torch.int32).numpy().copy(), e.numpy()


def _fixed_fake_tensor_quant():
    """ModelOpt 0.47's _compute_amax_mse calls fake_tensor_quant(centers, amax, num_bits, unsigned)
    positionally, but its third parameter is now `bias`. Returns the call with the arguments by
    name when that is the case (None when ModelOpt's own call is right)."""
    params = list(inspect.signature(_mo_tq.FakeTensorQuantFunction.forward).parameters)
    if params[3] != "bias":
        return None
    return lambda inputs, amax, num_bits, unsigned: _mo_tq.fake_tensor_quant(inputs, amax, None, num_bits, unsigned)


def _mo_mse(monkeypatch, *args):
    fixed = _fixed_fake_tensor_quant()
    if fixed is not None:
        monkeypatch.setattr(_mo_hist, "fake_tensor_quant", fixed)
    return _mo_hist._compute_amax_mse(*args)


def _synthetic(bins, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "dense":
        h = (torch.rand(bins, generator=g) * 1000).to(torch.int64)
    elif kind == "decay":
        h = (1e6 * torch.exp(-torch.arange(bins, dtype=torch.float64) / (bins / 12))).to(torch.int64)
    elif kind == "sparse":
        h = torch.zeros(bins, dtype=torch.int64)
        h[torch.randint(0, bins, (bins // 20,), generator=g)] = torch.randint(1, 50, (bins // 20,), generator=g)
    elif kind == "small counts":
        h = torch.randint(0, 3, (bins,), generator=g)
    elif kind == "zeros at start":
        h = torch.randint(0, 100, (bins,), generator=g)
        h[: bins // 3] = 0
    else:
        raise ValueError(kind)
    h[-1] = max(int(h[-1]), 1)
    hmax = 2.0 ** int(torch.randint(-3, 6, (1,), generator=g))
    return h, torch.arange(bins + 1, dtype=torch.float64) * (hmax / bins)


SYNTH = ["dense", "decay", "sparse", "small counts", "zeros at start"]


@needs_modelopt
@pytest.mark.parametrize("kind", SYNTH)
@pytest.mark.parametrize("bits,unsigned,stride,start", [(8, False, 1, 128), (8, True, 1, 128), (4, False, 3, 64),
                                                        (8, False, 7, 200)])
def test_entropy_compat_equals_modelopt(kind, bits, unsigned, stride, start):
    for seed in range(2):
        h, e = _synthetic(400, seed, kind)
        want = _mo_hist._compute_amax_entropy(*_mo_args(h, e), bits, unsigned, stride, start)
        got = modelopt_amax(h, e, "entropy", num_bits=bits, unsigned=unsigned, stride=stride, start_bin=start)
        assert got.dtype == torch.float32 and got.dim() == 0
        assert float(got) == float(want), (kind, seed, float(got), float(want))


@needs_modelopt
@pytest.mark.parametrize("kind", SYNTH)
@pytest.mark.parametrize("bits,unsigned,stride,start", [(8, False, 1, 128), (8, True, 1, 128), (4, False, 3, 64),
                                                        (2, False, 1, 0)])
def test_mse_compat_equals_modelopt(monkeypatch, kind, bits, unsigned, stride, start):
    for seed in range(3):
        h, e = _synthetic(600, seed, kind)
        want = _mo_mse(monkeypatch, *_mo_args(h, e), bits, unsigned, stride, start)
        got = modelopt_amax(h, e, "mse", num_bits=bits, unsigned=unsigned, stride=stride, start_bin=start)
        assert float(got) == float(want), (kind, seed, float(got), float(want))
        # the reference takes the same float32 steps and torch's own mean: bit for bit too
        ref = R.modelopt_amax_mse(h, e, bits, unsigned, stride, start)
        assert float(ref) == float(want)


@needs_modelopt
@pytest.mark.parametrize("kind", SYNTH)
def test_percentile_compat_equals_modelopt(kind):
    for seed in range(3):
        h, e = _synthetic(700, seed, kind)
        for p in (0.0, 10.0, 50.0, 99.0, 99.9, 99.99, 99.9999, 100.0):
            want = _mo_hist._compute_amax_percentile(*_mo_args(h, e), p)
            got = modelopt_amax(h, e, "percentile", percentile=p)
            assert float(got) == float(want), (kind, seed, p, float(got), float(want))
            assert float(R.modelopt_amax_percentile(h, e, p)) == float(want)


@needs_modelopt
@pytest.mark.parametrize("kind", ["heavy", "relu", "outlier"])
def test_compat_equals_histogram_calibrator(monkeypatch, kind):
    # A real HistogramCalibrator fed in batches (its bins grow past 2048): compute_amax itself.
    cal = _mo_calibrator_hist(_data(kind, 100_000, 6))
    h, e = cal._calib_hist, cal._calib_bin_edges
    assert h.numel() > 2048
    for method in ("percentile", "entropy"):
        want = cal.compute_amax(method)
        got = modelopt_amax(h, e, method)
        assert float(got) == float(want), (method, float(got), float(want))
    fixed = _fixed_fake_tensor_quant()
    if fixed is not None:
        monkeypatch.setattr(_mo_hist, "fake_tensor_quant", fixed)
    if e.numel() == h.numel() + 1:
        assert float(modelopt_amax(h, e, "mse")) == float(cal.compute_amax("mse"))
    else:
        # Once its bins have grown, ModelOpt's calibrator can hold bins + 2 edges (torch.arange
        # rounding); its percentile and entropy searches only index them, its mse search fails.
        with pytest.raises(RuntimeError):
            cal.compute_amax("mse")
        with pytest.raises(ValueError, match="ModelOpt's own mse search fails"):
            modelopt_amax(h, e, "mse")


@needs_modelopt
def test_modelopt_mse_argument_bug_is_as_documented():
    # What calibfast.ranges documents: ModelOpt 0.47's own mse search quantizes every centre to
    # amax + num_bits and so returns the first candidate. Skips once ModelOpt fixes the call.
    if _fixed_fake_tensor_quant() is None:
        pytest.skip("this ModelOpt passes fake_tensor_quant's arguments correctly")
    h, e = _synthetic(600, 0, "decay")
    got = _mo_hist._compute_amax_mse(*_mo_args(h, e), 8, False)
    centres = ((e[1:] + e[:-1]) / 2).float()
    assert float(got) == float(centres[128])
    assert float(modelopt_amax(h, e, "mse")) != float(got)


@needs_native
@pytest.mark.parametrize("kind", SYNTH)
def test_entropy_compat_native_matches_reference(kind):
    # The reference sums in torch's order (not numpy's): equal, or tied to 1e-12.
    h, e = _synthetic(400, 1, kind)
    got = _ops.modelopt_amax_entropy(h, e, 8, False, 1, 128)
    want = R.modelopt_amax_entropy(h, e, 8, False, 1, 128)
    ii, kl = R.modelopt_entropy_curve(h.double(), 8, False, 1, 128)
    _assert_same_or_tied(got, want, e[ii], kl, rtol=1e-12, what=kind)


def test_hist_amax_compat_modelopt_uses_its_conventions():
    h, hmax = _hist(_data("heavy", 50_000, 7), 2048)
    edges = torch.arange(2049, dtype=torch.float64) * (hmax / 2048)
    for method in ("percentile", "mse", "entropy"):
        got = hist_amax(h, hmax, method, compat="modelopt")
        want = modelopt_amax(h, edges, method)
        assert torch.equal(got, want), method
    # ModelOpt's percentile is a lower edge, calibfast's the upper one
    lo = float(hist_amax(h, hmax, "percentile", compat="modelopt"))
    hi = float(hist_amax(h, hmax, "percentile"))
    assert hi - lo == pytest.approx(hmax / 2048)


# ---- per-channel ------------------------------------------------------------------------------------

@pytest.mark.parametrize("method,fmt", [("max", "int8"), ("percentile", "int8"), ("mse", "int8"),
                                        ("mse", "fp8_e4m3"), ("entropy", "int8"), ("entropy", "int4")])
@pytest.mark.parametrize("compat", [None, "modelopt"])
def test_per_channel_equals_per_row(method, fmt, compat):
    if compat == "modelopt" and fmt.startswith("fp8"):
        pytest.skip("no fp8 in ModelOpt's mse")
    rows, hmaxs = [], []
    for c, kind in enumerate(KINDS + ["heavy", "normal"]):
        h, hmax = _hist(_data(kind, 5_000, 10 + c), 256)
        rows.append(h)
        hmaxs.append(hmax)
    H2 = torch.stack(rows)
    got = hist_amax(H2, torch.tensor(hmaxs), method, fmt=fmt, compat=compat)
    assert got.shape == (len(rows),) and got.dtype == torch.float32
    for r in range(len(rows)):
        one = hist_amax(rows[r], hmaxs[r], method, fmt=fmt, compat=compat)
        assert one.dim() == 0
        assert float(got[r]) == float(one), (r, float(got[r]), float(one))
    # one hist_max for every row
    shared = hist_amax(H2, 8.0, method, fmt=fmt, compat=compat)
    for r in range(len(rows)):
        assert float(shared[r]) == float(hist_amax(rows[r], 8.0, method, fmt=fmt, compat=compat))


def test_per_channel_modelopt_amax_with_per_row_edges():
    hs, es = zip(*(_synthetic(300, s, k) for s, k in enumerate(SYNTH)))
    H2, E2 = torch.stack(hs), torch.stack(es)
    for method in ("percentile", "mse", "entropy"):
        got = modelopt_amax(H2, E2, method)
        for r in range(len(hs)):
            assert float(got[r]) == float(modelopt_amax(hs[r], es[r], method)), (method, r)


@needs_native
def test_per_channel_native_equals_reference():
    H2 = torch.stack([_synthetic(300, s, k)[0] for s, k in enumerate(SYNTH)])
    w = torch.tensor([0.5, 1.0, 0.25, 2.0, 1.0], dtype=torch.float64)
    assert torch.equal(_ops.hist_amax_percentile(H2, w, 99.0), R.hist_amax_percentile(H2, w, 99.0))
    assert torch.equal(_ops.hist_amax_entropy(H2, w, 128, False), R.hist_amax_entropy(H2, w, 128, False))
    assert torch.equal(_ops.hist_amax_entropy(H2, w, 128, True), R.hist_amax_entropy(H2, w, 128, True))
    assert torch.equal(_ops.hist_amax_mse(H2, w, "int8"), R.hist_amax_mse(H2, w, "int8"))


# ---- count dtypes, devices ------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["percentile", "mse", "entropy", "max"])
def test_count_dtypes_agree(method):
    h, hmax = _hist(_data("heavy", 20_000, 8), 512)
    want = hist_amax(h, hmax, method)
    for dt in (torch.int32, torch.float32, torch.float64):
        assert torch.equal(hist_amax(h.to(dt), hmax, method), want), dt


# ---- errors -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["max", "percentile", "mse", "entropy"])
def test_empty_histogram_is_a_value_error(method):
    with pytest.raises(ValueError, match="empty histogram"):
        hist_amax(torch.zeros(64, dtype=torch.int64), 1.0, method)
    H2 = torch.ones(3, 64, dtype=torch.int64)
    H2[1] = 0
    with pytest.raises(ValueError, match=r"empty histogram \(all counts are zero\) in row 1"):
        hist_amax(H2, 1.0, method)
    if method != "max":
        with pytest.raises(ValueError, match="empty histogram"):
            modelopt_amax(torch.zeros(300), torch.arange(301.0), method)


@pytest.mark.parametrize("impl", ["native", "reference"])
def test_ops_raise_value_errors(impl):
    if impl == "native" and not native_on("cpu"):
        pytest.skip("the compiled CPU kernels are not built")
    ops = _ops if impl == "native" else R
    w = torch.tensor(1.0, dtype=torch.float64)
    z = torch.zeros(256, dtype=torch.int64)
    with pytest.raises(ValueError, match="empty histogram"):
        ops.hist_amax_mse(z, w, "int8")
    with pytest.raises(ValueError, match="empty histogram"):
        ops.modelopt_amax_entropy(z, torch.arange(257.0), 8, False, 1, 128)
    with pytest.raises(ValueError, match="unknown format 'int7'.*int8, uint8, int4, uint4, fp8_e4m3, fp8_e5m2"):
        ops.hist_amax_mse(torch.ones(8, dtype=torch.int64), w, "int7")
    with pytest.raises(ValueError, match="finite and non-negative"):
        ops.hist_amax_percentile(torch.tensor([1.0, -1.0]), w, 50.0)
    with pytest.raises(ValueError, match=r"1-D \[bins\] or 2-D"):
        ops.hist_amax_percentile(torch.ones(2, 2, 2), w, 50.0)
    with pytest.raises(ValueError, match="bin width must be finite and positive"):
        ops.hist_amax_percentile(torch.ones(8), torch.tensor(0.0, dtype=torch.float64), 50.0)
    with pytest.raises(ValueError, match="expected bin edges of shape"):
        ops.modelopt_amax_percentile(torch.ones(8), torch.arange(8.0), 50.0)
    with pytest.raises(ValueError, match="no candidates"):
        ops.modelopt_amax_mse(torch.ones(100), torch.arange(101.0), 8, False, 1, 128)
    with pytest.raises(ValueError, match="no candidates"):
        ops.modelopt_amax_entropy(torch.ones(100), torch.arange(101.0), 8, False, 1, 128)


def test_api_argument_errors():
    h = torch.ones(256, dtype=torch.int64)
    with pytest.raises(ValueError, match=r"unknown method 'kl'.*'max', 'percentile', 'mse', 'entropy'"):
        hist_amax(h, 1.0, "kl")
    with pytest.raises(ValueError, match=r"unknown format 'fp4'.*'int8'.*'fp8_e5m2'"):
        hist_amax(h, 1.0, "mse", fmt="fp4")
    with pytest.raises(ValueError, match="unknown compat mode"):
        hist_amax(h, 1.0, "mse", compat="tensorrt")
    with pytest.raises(ValueError, match="entropy calibration needs an integer format"):
        hist_amax(h, 1.0, "entropy", fmt="fp8_e4m3")
    with pytest.raises(ValueError, match=r"percentile must be in \(0, 100\]"):
        hist_amax(h, 1.0, "percentile", percentile=0)
    with pytest.raises(ValueError, match="hist_max must be finite and positive"):
        hist_amax(h, -1.0, "max")
    with pytest.raises(ValueError, match="one entry per histogram row"):
        hist_amax(torch.ones(3, 8), torch.ones(4), "max")
    with pytest.raises(ValueError, match=r"unknown method 'max'.*'percentile', 'mse', 'entropy'"):
        modelopt_amax(h, torch.arange(257.0), "max")
    with pytest.raises(ValueError, match="fp8"):
        modelopt_amax(h, torch.arange(257.0), "mse", num_bits=(4, 3))
    with pytest.raises(ValueError, match=r"percentile must be in \[0, 100\]"):
        modelopt_amax(h, torch.arange(257.0), "percentile", percentile=101)


# ---- the ops under torch.library's checks ---------------------------------------------------------

def test_opcheck():
    h = torch.randint(0, 50, (2, 300))
    w = torch.tensor([0.5, 1.0], dtype=torch.float64)
    e = torch.arange(301, dtype=torch.float64) * 0.25
    cases = [
        (_ops.hist_amax_percentile, (h, w, 99.0)),
        (_ops.hist_amax_mse, (h, w, "int8")),
        (_ops.hist_amax_entropy, (h, w, 128, False)),
        (_ops.modelopt_amax_percentile, (h, e, 99.0)),
        (_ops.modelopt_amax_mse, (h, e, 8, False, 1, 128)),
        (_ops.modelopt_amax_entropy, (h, e, 8, False, 1, 128)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


# ---- without the compiled kernels -----------------------------------------------------------------

_FALLBACK = """
import sys, warnings
sys.modules['calibfast._C'] = None
warnings.simplefilter('ignore')
import torch
from calibfast.ranges import hist_amax, modelopt_amax
g = torch.Generator().manual_seed(0)
h = (1e5 * torch.exp(-torch.arange(300, dtype=torch.float64) / 30)).long() + torch.randint(0, 3, (300,), generator=g)
out = [float(hist_amax(h, 4.0, m, fmt=f)) for m, f in (("percentile", "int8"), ("mse", "int8"),
       ("mse", "fp8_e4m3"), ("entropy", "int8"), ("max", "int8"))]
e = torch.arange(301, dtype=torch.float64) / 64
out += [float(modelopt_amax(h, e, m)) for m in ("percentile", "mse", "entropy")]
print(repr(out))
"""


def test_pure_torch_fallback_gives_the_same_ranges():
    import ast
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("CALIBFAST_REQUIRE_NATIVE", None)
    r = subprocess.run([sys.executable, "-c", _FALLBACK], capture_output=True, text=True, env=env, cwd=root)
    assert r.returncode == 0, r.stderr
    fallback = ast.literal_eval(r.stdout.strip().splitlines()[-1])
    ns = {"torch": torch, "hist_amax": hist_amax, "modelopt_amax": modelopt_amax}
    exec(_FALLBACK.split("import torch", 1)[1].rsplit("print(", 1)[0], ns)  # the same calls, in this process
    assert fallback == ns["out"]
