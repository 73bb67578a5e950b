"""Pure-torch implementations of the range searches over |x| histograms (csrc/cpu/hist_amax.cpp).

Registered as the kernel every device falls back to and used as the reference in the tests.
Same algorithms as the C++ kernels, vectorised over chunks of candidates ([candidates, bins]
matrices); where the two differ is in the order of floating-point sums, so on near-ties (two
candidates whose errors agree to ~1e-12) they may pick different candidates. The *_curve
functions expose every candidate's error for the tests.

Exceptions to "same results":
* modelopt_amax_mse: bit for bit the C++ kernel (both sum with torch's own float32 mean, as
  ModelOpt does).
* modelopt_amax_entropy: float64 sums in torch's order, not numpy's pairwise order, so it agrees
  with ModelOpt except on near-ties; the C++ kernel reproduces numpy's order exactly.
"""

import math

import torch

# name -> ("int", levels) or ("fp8", torch dtype, largest finite value)
FORMATS = {
    "int8": ("int", 127.0),
    "uint8": ("int", 255.0),
    "int4": ("int", 7.0),
    "uint4": ("int", 15.0),
    "fp8_e4m3": ("fp8", torch.float8_e4m3fn, 448.0),
    "fp8_e5m2": ("fp8", torch.float8_e5m2, 57344.0),
}

_COUNT_DTYPES = (torch.int64, torch.int32, torch.float32, torch.float64)
_CHUNK = 1 << 20  # entries of a [candidates, bins] matrix per step
_GRAIN = 32768  # at::internal::GRAIN_SIZE: a 1-D reduction longer than this is split over threads


def check_hist(hist, op):
    """The checks of load_hist in hist_amax.cpp, with its messages. Returns float64 [rows, bins]
    and whether the input was 2-D."""
    if not isinstance(hist, torch.Tensor):
        raise TypeError(f"calibfast::{op}: expected a tensor of counts, got {type(hist).__name__}")
    if hist.dim() not in (1, 2):
        raise ValueError(f"calibfast::{op}: the histogram must be 1-D [bins] or 2-D [channels, bins], "
                         f"got shape {list(hist.shape)}")
    if hist.dtype not in _COUNT_DTYPES:
        raise TypeError(f"calibfast::{op}: histogram counts must be int64, int32, float32 or float64, "
                        f"got {hist.dtype}")
    if hist.shape[-1] < 1:
        raise ValueError(f"calibfast::{op}: the histogram has no bins")
    batched = hist.dim() == 2
    c = hist.to(torch.float64).reshape(-1, hist.shape[-1])
    bad = ~torch.isfinite(c) | (c < 0)
    if bad.any():
        r, j = (int(v) for v in bad.nonzero()[0])
        where = f" of row {r}" if batched else ""
        raise ValueError(f"calibfast::{op}: histogram counts must be finite and non-negative, got "
                         f"{c[r, j].item()} in bin {j}{where}")
    empty = c.sum(1) == 0
    if empty.any():
        where = f" in row {int(empty.nonzero()[0, 0])}" if batched else ""
        raise ValueError(f"calibfast::{op}: empty histogram (all counts are zero){where}")
    return c, batched


def check_widths(width, rows, op):
    w = torch.as_tensor(width, dtype=torch.float64)
    if not (w.numel() == 1 or (w.dim() == 1 and w.numel() == rows)):
        raise ValueError(f"calibfast::{op}: the bin width must be a scalar or have one entry per histogram "
                         f"row ({rows}), got shape {list(w.shape)}")
    w = w.reshape(-1).expand(rows) if w.numel() == 1 else w.reshape(-1)
    if not (torch.isfinite(w) & (w > 0)).all():
        raise ValueError(f"calibfast::{op}: the bin width must be finite and positive, got {w.tolist()}")
    return w.tolist()


def check_edges(edges, rows, bins, batched, op, extra_ok):
    """load_edges of hist_amax.cpp: [bins + 1] or [rows, bins + 1] (extra_ok: or more, the first
    bins + 1 used), as float64 [rows, bins + 1]."""
    if not edges.is_floating_point():
        raise TypeError(f"calibfast::{op}: bin edges must be floating point, got {edges.dtype}")
    n = edges.shape[-1] if edges.dim() >= 1 else 0
    size_ok = n >= bins + 1 if extra_ok else n == bins + 1
    shared = edges.dim() == 1 and size_ok
    per_row = batched and edges.dim() == 2 and edges.shape[0] == rows and size_ok
    if not (shared or per_row):
        more = " or more" if extra_ok else ""
        alt = f" or [{rows}, {bins + 1}]" if batched else ""
        why = "" if extra_ok else " (ModelOpt's own mse search fails on such a histogram too)"
        raise ValueError(f"calibfast::{op}: expected bin edges of shape [{bins + 1}{more}]{alt} for a histogram of "
                         f"shape {[rows, bins] if batched else [bins]}, got {list(edges.shape)}{why}")
    e = edges.to(torch.float64)[..., :bins + 1].reshape(-1, bins + 1)
    return e.expand(rows, bins + 1) if shared else e


def check_format(fmt, op):
    if fmt not in FORMATS:
        raise ValueError(f"calibfast::{op}: unknown format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    return FORMATS[fmt]


def _result(values, batched, device):
    out = torch.tensor(values, dtype=torch.float32, device=device)
    return out if batched else out.reshape(())


def _last_nonempty(c):
    nz = (c > 0).nonzero()
    return int(nz[-1, 0]) if nz.numel() else 0


# ---- calibfast conventions ---------------------------------------------------------------------

def hist_amax_percentile(hist, width, percentile):
    op = "hist_amax_percentile"
    if not 0 < percentile <= 100:
        raise ValueError(f"calibfast::{op}: percentile must be in (0, 100], got {percentile}")
    c, batched = check_hist(hist, op)
    w = check_widths(width, c.shape[0], op)
    N = c.sum(1, keepdim=True)
    reached = (c > 0) & (c.cumsum(1) * 100.0 >= percentile * N)
    idx = reached.to(torch.int8).argmax(1)  # first bin where the cumulative count reaches p%
    return _result([(int(idx[r]) + 1) * w[r] for r in range(c.shape[0])], batched, hist.device)


# fp8 grids: (mantissa bits, smallest normal exponent, largest binade exponent)
_FP8_GRID = {"fp8_e4m3": (3, -6, 8), "fp8_e5m2": (2, -14, 15)}


def _cell_sq(lo, hi, q, inv, cap):
    """Integral over [lo, hi) of (y - q * min(round(y / q), cap))^2 (elementwise; lo <= hi): the
    squared rounding error of values spread uniformly over [lo, hi). See cell_sq in
    csrc/cpu/hist_amax_kernel.h (the same operations)."""
    m1 = torch.round(torch.clamp(lo * inv, max=cap))
    m2 = torch.round(torch.clamp(hi * inv, max=cap))
    h = 0.5 * q
    h3 = h * h * h
    d1 = lo - m1 * q
    d2 = hi - m2 * q
    e1 = hi - m1 * q
    single = (e1 * e1 * e1 - d1 * d1 * d1) / 3.0
    multi = (h3 - d1 * d1 * d1) / 3.0 + (m2 - m1 - 1.0) * (q * q * q / 12.0) + (d2 * d2 * d2 + h3) / 3.0
    return torch.where(m1 == m2, single, multi)


def _pow2(e):
    return torch.ldexp(torch.ones_like(e, dtype=torch.float64), e)


def _fp8_cells(ylo, yhi, mant, emin, emax, fmax):
    """_cell_sq on an fp8 grid (scaled domain) for bins with 0 < ylo, yhi <= 2 * ylo: at most two
    binades, split at the upper one's start."""
    e1 = (torch.frexp(ylo).exponent - 1).clamp(emin, emax)
    e2 = (torch.frexp(yhi).exponent - 1).clamp(emin, emax)
    t = torch.minimum(torch.maximum(_pow2(e2), ylo), yhi)
    q1, q2 = _pow2(e1 - mant), _pow2(e2 - mant)
    i1, i2 = _pow2(mant - e1), _pow2(mant - e2)
    return _cell_sq(ylo, t, q1, i1, fmax * i1) + _cell_sq(t, yhi, q2, i2, fmax * i2)


def _fp8_bin0(yhi, mant, emin, emax, fmax):
    """_cell_sq on an fp8 grid over [0, yhi) [m]: every binade from the subnormals up."""
    tot = torch.zeros_like(yhi)
    lo = torch.zeros_like(yhi)
    for e in range(emin + 1, emax + 1):
        t = torch.minimum(torch.full_like(yhi, 2.0 ** e), yhi)
        q = 2.0 ** (e - 1 - mant)
        tot = tot + _cell_sq(lo, torch.maximum(t, lo), q, 1.0 / q, fmax / q)
        lo = torch.maximum(t, lo)
    q = 2.0 ** (emax - mant)
    return tot + _cell_sq(lo, yhi, q, 1.0 / q, fmax / q)


def mse_curve(c, w, fmt):
    """Candidates amax = k*w (k = 1 .. upper edge of the last non-empty bin) of one row of counts
    and each one's squared quantization error, the values of each bin spread uniformly over it:
    sum over bins of count / w * integral over the bin of (x - q(x))^2."""
    spec = FORMATS[fmt]
    K = _last_nonempty(c) + 1
    nz = (c > 0).nonzero()[:, 0]
    lo = (nz.to(torch.float64) * w)[None, :]
    hi = lo + w
    nw = (c[nz] / w)[None, :]
    ks = torch.arange(1, K + 1, dtype=torch.float64, device=c.device)
    errs = []
    step_k = max(1, _CHUNK // max(1, nz.numel()))
    for k0 in range(0, K, step_k):
        a = (ks[k0:k0 + step_k] * w)[:, None]
        if spec[0] == "int":
            L = spec[1]
            q = a / L
            u = _cell_sq(lo, hi, q, L / a, L)
        else:
            mant, emin, emax = _FP8_GRID[fmt]
            fmax = spec[2]
            S = fmax / a
            u = _fp8_cells(lo * S, hi * S, mant, emin, emax, fmax)
            if int(nz[0]) == 0:
                u[:, 0] = _fp8_bin0(hi[:, 0] * S[:, 0], mant, emin, emax, fmax)
            u = u / (S * S * S)
        errs.append((u * nw).sum(1))
    return ks * w, torch.cat(errs)


def hist_amax_mse(hist, width, fmt):
    op = "hist_amax_mse"
    check_format(fmt, op)
    c, batched = check_hist(hist, op)
    w = check_widths(width, c.shape[0], op)
    out = []
    for r in range(c.shape[0]):
        amax, err = mse_curve(c[r], w[r], fmt)
        out.append(float(amax[int(torch.argmin(err))]))  # first of the smallest
    return _result(out, batched, hist.device)


def _kl_matrix(c, i, level, levels, N):
    """Divergences KL(P || Q) of one row of counts c [B] for candidates i [m] given each bin's
    level [m, B] (bins at or beyond i: any value, masked). P: c[:i] with the counts beyond in its
    last bin; Q: each level's count spread evenly over its non-empty bins. NaN where Q has no mass,
    +inf where P has mass that Q has not."""
    B = c.numel()
    j = torch.arange(B, device=c.device)
    inside = j[None, :] < i[:, None]
    cin = torch.where(inside, c[None, :], 0.0)
    nzin = (inside & (c[None, :] > 0)).to(torch.float64)
    lev = torch.where(inside, level, 0).clamp(0, levels - 1)
    Lk = torch.zeros(i.numel(), levels, dtype=torch.float64, device=c.device).scatter_add_(1, lev, cin)
    nk = torch.zeros_like(Lk).scatter_add_(1, lev, nzin)
    S = cin.sum(1)
    avg = torch.gather(Lk, 1, lev) / torch.gather(nk, 1, lev).clamp(min=1)
    Q = torch.where(nzin > 0, avg, 0.0) / S[:, None]
    P = cin.clone()
    rows = torch.arange(i.numel(), device=c.device)
    P[rows, i - 1] += N - S
    P = P / N
    terms = torch.where(P > 0, P * torch.log(P / Q), 0.0)
    kl = terms.sum(1)
    return torch.where(S > 0, kl, math.nan)


def entropy_curve(c, w, levels):
    """Candidates amax = i*w (i = levels .. upper edge of the last non-empty bin) and each one's
    KL divergence; empty when the data fit within `levels` bins."""
    K = _last_nonempty(c) + 1
    N = c.sum()
    B = c.numel()
    j = torch.arange(B, device=c.device)
    ii = torch.arange(levels, K + 1, device=c.device)
    kls = []
    step = max(1, _CHUNK // B)
    for t0 in range(0, ii.numel(), step):
        i = ii[t0:t0 + step]
        level = (j[None, :] * levels) // i[:, None]
        kl = _kl_matrix(c, i, level, levels, N)
        kls.append(torch.where(torch.isnan(kl), math.inf, kl))
    kl = torch.cat(kls) if kls else torch.zeros(0, dtype=torch.float64, device=c.device)
    return ii.to(torch.float64) * w, kl


def hist_amax_entropy(hist, width, levels, ignore_zero_spike):
    op = "hist_amax_entropy"
    if levels < 2:
        raise ValueError(f"calibfast::{op}: levels must be >= 2, got {levels}")
    c, batched = check_hist(hist, op)
    w = check_widths(width, c.shape[0], op)
    if ignore_zero_spike and c.shape[1] >= 2:  # ModelOpt's rule: bin 0 takes bin 1's count
        c = c.clone()
        c[:, 0] = c[:, 1]
    out = []
    for r in range(c.shape[0]):
        K = _last_nonempty(c[r]) + 1
        if K <= levels:
            out.append(K * w[r])
            continue
        amax, kl = entropy_curve(c[r], w[r], levels)
        last = kl.numel() - 1 - int(torch.argmin(kl.flip(0)))  # last of the smallest
        out.append(float(amax[last]))
    return _result(out, batched, hist.device)


# ---- ModelOpt compatibility --------------------------------------------------------------------

def _check_modelopt(op, num_bits, stride, start_bin, min_start):
    if not (isinstance(num_bits, int) and 1 <= num_bits <= 16):
        raise ValueError(f"calibfast::{op}: num_bits must be in [1, 16], got {num_bits}")
    if stride < 1:
        raise ValueError(f"calibfast::{op}: stride must be >= 1, got {stride}")
    if start_bin < min_start:
        raise ValueError(f"calibfast::{op}: start_bin must be >= {min_start}, got {start_bin}")


def modelopt_amax_percentile(hist, bin_edges, percentile):
    op = "modelopt_amax_percentile"
    if not 0 <= percentile <= 100:
        raise ValueError(f"calibfast::{op}: percentile must be in [0, 100], got {percentile}")
    c, batched = check_hist(hist, op)
    e = check_edges(bin_edges, c.shape[0], c.shape[1], batched, op, True)
    out = []
    for r in range(c.shape[0]):
        cdf = torch.cumsum(c[r] / c[r].sum(), 0)
        idx = int(torch.searchsorted(cdf, torch.tensor([percentile / 100], dtype=torch.float64,
                                                       device=cdf.device), side="left")[0])
        out.append(float(e[r, idx]))
    return _result(out, batched, hist.device)


def modelopt_mse_curve(c, edges, num_bits, is_unsigned, stride, start_bin):
    """ModelOpt's mse candidates (bin centres start_bin, start_bin + stride, ... < bins, float32) and
    their float32 mean errors, computed as ModelOpt computes them on CPU."""
    counts = c.to(torch.float32)
    e = edges.to(torch.float32)
    x = (e[1:] + e[:-1]) / 2
    B = x.numel()
    idx = torch.arange(start_bin, B, stride, device=c.device)
    mbf = 2.0 ** (num_bits - 1 + int(is_unsigned)) - 1.0
    mb = torch.tensor(mbf, dtype=torch.float32, device=c.device)
    eps = 1.0 / (1 << 24)
    means = []
    step = max(1, (1 << 22) // B)
    for t0 in range(0, idx.numel(), step):
        amax = x[idx[t0:t0 + step]][:, None]
        zero = amax <= eps
        s = torch.where(zero, 0.0, mb / amax)
        q = torch.clamp((x[None, :] * s).round(), 0.0 if is_unsigned else -mbf, mbf)
        q = q / torch.where(zero, 1.0, s)
        t = (q - x[None, :]) ** 2 * counts[None, :]
        if B > _GRAIN:  # ModelOpt reduces each row on its own; a long row is split over threads
            means.append(torch.stack([row.mean() for row in t]))
        else:
            means.append(t.mean(1))
    return x[idx], torch.cat(means)


def modelopt_amax_mse(hist, bin_edges, num_bits, is_unsigned, stride, start_bin):
    op = "modelopt_amax_mse"
    _check_modelopt(op, num_bits, stride, start_bin, 0)
    c, batched = check_hist(hist, op)
    B = c.shape[1]
    e = check_edges(bin_edges, c.shape[0], B, batched, op, False)
    if start_bin >= B:
        raise ValueError(f"calibfast::{op}: no candidates: ModelOpt's mse search tries bin centres {start_bin} to "
                         f"{B - 1} (start_bin must be below the number of bins, {B})")
    out = []
    for r in range(c.shape[0]):
        amax, mse = modelopt_mse_curve(c[r], e[r], num_bits, is_unsigned, stride, start_bin)
        nan = torch.isnan(mse)
        best = int(nan.to(torch.int8).argmax()) if nan.any() else int(torch.argmin(mse))
        out.append(float(amax[best]))
    return _result(out, batched, hist.device)


def _modelopt_levels(i, nb, B):
    """level(j) = digitize(j, linspace(0, i, nb + 1)) - 1 for bins j of candidates i [m]: the
    largest k < nb with fl(k * fl(i / nb)) <= j."""
    step = (i.to(torch.float64) / nb)[:, None]
    j = torch.arange(B, device=i.device, dtype=torch.float64)[None, :]
    k = torch.floor(j / step).clamp(0, nb - 1)
    k = torch.where(k * step > j, k - 1, k)
    k = torch.where(((k + 1) * step <= j) & (k + 1 < nb), k + 1, k)
    return k.to(torch.int64)


def modelopt_entropy_curve(c, num_bits, is_unsigned, stride, start_bin):
    """ModelOpt's entropy candidates i (start_bin, start_bin + stride, ... <= bins) and their
    divergences (float64, torch's summation order)."""
    c = c.clone()
    c[0] = c[1]
    B = c.numel()
    N = c.sum()
    nb = 1 << (num_bits - 1 + int(is_unsigned))
    ii = torch.arange(start_bin, B + 1, stride, device=c.device)
    kls = []
    step = max(1, _CHUNK // B)
    for t0 in range(0, ii.numel(), step):
        i = ii[t0:t0 + step]
        if N > 0:
            kls.append(_kl_matrix(c, i, _modelopt_levels(i, nb, B), nb, N))
        else:
            kls.append(torch.full((i.numel(),), math.nan, dtype=torch.float64, device=c.device))
    return ii, torch.cat(kls)


def modelopt_amax_entropy(hist, bin_edges, num_bits, is_unsigned, stride, start_bin):
    op = "modelopt_amax_entropy"
    _check_modelopt(op, num_bits, stride, start_bin, 1)
    c, batched = check_hist(hist, op)
    B = c.shape[1]
    e = check_edges(bin_edges, c.shape[0], B, batched, op, True)
    if B < 2:
        raise ValueError(f"calibfast::{op}: ModelOpt's entropy search needs at least 2 bins")
    if start_bin > B:
        raise ValueError(f"calibfast::{op}: no candidates: start_bin ({start_bin}) is beyond the number of bins ({B})")
    out = []
    for r in range(c.shape[0]):
        ii, kl = modelopt_entropy_curve(c[r], num_bits, is_unsigned, stride, start_bin)
        # np.argmin over the reversed list: the last NaN if any, else the last of the smallest.
        nan = torch.isnan(kl)
        rev = (nan if nan.any() else kl == kl.min()).flip(0).to(torch.int8).argmax()
        out.append(float(e[r, int(ii[kl.numel() - 1 - int(rev)])]))
    return _result(out, batched, hist.device)


def hist_amax_fake(hist, *args):
    """Fake kernel of every range op: float32, one value per histogram row."""
    if hist.dim() not in (1, 2):
        raise ValueError(f"calibfast: the histogram must be 1-D [bins] or 2-D [channels, bins], got shape "
                         f"{list(hist.shape)}")
    return hist.new_empty(hist.shape[:-1], dtype=torch.float32)
