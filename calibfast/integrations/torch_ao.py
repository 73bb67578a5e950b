"""torch.ao observers whose statistics come from calibfast's fused kernel.

Each class has the name and the constructor arguments of its torch.ao namesake and subclasses it,
so ``calculate_qparams``, ``state_dict``, ``QConfig``, ``QConfigMapping``, ``prepare_fx`` /
``convert_fx`` and anything else that accepts torch.ao observers take them unchanged::

    from torch.ao.quantization import QConfig, QConfigMapping
    from torch.ao.quantization.quantize_fx import prepare_fx, convert_fx
    from calibfast.integrations import torch_ao as cf

    qconfig = QConfig(activation=cf.HistogramObserver.with_args(reduce_range=True),
                      weight=cf.PerChannelMinMaxObserver.with_args(dtype=torch.qint8,
                                                                    qscheme=torch.per_channel_symmetric))
    prepared = prepare_fx(model, QConfigMapping().set_global(qconfig), example_inputs)

Only ``forward`` (and, for the histogram observer, ``calculate_qparams``) is replaced.

Min/max observers (``MinMaxObserver``, ``PerChannelMinMaxObserver``,
``MovingAverageMinMaxObserver``, ``MovingAveragePerChannelMinMaxObserver``): each batch's min/max
(per tensor, or per channel along ``ch_axis``) comes from one read of the tensor by
:class:`~calibfast.ChannelStats` (any strides, any axis, fp16/bf16/fp32/fp64 read as they are),
and is folded into the ``min_val``/``max_val`` buffers with torch.ao's own operations
(``torch.min``/``torch.max``; for the moving averages ``min_val + c * (cur - min_val)`` in
float32 with the first batch taken as it is, and per channel the first batch when the buffers
are empty). So the buffers, and hence ``calculate_qparams``, are bit for bit torch.ao's for the
same data, whatever the dtype or layout of the input. The buffers stay the state: ``state_dict``,
``load_state_dict``, ``reset_min_max_vals`` behave as in torch.ao.

Departures (the min/max observers): non-finite values. torch.ao's ``aminmax`` lets a NaN poison
the range (NaN min/max, then a NaN scale) and an inf make it infinite; calibfast ignores NaN and
±inf (it counts them), so the range is that of the finite values. A tensor with no finite value
leaves the buffers as they were (per tensor; per channel, such a channel gets +inf/-inf and
torch.ao's ``calculate_qparams`` then fails as it does for an empty channel). Tensors of other
dtypes (integer) go to torch.ao's own ``forward``.

``HistogramObserver``: keeps calibfast's exact power-of-two histogram of |x| (``bins`` rounded up to
a power of two; independent of batching) and, in ``calculate_qparams``, picks the clipping amax
with calibfast's mse search (:meth:`ChannelStats.amax` ``("mse", fmt=...)``, the expected squared
quantization error of the target grid, each bin's values spread uniformly over it). The grid is
read from the observer's quantization range: ``quant_max - quant_min`` steps over ``[0, amax]``
when the scheme is affine and the data were non-negative (the zero point sits at ``quant_min``),
half as many per side otherwise, mapped to the nearest of calibfast's formats (uint8: 255 steps,
int8: 127, uint4: 15, int4: 7 — e.g. quint8 with ``reduce_range`` is the int8 search). The range
passed to torch.ao's ``_calculate_qparams`` is ``[max(min_val, -amax), min(max_val, amax)]``.
**By design this differs from torch.ao's HistogramObserver**, whose ``_non_linear_param_search``
minimises an L2 norm over a histogram of x (not |x|) on [min, max], searching both ends
separately on 16x-upsampled bins: its range is asymmetric, ours clips both sides at one amax. The
benchmark and tests measure the difference (benchmarks/results/cpu_integrations.md: on the
4 x 2048 MLP the scales are within 0.5-2% of torch.ao's, zero points within 1; the tests check the
scales within 2x and the converted model's error against the float model within 2x of torch.ao's
on a small conv/linear net); calibfast's histogram is exact (the same
counts however the data were batched), torch.ao's is re-binned (an approximation) whenever the
range grows. torch.ao's ``histogram`` buffer is left at zeros; our histogram lives in
``observer.stats`` (not in ``state_dict``). Non-finite values are ignored (counted, not binned,
not in min/max); torch.ao skips a whole tensor that holds ±inf (with a warning) and lets a NaN
poison its range.

The observers are Python modules holding calibfast state: unlike torch.ao's, they do not go
through ``torch.jit.script``.

Not covered: pt2e's ``prepare_pt2e`` with XNNPACKQuantizer (torch 2.14 no longer ships
``torch.ao.quantization.quantizer``); the observers would plug into a quantizer's
``QuantizationSpec(observer_or_fake_quant_ctr=...)`` the same way.
"""

import math
import warnings

import torch
from torch.ao.quantization import observer as _ao

from .._reference import FLOAT_DTYPES
from . import _pow2_bins, _scratch_stats, _TensorHist

__all__ = ["MinMaxObserver", "PerChannelMinMaxObserver", "MovingAverageMinMaxObserver",
           "MovingAveragePerChannelMinMaxObserver", "HistogramObserver"]


def _batch_minmax(obs, x, axis):
    """(min, max) float32 of the finite values of one tensor: per tensor (axis None, 0-d) or per
    channel along ``axis`` ([C]); one fused read, into ``obs``'s scratch statistics (the per-channel
    results are views of them: use them before ``obs``'s next call)."""
    if x.dim() == 0:
        x = x.reshape(1)
    if axis is None and x.device.type == "cpu":
        # Per tensor on the CPU: torch's own two-statistic reduction is faster than the six-
        # statistic fused op (512 x 4096: ~0.2 vs ~0.4 ms) and gives the same result whenever it
        # is finite (a NaN or +-Inf in x makes it non-finite); otherwise the fused op below, which
        # skips them. (Not on GPUs: the finiteness check would be a host sync per batch.)
        mn, mx = torch.aminmax(x)
        if math.isfinite(mn.item()) and math.isfinite(mx.item()):
            return mn.float(), mx.float()
    s = _scratch_stats(obs, x, -1 if axis is None else axis)
    if axis is None:
        mn, mx = s.min.min(), s.max.max()
        return mn, mx
    return s.min, s.max


def _handled(x):
    return x.dtype in FLOAT_DTYPES and x.numel() > 0


class MinMaxObserver(_ao.MinMaxObserver):
    """torch.ao's ``MinMaxObserver`` (same arguments, same qparams), min/max from calibfast."""

    def forward(self, x_orig):
        if not _handled(x_orig):
            return super().forward(x_orig)
        mn_cur, mx_cur = _batch_minmax(self, x_orig.detach(), None)
        self.min_val.copy_(torch.min(mn_cur.to(self.min_val.device), self.min_val))
        self.max_val.copy_(torch.max(mx_cur.to(self.max_val.device), self.max_val))
        return x_orig


class MovingAverageMinMaxObserver(_ao.MovingAverageMinMaxObserver):
    """torch.ao's ``MovingAverageMinMaxObserver``: the same averaging (``averaging_constant``)."""

    def forward(self, x_orig):
        if not _handled(x_orig):
            return super().forward(x_orig)
        mn_cur, mx_cur = _batch_minmax(self, x_orig.detach(), None)
        if mn_cur == float("inf") and mx_cur == float("-inf"):
            return x_orig  # nothing finite in this batch
        mn_cur, mx_cur = mn_cur.to(self.min_val.device), mx_cur.to(self.max_val.device)
        min_val, max_val = self.min_val, self.max_val
        if min_val == float("inf") and max_val == float("-inf"):
            min_val, max_val = mn_cur, mx_cur
        else:
            min_val = min_val + self.averaging_constant * (mn_cur - min_val)
            max_val = max_val + self.averaging_constant * (mx_cur - max_val)
        self.min_val.copy_(min_val)
        self.max_val.copy_(max_val)
        return x_orig


def _fold_per_channel(obs, x_orig, combine):
    """Folds one tensor's per-channel min/max into ``obs.min_val``/``max_val`` (taken as they are
    when the buffers are still empty, else ``combine(cur_min, cur_max, old_min, old_max)``)."""
    mn_cur, mx_cur = _batch_minmax(obs, x_orig.detach(), obs.ch_axis)
    mn_cur, mx_cur = mn_cur.to(obs.min_val.device), mx_cur.to(obs.max_val.device)
    if obs.min_val.numel() == 0 or obs.max_val.numel() == 0:
        min_val, max_val = mn_cur, mx_cur
    else:
        min_val, max_val = combine(mn_cur, mx_cur, obs.min_val, obs.max_val)
    obs.min_val.resize_(min_val.shape)
    obs.max_val.resize_(max_val.shape)
    obs.min_val.copy_(min_val)
    obs.max_val.copy_(max_val)
    return x_orig


class PerChannelMinMaxObserver(_ao.PerChannelMinMaxObserver):
    """torch.ao's ``PerChannelMinMaxObserver`` (``ch_axis``), min/max per channel from calibfast."""

    def _forward(self, x_orig):
        if not _handled(x_orig):
            return super()._forward(x_orig)
        return _fold_per_channel(self, x_orig, lambda mn, mx, old_mn, old_mx: (torch.min(mn, old_mn),
                                                                             torch.max(mx, old_mx)))


class MovingAveragePerChannelMinMaxObserver(_ao.MovingAveragePerChannelMinMaxObserver):
    """torch.ao's ``MovingAveragePerChannelMinMaxObserver``: the same per-channel averaging."""

    def forward(self, x_orig):
        if not _handled(x_orig):
            return super().forward(x_orig)
        c = self.averaging_constant
        return _fold_per_channel(self, x_orig, lambda mn, mx, old_mn, old_mx: (old_mn + c * (mn - old_mn),
                                                                             old_mx + c * (mx - old_mx)))


# steps over [0, amax] of each calibfast search format
_FMT_STEPS = {"uint8": 255, "int8": 127, "uint4": 15, "int4": 7}


def _search_fmt(steps):
    """The calibfast format whose grid over [0, amax] is nearest (in ratio) to ``steps`` steps."""
    import math

    return min(_FMT_STEPS, key=lambda f: abs(math.log(_FMT_STEPS[f] / max(steps, 1e-9))))


class HistogramObserver(_ao.HistogramObserver):
    """torch.ao's ``HistogramObserver`` arguments; calibfast's exact |x| histogram and mse search.

    The range differs from torch.ao's by design (see the module docstring). ``search_fmt``
    reports the calibfast format the search optimises for; ``stats`` holds the histogram."""

    def __init__(self, bins: int = 2048, dtype: torch.dtype = torch.quint8, qscheme=torch.per_tensor_affine,
                 reduce_range=False, quant_min=None, quant_max=None, factory_kwargs=None,
                 eps=torch.finfo(torch.float32).eps, is_dynamic=False, **kwargs) -> None:
        super().__init__(bins=bins, dtype=dtype, qscheme=qscheme, reduce_range=reduce_range, quant_min=quant_min,
                         quant_max=quant_max, factory_kwargs=factory_kwargs, eps=eps, is_dynamic=is_dynamic, **kwargs)
        self.stats = _TensorHist(_pow2_bins(bins, "torch_ao.HistogramObserver"))

    def forward(self, x_orig: torch.Tensor) -> torch.Tensor:  # pyre-ignore[14]
        if not _handled(x_orig):
            return x_orig if x_orig.numel() == 0 else super().forward(x_orig)
        x = x_orig.detach()
        c = x.shape[-1] if x.dim() else 1
        self.stats.update(x)
        s = self.stats._by_c[c]
        mn, mx = s.min.min(), s.max.max()
        self.min_val.copy_(torch.min(mn.to(self.min_val.device), self.min_val))
        self.max_val.copy_(torch.max(mx.to(self.max_val.device), self.max_val))
        return x_orig

    @property
    def search_fmt(self):
        levels = self.quant_max - self.quant_min
        affine = self.qscheme in (torch.per_tensor_affine, torch.per_channel_affine)
        one_sided = affine and bool(self.min_val >= 0)
        return _search_fmt(levels if one_sided else levels / 2)

    def calculate_qparams(self):
        if self.stats.empty or (self.min_val == float("inf") and self.max_val == float("-inf")):
            warnings.warn("must run observer before calling calculate_qparams. Returning default scale and "
                          "zero point", stacklevel=2)
            dev = self.min_val.device.type
            return torch.tensor([1.0], device=dev), torch.tensor([0], device=dev)
        amax = self.stats.amax("mse", fmt=self.search_fmt).to(self.min_val.device, torch.float32)
        new_min = torch.max(self.min_val, -amax)
        new_max = torch.min(self.max_val, amax)
        return self._calculate_qparams(new_min, new_max)

    def reset_min_max_vals(self):
        self.min_val.copy_(torch.tensor(float("inf")))
        self.max_val.copy_(torch.tensor(float("-inf")))
        self.stats.reset()
