"""ChannelStats.amax and qparams(method=...): the range searches wired to the statistics."""

import pytest
import torch

import calibfast
from calibfast import ChannelStats
from calibfast.ranges import hist_amax


def _stats():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4000, 16, generator=g) * torch.exp(torch.randn(4000, 16, generator=g))
    return x, ChannelStats(bins=2048, channel_bins=256).update(x)


def test_max_is_the_exact_absmax():
    x, s = _stats()
    assert torch.equal(s.amax("max"), x.abs().max())
    assert torch.equal(s.amax("max", per_channel=True), x.abs().amax(0))


@pytest.mark.parametrize("method", ["percentile", "mse", "entropy"])
def test_searches_use_the_histograms(method):
    x, s = _stats()
    a = s.amax(method)
    assert a.dim() == 0 and 0 < float(a) <= float(s.hist_max)
    assert torch.equal(a, torch.minimum(hist_amax(s.hist, s.hist_max, method), s.absmax.max()))
    pc = s.amax(method, per_channel=True)
    assert pc.shape == (16,)
    assert torch.equal(pc, torch.minimum(hist_amax(s.channel_hist, s.channel_hist_max, method), s.absmax))
    assert torch.equal(s.amax(method, compat="modelopt"), hist_amax(s.hist, s.hist_max, method, compat="modelopt"))


def test_percentile_close_to_torch_quantile():
    x, s = _stats()
    q = torch.quantile(x.abs().flatten().double()[:16_000_000], 0.999).item()
    a = float(s.amax("percentile", percentile=99.9))
    width = float(s.hist_max) / s.bins
    assert q <= a + 1e-9 and a - q <= width + 1e-9
    assert float(s.amax("percentile", percentile=100.0)) == float(x.abs().max())  # capped at the abs-max


def test_errors():
    _, s = _stats()
    with pytest.raises(ValueError, match="valid methods.*percentile"):
        s.amax("median")
    with pytest.raises(ValueError, match="format"):
        s.amax("mse", fmt="int7")
    with pytest.raises(RuntimeError, match="channel_bins"):
        ChannelStats().update(torch.randn(4, 3)).amax("mse", per_channel=True)
    e = ChannelStats(bins=64).update(torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="empty histogram"):
        e.amax("percentile")
    with pytest.raises(ValueError, match="no finite value"):
        e.amax("max")


def test_qparams_with_methods():
    _, s = _stats()
    qp = calibfast.qparams(s, "int8", method="mse")
    assert torch.allclose(qp.scale, s.amax("mse", fmt="int8") / 127.5)
    qp4 = calibfast.qparams(s, "int4", method="entropy", per_channel=True)
    assert qp4.scale.shape == (16,)
    fp8 = calibfast.qparams(s, "fp8_e4m3", method="percentile", percentile=99.0)
    assert torch.allclose(fp8.scale, s.amax("percentile", percentile=99.0) / 448)
    with pytest.raises(ValueError, match="symmetric"):
        calibfast.qparams(s, "uint8", symmetric=False, method="mse")
    with pytest.raises(ValueError, match="valid methods"):
        calibfast.qparams(s, method="best")
    with pytest.raises(TypeError, match="ChannelStats"):
        calibfast.qparams(3.0, method="mse")
