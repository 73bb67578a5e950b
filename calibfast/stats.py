"""Running per-channel statistics of activation tensors."""

import math

import torch

from . import _ops, _reference
from ._reference import FLOAT_DTYPES

_BACKENDS = ("dispatch", "reference")
AMAX_METHODS = ("max", "percentile", "mse", "entropy")

_STATE_KEYS = ("min", "max", "absmin", "sum", "sum_abs", "sum_sq", "count", "nan_count", "inf_count")
_HIST_KEYS = ("hist", "hist_exp", "channel_hist", "channel_hist_exp")
_TENSORS = ("_f", "_d", "_i", "_h", "_he", "_ch", "_che")


def _check_bins(bins, name):
    if not isinstance(bins, int) or isinstance(bins, bool):
        raise TypeError(f"calibfast: {name} must be an int, got {type(bins).__name__}")
    if bins != 0 and (bins < 2 or bins > _reference.MAX_BINS or bins & (bins - 1)):
        raise ValueError(f"calibfast: {name} must be 0 (off) or a power of two in [2, {_reference.MAX_BINS}] "
                         f"(bins nest exactly when the range doubles), got {bins}")


class ChannelStats:
    """Per-channel statistics along one axis, updated in one fused read of each tensor.

    Kept per channel (shape [C]): ``min``, ``max``, ``absmin``, ``absmax`` (float32, over finite
    values), ``sum``, ``sum_abs``, ``sum_sq`` (float64, over finite values), ``count`` (values
    seen, int64), ``nan_count`` and ``inf_count`` (int64). Non-finite values are counted and
    otherwise ignored. A channel that has seen no finite value has ``min = +inf``,
    ``max = -inf``. float64 inputs are folded in float64 and their min/max/abs-min stored rounded
    to the nearest float32 (a finite float64 beyond the float32 range is stored as +-inf, while
    still counted as finite; the sums stay float64).

    Histograms, in the same read of the input: ``hist`` (int64 [bins]) counts |x| over the whole
    tensor in uniform bins over [0, ``hist_max``); ``channel_hist`` (int64 [C, channel_bins],
    optional) does the same per channel over [0, ``channel_hist_max[c]``). Ranges are powers of
    two, ``hist_max = 2^e`` with the smallest e such that absmax < 2^e, so at least half the bins
    cover [0, absmax]. When data exceed the range, the range doubles as often as needed and every
    2^k adjacent bins merge into one, with the bin count fixed. Since a power-of-two scale is exact
    in floating point, the bin of a value depends only on the value and the final range: the counts
    are the same, bit for bit, however the data were batched, ordered or split across processes
    and merged. Non-finite values are not binned (they are counted in ``nan_count``/``inf_count``).

    The state lives on the device of the first tensor seen (or ``device``); every update runs on
    that device without a host synchronisation.

    Args:
        axis: the channel axis of the tensors passed to :meth:`update` (negative counts from the
            end, so ``-1`` is the last dim whatever the rank).
        num_channels: allocate the state up front (otherwise on the first update).
        device: where to allocate it when ``num_channels`` is given.
        bins: bins of the |x| histogram over the whole tensor (a power of two; 0 turns it off).
        channel_bins: bins of the per-channel histograms (a power of two; 0, the default, is off).
        backend: ``"dispatch"`` (default: the op through the dispatcher, i.e. the compiled kernel
            for the tensor's device when there is one) or ``"reference"`` (always the pure-torch
            implementation; what the equivalence tests compare against).
    """

    def __init__(self, axis=-1, num_channels=None, device=None, bins=2048, channel_bins=0, backend="dispatch"):
        if not isinstance(axis, int):
            raise TypeError(f"calibfast: axis must be an int, got {type(axis).__name__}")
        if backend not in _BACKENDS:
            raise ValueError(f"calibfast: backend must be one of {_BACKENDS}, got {backend!r}")
        _check_bins(bins, "bins")
        _check_bins(channel_bins, "channel_bins")
        self.axis = axis
        self.bins = bins
        self.channel_bins = channel_bins
        self.backend = backend
        self._update = _ops.channel_stats_update if backend == "dispatch" else _reference.channel_stats_update
        self._epoch = 0  # bumped by every change of the state (collect() uses it to share work)
        for name in _TENSORS:
            setattr(self, name, None)
        if num_channels is not None:
            self._allocate(int(num_channels), torch.device(device) if device is not None else torch.device("cpu"))

    # -- state --------------------------------------------------------------------------------
    def _allocate(self, C, device):
        # Normal tensors even when the first update happens under torch.inference_mode(), so the
        # state can be updated and merged afterwards outside it.
        self._epoch += 1
        with torch.inference_mode(False):
            f = torch.empty(3, C, dtype=torch.float32, device=device)
            f[0].fill_(math.inf)
            f[1].fill_(-math.inf)
            f[2].fill_(math.inf)
            i64 = dict(dtype=torch.int64, device=device)
            self._f = f
            self._d = torch.zeros(3, C, dtype=torch.float64, device=device)
            self._i = torch.zeros(3, C, **i64)
            self._h = torch.zeros(self.bins, **i64)
            self._he = torch.full((2,), _reference.EMPTY_EXP, **i64)
            self._ch = torch.zeros(C if self.channel_bins else 0, self.channel_bins, **i64)
            self._che = torch.full((2, C), _reference.EMPTY_EXP, **i64)

    @property
    def initialized(self):
        """Whether the state exists (after the first update, or with ``num_channels``)."""
        return self._f is not None

    @property
    def num_channels(self):
        return None if self._f is None else self._f.shape[1]

    @property
    def device(self):
        return None if self._f is None else self._f.device

    def _need(self):
        if self._f is None:
            raise RuntimeError("calibfast: this ChannelStats has seen no tensor yet (call update() first)")

    # -- updates ------------------------------------------------------------------------------
    def update(self, x):
        """Fold one tensor into the statistics. Returns ``self``.

        Raises (leaving the state as it was) for a non-tensor, an integer or complex tensor, a
        0-d tensor, an axis out of range, a channel count that differs from the one held, or a
        tensor on another device than the state.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibfast: ChannelStats.update expects a tensor, got {type(x).__name__}")
        if x.dtype not in FLOAT_DTYPES:
            raise TypeError("calibfast: ChannelStats.update expects a floating-point tensor "
                            f"(float32, float16, bfloat16 or float64), got {x.dtype}")
        if x.dim() < 1:
            raise ValueError("calibfast: ChannelStats.update needs a tensor of rank >= 1, got a 0-d tensor")
        if not -x.dim() <= self.axis < x.dim():
            raise IndexError(f"calibfast: channel axis {self.axis} is out of range for a tensor of rank "
                             f"{x.dim()} (shape {list(x.shape)})")
        C = x.shape[self.axis]
        if self._f is None:
            self._allocate(C, x.device)
        elif C != self._f.shape[1]:
            raise ValueError(f"calibfast: channel count mismatch: this ChannelStats holds {self._f.shape[1]} "
                             f"channels, got a tensor with {C} channels along axis {self.axis} "
                             f"(shape {list(x.shape)})")
        elif x.device != self._f.device:
            raise ValueError(f"calibfast: the statistics are on {self._f.device} but the tensor is on "
                             f"{x.device}; move one of them (ChannelStats.to(device))")
        self._epoch += 1
        self._update(x.detach(), self.axis, self._f, self._d, self._i, self._h, self._he, self._ch, self._che)
        return self

    def _same_config(self, other):
        return (self.axis, self.bins, self.channel_bins, self.backend) == \
            (other.axis, other.bins, other.channel_bins, other.backend)

    def _copy_state_from(self, other):
        """Make this state a copy of ``other``'s (same configuration; used by collect() when two
        modules are known to have seen exactly the same tensors)."""
        self._epoch += 1
        if other._f is None:
            for name in _TENSORS:
                setattr(self, name, None)
            return self
        srcs = [getattr(other, name) for name in _TENSORS]
        dsts = [getattr(self, name) for name in _TENSORS]
        if all(d is not None and d.shape == s.shape and d.device == s.device for s, d in zip(srcs, dsts)):
            # The common case (collect()'s shared inputs, every batch after the first): one call
            # for all seven tensors. Copying into normal tensors is allowed in inference mode.
            torch._foreach_copy_(dsts, srcs)
            return self
        with torch.inference_mode(False):  # clones: normal tensors even under inference mode
            for name, src, dst in zip(_TENSORS, srcs, dsts):
                if dst is None or dst.shape != src.shape or dst.device != src.device:
                    setattr(self, name, src.clone())
                else:
                    dst.copy_(src)
        return self

    def merge(self, other):
        """Fold another ChannelStats (e.g. from another process or device) into this one. The
        result equals what one object would hold after seeing both streams (exactly for min,
        max, abs-min/abs-max and the counts; sums up to float64 rounding). Returns ``self``."""
        if not isinstance(other, ChannelStats):
            raise TypeError(f"calibfast: merge expects a ChannelStats, got {type(other).__name__}")
        if other._f is None:
            return self
        if (other.bins, other.channel_bins) != (self.bins, self.channel_bins):
            raise ValueError(f"calibfast: histogram size mismatch: this ChannelStats has bins={self.bins}, "
                             f"channel_bins={self.channel_bins}; the other bins={other.bins}, "
                             f"channel_bins={other.channel_bins}")
        if self._f is not None and other.num_channels != self.num_channels:
            raise ValueError(f"calibfast: channel count mismatch: this ChannelStats holds {self.num_channels} "
                             f"channels, the other holds {other.num_channels}")
        if self._f is None:
            self._allocate(other.num_channels, other.device)
        self._epoch += 1
        dev = self._f.device
        with torch.inference_mode(False):
            of, od, oi, oh, ohe, och, oche = (getattr(other, n).to(dev) for n in _TENSORS)
            torch.minimum(self._f[0], of[0], out=self._f[0])
            torch.maximum(self._f[1], of[1], out=self._f[1])
            torch.minimum(self._f[2], of[2], out=self._f[2])
            self._d += od
            self._i += oi
            if self.bins:
                _merge_hist(self._h, self._he, oh.clone(), ohe)
            if self.channel_bins:
                _merge_hist(self._ch, self._che, och.clone(), oche)
        return self

    def reset(self):
        """Forget everything seen (the channel count, device and bin counts stay)."""
        if self._f is not None:
            self._allocate(self.num_channels, self.device)
        return self

    def _clear(self):
        """reset() in place: the same tensors, refilled (a few fills instead of seven allocations,
        ~10 against ~30 µs). For scratch objects reused call after call (the integrations' per-batch
        statistics); views handed out before see the cleared state, unlike after reset()."""
        if self._f is not None:
            self._epoch += 1
            self._f[0::2].fill_(math.inf)
            self._f[1].fill_(-math.inf)
            self._d.zero_()
            self._i.zero_()
            if self.bins:
                self._h.zero_()
                self._he.fill_(_reference.EMPTY_EXP)
            if self.channel_bins:
                self._ch.zero_()
                self._che.fill_(_reference.EMPTY_EXP)
        return self

    # -- statistics ---------------------------------------------------------------------------
    @property
    def min(self):
        self._need()
        return self._f[0]

    @property
    def max(self):
        self._need()
        return self._f[1]

    @property
    def absmin(self):
        self._need()
        return self._f[2]

    @property
    def absmax(self):
        """max |x| over finite values (exactly max(max, -min)); -inf where none was seen."""
        self._need()
        return torch.maximum(self._f[1], -self._f[0])

    @property
    def sum(self):
        self._need()
        return self._d[0]

    @property
    def sum_abs(self):
        self._need()
        return self._d[1]

    @property
    def sum_sq(self):
        self._need()
        return self._d[2]

    @property
    def count(self):
        """Values seen per channel (finite or not)."""
        self._need()
        return self._i[0]

    @property
    def nan_count(self):
        self._need()
        return self._i[1]

    @property
    def inf_count(self):
        self._need()
        return self._i[2]

    @property
    def finite_count(self):
        self._need()
        return self._i[0] - self._i[1] - self._i[2]

    @property
    def mean(self):
        """Mean of the finite values (float64; NaN where a channel has none)."""
        n = self.finite_count.double()
        return self._d[0] / n

    @property
    def std(self):
        """Population standard deviation of the finite values (float64; NaN where none)."""
        n = self.finite_count.double()
        mean = self._d[0] / n
        var = (self._d[2] / n - mean * mean).clamp_min(0.0)
        return var.sqrt()

    @property
    def hist(self):
        """Counts of finite |x| over the whole tensor (int64 [bins]), uniform over [0, hist_max)."""
        self._need_hist()
        return self._h

    @property
    def hist_exp(self):
        """The histogram's range exponent (int64 0-d tensor): hist_max = 2^hist_exp."""
        self._need_hist()
        return self._he[0]

    @property
    def hist_max(self):
        """Upper end of the histogram's range, 2^hist_exp (float64 0-d tensor; 0 before any finite value)."""
        self._need_hist()
        return _exp_to_max(self._he[0])

    @property
    def hist_edges(self):
        """Bin edges (float64 [bins + 1])."""
        return torch.linspace(0, 1, self.bins + 1, dtype=torch.float64, device=self._h.device) * self.hist_max

    @property
    def channel_hist(self):
        """Per-channel counts of finite |x| (int64 [C, channel_bins]), over [0, channel_hist_max[c])."""
        self._need_hist(channel=True)
        return self._ch

    @property
    def channel_hist_exp(self):
        self._need_hist(channel=True)
        return self._che[0]

    @property
    def channel_hist_max(self):
        """Per-channel ranges, 2^channel_hist_exp (float64 [C]; 0 for a channel with no finite value yet)."""
        self._need_hist(channel=True)
        return _exp_to_max(self._che[0])

    def amax(self, method="max", *, per_channel=False, percentile=99.99, fmt="int8", compat=None,
             ignore_zero_spike=False):
        """The clipping range (amax of |x|) that ``method`` picks, per tensor (0-d) or per channel ([C]).

        - ``"max"``: the abs-max of the finite values (exact; per channel: ``absmax``, -inf where a
          channel saw nothing finite).
        - ``"percentile"``: the smallest bin edge under which ``percentile`` % of the values lie
          (within one bin width above the true percentile), capped at the abs-max.
        - ``"mse"``: the clip minimising the expected squared quantization error of ``fmt``
          (``int8``, ``uint8``, ``int4``, ``uint4``, ``fp8_e4m3``, ``fp8_e5m2``), from the histogram.
        - ``"entropy"``: TensorRT-style KL-divergence calibration (integer formats);
          ``ignore_zero_spike=True`` gives bin 0 bin 1's count first, as ModelOpt does, which helps
          on ReLU outputs (a spike of zeros otherwise pulls the clip down).

        The searches run on the |x| histogram (``per_channel``: the per-channel histograms, which
        need ``channel_bins``) in C++ (:mod:`calibfast.ranges`); results above the abs-max seen
        are capped at it. ``compat="modelopt"`` reproduces
        ModelOpt's conventions and results on the same histogram. Raises ValueError for an
        unknown method or format, or an empty histogram.
        """
        if method not in AMAX_METHODS:
            raise ValueError(f"calibfast: unknown amax method {method!r}; valid methods are {list(AMAX_METHODS)}")
        self._need()
        if method == "max":
            a = self.absmax
            if per_channel:
                return a
            if a.numel() == 0 or not bool(torch.isfinite(a).any()):
                raise ValueError("calibfast: amax('max'): no finite value was seen")
            return a.max()
        from .ranges import hist_amax

        if per_channel:
            self._need_hist(channel=True)
            a = hist_amax(self._ch, self.channel_hist_max, method, percentile=percentile, fmt=fmt, compat=compat,
                          ignore_zero_spike=ignore_zero_spike)
            cap = self.absmax
        else:
            self._need_hist()
            a = hist_amax(self._h, self.hist_max, method, percentile=percentile, fmt=fmt, compat=compat,
                          ignore_zero_spike=ignore_zero_spike)
            cap = self.absmax.max()
        # A bin edge above the largest value seen clips nothing more than the abs-max itself and
        # only coarsens the scale: cap there (not in compat mode, which reproduces the peer as is).
        return a if compat is not None else torch.minimum(a, cap.to(a.dtype))

    def _need_hist(self, channel=False):
        self._need()
        if channel and not self.channel_bins:
            raise RuntimeError("calibfast: this ChannelStats keeps no per-channel histograms "
                               "(construct it with channel_bins=N)")
        if not channel and not self.bins:
            raise RuntimeError("calibfast: this ChannelStats keeps no histogram (bins=0)")

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self):
        """Tensors by name (copies), plus ``axis``, ``bins``, ``channel_bins`` as 0-d tensors;
        loads back with :meth:`load_state_dict`."""
        self._need()
        d = {k: getattr(self, k).clone() for k in _STATE_KEYS}
        d["hist"] = self._h.clone()
        d["hist_exp"] = self._he.clone()
        d["channel_hist"] = self._ch.clone()
        d["channel_hist_exp"] = self._che.clone()
        d["axis"] = torch.tensor(self.axis, dtype=torch.int64)
        d["bins"] = torch.tensor(self.bins, dtype=torch.int64)
        d["channel_bins"] = torch.tensor(self.channel_bins, dtype=torch.int64)
        return d

    def load_state_dict(self, d):
        """Replaces the state with ``d`` (from :meth:`state_dict`). Checks every key, shape and
        dtype first: on error the state is left as it was."""
        missing = [k for k in _STATE_KEYS + _HIST_KEYS + ("bins", "channel_bins") if k not in d]
        if missing:
            raise KeyError(f"calibfast: state dict lacks {missing}")
        if d["min"].dim() != 1:
            raise ValueError(f"calibfast: state dict 'min' must be 1-d, got shape {list(d['min'].shape)}")
        C = d["min"].shape[0]
        for k in _STATE_KEYS:
            if tuple(d[k].shape) != (C,):
                raise ValueError(f"calibfast: state dict '{k}' must have shape [{C}], got {list(d[k].shape)}")
        bins, cbins = int(d["bins"]), int(d["channel_bins"])
        _check_bins(bins, "bins")
        _check_bins(cbins, "channel_bins")
        shapes = {"hist": (bins,), "hist_exp": (2,), "channel_hist": (C if cbins else 0, cbins),
                  "channel_hist_exp": (2, C)}
        for k, shape in shapes.items():
            if tuple(d[k].shape) != shape or d[k].dtype != torch.int64:
                raise ValueError(f"calibfast: state dict '{k}' must be int64 of shape {list(shape)}, "
                                 f"got {d[k].dtype} {list(d[k].shape)}")
        device = d["min"].device
        with torch.inference_mode(False):
            f = torch.stack([d["min"], d["max"], d["absmin"]]).to(device=device, dtype=torch.float32)
            dd = torch.stack([d["sum"], d["sum_abs"], d["sum_sq"]]).to(device=device, dtype=torch.float64)
            i = torch.stack([d["count"], d["nan_count"], d["inf_count"]]).to(device=device, dtype=torch.int64)
            hs = [d[k].to(device).clone().contiguous() for k in _HIST_KEYS]
        if "axis" in d:
            self.axis = int(d["axis"])
        self.bins, self.channel_bins = bins, cbins
        self._f, self._d, self._i = f.contiguous(), dd.contiguous(), i.contiguous()
        self._h, self._he, self._ch, self._che = hs
        self._epoch += 1
        return self

    def to(self, device):
        """Move the state to ``device``. Returns ``self``."""
        if self._f is not None:
            self._epoch += 1
            with torch.inference_mode(False):
                for n in _TENSORS:
                    setattr(self, n, getattr(self, n).to(device))
        return self

    def clone(self):
        c = ChannelStats(self.axis, bins=self.bins, channel_bins=self.channel_bins, backend=self.backend)
        return c._copy_state_from(self)

    def __repr__(self):
        if self._f is None:
            return f"ChannelStats(axis={self.axis}, empty)"
        return (f"ChannelStats(axis={self.axis}, channels={self.num_channels}, device={self.device}, "
                f"values/channel={int(self._i[0, 0]) if self.num_channels else 0})")


def _exp_to_max(e):
    """2^e as float64, 0 where the range is empty."""
    m = torch.ldexp(torch.ones_like(e, dtype=torch.float64), e.clamp(min=-1074))
    return torch.where(e == _reference.EMPTY_EXP, 0.0, m)


def _merge_hist(h, he, oh, ohe):
    """h += oh after bringing both to the larger range (exact: bins nest). oh is consumed."""
    e_a, e_b = he[0].clone(), ohe[0]
    e = torch.maximum(e_a, e_b)
    _reference.grow_hist(h, e_a, e)
    _reference.grow_hist(oh, e_b, e)
    h += oh
    he[0] = e
