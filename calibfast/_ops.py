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
