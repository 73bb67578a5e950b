"""collect(share_inputs=True): modules fed the very same tensor read it once; the statistics are
those of separate updates."""

import pytest
import torch
from torch import nn

import calibfast

from test_channel_stats import assert_stats_match


class QKV(nn.Module):
    """q/k/v on one hidden state, an output projection, and a gated MLP (gate/up share)."""

    def __init__(self, d=32, h=48):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))
        self.gate, self.up, self.down = nn.Linear(d, h), nn.Linear(d, h), nn.Linear(h, d)

    def forward(self, x):
        a = torch.softmax(self.q(x) @ self.k(x).transpose(-1, -2), -1) @ self.v(x)
        x = x + self.o(a)
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def _batches():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, t, 32, generator=g) * (1 + i) for i, (b, t) in enumerate([(2, 5), (3, 7), (1, 9), (4, 3)])]


def _assert_same(a, b):
    assert set(a.inputs) == set(b.inputs) and set(a.outputs) == set(b.outputs)
    for side in ("inputs", "outputs"):
        for name, s in getattr(a, side).items():
            t = getattr(b, side)[name]
            assert_stats_match(s, t, torch.float32, f"{side}[{name}] ")
            assert torch.allclose(s.sum, t.sum, rtol=1e-12, atol=0)


@pytest.mark.parametrize("capture", ["input", "both", "output"])
@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference"])
def test_shared_inputs_give_the_statistics_of_separate_updates(capture, mode):
    torch.manual_seed(0)
    m = QKV()
    ctx = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference": torch.inference_mode}[mode]
    with ctx(), calibfast.collect(m, capture=capture, channel_bins=8) as shared:
        for x in _batches():
            m(x)
    with ctx(), calibfast.collect(m, capture=capture, channel_bins=8, share_inputs=False) as separate:
        for x in _batches():
            m(x)
    _assert_same(shared, separate)
    # k, v read nothing (q did), up reads nothing (gate did): 3 per batch on the input side
    expect = 3 * len(_batches()) if capture in ("input", "both") else 0
    assert shared.shared_updates == expect and separate.shared_updates == 0


def test_a_state_changed_outside_the_hooks_is_not_shared():
    m = QKV()
    with torch.no_grad(), calibfast.collect(m) as col:
        xs = _batches()
        m(xs[0])
        col.inputs["k"].reset()  # k's history now differs from q's
        col.inputs["v"].update(xs[1])
        m(xs[2])
    ref_k = calibfast.ChannelStats().update(xs[2])
    assert_stats_match(col.inputs["k"], ref_k, torch.float32)
    ref_v = calibfast.ChannelStats().update(xs[0]).update(xs[1]).update(xs[2])
    assert_stats_match(col.inputs["v"], ref_v, torch.float32)
    ref_q = calibfast.ChannelStats().update(xs[0]).update(xs[2])
    assert_stats_match(col.inputs["q"], ref_q, torch.float32)


def test_an_input_modified_in_place_between_siblings_is_read_again():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            y = self.a(x)
            x.mul_(3.0)  # the same tensor object, new values
            return y + self.b(x)

    m = InPlace()
    x = torch.randn(4, 8)
    with torch.no_grad(), calibfast.collect(m) as col:
        m(x.clone())
    assert col.shared_updates == 0
    assert torch.equal(col.inputs["b"].max, (x * 3.0).amax(0))
    assert torch.equal(col.inputs["a"].max, x.amax(0))
