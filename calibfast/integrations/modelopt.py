"""ModelOpt calibrators whose statistics come from calibfast's fused kernel.

``MaxCalibrator`` and ``HistogramCalibrator`` have ModelOpt's constructor arguments and interface
(``collect(x)``, ``compute_amax(...)``, ``reset()``) and subclass ModelOpt's ``_Calibrator``, so a
``TensorQuantizer`` uses them in place of its own. Two ways in:

1. In the quantization config: ModelOpt's ``calibrator`` attribute takes a constructor tuple::

       from calibfast.integrations import modelopt as cfm
       cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
       cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer",
                                "cfg": {"num_bits": 8, "axis": None,
                                        "calibrator": (cfm.MaxCalibrator, (8, None, False), {})}})
       mtq.quantize(model, cfg, forward_loop)

   (A ``HistogramCalibrator`` given ``method=`` at construction also works under ModelOpt's
   ``algorithm="max"`` flow, which calls ``compute_amax()`` with no argument.)
2. After ``mtq.quantize`` set up the quantizers: :func:`swap_calibrators` replaces every
   ``TensorQuantizer``'s ``_calibrator`` with calibfast's (same num_bits / axis / unsigned).

``MaxCalibrator(num_bits, axis, unsigned, track_amax)``: the amax is bit for bit ModelOpt's: per
tensor (``axis=None``, a 0-d tensor in the input's dtype) and per channel (``axis`` an int or a
tuple of kept axes: the shape of ModelOpt's ``reduce_amax(..., keepdims=True)``, squeezed to 0-d
when it has one element). One kept axis is read in place by the kernel; several kept axes are
first moved to the front and flattened (a copy). Like ModelOpt, a NaN or inf in a tensor raises
(ModelOpt: AssertionError at ``collect``; here: ValueError at ``collect`` for the batch, from the
kernel's non-finite counts), and a change of amax shape raises RuntimeError.

``HistogramCalibrator(num_bits, axis, unsigned, num_bins, grow_method, skip_zeros, torch_hist)``
(per tensor only, ``axis`` must be None, as in ModelOpt): calibfast's exact power-of-two histogram
of |x| (``num_bins`` rounded up to a power of two), and ``compute_amax(method, *, stride,
start_bin, percentile)`` for ``"entropy"``, ``"mse"``, ``"percentile"`` (plus ``"max"``).

- Default (``compat=None``): calibfast's conventions (:func:`calibfast.ranges.hist_amax`): bin
  edges as results, percentile = the upper edge of the bin where the cdf reaches it, mse = the
  exact expected error of the format's grid (int8 / uint8 / int4 / uint4 / fp8 from
  ``num_bits``/``unsigned``), entropy = TensorRT's KL search over the format's levels, results
  capped at the abs-max. ``ignore_zero_spike=True`` (the default here, as in ModelOpt) gives
  bin 0 bin 1's count in the entropy search.
- ``compat="modelopt"``: ModelOpt's own algorithms (``_compute_amax_entropy`` / ``_mse`` /
  ``_percentile``, with ``stride`` / ``start_bin``) run on calibfast's histogram
  (:func:`calibfast.ranges.modelopt_amax`, bit for bit ModelOpt's result *for that histogram*).
  ModelOpt's own histogram is different: its range is the first batch's max, extended by whole
  bins when a later batch exceeds it (``torch.histc`` re-binning each batch, so the edges depend
  on the batch order), while ours is a power of two that at least half the bins cover. Same data,
  different bins: compat mode approximates ModelOpt's amax (within a bin width or two of each
  histogram for percentile, close for entropy/mse), it cannot equal it in general.

ModelOpt 0.47's mse search passes its arguments to ``fake_tensor_quant`` in the wrong positions
(see :mod:`calibfast.ranges`); compat mode computes what the call means, so on mse it differs
from what ModelOpt 0.47 actually returns (its ``centers[start_bin]``).
"""

import math

import torch
from modelopt.torch.quantization.calib.calibrator import _Calibrator

from . import _pow2_bins, _scratch_stats, _TensorHist

__all__ = ["MaxCalibrator", "HistogramCalibrator", "swap_calibrators"]


def _kept_axes(x, axis):
    axes = axis if isinstance(axis, (list, tuple)) else [axis]
    return sorted({a % x.dim() for a in axes})


def _raise_on_nonfinite(s):
    raise ValueError(f"calibfast: MaxCalibrator: {int(s.nan_count.sum())} NaN and {int(s.inf_count.sum())} "
                     "inf values in the tensor (ModelOpt's MaxCalibrator asserts on them too)")


class MaxCalibrator(_Calibrator):
    """ModelOpt's ``MaxCalibrator``: the running abs-max, per tensor or along ``axis``."""

    def __init__(self, num_bits=8, axis=None, unsigned=False, track_amax=False):
        super().__init__(num_bits, axis, unsigned)
        self._track_amax = track_amax
        if self._track_amax:
            self._amaxs = []
        self._calib_amax = None

    @property
    def amaxs(self):
        return self._amaxs

    def _local_amax(self, x):
        """ModelOpt's reduce_amax(x, reduce axes, keepdims=True) (0-d per tensor), from one read."""
        if x.dim() == 0:
            x = x.reshape(1)
        if self._axis is None:
            # torch's two-statistic reduction: faster than the six-statistic fused op for one
            # value per tensor, exact (the maximum is one of the values), and this calibrator
            # syncs once a batch anyway to raise on NaN / Inf, as ModelOpt's does. A non-finite
            # result means such values are there: the fused op counts them for the error.
            mn, mx = torch.aminmax(x)
            amax = torch.maximum(mx, -mn)
            if not math.isfinite(amax.item()):
                _raise_on_nonfinite(_scratch_stats(self, x, -1))
            return amax.abs()  # abs: +0.0 for an all-(-0.0) tensor
        kept = _kept_axes(x, self._axis)
        if len(kept) == 1:
            s = _scratch_stats(self, x, kept[0])
        else:
            moved = x.movedim(kept, list(range(len(kept))))
            s = _scratch_stats(self, moved.reshape(-1, *moved.shape[len(kept):]), 0)
        if bool(s.nan_count.sum() + s.inf_count.sum() != 0):
            _raise_on_nonfinite(s)
        shape = [x.shape[d] if d in kept else 1 for d in range(x.dim())]
        amax = s.absmax.abs().reshape(shape).to(x.dtype)  # abs: +0.0 for an all-(-0.0) channel
        if amax.numel() == 1 and amax.dim() > 0:
            amax = amax.squeeze()
        return amax

    @torch.no_grad()
    def collect(self, x):
        if x.device.type == "meta" or x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            from modelopt.torch.quantization.calib.max import MaxCalibrator as _MO

            _MO.collect(self, x)  # ModelOpt's own path (meta tensors for initialisation, other dtypes)
            return
        local_amax = self._local_amax(x.detach())
        if self._calib_amax is None:
            self._calib_amax = local_amax
        else:
            if local_amax.shape != self._calib_amax.shape:
                raise RuntimeError("amax shape changed!")
            self._calib_amax = torch.max(self._calib_amax, local_amax)
        if self._track_amax:
            a = local_amax.cpu()
            self._amaxs.append((a.float() if a.dtype == torch.bfloat16 else a).numpy())  # numpy has no bf16

    def reset(self):
        self._calib_amax = None

    def compute_amax(self):
        return self._calib_amax

    def __repr__(self):
        return (f"calibfast.MaxCalibrator({super().__repr__()} calib_amax={self._calib_amax} "
                f"track_amax={self._track_amax})")


_INT_FMT = {(8, False): "int8", (8, True): "uint8", (4, False): "int4", (4, True): "uint4"}
_FP_FMT = {(4, 3): "fp8_e4m3", (5, 2): "fp8_e5m2"}


class HistogramCalibrator(_Calibrator):
    """ModelOpt's ``HistogramCalibrator`` arguments; calibfast's exact |x| histogram and searches.

    Extra keyword arguments: ``method`` (used when ``compute_amax`` is called without one),
    ``compat`` (None: calibfast's conventions; ``"modelopt"``: ModelOpt's algorithms on our
    histogram), ``ignore_zero_spike`` (entropy; True as in ModelOpt)."""

    def __init__(self, num_bits=8, axis=None, unsigned=False, num_bins=2048, grow_method=None, skip_zeros=False,
                 torch_hist=True, *, method=None, compat=None, ignore_zero_spike=True):
        super().__init__(num_bits, axis, unsigned)
        if axis is not None:
            raise NotImplementedError("Calibrator histogram collection only supports per tensor scaling")
        if compat not in (None, "modelopt"):
            raise ValueError(f"calibfast: compat must be None or 'modelopt', got {compat!r}")
        self._num_bins = num_bins
        self._skip_zeros = skip_zeros
        self._torch_hist = torch_hist
        self._method = method
        self._compat = compat
        self._ignore_zero_spike = ignore_zero_spike
        self._hist = _TensorHist(_pow2_bins(num_bins, "modelopt.HistogramCalibrator"))

    @torch.no_grad()
    def collect(self, x):
        x = x.detach()
        if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            x = x.float()
        if self._skip_zeros:
            x = x[x != 0]
            if x.numel() == 0:
                return
        self._hist.update(x)

    def reset(self):
        self._hist.reset()

    @property
    def hist(self):
        """(counts int64 [bins], hist_max float): the histogram of |x| over [0, hist_max)."""
        h, hist_max, *_ = self._hist.stats()
        return h, hist_max

    def _fmt(self, method):
        nb = self._num_bits
        if isinstance(nb, (tuple, list)):
            fmt = _FP_FMT.get(tuple(nb))
        else:
            fmt = _INT_FMT.get((int(nb), bool(self._unsigned)))
        if fmt is None:
            raise ValueError(f"calibfast: HistogramCalibrator: no calibfast format for num_bits={nb!r}, "
                             f"unsigned={self._unsigned} (int8/uint8/int4/uint4, fp8 (4, 3)/(5, 2))")
        return fmt

    def compute_amax(self, method=None, *, stride=1, start_bin=128, percentile=99.99, compat="default"):
        """The amax by ``method`` (``"entropy"``, ``"mse"``, ``"percentile"``, ``"max"``; default: the
        constructor's ``method``). ``stride``/``start_bin`` apply with ``compat="modelopt"``.
        Returns None when nothing was collected (as ModelOpt's MaxCalibrator does)."""
        method = self._method if method is None else method
        if method is None:
            raise TypeError("compute_amax() needs a method ('entropy', 'mse', 'percentile' or 'max'), or "
                            "construct the calibrator with method=...")
        if method not in ("entropy", "mse", "percentile", "max"):
            raise TypeError(f"Unknown calibration method {method}")
        compat = self._compat if compat == "default" else compat
        if self._hist.empty:
            return None
        h, hist_max, mn, mx, _ = self._hist.stats()
        if method == "max":
            return torch.maximum(mx, -mn).abs()
        if compat == "modelopt":
            from ..ranges import modelopt_amax

            edges = torch.arange(h.numel() + 1, dtype=torch.float64) * (hist_max / h.numel())
            if method == "percentile":
                return modelopt_amax(h, edges, "percentile", percentile=percentile)
            fmt = self._fmt(method)
            if fmt.startswith("fp8"):
                raise ValueError("calibfast: compat='modelopt' has no fp8 search (ModelOpt 0.47's own fails)")
            return modelopt_amax(h, edges, method, num_bits=int(self._num_bits), unsigned=bool(self._unsigned),
                                 stride=stride, start_bin=start_bin)
        kw = {"percentile": percentile} if method == "percentile" else {"fmt": self._fmt(method)}
        if method == "entropy":
            kw["ignore_zero_spike"] = self._ignore_zero_spike
        return self._hist.amax(method, **kw)

    def __repr__(self):
        return (f"calibfast.HistogramCalibrator({super().__repr__()} num_bins={self._hist.bins} "
                f"method={self._method} compat={self._compat})")


def swap_calibrators(model, histogram_kwargs=None):
    """Replace the calibrator of every ``TensorQuantizer`` in ``model`` with calibfast's.

    A ModelOpt ``MaxCalibrator`` becomes :class:`MaxCalibrator` and a ``HistogramCalibrator``
    becomes :class:`HistogramCalibrator` (``histogram_kwargs`` passed to it: ``method``,
    ``compat``, ...), with the same num_bits / axis / unsigned (and num_bins, skip_zeros). Other
    calibrators are left alone. Returns the number of calibrators replaced. Call it after
    ``mtq.quantize`` (or ``mtq.replace_quant_module`` / ``set_quantizer_by_cfg``) and before
    calibration data flow."""
    from modelopt.torch.quantization.calib import HistogramCalibrator as _MOHist
    from modelopt.torch.quantization.calib import MaxCalibrator as _MOMax
    from modelopt.torch.quantization.nn import TensorQuantizer

    n = 0
    for m in model.modules():
        if not isinstance(m, TensorQuantizer):
            continue
        c = getattr(m, "_calibrator", None)
        if type(c) is _MOMax:
            m._calibrator = MaxCalibrator(c._num_bits, c._axis, c._unsigned, c._track_amax)
            n += 1
        elif type(c) is _MOHist:
            m._calibrator = HistogramCalibrator(c._num_bits, c._axis, c._unsigned, c._num_bins,
                                                skip_zeros=c._skip_zeros, **(histogram_kwargs or {}))
            n += 1
    return n
