"""Clipping ranges (amax) from histograms of |x|.

    from calibfast.ranges import hist_amax, modelopt_amax
    amax = hist_amax(stats.hist, stats.hist_max, "mse", fmt="int8")            # 0-d float32
    amax_c = hist_amax(stats.channel_hist, stats.channel_hist_max, "entropy")  # [C]
    same_as_modelopt = modelopt_amax(counts, bin_edges, "entropy")

calibfast's conventions (:func:`hist_amax`): bins of width ``w = hist_max / B`` over
``[0, hist_max)``, bin ``j = [j*w, (j+1)*w)``; every candidate and every result is a bin edge
``k*w``, never above ``K*w``, the upper edge of the last non-empty bin (which is what ``"max"``
returns).

``"percentile"``
    The smallest edge with at least ``percentile`` % of the counted values at or below it: the
    UPPER edge of the first bin where the cumulative count reaches ``percentile * N / 100``
    (compared as ``100 * cum >= percentile * N`` in float64). So the result is >= the nearest-rank
    percentile of the data, less than one bin width above it, and within one bin width of
    ``torch.quantile`` of the raw data where the data are dense (in a sparse tail the two
    percentile definitions themselves differ by the gap between neighbouring order statistics).
``"mse"``
    The edge ``a = k*w`` (``k = 1..K``) minimising the expected squared quantization error of the
    format ``fmt`` with that amax, the values of each bin taken as spread uniformly over it (as
    torch.ao's HistogramObserver does): the sum over bins of ``count / w`` times the exact integral
    over the bin of ``(x - q(x))^2``, where ``q`` rounds to the grid (half to even) and clips
    values above the grid's top to it. Grids over ``[0, a]``: ``int8`` 127 steps, ``uint8`` 255
    (for non-negative data), ``int4`` 7, ``uint4`` 15; ``fp8_e4m3`` / ``fp8_e5m2``: ``x * 448 / a``
    (or ``* 57344 / a``) on the fp8 grid (3 / 2 mantissa bits, subnormals, clipped at the largest
    finite value). Exact ties: the smallest amax. (Each bin's values taken at its centre instead,
    the error curve has grid-alignment artefacts: on ReLU data with uint8 the pick was 2.5% worse
    on the raw data than the best amax; the integral keeps it within 0.2% in the tests.)
``"entropy"``
    TensorRT's KL-divergence calibration over ``L`` quantized levels (``int8``: 128, ``uint8``:
    256, ``int4``: 8, ``uint4``: 16). For each candidate ``i`` from ``L`` to ``K``: P is
    ``hist[:i]`` with the counts of ``hist[i:]`` added to its last bin; Q quantizes ``hist[:i]``
    (without those outliers, as TensorRT and ModelOpt do) into ``L`` levels of ``i / L`` bins
    (bin ``j`` in level ``floor(j * L / i)``), each level's count spread evenly over its non-empty
    bins (empty bins get 0); the result is ``i*w`` for the ``i`` with the smallest KL(P || Q);
    exact ties: the largest ``i`` (the least clipping, ModelOpt's rule). A candidate where P has
    mass in a bin that Q leaves empty (the last bin empty, values beyond it) has KL = inf. When
    the data fit within ``L`` bins (``K <= L``) the result is ``K*w``. Bin 0 is used as it is
    unless ``ignore_zero_spike=True``, which gives it bin 1's count first, as ModelOpt does. On
    data with many exact zeros (ReLU outputs) the spike decides the search otherwise: level 0's
    mass spread over its bins makes KL grow with the candidate, so the result is pulled low (ReLU
    of 3 * randn, 2048 bins, int8: amax 6.0 of max 13.0 and a raw-data mse 130 times the best;
    with ``ignore_zero_spike=True`` 12.6, within 6% of the best).
``"max"``
    ``K*w``.

ModelOpt's conventions (:func:`modelopt_amax`, or ``hist_amax(..., compat="modelopt")`` on
calibfast's bins): the value ModelOpt's ``HistogramCalibrator.compute_amax`` (nvidia-modelopt
0.47, ``calib/histogram.py``) returns for the same counts and bin edges. Counts given as floats
are truncated to integers first, as ``compute_amax`` does (``.int()``). Bin edges may be longer
than ``bins + 1`` for percentile and entropy (ModelOpt's calibrator holds ``bins + 2`` edges once
its bins have grown, and those searches only index ``edges[0..bins]``); its mse search fails on
such a histogram, and so does ours (ValueError).

* ``"percentile"``: ``cumsum(counts / total)`` in float64, the first bin whose cdf reaches
  ``percentile / 100``, and that bin's LOWER edge. Bit for bit.
* ``"entropy"``: candidates ``i = start_bin, start_bin + stride, ... <= B``, bin 0 replaced by bin 1,
  ``2^(num_bits - 1 + unsigned)`` levels split by ``numpy.digitize`` over ``linspace(0, i)``,
  scipy's ``entropy`` (both distributions normalised), the last of the smallest (a NaN, from a
  candidate with no counts below it, wins as in ``np.argmin``); result ``bin_edges[i]``. Bit for
  bit: every candidate is screened with an O(levels) divergence and those within
  1e-9 + 1e-7 * |min| of the smallest are recomputed with numpy's and scipy's operations in their
  order (pairwise sums included).
* ``"mse"``: candidates: the float32 bin centres ``start_bin, start_bin + stride, ... < B``;
  ``fake_tensor_quant(centres, amax, num_bits, unsigned)``; ``mean((q - centres)^2 * counts)``
  in float32 (torch's own mean, so its summation order), the first of the smallest; result the
  centre. Bit for bit with ModelOpt's algorithm as it runs on CPU **with its call fixed**:
  ModelOpt 0.47's ``_compute_amax_mse`` calls ``fake_tensor_quant(centers, amax, num_bits,
  unsigned)`` positionally, and that function's third parameter is now ``bias``, so it quantizes
  ``centers - num_bits`` with ``num_bits = unsigned`` (0): every centre becomes ``amax + 8`` and
  the search returns ``centers[start_bin]`` for any ordinary histogram. We compute what the call
  means (``num_bits=``, ``unsigned=`` by name). With CUDA available ModelOpt runs this search on
  the GPU, whose float32 sums may differ in the last bits. The fp8 variant (``num_bits=(4, 3)``)
  fails inside ModelOpt 0.47 (a missing argument) and is not offered here.

Everything runs on CPU (the histogram is copied there if needed; the result goes back to the
histogram's device): the compiled kernels when they are built, the pure-torch implementations of
calibfast/_reference_ranges.py otherwise.
"""

import math

import torch

from . import _ops

METHODS = ("max", "percentile", "mse", "entropy")
FORMATS = ("int8", "uint8", "int4", "uint4", "fp8_e4m3", "fp8_e5m2")
COMPAT = (None, "modelopt")
MODELOPT_METHODS = ("percentile", "mse", "entropy")
ENTROPY_LEVELS = {"int8": 128, "uint8": 256, "int4": 8, "uint4": 16}
_MODELOPT_BITS = {"int8": (8, False), "uint8": (8, True), "int4": (4, False), "uint4": (4, True)}


def _as_counts(hist, fn):
    """The counts as a CPU tensor the ops take, and the device to return results on. (The ops check
    the rest, empty histograms included, with the same ValueErrors as here.)"""
    if not isinstance(hist, torch.Tensor):
        try:
            hist = torch.as_tensor(hist)
        except Exception as e:
            raise TypeError(f"calibfast.{fn}: expected a tensor of counts, got {type(hist).__name__}") from e
    if hist.dim() not in (1, 2):
        raise ValueError(f"calibfast.{fn}: the histogram must be 1-D [bins] or 2-D [channels, bins], "
                         f"got shape {list(hist.shape)}")
    if hist.shape[-1] == 0:
        raise ValueError(f"calibfast.{fn}: the histogram has no bins")
    if hist.dtype not in (torch.int64, torch.int32, torch.float32, torch.float64):
        hist = hist.to(torch.float64 if hist.is_floating_point() else torch.int64)
    return hist.device, (hist if hist.device.type == "cpu" and not hist.requires_grad else hist.detach().cpu())


def _check_not_empty(counts, fn):
    empty = counts.reshape(-1, counts.shape[-1]).sum(1) == 0
    if empty.any():
        where = f" in row {int(empty.nonzero()[0, 0])}" if counts.dim() == 2 else ""
        raise ValueError(f"calibfast.{fn}: empty histogram (all counts are zero){where}")


def _check_choice(value, valid, what, fn):
    if value not in valid:
        raise ValueError(f"calibfast.{fn}: unknown {what} {value!r}; valid: {', '.join(map(repr, valid))}")


def hist_amax(hist, hist_max, method, *, percentile=99.99, fmt="int8", compat=None, ignore_zero_spike=False):
    """Clipping amax from a histogram of |x| over ``[0, hist_max)``.

    Args:
        hist: counts, 1-D ``[B]`` or 2-D ``[C, B]`` (one search per row), int or float.
        hist_max: upper end of the histogram's range: a float, or a tensor (0-d, or ``[C]`` for a
            2-D histogram: each row's own range).
        method: ``"max"``, ``"percentile"``, ``"mse"`` or ``"entropy"`` (see the module doc).
        percentile: for ``"percentile"``, in (0, 100] (ModelOpt: [0, 100]).
        fmt: the target format for ``"mse"`` and ``"entropy"``: ``int8``, ``uint8``, ``int4``,
            ``uint4``, ``fp8_e4m3``, ``fp8_e5m2`` (entropy: the integer ones).
        compat: ``None`` (calibfast's conventions) or ``"modelopt"``: ModelOpt's result for this
            histogram, its bin edges being ``k * hist_max / B`` (``fmt`` gives num_bits/unsigned;
            ModelOpt's defaults ``start_bin=128``, ``stride=1``).
        ignore_zero_spike: for ``"entropy"``: bin 0 takes bin 1's count first (ModelOpt's rule),
            so that a spike of exact zeros does not decide the range. Off by default (the
            search as TensorRT describes it); on ReLU-like data it matters a lot.

    Returns:
        float32 tensor, 0-d for a 1-D histogram, ``[C]`` for a 2-D one, on the histogram's device.
    """
    fn = "hist_amax"
    _check_choice(method, METHODS, "method", fn)
    _check_choice(fmt, FORMATS, "format", fn)
    _check_choice(compat, COMPAT, "compat mode", fn)
    device, counts = _as_counts(hist, fn)
    rows, B = (counts.shape[0] if counts.dim() == 2 else 1), counts.shape[-1]
    # first: an empty histogram (say of a channel with no finite value) has no range either
    # (hist_max 0), and "empty" is the error that names the problem
    _check_not_empty(counts, fn)
    if isinstance(hist_max, (int, float)) and not isinstance(hist_max, bool):
        if not (math.isfinite(hist_max) and hist_max > 0):
            raise ValueError(f"calibfast.{fn}: hist_max must be finite and positive, got {hist_max!r}")
        width = torch.tensor(hist_max / B, dtype=torch.float64)
    else:
        hmax = torch.as_tensor(hist_max, dtype=torch.float64).detach().cpu()
        if not (hmax.numel() == 1 or (counts.dim() == 2 and hmax.dim() == 1 and hmax.numel() == rows)):
            raise ValueError(f"calibfast.{fn}: hist_max must be a scalar or have one entry per histogram row "
                             f"({rows}), got shape {list(hmax.shape)}")
        if not (torch.isfinite(hmax) & (hmax > 0)).all():
            raise ValueError(f"calibfast.{fn}: hist_max must be finite and positive, got {hmax.tolist()}")
        width = (hmax / B).reshape(()) if hmax.numel() == 1 else hmax / B

    if method == "max":
        _check_not_empty(counts, fn)
        nz = counts.reshape(rows, B) > 0
        last = B - 1 - nz.flip(1).to(torch.int8).argmax(1)
        out = ((last + 1).to(torch.float64) * width).to(torch.float32)
        return (out if counts.dim() == 2 else out.reshape(())).to(device)

    if compat == "modelopt":
        if method == "percentile":
            return modelopt_amax(hist, _edges(width, rows, B, counts.dim()), "percentile", percentile=percentile)
        if fmt not in _MODELOPT_BITS:
            raise ValueError(f"calibfast.{fn}: compat='modelopt' supports formats {', '.join(_MODELOPT_BITS)} for "
                             f"{method!r}, got {fmt!r} (ModelOpt 0.47's fp8 mse search fails inside ModelOpt)")
        num_bits, unsigned = _MODELOPT_BITS[fmt]
        return modelopt_amax(hist, _edges(width, rows, B, counts.dim()), method, num_bits=num_bits,
                             unsigned=unsigned)

    if method == "percentile":
        if not (isinstance(percentile, (int, float)) and 0 < percentile <= 100):
            raise ValueError(f"calibfast.{fn}: percentile must be in (0, 100], got {percentile!r}")
        out = _ops.hist_amax_percentile(counts, width, float(percentile))
    elif method == "mse":
        out = _ops.hist_amax_mse(counts, width, fmt)
    else:
        if fmt not in ENTROPY_LEVELS:
            raise ValueError(f"calibfast.{fn}: entropy calibration needs an integer format "
                             f"({', '.join(ENTROPY_LEVELS)}), got {fmt!r}")
        out = _ops.hist_amax_entropy(counts, width, ENTROPY_LEVELS[fmt], bool(ignore_zero_spike))
    return out.to(device)


def _edges(width, rows, B, dim):
    k = torch.arange(B + 1, dtype=torch.float64)
    if width.dim() == 0:
        return k * width
    return width[:, None] * k[None, :] if dim == 2 else k * width.reshape(())


def modelopt_amax(hist, bin_edges, method, *, num_bits=8, unsigned=False, percentile=99.99, stride=1,
                  start_bin=128):
    """ModelOpt's ``HistogramCalibrator.compute_amax(method)`` for these counts and bin edges.

    Args:
        hist: counts ``[B]`` (or ``[C, B]``: one search per row), a tensor or a numpy array; float
            counts are truncated to integers as ``compute_amax`` does.
        bin_edges: ``[B + 1]`` (or ``[C, B + 1]``), starting at 0 as ModelOpt's do.
        method: ``"percentile"``, ``"mse"`` or ``"entropy"``.
        num_bits, unsigned, stride, start_bin, percentile: ModelOpt's arguments (num_bits an int:
            ModelOpt 0.47 cannot run its fp8 mse search).

    Returns:
        float32 tensor, 0-d (or ``[C]``), on the histogram's device; the same value as ModelOpt's
        (for mse: with ModelOpt 0.47's argument bug fixed; see the module doc).
    """
    fn = "modelopt_amax"
    _check_choice(method, MODELOPT_METHODS, "method", fn)
    device, counts = _as_counts(hist, fn)
    if counts.is_floating_point():
        counts = counts.to(torch.int64)  # compute_amax: self._calib_hist.int()
    edges = bin_edges if isinstance(bin_edges, torch.Tensor) else torch.as_tensor(bin_edges)
    edges = edges if edges.device.type == "cpu" and not edges.requires_grad else edges.detach().cpu()
    if not edges.is_floating_point():
        edges = edges.to(torch.float64)
    if method == "percentile":
        if not (isinstance(percentile, (int, float)) and 0 <= percentile <= 100):
            raise ValueError(f"calibfast.{fn}: percentile must be in [0, 100], got {percentile!r}")
        out = _ops.modelopt_amax_percentile(counts, edges, float(percentile))
        return out.to(device)
    if isinstance(num_bits, tuple):
        raise ValueError(f"calibfast.{fn}: num_bits={num_bits} (fp8) is not supported: ModelOpt 0.47's own fp8 "
                         "mse search fails; use hist_amax(..., 'mse', fmt='fp8_e4m3')")
    if isinstance(num_bits, bool) or not isinstance(num_bits, int) or not 1 <= num_bits <= 16:
        raise ValueError(f"calibfast.{fn}: num_bits must be an int in [1, 16], got {num_bits!r}")
    op = _ops.modelopt_amax_mse if method == "mse" else _ops.modelopt_amax_entropy
    return op(counts, edges, num_bits, bool(unsigned), int(stride), int(start_bin)).to(device)


__all__ = ["hist_amax", "modelopt_amax", "METHODS", "FORMATS", "ENTROPY_LEVELS"]
