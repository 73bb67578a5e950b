"""Calibration results in the shapes other quantization tools consume.

    from calibfast import export
    scales = export.act_scales(collector)          # SmoothQuant / AWQ: {layer: abs-max per channel}
    export.save_pt(scales, "act_scales.pt")        # what SmoothQuant's generate_act_scales.py writes
    amax = export.modelopt_amax(collector)         # {"<layer>.input_quantizer": amax}
    qp = export.torch_ao_qparams(collector, "int8", symmetric=True)   # {layer: (scale, zero_point)}
    export.save_json(qp, "qparams.json")

Every export reads one side of a :class:`~calibfast.Collector` (``side="inputs"``, the default,
or ``"outputs"``); a plain dict ``{name: ChannelStats}`` (e.g. ``collector.inputs``) works too.
Statistics that saw no data (a module the calibration never reached) are left out of the result.
The tensors returned are on the CPU (``device=None`` keeps the statistics' device).

A channel that saw no finite value holds ``absmax = -inf`` in a ChannelStats; the abs-max and
mean-|x| exports give it 0 (no finite activation seen; the consumers' scripts would get -inf or
NaN there, or inf when the channel held infinities). :func:`torch_ao_qparams` gives such
a channel torch.ao's "not observed" default, scale 1 and zero point 0 (see
:func:`calibfast.qparams`).
"""

import inspect
import json
import math
import os

import torch

from .hooks import Collector
from .quantize import qparams
from .stats import ChannelStats

__all__ = ["act_scales", "act_mean_abs", "modelopt_amax", "torch_ao_qparams", "save_pt", "save_json"]

_SIDES = ("inputs", "outputs")
_QUANTIZER = {"inputs": "input_quantizer", "outputs": "output_quantizer"}


def _items(collector, side):
    """(name, ChannelStats) pairs that hold data, in the collector's order."""
    if side not in _SIDES:
        raise ValueError(f"calibfast.export: side must be one of {_SIDES}, got {side!r}")
    if isinstance(collector, Collector):
        stats = getattr(collector, side)
    elif isinstance(collector, dict):
        stats = collector
    else:
        raise TypeError(f"calibfast.export expects a Collector or a dict of ChannelStats, got "
                        f"{type(collector).__name__}")
    out = []
    for name, s in stats.items():
        if not isinstance(s, ChannelStats):
            raise TypeError(f"calibfast.export: {name!r} is a {type(s).__name__}, not a ChannelStats")
        if s.initialized:
            out.append((name, s))
    return out


def _place(t, device):
    return t if device is None else t.to(device)


def act_scales(collector, *, side="inputs", device="cpu"):
    """``{layer: max |x| per channel}`` (float32 [C]), the ``act_scales`` of SmoothQuant
    (``generate_act_scales.py``) and AWQ-style smoothing: ``stats.absmax``, with 0 for a channel
    that saw no finite value."""
    return {n: _place(s.absmax.clamp_min(0.0), device) for n, s in _items(collector, side)}


def act_mean_abs(collector, *, side="inputs", device="cpu"):
    """``{layer: mean |x| per channel}`` (float32 [C]; AWQ's ``get_act_scale``, which is
    ``x.abs().view(-1, C).mean(0)``): ``sum_abs / finite_count`` computed in float64 and rounded
    to float32, 0 for a channel that saw no finite value."""
    out = {}
    for n, s in _items(collector, side):
        cnt = s.finite_count
        m = torch.where(cnt > 0, s.sum_abs / cnt.clamp_min(1).double(), 0.0)
        out[n] = _place(m.float(), device)
    return out


def modelopt_amax(collector, method="max", per_channel=False, *, side="inputs", device="cpu", **kwargs):
    """``{"<layer>.input_quantizer": amax}`` (``output_quantizer`` for ``side="outputs"``), the
    names of ModelOpt's ``TensorQuantizer`` modules inside a quantized layer; ``amax`` is float32,
    0-d per tensor or [C] per channel (ModelOpt keeps per-channel activation amax with singleton
    dims, e.g. [1, 1, C]: reshape to the quantizer's ``amax`` shape when loading it).

    ``method="max"``: ``stats.absmax`` (its max over channels per tensor), what ModelOpt's
    ``MaxCalibrator`` computes. Any other method goes to ``ChannelStats.amax(method,
    per_channel=..., **kwargs)`` when ChannelStats has one (histogram methods such as
    ``"percentile"``, ``"mse"``, ``"entropy"``); otherwise NotImplementedError.
    """
    if not isinstance(method, str):
        raise TypeError(f"calibfast.export.modelopt_amax: method must be a str, got {type(method).__name__}")
    items = _items(collector, side)
    q = _QUANTIZER[side]
    if method == "max":
        if kwargs:
            raise TypeError(f"calibfast.export.modelopt_amax: method 'max' takes no options, got {sorted(kwargs)}")
        out = {}
        for n, s in items:
            a = s.absmax
            if not per_channel:
                a = a.max() if a.numel() else torch.tensor(-math.inf, device=a.device)
            out[f"{n}.{q}"] = _place(a.clamp_min(0.0), device)
        return out
    fn = getattr(ChannelStats, "amax", None)
    if not callable(fn):
        raise NotImplementedError(f"calibfast.export.modelopt_amax: method {method!r} needs ChannelStats.amax("
                                  "method, ...) (histogram-based ranges), which this calibfast does not have; "
                                  "use method='max' or compute the amax from stats.hist / stats.channel_hist")
    try:
        params = inspect.signature(fn).parameters
        takes_pc = "per_channel" in params or any(p.kind is p.VAR_KEYWORD for p in params.values())
    except (TypeError, ValueError):
        takes_pc = True
    if not takes_pc and per_channel:
        raise NotImplementedError("calibfast.export.modelopt_amax: ChannelStats.amax takes no per_channel "
                                  "argument, so per-channel amax is not available for method "
                                  f"{method!r}")
    extra = {"per_channel": per_channel} if takes_pc else {}
    return {f"{n}.{q}": _place(torch.as_tensor(s.amax(method, **extra, **kwargs)).float(), device)
            for n, s in items}


def torch_ao_qparams(collector, dtype="int8", symmetric=True, per_channel=False, *, side="inputs", device="cpu",
                     **kwargs):
    """``{layer: (scale, zero_point)}`` with torch.ao's conventions, from
    :func:`calibfast.qparams` (scale float32, zero_point int32; 0-d per tensor, [C] per channel).
    ``kwargs`` go to :func:`calibfast.qparams` (``narrow_range``, ``reduce_range``, ``eps``)."""
    out = {}
    for n, s in _items(collector, side):
        qp = qparams(s, dtype, symmetric=symmetric, per_channel=per_channel, **kwargs)
        out[n] = (_place(qp.scale, device), _place(qp.zero_point, device))
    return out


# -- files --------------------------------------------------------------------------------------
def _plain(v, where):
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().contiguous().clone()
    if isinstance(v, (tuple, list)):
        return tuple(_plain(x, where) for x in v)
    raise TypeError(f"calibfast.export: {where} is a {type(v).__name__}; expected tensors")


def save_pt(exported, path):
    """``torch.save`` of a plain ``{name: tensor}`` (or ``{name: (scale, zero_point)}``) dict of
    CPU tensors, loadable with ``torch.load(path, weights_only=True)``."""
    if not isinstance(exported, dict):
        raise TypeError(f"calibfast.export.save_pt expects a dict, got {type(exported).__name__}")
    torch.save({str(k): _plain(v, repr(k)) for k, v in exported.items()}, os.fspath(path))


def _jsonable(v, where):
    if isinstance(v, torch.Tensor):
        t = v.detach().cpu()
        vals = t.tolist()
        flat = t.reshape(-1).tolist()
        if t.is_floating_point() and not all(math.isfinite(x) for x in flat):
            raise ValueError(f"calibfast.export.save_json: {where} holds a non-finite value (JSON has none)")
        return vals
    if isinstance(v, (tuple, list)):
        return [_jsonable(x, where) for x in v]
    raise TypeError(f"calibfast.export.save_json: {where} is a {type(v).__name__}; expected tensors")


def save_json(exported, path):
    """Write an export as JSON: each tensor becomes a number (0-d) or a list (per channel);
    ``(scale, zero_point)`` pairs become ``[scale, zero_point]``. float32 values are written as the
    shortest decimal that reads back to the same float64, hence to the same float32."""
    if not isinstance(exported, dict):
        raise TypeError(f"calibfast.export.save_json expects a dict, got {type(exported).__name__}")
    doc = {str(k): _jsonable(v, repr(k)) for k, v in exported.items()}
    with open(os.fspath(path), "w") as fh:
        json.dump(doc, fh, indent=1, allow_nan=False)
        fh.write("\n")
