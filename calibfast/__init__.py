"""calibfast: fast, exact post-training quantization calibration statistics for PyTorch.

    import calibfast
    with calibfast.collect(model) as stats:
        for batch in data:
            model(batch)
    stats["encoder.layer.0.attention.self.query"].absmax
"""

from ._version import __version__
from . import _ops  # noqa: F401  (defines the op schemas and the pure-torch kernels)
from . import _native

_native.load()

from ._native import cpu_capability, native_backends  # noqa: E402
from .hooks import Collector, channel_axis, collect  # noqa: E402
from .quantize import QParams, fake_quantize, qparams  # noqa: E402
from .stats import ChannelStats  # noqa: E402
from . import data  # noqa: E402,F401  (calibfast.data: calibration data and sample selection)

__all__ = [
    "ChannelStats",
    "Collector",
    "channel_axis",
    "collect",
    "cpu_capability",
    "native_backends",
    "QParams",
    "fake_quantize",
    "qparams",
    "__version__",
]
