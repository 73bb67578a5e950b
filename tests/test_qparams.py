"""calibfast.qparams against torch.ao's own observers (bit for bit), fp8 scales, fake_quantize, bad input."""

import math
import warnings

import pytest
import torch
from hypothesis import given, settings, strategies as st
from torch.ao.quantization.observer import MinMaxObserver, PerChannelMinMaxObserver

from calibfast import ChannelStats
from calibfast.quantize import DTYPES, QParams, fake_quantize, qparams

from conftest import DEVICES

INT_DTYPES = ["int8", "uint8", "int4", "uint4"]
FP8 = {"fp8_e4m3": 448.0, "fp8_e5m2": 57344.0}


def _configs():
    """(dtype, symmetric, narrow_range, reduce_range) combinations calibfast accepts."""
    out = []
    for dt in INT_DTYPES:
        for sym in (True, False):
            for narrow in (False, True):
                for reduce in (False, True):
                    if narrow and dt.startswith("u"):
                        continue
                    if reduce and sym and dt.startswith("u"):
                        continue
                    out.append((dt, sym, narrow, reduce))
    return out


CONFIGS = _configs()
CONFIG_IDS = ["-".join([c[0], "sym" if c[1] else "aff"] + (["narrow"] if c[2] else []) + (["reduce"] if c[3] else []))
              for c in CONFIGS]


def _observer(dtype, symmetric, narrow, reduce, per_channel, ch_axis=0, device="cpu"):
    """The torch.ao observer with the same conventions."""
    kw = {}
    if dtype in ("int8", "int4"):
        kw["dtype"] = torch.qint8
        if dtype == "int4":
            kw["quant_min"], kw["quant_max"] = (-7 if narrow else -8), 7
        elif narrow:
            kw["quant_min"], kw["quant_max"] = -127, 127
    else:
        kw["dtype"] = torch.quint8
        if dtype == "uint4":
            kw["quant_min"], kw["quant_max"] = 0, 15
    if per_channel:
        kw["qscheme"] = torch.per_channel_symmetric if symmetric else torch.per_channel_affine
        cls = PerChannelMinMaxObserver
        kw["ch_axis"] = ch_axis
    else:
        kw["qscheme"] = torch.per_tensor_symmetric if symmetric else torch.per_tensor_affine
        cls = MinMaxObserver
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # reduce_range deprecation
        obs = cls(reduce_range=reduce, **kw)
    return obs.to(device)


def _ao_qparams(obs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "must run observer before calling calculate_qparams"
        return obs.calculate_qparams()


def _compare(qparams_args, obs, per_channel, **kw):
    """calibfast against the observer, where torch.ao's scale is finite (else calibfast refuses)."""
    ao_scale, ao_zp = _ao_qparams(obs)
    if not torch.isfinite(ao_scale).all():  # max - min overflowed float32
        with pytest.raises(ValueError, match="too wide"):
            qparams(qparams_args, per_channel=per_channel, **kw)
        return
    _assert_same(qparams(qparams_args, per_channel=per_channel, **kw), ao_scale, ao_zp, per_channel)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _assert_same(qp, ao_scale, ao_zp, per_channel):
    assert isinstance(qp, QParams)
    assert qp.scale.dtype == torch.float32 and qp.zero_point.dtype == torch.int32
    if per_channel:
        assert qp.scale.shape == ao_scale.shape == qp.zero_point.shape
    else:
        assert qp.scale.dim() == 0 and qp.zero_point.dim() == 0
        ao_scale, ao_zp = ao_scale.reshape(()), ao_zp.reshape(())
    assert qp.scale.device == ao_scale.device
    assert torch.equal(_bits(qp.scale), _bits(ao_scale.to(torch.float32))), (qp.scale, ao_scale)
    assert torch.equal(qp.zero_point, ao_zp.to(torch.int32)), (qp.zero_point, ao_zp)
    assert torch.isfinite(qp.scale).all() and (qp.scale > 0).all()
    assert (qp.zero_point >= qp.quant_min).all() and (qp.zero_point <= qp.quant_max).all()


def _channels(n, seed):
    """[n, C] float32 data whose channels cover the interesting range shapes."""
    g = torch.Generator().manual_seed(seed)
    cols = []
    r = lambda: torch.randn(n, generator=g)  # noqa: E731
    u = lambda: torch.rand(n, generator=g)  # noqa: E731
    for s in (1.0, 3.7, 1e-3, 250.0):
        cols.append(r() * s)  # mixed sign
        cols.append(u() * s + 0.1 * s)  # all positive
        cols.append(-u() * s - 0.1 * s)  # all negative
        cols.append(r() * s + 5 * s)  # mostly positive, skewed
        cols.append(r() * s - 5 * s)  # mostly negative, skewed
    cols.append(torch.zeros(n))  # zero-width at 0
    cols.append(torch.full((n,), 2.5))  # zero-width, positive
    cols.append(torch.full((n,), -0.75))  # zero-width, negative
    cols.append(r() * 1e-30)  # tiny: scale clamps to eps
    cols.append(r() * 1e30)  # huge
    cols.append(u() * 1e-40)  # subnormal, positive
    cols.append(torch.linspace(-2.5, 252.5, n))  # affine: scale 1, round(-2.5) half to even
    cols.append(torch.linspace(-3.5, 251.5, n))  # round(-3.5) = -4
    cols.append(torch.linspace(-0.5, 14.5, n))  # 4-bit: scale 1, round(-0.5) = -0
    cols.append(torch.linspace(-1.5, 13.5, n))
    return torch.stack(cols, dim=1).contiguous()


# -- the same data through torch.ao's observers and a ChannelStats --------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_ao_observers(cfg, device):
    dtype, sym, narrow, reduce = cfg
    stats = ChannelStats(axis=1)
    obs_c = _observer(dtype, sym, narrow, reduce, per_channel=True, ch_axis=1, device=device)
    obs_t = _observer(dtype, sym, narrow, reduce, per_channel=False, device=device)
    for seed in range(3):  # several batches: running min/max
        x = _channels(64, seed).to(device)
        stats.update(x)
        obs_c(x)
        obs_t(x)
    kw = dict(dtype=dtype, symmetric=sym, narrow_range=narrow, reduce_range=reduce)
    qp = qparams(stats, per_channel=True, **kw)
    assert (qp.quant_min, qp.quant_max) == (obs_c.quant_min, obs_c.quant_max) == (obs_t.quant_min, obs_t.quant_max)
    _assert_same(qp, *_ao_qparams(obs_c), per_channel=True)
    _assert_same(qparams(stats, per_channel=False, **kw), *_ao_qparams(obs_t), per_channel=False)
    # The same through a (min, max) tuple of the observer's own buffers.
    _assert_same(qparams((obs_c.min_val, obs_c.max_val), per_channel=True, **kw), *_ao_qparams(obs_c), True)
    _assert_same(qparams((obs_t.min_val, obs_t.max_val), **kw), *_ao_qparams(obs_t), False)


@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_matches_torch_ao_channel_axis_0_rank_4(cfg):
    dtype, sym, narrow, reduce = cfg
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 3, 4, 5, generator=g) * torch.tensor([1e-3, 1.0, 10.0, 0.0, 3.0, 1e4]).view(6, 1, 1, 1)
    x = x + torch.tensor([0.0, 2.0, -20.0, 1.5, 0.0, 0.0]).view(6, 1, 1, 1)
    stats = ChannelStats(axis=0).update(x)
    obs = _observer(dtype, sym, narrow, reduce, per_channel=True, ch_axis=0)
    obs(x)
    kw = dict(dtype=dtype, symmetric=sym, narrow_range=narrow, reduce_range=reduce)
    _assert_same(qparams(stats, per_channel=True, **kw), *_ao_qparams(obs), per_channel=True)


# -- channels that saw no finite value ------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_channels_without_finite_values(cfg, device):
    dtype, sym, narrow, reduce = cfg
    x = _channels(32, 7)
    C = x.shape[1]
    empty = torch.zeros(C, dtype=torch.bool)
    empty[[0, 3, C - 1]] = True
    x[:, 0] = float("nan")
    x[:, 3] = float("inf")
    x[::2, C - 1] = float("nan")
    x[1::2, C - 1] = -float("inf")
    x = x.to(device)
    stats = ChannelStats(axis=1).update(x)
    kw = dict(dtype=dtype, symmetric=sym, narrow_range=narrow, reduce_range=reduce)

    qp = qparams(stats, per_channel=True, **kw)
    assert not torch.isnan(qp.scale).any()
    assert torch.equal(qp.scale.cpu()[empty], torch.ones(3)) and torch.equal(qp.zero_point.cpu()[empty],
                                                                             torch.zeros(3, dtype=torch.int32))
    # The other channels: torch.ao's per-channel observer on just those channels (it refuses a
    # channel that has seen nothing: min > max).
    keep = (~empty).nonzero().flatten().to(device)
    obs = _observer(dtype, sym, narrow, reduce, per_channel=True, ch_axis=1, device=device)
    obs(x.index_select(1, keep))
    ao_s, ao_z = _ao_qparams(obs)
    _assert_same(QParams(qp.scale[keep], qp.zero_point[keep], qp.quant_min, qp.quant_max, dtype), ao_s, ao_z, True)

    # Per tensor: empty channels do not take part; torch.ao fed the finite values only.
    obs_t = _observer(dtype, sym, narrow, reduce, per_channel=False, device=device)
    obs_t(x[torch.isfinite(x)])
    _assert_same(qparams(stats, **kw), *_ao_qparams(obs_t), per_channel=False)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cfg", CONFIGS, ids=CONFIG_IDS)
def test_nothing_finite_at_all(cfg, device):
    dtype, sym, narrow, reduce = cfg
    kw = dict(dtype=dtype, symmetric=sym, narrow_range=narrow, reduce_range=reduce)
    stats = ChannelStats(axis=-1, num_channels=4, device=device)  # nothing seen
    stats.update(torch.full((3, 4), float("nan"), device=device))
    # torch.ao's per-tensor observer that saw nothing: (1.0, 0).
    obs_t = _observer(dtype, sym, narrow, reduce, per_channel=False, device=device)
    _assert_same(qparams(stats, **kw), *_ao_qparams(obs_t), per_channel=False)
    qp = qparams(stats, per_channel=True, **kw)
    assert torch.equal(qp.scale.cpu(), torch.ones(4)) and torch.equal(qp.zero_point.cpu(),
                                                                      torch.zeros(4, dtype=torch.int32))
    # The same through the amax of such channels (-inf).
    qa = qparams(stats.absmax, per_channel=True, **kw)
    assert torch.equal(qa.scale, qp.scale) and torch.equal(qa.zero_point, qp.zero_point)


# -- arbitrary float32 min/max, straight into the observers' buffers -------------------------------

_f32 = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.floats(min_value=-2.0 ** -20, max_value=2.0 ** -20, width=32),
    st.floats(min_value=-300, max_value=300, width=32),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, -2.5, 127.5, -128.0, 1e-45, 1.1754943508222875e-38]),
)
_pair = st.tuples(_f32, _f32).map(sorted)


@settings(max_examples=150, deadline=None)
@given(pairs=st.lists(_pair, min_size=1, max_size=6), cfg=st.sampled_from(CONFIGS))
def test_random_min_max_against_torch_ao(pairs, cfg):
    dtype, sym, narrow, reduce = cfg
    kw = dict(dtype=dtype, symmetric=sym, narrow_range=narrow, reduce_range=reduce)
    mn = torch.tensor([p[0] for p in pairs], dtype=torch.float32)
    mx = torch.tensor([p[1] for p in pairs], dtype=torch.float32)

    obs = _observer(dtype, sym, narrow, reduce, per_channel=True)
    obs.min_val.resize_(mn.shape).copy_(mn)
    obs.max_val.resize_(mx.shape).copy_(mx)
    _compare((mn, mx), obs, True, **kw)

    obs_t = _observer(dtype, sym, narrow, reduce, per_channel=False)
    obs_t.min_val.copy_(mn[0])
    obs_t.max_val.copy_(mx[0])
    _compare((float(mn[0]), float(mx[0])), obs_t, False, **kw)

    # A symmetric amax is the range [-amax, amax].
    amax = torch.maximum(mx.abs(), mn.abs())
    obs.min_val.copy_(-amax)
    obs.max_val.copy_(amax)
    _compare(amax, obs, True, **kw)


def test_range_too_wide_for_float32():
    # torch.ao: (3e38 + 3e38) / 255 overflows to scale = inf; calibfast refuses.
    obs = _observer("int8", False, False, False, per_channel=False)
    obs(torch.tensor([-3e38, 3e38]))
    assert _ao_qparams(obs)[0].isinf().all()
    _compare((-3e38, 3e38), obs, False, dtype="int8", symmetric=False)
    with pytest.raises(ValueError, match="too wide"):
        qparams(ChannelStats(axis=0).update(torch.tensor([[-3e38], [3e38]])), "uint8", symmetric=False)
    # Symmetric (max(|min|, |max|) / 127.5) stays finite: same as torch.ao.
    obs = _observer("int8", True, False, False, per_channel=False)
    obs(torch.tensor([-3e38, 3e38]))
    _assert_same(qparams((-3e38, 3e38)), *_ao_qparams(obs), per_channel=False)


@pytest.mark.parametrize("eps", [1e-3, 2.0 ** -20])
def test_custom_eps_like_torch_ao(eps):
    mn = torch.tensor([-1e-5, 0.0, -3.0, 0.0])
    mx = torch.tensor([1e-5, 0.0, 4.0, 1e-2])
    for sym in (True, False):
        obs = PerChannelMinMaxObserver(dtype=torch.qint8, eps=eps,
                                       qscheme=torch.per_channel_symmetric if sym else torch.per_channel_affine)
        obs(torch.stack([mn, mx]).T.contiguous())  # channel c sees exactly min/max
        _assert_same(qparams((mn, mx), "int8", symmetric=sym, per_channel=True, eps=eps),
                     *_ao_qparams(obs), per_channel=True)


def test_round_half_to_even_and_ranges():
    # scale (252.5 + 2.5) / 255 = 1: zero point -128 - round(-2.5) = -128 + 2 (half to even).
    qp = qparams((-2.5, 252.5), "int8", symmetric=False)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == -126
    qp = qparams((-3.5, 251.5), "uint8", symmetric=False)
    assert float(qp.scale) == 1.0 and int(qp.zero_point) == 4
    assert qparams(1.0, "uint8").zero_point.item() == 128
    assert qparams(1.0, "uint4").zero_point.item() == 7  # torch.ao: (0 + 15) // 2 for a custom range
    for dt, narrow, reduce, rng in [("int8", False, False, (-128, 127)), ("int8", True, False, (-127, 127)),
                                    ("int8", False, True, (-64, 63)), ("int8", True, True, (-64, 63)),
                                    ("uint8", False, False, (0, 255)), ("int4", False, False, (-8, 7)),
                                    ("int4", True, False, (-7, 7)), ("int4", False, True, (-4, 3)),
                                    ("int4", True, True, (-4, 3)), ("uint4", False, False, (0, 15))]:
        qp = qparams(1.0, dt, narrow_range=narrow, reduce_range=reduce)
        assert (qp.quant_min, qp.quant_max) == rng, dt
    assert (qparams(1.0, "uint8", symmetric=False, reduce_range=True).quant_max,
            qparams(1.0, "uint4", symmetric=False, reduce_range=True).quant_max) == (127, 7)


def test_input_forms_agree():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(50, 8, generator=g) * torch.linspace(0.1, 10, 8)
    stats = ChannelStats(axis=1).update(x)
    for dt in INT_DTYPES + list(FP8):
        a = qparams(stats, dt, per_channel=True)
        b = qparams((stats.min, stats.max), dt, per_channel=True)
        c = qparams((x.amin(0).double(), x.amax(0).double()), dt, per_channel=True)
        d = qparams(stats.absmax, dt, per_channel=True)  # symmetric: only the amax matters
        for q in (b, c, d):
            assert torch.equal(a.scale, q.scale) and torch.equal(a.zero_point, q.zero_point)
        t = qparams(stats, dt)
        assert torch.equal(t.scale, qparams(float(stats.absmax.max()), dt).scale)
    # Statistics are untouched.
    assert torch.equal(stats.min, x.amin(0)) and torch.equal(stats.max, x.amax(0))


# -- fp8 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(FP8))
def test_fp8_scale(dtype, device):
    fmax = FP8[dtype]
    x = _channels(40, 5).to(device)
    stats = ChannelStats(axis=1).update(x)
    qp = qparams(stats, dtype, per_channel=True)
    amax = x.abs().amax(0)
    expect = torch.maximum(amax / fmax, torch.tensor(torch.finfo(torch.float32).eps, device=device))
    assert torch.equal(_bits(qp.scale), _bits(expect))
    assert torch.equal(qp.zero_point, torch.zeros_like(qp.zero_point)) and qp.zero_point.dtype == torch.int32
    assert (qp.quant_min, qp.quant_max) == (-int(fmax), int(fmax))
    # Per tensor, and from a plain amax.
    qt = qparams(stats, dtype)
    assert qt.scale.dim() == 0 and torch.equal(qt.scale, amax.max() / fmax)
    assert float(qparams(896.0, dtype).scale) == torch.tensor(896.0 / fmax, dtype=torch.float32).item()
    assert float(qparams(0.0, dtype).scale) == torch.finfo(torch.float32).eps
    assert float(qparams(-math.inf, dtype).scale) == 1.0  # nothing seen


@pytest.mark.parametrize("dtype", list(FP8))
def test_fp8_fake_quantize(dtype):
    f8 = torch.float8_e4m3fn if dtype == "fp8_e4m3" else torch.float8_e5m2
    g = torch.Generator().manual_seed(4)
    x = torch.randn(16, 5, generator=g) * torch.tensor([1e-3, 1.0, 30.0, 1e4, 0.5])
    qp = qparams(x.abs().amax(0), dtype, per_channel=True)
    y = fake_quantize(x, qp, axis=1)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    expect = (x / qp.scale).to(f8).float() * qp.scale
    assert torch.equal(y, expect)
    assert torch.equal(fake_quantize(y, qp, axis=1), y)  # idempotent
    # Values past amax saturate instead of overflowing to inf/NaN.
    big = fake_quantize(x * 10, qp, axis=-1)
    assert torch.isfinite(big).all()
    assert torch.allclose(big.abs().amax(0), qp.scale * FP8[dtype])
    # Per tensor, channel-last half input.
    qt = qparams(x.abs().amax(), dtype)
    yt = fake_quantize(x.half(), qt)
    assert yt.dtype == torch.float16 and torch.isfinite(yt).all()


# -- fake_quantize for integers --------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [c for c in CONFIGS if not c[3]], ids=[i for c, i in zip(CONFIGS, CONFIG_IDS)
                                                                         if not c[3]])
def test_int_fake_quantize(cfg):
    dtype, sym, narrow, _ = cfg
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(4, 6, 10, generator=g) * torch.linspace(0.1, 5, 6).view(6, 1) + 0.3).contiguous()
    stats = ChannelStats(axis=1).update(x)
    qp = qparams(stats, dtype, symmetric=sym, narrow_range=narrow, per_channel=True)
    y = fake_quantize(x, qp, axis=1)
    s, z = qp.scale.view(1, 6, 1), qp.zero_point.view(1, 6, 1)
    q = torch.clamp(torch.round(x / s) + z, qp.quant_min, qp.quant_max)
    assert torch.allclose(y, (q - z) * s, rtol=0, atol=1e-6)
    assert torch.equal(fake_quantize(x, qp, axis=-2), y)
    qt = qparams(stats, dtype, symmetric=sym, narrow_range=narrow)
    yt = fake_quantize(x, qt)
    assert torch.equal(yt, torch.fake_quantize_per_tensor_affine(x, float(qt.scale), int(qt.zero_point),
                                                                qt.quant_min, qt.quant_max))
    with pytest.raises(ValueError, match="channels"):
        fake_quantize(x, qp, axis=2)


# -- bad input -------------------------------------------------------------------------------------

def test_unknown_dtype_lists_valid_ones():
    for bad in ("int16", "INT8", "fp8", torch.int8):
        with pytest.raises(ValueError) as e:
            qparams(1.0, bad)
        for name in DTYPES:
            assert name in str(e.value)


@pytest.mark.parametrize("dtype", list(FP8))
def test_fp8_asymmetric_refused(dtype):
    with pytest.raises(ValueError, match="symmetric"):
        qparams((-1.0, 3.0), dtype, symmetric=False)
    with pytest.raises(ValueError):
        qparams(1.0, dtype, narrow_range=True)
    with pytest.raises(ValueError):
        qparams(1.0, dtype, reduce_range=True)


def test_other_bad_input():
    with pytest.raises(ValueError, match="narrow_range"):
        qparams(1.0, "uint8", narrow_range=True)
    with pytest.raises(ValueError, match="reduce_range"):
        qparams(1.0, "uint8", symmetric=True, reduce_range=True)
    with pytest.raises(ValueError, match="min > max"):
        qparams((torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0])), per_channel=True)
    with pytest.raises(ValueError, match="NaN"):
        qparams((float("nan"), 1.0))
    with pytest.raises(ValueError, match="amax"):
        qparams(torch.tensor([1.0, -2.0]), per_channel=True)
    with pytest.raises(ValueError, match="infinite"):
        qparams((-math.inf, 1.0))
    with pytest.raises(ValueError, match="1-d"):
        qparams(1.0, per_channel=True)
    with pytest.raises(TypeError):
        qparams("1.0")
    with pytest.raises(TypeError):
        qparams((1.0, 2.0, 3.0))
    with pytest.raises(RuntimeError):
        qparams(ChannelStats())  # nothing seen yet
