"""calibfast.export: exports for SmoothQuant/AWQ, ModelOpt and torch.ao."""

import json
import math

import pytest
import torch
from torch import nn

import calibfast
from calibfast import ChannelStats, export


def _model():
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.Linear(3, 2))


@pytest.fixture
def run():
    """A collector over a small model (with layer "3" never run) and the activations it saw."""
    model = _model()
    x = torch.randn(4, 6, 5) * torch.tensor([1.0, 10.0, 0.1, 3.0, 1.0])
    x[0, 0, 4] = float("nan")
    with torch.no_grad(), calibfast.collect(model, capture="both", bins=64, channel_bins=8) as col:
        h0 = model[0](x)
        h2 = model[2](model[1](h0))
    acts = {"inputs": {"0": x, "2": model[1](h0).detach()}, "outputs": {"0": h0.detach(), "2": h2.detach()}}
    return col, acts


def _rows(t):
    return t.reshape(-1, t.shape[-1])


def _finite_absmax(t):
    a = _rows(t).abs()
    return torch.where(torch.isfinite(a), a, 0).amax(0)


@pytest.mark.parametrize("side", ["inputs", "outputs"])
def test_act_scales(run, side):
    col, acts = run
    got = export.act_scales(col, side=side)
    assert sorted(got) == ["0", "2"]  # "3" never ran: left out
    for n, t in got.items():
        s = getattr(col, side)[n]
        assert t.dtype == torch.float32 and t.device.type == "cpu"
        assert torch.equal(t, s.absmax.clamp_min(0))
        assert torch.equal(t, _finite_absmax(acts[side][n]))  # what SmoothQuant computes per batch
    plain = export.act_scales(getattr(col, side))  # a plain {name: ChannelStats} dict works too
    assert sorted(plain) == sorted(got) and all(torch.equal(plain[k], got[k]) for k in got)


def test_act_scales_channel_without_finite_values_is_zero():
    s = ChannelStats(bins=0).update(torch.tensor([[1.0, float("nan"), -2.0], [0.5, float("inf"), 1.0]]))
    got = export.act_scales({"l": s})["l"]
    assert got.tolist() == [1.0, 0.0, 2.0]
    assert export.act_mean_abs({"l": s})["l"].tolist() == [0.75, 0.0, 1.5]


def test_act_mean_abs(run):
    col, acts = run
    got = export.act_mean_abs(col)
    for n, t in got.items():
        s = col.inputs[n]
        assert t.dtype == torch.float32
        assert torch.equal(t, (s.sum_abs / s.finite_count.double()).float())
        a = _rows(acts["inputs"][n]).double()
        fin = torch.isfinite(a)
        ref = torch.where(fin, a.abs(), 0).sum(0) / fin.sum(0)  # AWQ: x.abs().mean(0), finite values
        assert torch.allclose(t.double(), ref, rtol=1e-6)


@pytest.mark.parametrize("per_channel", [False, True])
def test_modelopt_amax_max(run, per_channel):
    col, acts = run
    got = export.modelopt_amax(col, "max", per_channel=per_channel)
    assert sorted(got) == ["0.input_quantizer", "2.input_quantizer"]
    for n in ("0", "2"):
        t = got[f"{n}.input_quantizer"]
        ref = _finite_absmax(acts["inputs"][n])
        if per_channel:
            assert t.shape == (col.inputs[n].num_channels,) and torch.equal(t, ref)
        else:
            assert t.dim() == 0 and torch.equal(t, ref.max()) and torch.equal(t, col.inputs[n].absmax.max())
        assert t.dtype == torch.float32
    out = export.modelopt_amax(col, side="outputs")
    assert sorted(out) == ["0.output_quantizer", "2.output_quantizer"]
    assert torch.equal(out["2.output_quantizer"], _finite_absmax(acts["outputs"]["2"]).max())


def test_modelopt_amax_other_methods_need_channel_stats_amax(run, monkeypatch):
    col, _ = run
    monkeypatch.delattr(ChannelStats, "amax", raising=False)
    with pytest.raises(NotImplementedError, match=r"ChannelStats.amax"):
        export.modelopt_amax(col, "percentile")
    with pytest.raises(TypeError, match="no options"):
        export.modelopt_amax(col, "max", percentile=99.9)

    calls = []

    def amax(self, method, *, per_channel=False, percentile=99.99):
        calls.append((method, per_channel, percentile))
        return self.absmax if per_channel else self.absmax.max() / 2

    monkeypatch.setattr(ChannelStats, "amax", amax, raising=False)
    got = export.modelopt_amax(col, "percentile", per_channel=False, percentile=99.9)
    assert calls == [("percentile", False, 99.9)] * 2
    assert torch.equal(got["0.input_quantizer"], col.inputs["0"].absmax.max() / 2)

    def amax_no_pc(self, method):
        return self.absmax.max()

    monkeypatch.setattr(ChannelStats, "amax", amax_no_pc, raising=False)
    assert export.modelopt_amax(col, "mse")["2.input_quantizer"].dim() == 0
    with pytest.raises(NotImplementedError, match="per_channel"):
        export.modelopt_amax(col, "mse", per_channel=True)


@pytest.mark.parametrize("dtype, symmetric, per_channel", [
    ("int8", True, False), ("int8", False, True), ("uint8", False, False), ("fp8_e4m3", True, True)])
def test_torch_ao_qparams(run, dtype, symmetric, per_channel):
    col, _ = run
    got = export.torch_ao_qparams(col, dtype, symmetric=symmetric, per_channel=per_channel)
    assert sorted(got) == ["0", "2"]
    for n, (scale, zp) in got.items():
        qp = calibfast.qparams(col.inputs[n], dtype, symmetric=symmetric, per_channel=per_channel)
        assert torch.equal(scale, qp.scale) and torch.equal(zp, qp.zero_point)
        assert scale.dtype == torch.float32 and zp.dtype == torch.int32


@pytest.mark.parametrize("qscheme", [torch.per_tensor_symmetric, torch.per_tensor_affine])
def test_torch_ao_qparams_match_the_observer(qscheme):
    model = _model()
    x = torch.randn(8, 5) * 3
    with torch.no_grad(), calibfast.collect(model, bins=0) as col:
        model(x)
    obs = torch.ao.quantization.MinMaxObserver(dtype=torch.qint8, qscheme=qscheme)
    obs(x)
    scale, zp = obs.calculate_qparams()
    got = export.torch_ao_qparams(col, "int8", symmetric=qscheme == torch.per_tensor_symmetric)["0"]
    assert torch.equal(got[0], scale.reshape(())) and int(got[1]) == int(zp)


def test_save_pt_and_json(run, tmp_path):
    col, _ = run
    scales = export.act_scales(col)
    export.save_pt(scales, tmp_path / "s.pt")
    back = torch.load(tmp_path / "s.pt", weights_only=True)
    assert sorted(back) == sorted(scales) and all(torch.equal(back[k], scales[k]) for k in scales)

    qp = export.torch_ao_qparams(col, "uint8", symmetric=False)
    export.save_pt(qp, tmp_path / "q.pt")
    back = torch.load(tmp_path / "q.pt", weights_only=True)
    assert all(torch.equal(back[k][0], qp[k][0]) and torch.equal(back[k][1], qp[k][1]) for k in qp)

    export.save_json(qp, tmp_path / "q.json")
    doc = json.loads((tmp_path / "q.json").read_text())
    for k, (scale, zp) in qp.items():
        assert torch.tensor(doc[k][0], dtype=torch.float32) == scale  # exact through JSON
        assert doc[k][1] == int(zp)
    amax = export.modelopt_amax(col, per_channel=True)
    export.save_json(amax, tmp_path / "a.json")
    doc = json.loads((tmp_path / "a.json").read_text())
    assert all(torch.equal(torch.tensor(doc[k], dtype=torch.float32), amax[k]) for k in amax)

    with pytest.raises(ValueError, match="non-finite"):
        export.save_json({"x": torch.tensor([1.0, math.inf])}, tmp_path / "bad.json")
    with pytest.raises(TypeError):
        export.save_pt({"x": 1.0}, tmp_path / "bad.pt")


def test_bad_arguments(run):
    col, _ = run
    with pytest.raises(ValueError, match="side"):
        export.act_scales(col, side="both")
    with pytest.raises(TypeError, match="Collector"):
        export.act_scales([1, 2])
    with pytest.raises(TypeError, match="not a ChannelStats"):
        export.act_scales({"a": 1})


def test_device_none_keeps_the_device(run):
    col, _ = run
    assert export.act_scales(col, device=None)["0"].device == col.inputs["0"].device
