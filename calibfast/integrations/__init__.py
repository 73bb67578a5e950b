"""Drop-in adapters for the quantization toolkits calibfast's statistics feed.

- :mod:`calibfast.integrations.torch_ao`: observers named and constructed like torch.ao's
  (``MinMaxObserver``, ``PerChannelMinMaxObserver``, ``MovingAverageMinMaxObserver``,
  ``MovingAveragePerChannelMinMaxObserver``, ``HistogramObserver``), subclasses of torch.ao's own
  classes, for ``QConfig`` / ``QConfigMapping`` / ``prepare_fx`` and every flow that takes them.
- :mod:`calibfast.integrations.modelopt`: ``MaxCalibrator`` and ``HistogramCalibrator`` with
  ModelOpt's calibrator interface (``collect``, ``compute_amax``, ``reset``), subclasses of
  ModelOpt's ``_Calibrator``, usable as a ``TensorQuantizer``'s calibrator.

Neither submodule is imported here: each imports its peer (torch.ao, or ModelOpt, which takes
seconds to import) only when it is imported itself.
"""

import math

import torch

from .._reference import EMPTY_EXP
from ..ranges import hist_amax
from ..stats import ChannelStats, _merge_hist

__all__ = ["torch_ao", "modelopt"]


def _pow2_bins(bins, who):
    """The power of two calibfast's histograms need, from a peer's bin count (rounded up)."""
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
        raise ValueError(f"calibfast.integrations.{who}: the bin count must be an int >= 2, got {bins!r}")
    return 1 << (bins - 1).bit_length()


def _scratch_stats(owner, x, axis):
    """The statistics (bins=0) of one tensor along ``axis``, in a ChannelStats that ``owner`` (an
    observer or calibrator) keeps and clears in place call after call, instead of a new one each
    call (whose seven allocations cost more than the update of a small tensor). Read what is needed
    from it before the owner's next call."""
    key = (axis, x.shape[axis], x.device)
    cache = owner.__dict__.setdefault("_calibfast_scratch", {})
    s = cache.get(key)
    if s is None:
        if len(cache) >= 8:  # shapes that keep changing: keep the cache small
            cache.clear()
        s = cache[key] = ChannelStats(axis=axis, bins=0)
    else:
        s._clear()
    return s.update(x)


class _TensorHist:
    """A per-tensor |x| histogram (calibfast's power-of-two one) over tensors of any shape.

    ChannelStats needs a fixed channel count along its axis; a per-tensor statistic must accept any
    shape, so one ChannelStats is kept per size of the last dim (almost always just one) and their
    histograms are merged (exactly: bins nest) when a range is asked for."""

    def __init__(self, bins):
        self.bins = bins
        self._by_c = {}

    def reset(self):
        self._by_c = {}

    @property
    def empty(self):
        return not self._by_c

    def update(self, x):
        x = x.detach()
        if x.dim() == 0:
            x = x.reshape(1)
        c = x.shape[-1]
        s = self._by_c.get(c)
        if s is None:
            s = self._by_c[c] = ChannelStats(axis=-1, bins=self.bins)
        s.update(x)

    def stats(self):
        """(hist int64 [bins], hist_max float, min, max, non-finite count) over all tensors seen;
        hist_max is 0.0 when no finite value was seen."""
        stats = list(self._by_c.values())
        first = stats[0]
        h, he = first.hist.clone(), first._he.clone()
        mn, mx = first.min.min(), first.max.max()
        nonfinite = first.nan_count.sum() + first.inf_count.sum()
        for s in stats[1:]:
            _merge_hist(h, he, s.hist.clone(), s._he.to(h.device))
            mn = torch.minimum(mn, s.min.min())
            mx = torch.maximum(mx, s.max.max())
            nonfinite = nonfinite + s.nan_count.sum() + s.inf_count.sum()
        e = int(he[0])
        hist_max = 0.0 if e == EMPTY_EXP else math.ldexp(1.0, e)
        return h, hist_max, mn, mx, int(nonfinite)

    def amax(self, method, *, compat=None, **kwargs):
        """ChannelStats.amax's per-tensor result over everything seen (capped at the abs-max
        unless ``compat`` is given, as ChannelStats.amax does)."""
        h, hist_max, mn, mx, _ = self.stats()
        absmax = torch.maximum(mx, -mn)
        if method == "max":
            return absmax
        if hist_max == 0.0:
            raise ValueError("calibfast.integrations: no finite value was seen (empty histogram)")
        a = hist_amax(h, hist_max, method, compat=compat, **kwargs)
        return a if compat is not None else torch.minimum(a, absmax.to(a.dtype))
