"""Pure-torch implementations of calibfast's ops.

They are registered as the kernel every device falls back to (CompositeExplicitAutograd) and they
are the reference that the native kernels are tested against. They follow the op contract to the
letter: min/max/abs-min and the sums are over finite values only; NaN and +-Inf are only counted.
Work is done in row chunks so that the temporaries stay small whatever the input size, and
without host-device synchronisation (no .item(), no boolean-mask indexing).

Histograms (see calibfast/stats.py for the user-facing description): B bins (a power of two) of
|x| uniform over [0, 2^e). A finite value a = |x| lands in bin floor(a * B * 2^-e), computed in the
input's float type (float32 for 16-bit inputs): a product by a power of two is exact, so the bin
of a value is a pure function of the value and e, whatever the batching. e only grows, to the
smallest exponent with absmax < 2^e; growing by k merges 2^k adjacent bins, which is exact too.
Values with a >= 2^e (only float64 inputs beyond the float32 range, since e is capped at 128)
are not binned.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Rows of [rows, C] handled per step; bounds the temporaries to ~2^22 values.
_CHUNK_VALUES = 1 << 22

# Histogram exponents (same constants as csrc/common.h).
EMPTY_EXP = -(1 << 30)  # no range yet
MIN_EXP = -100  # ranges never shrink below 2^-100 (all-zero data)
MAX_EXP = 128  # float32 absmax < 2^128; a float64 beyond that saturates the state to inf
MAX_BINS = 1 << 24


def hist_exponent(amax):
    """The smallest e with amax < 2^e (float tensor -> int64 tensor), clamped to [MIN_EXP, MAX_EXP];
    amax <= 0 (nothing but zeros) gives MIN_EXP, and amax = -inf (the abs-max of a channel with no
    finite value yet) EMPTY_EXP: it needs no range, and max(e_old, EMPTY_EXP) keeps the old one."""
    a = amax.double()
    _, e = torch.frexp(torch.where(torch.isfinite(a), a, 0.0))
    e = e.long()
    e = torch.where(a > 0, e, MIN_EXP)
    e = torch.where(a == float("inf"), MAX_EXP, e).clamp(MIN_EXP, MAX_EXP)
    return torch.where(a == -float("inf"), EMPTY_EXP, e)


def grow_hist(hist, e_old, e_new):
    """Re-bins hist ([..., B]) from exponent e_old to e_new >= e_old (per row when 2-D) by
    merging 2^(e_new - e_old) adjacent bins. Exact; no synchronisation."""
    B = hist.shape[-1]
    shift = (e_new - e_old).clamp(0, 62)
    if hist.dim() == 1:
        idx = torch.bitwise_right_shift(torch.arange(B, device=hist.device), shift)
        out = torch.zeros_like(hist).scatter_add_(0, idx, hist)
    else:
        idx = torch.bitwise_right_shift(torch.arange(B, device=hist.device)[None, :], shift[:, None])
        out = torch.zeros_like(hist).scatter_add_(1, idx, hist)
    hist.copy_(out)


def _bin_scale(e, B, dtype):
    """B * 2^-e in `dtype` (exact: a power of two)."""
    return torch.ldexp(torch.full(e.shape, float(B), dtype=torch.float64, device=e.device), -e).to(dtype)


def check_channel_stats_args(x, axis, fstate, dstate, istate, hist=None, hexp=None, chist=None, chexp=None):
    """The same checks as csrc/common.h, with the same messages. Returns the non-negative axis."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"calibfast: expected a tensor, got {type(x).__name__}")
    if x.dim() < 1:
        raise ValueError("calibfast: channel statistics need a tensor of rank >= 1, got a 0-d tensor")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            "calibfast: expected a floating-point tensor (float32, float16, bfloat16 or float64), "
            f"got {x.dtype}")
    if not -x.dim() <= axis < x.dim():
        raise IndexError(f"calibfast: channel axis {axis} is out of range for a tensor of rank {x.dim()}")
    ax = axis % x.dim()
    C = x.shape[ax]
    for s, dt, name in ((fstate, torch.float32, "fstate"), (dstate, torch.float64, "dstate"),
                        (istate, torch.int64, "istate")):
        if s.dtype != dt:
            raise TypeError(f"calibfast: {name} must be {dt}, got {s.dtype}")
        if tuple(s.shape) != (3, C):
            raise ValueError(f"calibfast: {name} must have shape [3, {C}] for a tensor with {C} channels "
                             f"along axis {axis}, got {list(s.shape)}")
        if s.device != x.device:
            raise ValueError(f"calibfast: {name} is on {s.device} but the input is on {x.device}")
    if hist is not None and hist.numel() > 0:
        _check_hist(hist, hexp, x, "hist", "hexp", (2,))
    if chist is not None and chist.numel() > 0:
        if chist.dim() != 2 or chist.shape[0] != C:
            raise ValueError(f"calibfast: chist must have shape [{C}, bins] for a tensor with {C} channels, "
                             f"got {list(chist.shape)}")
        _check_hist(chist, chexp, x, "chist", "chexp", (2, C))
    return ax


def _check_hist(h, e, x, hname, ename, eshape):
    B = h.shape[-1]
    if h.dtype != torch.int64:
        raise TypeError(f"calibfast: {hname} must be torch.int64, got {h.dtype}")
    if B < 2 or B > MAX_BINS or B & (B - 1):
        raise ValueError(f"calibfast: {hname} needs a power-of-two bin count in [2, {MAX_BINS}], got {B}")
    if e is None or e.dtype != torch.int64 or tuple(e.shape) != eshape:
        got = None if e is None else f"{e.dtype} {list(e.shape)}"
        raise ValueError(f"calibfast: {ename} must be int64 of shape {list(eshape)}, got {got}")
    for t, n in ((h, hname), (e, ename)):
        if t.device != x.device:
            raise ValueError(f"calibfast: {n} is on {t.device} but the input is on {x.device}")


def _rows_view(x, ax):
    C = x.shape[ax]
    return x.movedim(ax, -1).reshape(-1, C)


def channel_stats_update(x, axis, fstate, dstate, istate, hist=None, hexp=None, chist=None, chexp=None):
    ax = check_channel_stats_args(x, axis, fstate, dstate, istate, hist, hexp, chist, chexp)
    C = x.shape[ax]
    if C == 0:
        return
    xm = _rows_view(x, ax)
    rows = xm.shape[0]
    istate[0] += rows
    if rows == 0:
        return
    step = max(1, _CHUNK_VALUES // C)
    inf = float("inf")
    for r in range(0, rows, step):
        part = xm[r:r + step]
        if part.dtype in (torch.float16, torch.bfloat16):
            part = part.float()
        finite = torch.isfinite(part)
        nan = torch.isnan(part)
        istate[1] += nan.sum(0)
        istate[2] += (~(finite | nan)).sum(0)
        absx = part.abs()
        fstate[0] = torch.minimum(fstate[0], torch.where(finite, part, inf).amin(0).float())
        fstate[1] = torch.maximum(fstate[1], torch.where(finite, part, -inf).amax(0).float())
        fstate[2] = torch.minimum(fstate[2], torch.where(finite, absx, inf).amin(0).float())
        pd = torch.where(finite, part.double(), 0.0)
        dstate[0] += pd.sum(0)
        dstate[1] += pd.abs().sum(0)
        dstate[2] += (pd * pd).sum(0)
    use_hist = hist is not None and hist.numel() > 0
    use_chist = chist is not None and chist.numel() > 0
    if not (use_hist or use_chist):
        return
    absmax_c = torch.maximum(fstate[1], -fstate[0])  # [C], -inf where nothing finite yet
    if use_hist:
        e_old = hexp[0].clone()
        e_new = torch.maximum(e_old, hist_exponent(absmax_c.max()))
        grow_hist(hist, e_old, e_new)
        hexp[0] = e_new
        hexp[1] = e_old
    if use_chist:
        ce_old = chexp[0].clone()
        ce_new = torch.maximum(ce_old, hist_exponent(absmax_c))
        grow_hist(chist, ce_old, ce_new)
        chexp[0] = ce_new
        chexp[1] = ce_old
    for r in range(0, rows, step):
        part = xm[r:r + step]
        if part.dtype in (torch.float16, torch.bfloat16):
            part = part.float()
        a = part.abs()
        fin = torch.isfinite(part)
        if use_hist:
            B = hist.numel()
            idx = torch.floor(a * _bin_scale(hexp[0], B, a.dtype))
            idx = torch.where(fin & (idx < B), idx, B).long().reshape(-1)
            buf = torch.zeros(B + 1, dtype=torch.int64, device=hist.device)
            buf.scatter_add_(0, idx, torch.ones_like(idx))
            hist += buf[:B]
        if use_chist:
            N = chist.shape[1]
            sc = _bin_scale(chexp[0], N, a.dtype)  # [C]
            idx = torch.floor(a * sc)
            ok = fin & (idx < N)
            flat = torch.arange(C, device=a.device) * N + torch.where(ok, idx, 0).long()
            flat = torch.where(ok, flat, C * N).reshape(-1)
            buf = torch.zeros(C * N + 1, dtype=torch.int64, device=chist.device)
            buf.scatter_add_(0, flat, torch.ones_like(flat))
            chist += buf[:C * N].view(C, N)
