"""Every op schema of calibfast, in one place.

The pure-torch implementations (calibfast/_reference.py) are registered for every device
(CompositeExplicitAutograd); the compiled library, when it loads, overrides them for CPU and CUDA
(csrc/cpu/*.cpp, csrc/cuda/*.cu). Each op also has a fake kernel, so torch.compile and
torch.library.opcheck accept it.
"""

import torch

from . import _reference

_lib = torch.library.Library("calibfast", "DEF")

# Updates running per-channel state from one tensor, in one read of it (see csrc/common.h):
#   fstate float32 [3, C]: min, max, abs-min over finite values (abs-max = max(max, -min))
#   dstate float64 [3, C]: sum, sum |x|, sum x^2 over finite values
#   istate int64   [3, C]: values seen, NaN count, +-Inf count
# and histograms of |x| (an empty tensor turns one off):
#   hist int64 [B], hexp int64 [2]      over [0, 2^hexp[0]); hexp[1]: the exponent before this update
#   chist int64 [C, N], chexp int64 [2, C]   the same per channel
_lib.define(
    "channel_stats_update(Tensor x, int axis, Tensor(a!) fstate, Tensor(b!) dstate, Tensor(c!) istate, "
    "Tensor(d!) hist, Tensor(e!) hexp, Tensor(f!) chist, Tensor(g!) chexp) -> ()")
_lib.impl("channel_stats_update", _reference.channel_stats_update, "CompositeExplicitAutograd")


@torch.library.register_fake("calibfast::channel_stats_update", lib=_lib)
def _channel_stats_update_fake(x, axis, fstate, dstate, istate, hist, hexp, chist, chexp):
    _reference.check_channel_stats_args(x, axis, fstate, dstate, istate, hist, hexp, chist, chexp)


channel_stats_update = torch.ops.calibfast.channel_stats_update


# ==== Range searches over |x| histograms (calibfast/ranges.py) ==================================
# Kept together at the end of this file. CPU kernels: csrc/cpu/hist_amax.cpp; pure-torch
# implementations: calibfast/_reference_ranges.py. Every op takes counts as 1-D [bins] or 2-D
# [channels, bins] (int64, int32, float32 or float64; one search per row) and returns float32,
# 0-d or [channels].
#   hist_amax_*: bins of `width` (0-d or [channels], float64) from 0, calibfast's conventions.
#   modelopt_amax_*: explicit `bin_edges` ([bins + 1] or [channels, bins + 1]), ModelOpt's
#   conventions and results (calib/histogram.py _compute_amax_percentile / _mse / _entropy).
from . import _reference_ranges  # noqa: E402

_RANGE_OPS = {
    "hist_amax_percentile": ("(Tensor hist, Tensor width, float percentile) -> Tensor",
                             _reference_ranges.hist_amax_percentile),
    "hist_amax_mse": ("(Tensor hist, Tensor width, str fmt) -> Tensor", _reference_ranges.hist_amax_mse),
    "hist_amax_entropy": ("(Tensor hist, Tensor width, int levels, bool ignore_zero_spike) -> Tensor",
                          _reference_ranges.hist_amax_entropy),
    "modelopt_amax_percentile": ("(Tensor hist, Tensor bin_edges, float percentile) -> Tensor",
                                 _reference_ranges.modelopt_amax_percentile),
    "modelopt_amax_mse": ("(Tensor hist, Tensor bin_edges, int num_bits, bool is_unsigned, int stride, "
                          "int start_bin) -> Tensor", _reference_ranges.modelopt_amax_mse),
    "modelopt_amax_entropy": ("(Tensor hist, Tensor bin_edges, int num_bits, bool is_unsigned, int stride, "
                              "int start_bin) -> Tensor", _reference_ranges.modelopt_amax_entropy),
}

for _name, (_sig, _impl) in _RANGE_OPS.items():
    _lib.define(_name + _sig)
    _lib.impl(_name, _impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"calibfast::{_name}", _reference_ranges.hist_amax_fake, lib=_lib)

hist_amax_percentile = torch.ops.calibfast.hist_amax_percentile
hist_amax_mse = torch.ops.calibfast.hist_amax_mse
hist_amax_entropy = torch.ops.calibfast.hist_amax_entropy
modelopt_amax_percentile = torch.ops.calibfast.modelopt_amax_percentile
modelopt_amax_mse = torch.ops.calibfast.modelopt_amax_mse
modelopt_amax_entropy = torch.ops.calibfast.modelopt_amax_entropy
# ==== end of the range searches ===================================================================
