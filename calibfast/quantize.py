"""Quantization parameters (scale, zero point) from calibration statistics.

    from calibfast.qparams import qparams, fake_quantize
    qp = qparams(stats, "int8", symmetric=True, per_channel=True)
    y = fake_quantize(x, qp, axis=stats.axis)

The integer conventions are torch.ao's: for the same min/max, dtype and qscheme the result is
bit for bit what ``torch.ao.quantization.observer.MinMaxObserver`` /
``PerChannelMinMaxObserver.calculate_qparams()`` return (the same float32 operations in the same
order, on the same device), except for the shapes/dtypes of the result and the cases listed under
"Departures" below.

Quantization ranges ``[quant_min, quant_max]``:

============  ===============  ================  ==================
dtype         default          ``narrow_range``  ``reduce_range``
============  ===============  ================  ==================
``int8``      [-128, 127]      [-127, 127]       [-64, 63]
``uint8``     [0, 255]         ValueError        [0, 127] (affine)
``int4``      [-8, 7]          [-7, 7]           [-4, 3]
``uint4``     [0, 15]          ValueError        [0, 7] (affine)
``fp8_e4m3``  [-448, 448]      ValueError        ValueError
``fp8_e5m2``  [-57344, 57344]  ValueError        ValueError
============  ===============  ================  ==================

The torch.ao observer each integer dtype reproduces: int8 is ``dtype=torch.qint8`` (narrow:
``quant_min=-127, quant_max=127``), uint8 is ``dtype=torch.quint8``, int4 is
``dtype=torch.qint8, quant_min=-8, quant_max=7`` (narrow: -7, 7), uint4 is
``dtype=torch.quint8, quant_min=0, quant_max=15``. fp8 (``torch.float8_e4m3fn`` /
``torch.float8_e5m2``) has no torch.ao observer; its "range" is the largest finite value.

``reduce_range`` works like torch.ao: the default 8-bit ranges become [-64, 63] / [0, 127], a
custom range (narrow int8, int4, uint4) is halved with floor division (so narrow int8 [-127, 127]
also becomes [-64, 63] and int4 [-7, 7] becomes [-4, 3]); unsigned + symmetric + reduce_range is
refused (torch.ao raises NotImplementedError there: the midpoint zero point would fall outside
the range).

Formulas, all in float32, with ``min_neg = min(min, 0)`` and ``max_pos = max(max, 0)`` (so the
range always contains 0), ``amax = max(-min_neg, max_pos)``, ``eps`` rounded to float32 and
``round`` half to even (``torch.round``):

========================  =================================  ==================================
scheme                    scale                              zero_point
========================  =================================  ==================================
symmetric, int8/int4      max(amax / ((qmax - qmin) / 2),    0
                          eps)
symmetric, uint8          same                               128 (torch.ao, default range)
symmetric, uint4          same                               (qmin + qmax) // 2 = 7 (torch.ao,
                                                             custom range)
affine (symmetric=False)  max((max_pos - min_neg) /          clamp(qmin - round(min_neg /
                          (qmax - qmin), eps)                scale), qmin, qmax)
fp8_e4m3 / fp8_e5m2       max(amax / 448, eps) /             0
                          max(amax / 57344, eps)
========================  =================================  ==================================

Each divisor is a Python float dividing a float32 tensor (``amax / 127.5``), exactly as in
torch.ao, so whatever rounding the device's division kernel does, torch.ao's observers on that
device get the same bits.

Departures from torch.ao and special cases:

* Channels that saw no finite value (``min = +inf`` and ``max = -inf``, what a
  :class:`~calibfast.ChannelStats` holds for them, or ``amax = -inf``) get ``scale = 1.0`` and
  ``zero_point = 0`` whatever the dtype and scheme, never NaN. That is what torch.ao's per-tensor
  observer returns when it has seen nothing (also 0, not 128, for uint8 symmetric); torch.ao's
  per-channel observer raises an AssertionError for such channels instead. Per tensor, the result
  is that default only when no channel saw a finite value (empty channels do not affect the
  global min/max).
* NaN, an inverted range (``min > max``, other than the empty marker above), a negative amax and
  an infinite bound (a float64 value beyond the float32 range, stored by ChannelStats as +-inf)
  raise ValueError (torch.ao raises AssertionError for the inverted range and returns an inf
  scale and a meaningless zero point for infinite bounds). So does an affine range wider than
  float32 holds (``max - min`` overflows, only with values beyond ~1.7e38), where torch.ao
  returns ``scale = inf``.
* Results: ``scale`` is float32, ``zero_point`` is int32 for every scheme (torch.ao gives int64
  for symmetric and int32 for affine); both are 0-d per tensor (torch.ao: shape [1]) and [C] per
  channel, on the device of the statistics.
* min/max/amax given as other float dtypes (float64, Python floats) are first rounded to float32,
  as torch.ao's observers store them.
"""

import math
from typing import NamedTuple

import torch

from .stats import ChannelStats

__all__ = ["QParams", "qparams", "fake_quantize", "DTYPES"]

# name -> (quant_min, quant_max, narrow quant_min, signed, torch.ao uses a custom range)
_INT_DTYPES = {
    "int8": (-128, 127, -127, True, False),
    "uint8": (0, 255, None, False, False),
    "int4": (-8, 7, -7, True, True),
    "uint4": (0, 15, None, False, True),
}
# name -> (largest finite value, torch dtype attribute name)
_FP8_DTYPES = {
    "fp8_e4m3": (448.0, "float8_e4m3fn"),
    "fp8_e5m2": (57344.0, "float8_e5m2"),
}
DTYPES = tuple(_INT_DTYPES) + tuple(_FP8_DTYPES)


class QParams(NamedTuple):
    """Quantization parameters: ``scale`` (float32) and ``zero_point`` (int32) tensors, 0-d per
    tensor or [C] per channel; ``quant_min``/``quant_max`` the integer range (for fp8 the largest
    finite magnitude, negated for ``quant_min``); ``dtype`` the name passed to :func:`qparams`."""

    scale: torch.Tensor
    zero_point: torch.Tensor
    quant_min: int
    quant_max: int
    dtype: str

    @property
    def per_channel(self):
        return self.scale.dim() > 0


def _ranges(dtype, symmetric, narrow_range, reduce_range):
    """(quant_min, quant_max, symmetric zero point) following torch.ao's calculate_qmin_qmax."""
    qmin, qmax, narrow_min, signed, custom = _INT_DTYPES[dtype]
    if narrow_range:
        if not signed:
            raise ValueError(f"calibfast: narrow_range applies to the signed integer dtypes (int8, int4), "
                             f"not {dtype!r}")
        qmin, custom = narrow_min, True
    if reduce_range:
        if symmetric and not signed:
            raise ValueError(f"calibfast: reduce_range with symmetric {dtype!r} is not supported (as in torch.ao: "
                             "the midpoint zero point would lie outside the reduced range); use symmetric=False")
        if custom:
            qmin, qmax = qmin // 2, qmax // 2
        else:  # torch.ao's fixed reduced 8-bit ranges
            qmin, qmax = (-64, 63) if signed else (0, 127)
    if signed:
        sym_zp = 0
    elif custom:
        sym_zp = (qmin + qmax) // 2
    else:
        sym_zp = 128
    return qmin, qmax, sym_zp


def _as_f32(v, device=None):
    if isinstance(v, torch.Tensor):
        if v.is_complex():
            raise TypeError("calibfast: qparams got a complex tensor")
        return v.detach().to(dtype=torch.float32, device=device if device is not None else v.device)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise TypeError(f"calibfast: qparams expects a ChannelStats, an amax (float or tensor) or a (min, max) "
                        f"tuple, got {type(v).__name__}")
    return torch.tensor(float(v), dtype=torch.float32, device=device)


def _min_max(src):
    """float32 (min, max) tensors of the same shape from any accepted input."""
    if isinstance(src, ChannelStats):
        return src.min.detach().clone(), src.max.detach().clone()
    if isinstance(src, tuple):
        if len(src) != 2:
            raise TypeError(f"calibfast: a (min, max) tuple must have 2 items, got {len(src)}")
        a, b = src
        dev = next((t.device for t in (a, b) if isinstance(t, torch.Tensor)), None)
        mn, mx = _as_f32(a, dev), _as_f32(b, dev)
        try:
            mn, mx = torch.broadcast_tensors(mn, mx)
        except RuntimeError as e:
            raise ValueError(f"calibfast: min and max shapes {list(mn.shape)} and {list(mx.shape)} "
                             "do not broadcast") from e
        return mn.clone(), mx.clone()
    amax = _as_f32(src)
    bad = torch.isnan(amax) | ((amax < 0) & (amax != -math.inf))
    if bool(bad.any()):
        raise ValueError("calibfast: amax must be >= 0 (or -inf for a channel that saw no finite value), "
                         f"got {_show(amax, bad)}")
    return -amax, amax.clone()


def _show(t, mask, limit=8):
    if t.dim() == 0:
        return f"{float(t)}"
    idx = mask.nonzero().flatten()[:limit].tolist()
    return f"channels {idx} (values {[float(t[i]) for i in idx]})"


def _check(mn, mx, empty, scale):
    """Raise for NaN, inverted or infinite ranges, and for a range too wide for a float32 scale
    (one host synchronisation)."""
    nan = torch.isnan(mn) | torch.isnan(mx)
    inverted = (mn > mx) & ~empty
    infinite = (torch.isinf(mn) | torch.isinf(mx)) & ~empty & ~inverted
    overflow = ~torch.isfinite(scale) & ~(nan | inverted | infinite | empty)
    flags = torch.stack([nan.any(), inverted.any(), infinite.any(), overflow.any()]).tolist()
    if flags[0]:
        raise ValueError(f"calibfast: NaN in the min/max statistics at {_show(mn, nan)}")
    if flags[1]:
        raise ValueError(f"calibfast: min > max at {_show(mn, inverted)}, max {_show(mx, inverted)}")
    if flags[2]:
        raise ValueError("calibfast: infinite range (beyond float32) at "
                         f"min {_show(mn, infinite)}, max {_show(mx, infinite)}")
    if flags[3]:
        raise ValueError("calibfast: the range is too wide for a float32 scale (max - min overflows) at "
                         f"min {_show(mn, overflow)}, max {_show(mx, overflow)}")


# The format each dtype's range search (ChannelStats.amax's ``fmt``) optimises for.
_SEARCH_FMT = {"int8": "int8", "uint8": "uint8", "int4": "int4", "uint4": "uint4", "fp8_e4m3": "fp8_e4m3",
               "fp8_e5m2": "fp8_e5m2"}


def qparams(stats_or_amax, dtype="int8", symmetric=True, per_channel=False, method="max", narrow_range=False,
            *, percentile=99.99, compat=None, eps=torch.finfo(torch.float32).eps, reduce_range=False):
    """Scale and zero point for ``dtype`` from calibration statistics (see the module docstring
    for the conventions, which are torch.ao's).

    Args:
        stats_or_amax: a :class:`~calibfast.ChannelStats` (its ``min``/``max``), an amax (float or
            tensor; the range [-amax, amax]), or a ``(min, max)`` tuple of floats or tensors.
        dtype: one of ``"int8"``, ``"uint8"``, ``"int4"``, ``"uint4"``, ``"fp8_e4m3"``,
            ``"fp8_e5m2"``.
        symmetric: symmetric (torch.ao's ``per_*_symmetric``) or affine (``per_*_affine``)
            quantization; fp8 is symmetric only.
        per_channel: one scale/zero point per channel (the statistics must be 1-d, [C]);
            otherwise per tensor from the global min/max over all channels.
        method: how a :class:`~calibfast.ChannelStats` gives its range: ``"max"`` (min/max, the
            default) or a clipping search over its histogram, ``"percentile"``, ``"mse"``,
            ``"entropy"`` (:meth:`ChannelStats.amax`, for this dtype's format; symmetric only;
            per channel needs ``channel_bins``).
        percentile, compat: passed to :meth:`ChannelStats.amax`.
        narrow_range: drop the most negative code of a signed integer dtype (int8 [-127, 127],
            int4 [-7, 7]).
        eps: the smallest scale (as a float32), like torch.ao's observers.
        reduce_range: torch.ao's ``reduce_range`` (one bit less; see the module docstring).

    Returns:
        :class:`QParams`.
    """
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"calibfast: unknown quantization dtype {dtype!r}; valid dtypes are {list(DTYPES)}")
    is_fp8 = dtype in _FP8_DTYPES
    if is_fp8:
        if not symmetric:
            raise ValueError(f"calibfast: {dtype} quantization is symmetric only (the float8 formats have no "
                             "zero point: asymmetric ranges are not representable); pass symmetric=True")
        if narrow_range or reduce_range:
            raise ValueError(f"calibfast: narrow_range/reduce_range apply to integer dtypes, not {dtype}")
    else:
        qmin, qmax, sym_zp = _ranges(dtype, symmetric, narrow_range, reduce_range)
    if method != "max":
        from .stats import AMAX_METHODS, ChannelStats

        if method not in AMAX_METHODS:
            raise ValueError(f"calibfast: unknown method {method!r}; valid methods are {list(AMAX_METHODS)}")
        if not isinstance(stats_or_amax, ChannelStats):
            raise TypeError(f"calibfast: method={method!r} searches a ChannelStats histogram; got a "
                            f"{type(stats_or_amax).__name__} (pass the ChannelStats, or method='max')")
        if not symmetric:
            raise ValueError(f"calibfast: method={method!r} clips |x| symmetrically (from a histogram of |x|); "
                             "pass symmetric=True, or method='max' for an affine range")
        stats_or_amax = stats_or_amax.amax(method, per_channel=per_channel, percentile=percentile,
                                           fmt=_SEARCH_FMT[dtype], compat=compat)

    with torch.no_grad():
        mn, mx = _min_max(stats_or_amax)
        if per_channel and mn.dim() != 1:
            raise ValueError(f"calibfast: per_channel=True needs 1-d statistics [C], got shape {list(mn.shape)}")
        if not per_channel:
            # Check every channel first: a bad one could hide behind the global min/max.
            ch_empty = (mn == math.inf) & (mx == -math.inf)
            _check(mn, mx, ch_empty, torch.ones_like(mn))
            if mn.numel() == 0:
                mn = torch.tensor(math.inf, device=mn.device)
                mx = torch.tensor(-math.inf, device=mx.device)
            else:
                # Empty channels hold +inf/-inf, which never win these reductions.
                mn, mx = mn.min(), mx.max()
        empty = (mn == math.inf) & (mx == -math.inf)
        device = mn.device
        eps_t = torch.tensor(eps, dtype=torch.float32, device=device)

        # torch.ao's UniformQuantizationObserverBase._calculate_qparams, operation for operation.
        min_val_neg = torch.min(mn, torch.zeros_like(mn))
        max_val_pos = torch.max(mx, torch.zeros_like(mx))
        if is_fp8:
            fmax, _ = _FP8_DTYPES[dtype]
            max_val_pos = torch.max(-min_val_neg, max_val_pos)
            scale = torch.max(max_val_pos / fmax, eps_t)
            zero_point = torch.zeros(mn.shape, dtype=torch.int32, device=device)
            qmin, qmax = -int(fmax), int(fmax)
        elif symmetric:
            max_val_pos = torch.max(-min_val_neg, max_val_pos)
            scale = max_val_pos / (float(qmax - qmin) / 2)
            scale = torch.max(scale, eps_t)
            zero_point = torch.full(mn.shape, sym_zp, dtype=torch.int32, device=device)
        else:
            scale = (max_val_pos - min_val_neg) / float(qmax - qmin)
            scale = torch.max(scale, eps_t)
            zero_point = qmin - torch.round(min_val_neg / scale).to(torch.int)
            zero_point = torch.clamp(zero_point, qmin, qmax).to(torch.int32)

        _check(mn, mx, empty, scale)
        # Channels with no finite value: torch.ao's "not observed" default (1.0, 0).
        scale = torch.where(empty, torch.ones_like(scale), scale)
        zero_point = torch.where(empty, torch.zeros_like(zero_point), zero_point)
    return QParams(scale, zero_point, qmin, qmax, dtype)


def fake_quantize(x, qp, axis=-1):
    """Quantize and dequantize ``x`` with ``qp`` (a :class:`QParams`); returns a tensor of
    ``x``'s dtype and shape.

    Integer dtypes use ``torch.fake_quantize_per_tensor_affine`` /
    ``torch.fake_quantize_per_channel_affine`` (values outside the range clamp to it; their
    straight-through gradient applies). fp8 computes ``x / scale`` (in float32, or float64 for
    float64 input), clamps it to the format's finite range (the float8 casts do not saturate:
    e5m2 overflows to inf and e4m3fn to NaN), casts to ``torch.float8_e4m3fn`` /
    ``torch.float8_e5m2`` and back, and multiplies by ``scale``. ``axis`` is the channel axis of
    ``x`` for per-channel parameters (ignored per tensor).
    """
    if not isinstance(qp, QParams):
        raise TypeError(f"calibfast: fake_quantize expects QParams, got {type(qp).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError("calibfast: fake_quantize expects a floating-point tensor")
    scale = qp.scale.to(x.device)
    zero_point = qp.zero_point.to(x.device)
    per_channel = scale.dim() > 0
    if per_channel:
        if not -x.dim() <= axis < x.dim():
            raise IndexError(f"calibfast: axis {axis} is out of range for a tensor of rank {x.dim()}")
        axis = axis % x.dim()
        if x.shape[axis] != scale.shape[0]:
            raise ValueError(f"calibfast: the qparams have {scale.shape[0]} channels but x has {x.shape[axis]} "
                             f"along axis {axis} (shape {list(x.shape)})")
    if qp.dtype in _FP8_DTYPES:
        fmax, attr = _FP8_DTYPES[qp.dtype]
        f8 = getattr(torch, attr)
        work = torch.promote_types(x.dtype, torch.float32)
        s = scale.to(work)
        if per_channel:
            shape = [1] * x.dim()
            shape[axis] = -1
            s = s.reshape(shape)
        y = (x.to(work) / s).clamp(-fmax, fmax).to(f8).to(work) * s
        return y.to(x.dtype)
    if qp.dtype not in _INT_DTYPES:
        raise ValueError(f"calibfast: unknown quantization dtype {qp.dtype!r}; valid dtypes are {list(DTYPES)}")
    if per_channel:
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qp.quant_min, qp.quant_max)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qp.quant_min, qp.quant_max)
