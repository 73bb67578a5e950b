"""Running per-channel statistics of activation tensors."""

import math

import torch

from . import _ops, _reference
from ._reference import FLOAT_DTYPES

_BACKENDS = ("dispatch", "reference")

_STATE_KEYS = ("min", "max", "absmin", "sum", "sum_abs", "sum_sq", "count", "nan_count", "inf_count")


class ChannelStats:
    """Per-channel statistics along one axis, updated in one fused read of each tensor.

    Kept per channel (shape [C]): ``min``, ``max``, ``absmin``, ``absmax`` (float32, over finite
    values), ``sum``, ``sum_abs``, ``sum_sq`` (float64, over finite values), ``count`` (values
    seen, int64), ``nan_count`` and ``inf_count`` (int64). Non-finite values are counted and
    otherwise ignored. A channel that has seen no finite value has ``min = +inf``,
    ``max = -inf``. float64 inputs are folded in float64 and their min/max/abs-min stored rounded
    to the nearest float32 (a finite float64 beyond the float32 range is stored as +-inf, while
    still counted as finite; the sums stay float64).

    The state lives on the device of the first tensor seen (or ``device``); every update runs on
    that device without a host synchronisation.

    Args:
        axis: the channel axis of the tensors passed to :meth:`update` (negative counts from the
            end, so ``-1`` is the last dim whatever the rank).
        num_channels: allocate the state up front (otherwise on the first update).
        device: where to allocate it when ``num_channels`` is given.
        backend: ``"dispatch"`` (default: the op through the dispatcher, i.e. the compiled kernel
            for the tensor's device when there is one) or ``"reference"`` (always the pure-torch
            implementation; what the equivalence tests compare against).
    """

    def __init__(self, axis=-1, num_channels=None, device=None, backend="dispatch"):
        if not isinstance(axis, int):
            raise TypeError(f"calibfast: axis must be an int, got {type(axis).__name__}")
        if backend not in _BACKENDS:
            raise ValueError(f"calibfast: backend must be one of {_BACKENDS}, got {backend!r}")
        self.axis = axis
        self.backend = backend
        self._update = _ops.channel_stats_update if backend == "dispatch" else _reference.channel_stats_update
        self._f = self._d = self._i = None
        if num_channels is not None:
            self._allocate(int(num_channels), torch.device(device) if device is not None else torch.device("cpu"))

    # -- state --------------------------------------------------------------------------------
    def _allocate(self, C, device):
        # Normal tensors even when the first update happens under torch.inference_mode(), so the
        # state can be updated and merged afterwards outside it.
        with torch.inference_mode(False):
            self._allocate_now(C, device)

    def _allocate_now(self, C, device):
        f = torch.empty(3, C, dtype=torch.float32, device=device)
        f[0].fill_(math.inf)
        f[1].fill_(-math.inf)
        f[2].fill_(math.inf)
        self._f = f
        self._d = torch.zeros(3, C, dtype=torch.float64, device=device)
        self._i = torch.zeros(3, C, dtype=torch.int64, device=device)

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
        self._update(x.detach(), self.axis, self._f, self._d, self._i)
        return self

    def merge(self, other):
        """Fold another ChannelStats (e.g. from another process or device) into this one. The
        result equals what one object would hold after seeing both streams (exactly for min,
        max, abs-min/abs-max and the counts; sums up to float64 rounding). Returns ``self``."""
        if not isinstance(other, ChannelStats):
            raise TypeError(f"calibfast: merge expects a ChannelStats, got {type(other).__name__}")
        if other._f is None:
            return self
        if self._f is None:
            self._allocate(other.num_channels, other.device)
        elif other.num_channels != self.num_channels:
            raise ValueError(f"calibfast: channel count mismatch: this ChannelStats holds {self.num_channels} "
                             f"channels, the other holds {other.num_channels}")
        dev = self._f.device
        with torch.inference_mode(False):
            of, od, oi = (t.to(dev) for t in (other._f, other._d, other._i))
            torch.minimum(self._f[0], of[0], out=self._f[0])
            torch.maximum(self._f[1], of[1], out=self._f[1])
            torch.minimum(self._f[2], of[2], out=self._f[2])
            self._d += od
            self._i += oi
        return self

    def reset(self):
        """Forget everything seen (the channel count and device stay)."""
        if self._f is not None:
            self._allocate(self.num_channels, self.device)
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

    # -- persistence --------------------------------------------------------------------------
    def state_dict(self):
        """Tensors by name (copies), plus ``axis``; loads back with :meth:`load_state_dict`."""
        self._need()
        d = {k: getattr(self, k).clone() for k in _STATE_KEYS}
        d["axis"] = torch.tensor(self.axis, dtype=torch.int64)
        return d

    def load_state_dict(self, d):
        missing = [k for k in _STATE_KEYS if k not in d]
        if missing:
            raise KeyError(f"calibfast: state dict lacks {missing}")
        C = d["min"].shape[0] if d["min"].dim() == 1 else None
        if C is None:
            raise ValueError(f"calibfast: state dict 'min' must be 1-d, got shape {list(d['min'].shape)}")
        for k in _STATE_KEYS:
            if tuple(d[k].shape) != (C,):
                raise ValueError(f"calibfast: state dict '{k}' must have shape [{C}], got {list(d[k].shape)}")
        device = d["min"].device
        with torch.inference_mode(False):
            self._load_checked(d, device)
        return self

    def _load_checked(self, d, device):
        f = torch.stack([d["min"], d["max"], d["absmin"]]).to(device=device, dtype=torch.float32)
        dd = torch.stack([d["sum"], d["sum_abs"], d["sum_sq"]]).to(device=device, dtype=torch.float64)
        i = torch.stack([d["count"], d["nan_count"], d["inf_count"]]).to(device=device, dtype=torch.int64)
        if "axis" in d:
            self.axis = int(d["axis"])
        self._f, self._d, self._i = f.contiguous(), dd.contiguous(), i.contiguous()

    def to(self, device):
        """Move the state to ``device``. Returns ``self``."""
        if self._f is not None:
            with torch.inference_mode(False):
                self._f, self._d, self._i = (t.to(device) for t in (self._f, self._d, self._i))
        return self

    def clone(self):
        c = ChannelStats(self.axis, backend=self.backend)
        if self._f is not None:
            with torch.inference_mode(False):
                c._f, c._d, c._i = self._f.clone(), self._d.clone(), self._i.clone()
        return c

    def __repr__(self):
        if self._f is None:
            return f"ChannelStats(axis={self.axis}, empty)"
        return (f"ChannelStats(axis={self.axis}, channels={self.num_channels}, device={self.device}, "
                f"values/channel={int(self._i[0, 0]) if self.num_channels else 0})")
