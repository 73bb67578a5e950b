"""collect(): corner cases of hooking real modules."""

import pytest
import torch
from torch import nn

import calibfast
from calibfast import ChannelStats


def test_module_called_with_keyword_input_is_captured():
    lin = nn.Linear(6, 4)
    x = torch.randn(5, 6)
    with calibfast.collect(lin, capture="both") as c:
        lin(input=x)
    assert torch.equal(c.inputs[""].max, x.amax(0))
    assert torch.equal(c.outputs[""].count, torch.full((4,), 5))


def test_a_name_given_twice_is_hooked_once():
    model = nn.Sequential(nn.Linear(3, 3), nn.ReLU())
    with calibfast.collect(model, modules=["0", "0"]) as c:
        model(torch.randn(2, 3))
    assert list(c) == ["0"]
    assert c["0"].count.tolist() == [2, 2, 2]


@pytest.mark.parametrize("backend", ["dispatch", "reference"])
def test_state_made_under_inference_mode_is_usable_outside(backend):
    a = ChannelStats(backend=backend)
    with torch.inference_mode():
        a.update(torch.randn(4, 3))
    a.update(torch.randn(4, 3))  # no "inplace update to inference tensor"
    b = ChannelStats(backend=backend)
    with torch.inference_mode():
        b.update(torch.randn(2, 3))
    a.merge(b)
    b.merge(a)
    assert a.count.tolist() == [10, 10, 10]
    assert b.count.tolist() == [12, 12, 12]
    c = a.clone().to("cpu")
    c.update(torch.randn(1, 3))
    d = ChannelStats().load_state_dict(a.state_dict())
    d.update(torch.randn(1, 3))


def test_hooks_removed_when_body_raises_and_stats_kept():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 2))
    with pytest.raises(RuntimeError, match="boom"):
        with calibfast.collect(model, capture="both") as c:
            model(torch.randn(2, 3, 6, 6))
            raise RuntimeError("boom")
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert c.inputs["0"].num_channels == 3 and c.outputs["0"].num_channels == 8
    assert c.inputs["2"].num_channels == 128


def test_bad_arguments():
    model = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="capture"):
        with calibfast.collect(model, capture="weights"):
            pass
    with pytest.raises(TypeError, match="nn.Module"):
        with calibfast.collect(lambda x: x):
            pass


def test_input_hessian_matches_xtx():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    xs = [torch.randn(4, 6, 5), torch.randn(2, 5)]
    with calibfast.collect(model, hessian=True) as c:
        for x in xs:
            model(x)
    X = torch.cat([x.reshape(-1, 5) for x in xs]).double()
    h = c.hessians["0"]
    assert int(h.count) == 26
    assert torch.allclose(h.xtx.double(), X.t() @ X, rtol=1e-5, atol=1e-5)
    assert torch.allclose(h.hessian().double(), 2 * X.t() @ X / 26, rtol=1e-5, atol=1e-5)
    assert set(c.hessians) == {"0", "2"}
    with pytest.raises(RuntimeError, match="seen no input"):
        calibfast.hooks.InputHessian().hessian()


class _ScalesItsInputInPlace(nn.Module):
    def forward(self, x):
        return x.mul_(10.0)


def test_input_is_read_before_the_module_runs():
    # Inputs are captured by forward pre-hooks: a module that writes into its input (an in-place
    # activation, say) must not change the statistics of the input it was given.
    model = nn.Sequential(nn.Linear(4, 4), _ScalesItsInputInPlace())
    x = torch.randn(8, 4)
    with calibfast.collect(model, modules=lambda name, m: name == "1", capture="both") as col:
        y = model(x)
    want = model[0](x).detach()
    assert torch.equal(col.inputs["1"].max, want.amax(0))
    assert torch.equal(col.outputs["1"].max, y.detach().amax(0))
    assert torch.equal(col.outputs["1"].max, 10.0 * want.amax(0))
