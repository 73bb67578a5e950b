"""Pure-torch implementations of calibfast's ops.

They are registered as the kernel every device falls back to (CompositeExplicitAutograd) and they
are the reference that the native kernels are tested against. They follow the op contract to the
letter: min/max/abs-min and the sums are over finite values only; NaN and +-Inf are only counted.
Work is done in row chunks so that the temporaries stay small whatever the input size.
"""

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# Rows of [rows, C] handled per step; bounds the temporaries to ~2^22 values.
_CHUNK_VALUES = 1 << 22


def check_channel_stats_args(x, axis, fstate, dstate, istate):
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
    return ax


def channel_stats_update(x, axis, fstate, dstate, istate):
    ax = check_channel_stats_args(x, axis, fstate, dstate, istate)
    C = x.shape[ax]
    if C == 0:
        return
    xm = x.movedim(ax, -1).reshape(-1, C)
    rows = xm.shape[0]
    istate[0] += rows
    if rows == 0:
        return
    step = max(1, _CHUNK_VALUES // C)
    for r in range(0, rows, step):
        part = xm[r:r + step]
        if part.dtype in (torch.float16, torch.bfloat16):
            part = part.float()
        finite = torch.isfinite(part)
        nan = torch.isnan(part)
        istate[1] += nan.sum(0)
        istate[2] += (~(finite | nan)).sum(0)
        inf = float("inf")
        absx = part.abs()
        fstate[0] = torch.minimum(fstate[0], torch.where(finite, part, inf).amin(0).float())
        fstate[1] = torch.maximum(fstate[1], torch.where(finite, part, -inf).amax(0).float())
        fstate[2] = torch.minimum(fstate[2], torch.where(finite, absx, inf).amin(0).float())
        pd = torch.where(finite, part.double(), 0.0)
        dstate[0] += pd.sum(0)
        dstate[1] += pd.abs().sum(0)
        dstate[2] += (pd * pd).sum(0)
