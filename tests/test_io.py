"""calibfast.io: the statistics file format (safetensors + JSON metadata)."""

import json
import os
import pickle
import random

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import calibfast
from calibfast import ChannelStats, io
from calibfast.io import StatsFileError

STATE = ("_f", "_d", "_i", "_h", "_he", "_ch", "_che")


def assert_same_stats(a, b):
    assert (a.axis, a.bins, a.channel_bins, a.initialized) == (b.axis, b.bins, b.channel_bins, b.initialized)
    if a.initialized:
        for n in STATE:
            x, y = getattr(a, n), getattr(b, n)
            assert x.dtype == y.dtype and torch.equal(x, y), n


def assert_same_collector(a, b):
    assert a.capture == b.capture
    for side in ("inputs", "outputs"):
        da, db = getattr(a, side), getattr(b, side)
        assert sorted(da) == sorted(db)
        for k in da:
            assert_same_stats(da[k], db[k])
    assert sorted(a.hessians) == sorted(b.hessians)
    for k in a.hessians:
        ha, hb = a.hessians[k], b.hessians[k]
        assert (ha.xtx is None) == (hb.xtx is None)
        if ha.xtx is not None:
            assert torch.equal(ha.xtx, hb.xtx) and torch.equal(ha.count, hb.count)
            assert hb.count.dtype == torch.int64 and hb.count.dim() == 0


def _stats(**kw):
    s = ChannelStats(**kw)
    x = torch.randn(50, 5) * torch.tensor([1e-3, 1.0, 10.0, 1e3, 0.0])
    x[3, 1] = float("nan")
    x[4, 2] = float("inf")
    if s.axis == 0:
        x = x.t()
        s.update(x[:, :20]).update(x[:, 20:] * 3)
    else:
        s.update(x[:20]).update(x[20:] * 3)  # two updates: the exponents' scratch row is set
    return s


def _collector():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Conv1d(6, 3, 1), nn.Linear(5, 2))
    with torch.no_grad(), calibfast.collect(model, capture="both", bins=128, channel_bins=16,
                                            modules=["0", "2", "3"], hessian=True) as col:
        h = model[1](model[0](torch.randn(2, 5, 4)))  # "3" never runs: its stats stay empty
        model[2](h.transpose(1, 2))
    return col


@pytest.mark.parametrize("kw", [dict(), dict(axis=-1, bins=64, channel_bins=8), dict(axis=0, bins=0),
                                dict(bins=2, channel_bins=2)])
def test_channel_stats_round_trip_is_exact(tmp_path, kw):
    s = _stats(**kw)
    p = tmp_path / "s.safetensors"
    io.save(p, s)
    t = io.load(p)
    assert isinstance(t, ChannelStats)
    assert_same_stats(s, t)
    assert t.backend == "dispatch"
    # usable afterwards
    x = torch.randn(3, s.num_channels) if s.axis == -1 else torch.randn(s.num_channels, 3)
    assert_same_stats(s.update(x), t.update(x))


def test_empty_channel_stats_round_trip(tmp_path):
    s = ChannelStats(axis=1, bins=32, channel_bins=4)
    io.save(tmp_path / "e", s)
    t = io.load(tmp_path / "e")
    assert not t.initialized and (t.axis, t.bins, t.channel_bins) == (1, 32, 4)


def test_collector_round_trip_is_exact(tmp_path):
    col = _collector()
    assert not col.inputs["3"].initialized and col.hessians["3"].xtx is None
    p = tmp_path / "c.safetensors"
    io.save(p, col, metadata={"model": "tiny", "data": ["a", "b"], "options": {"bins": 128}})
    got = io.load(p)
    assert isinstance(got, calibfast.Collector)
    assert_same_collector(col, got)
    assert got["0"].axis == -1 and got["2"].axis == -2  # channel axes preserved


def test_metadata_and_plain_safetensors_layout(tmp_path):
    p = tmp_path / "c.safetensors"
    col = _collector()
    io.save(p, col, metadata={"model": "tiny", "n": 3})
    md = io.read_metadata(p)
    assert md["format"] == "calibfast-stats" and md["format_version"] == 1
    assert md["calibfast_version"] == calibfast.__version__ and md["torch_version"] == torch.__version__
    assert md["kind"] == "collector" and md["user"] == {"model": "tiny", "n": 3}
    entries = {e["name"]: e for e in md["contents"]["inputs"]}
    assert entries["0"] == {"name": "0", "axis": -1, "bins": 128, "channel_bins": 16, "num_channels": 4}
    assert entries["3"]["num_channels"] is None
    # any safetensors reader sees named tensors
    with safe_open(str(p), "pt") as f:
        assert f.metadata()["format"] == "calibfast-stats"
        assert torch.equal(f.get_tensor("inputs/0/min"), col.inputs["0"].min)
        assert torch.equal(f.get_tensor("outputs/2/channel_hist"), col.outputs["2"].channel_hist)
        assert torch.equal(f.get_tensor("hessians/0/xtx"), col.hessians["0"].xtx)
        assert not any(k.startswith("inputs/3/") for k in f.keys())


def test_save_is_atomic_and_checks_metadata(tmp_path):
    s = _stats()
    with pytest.raises(TypeError, match="JSON"):
        io.save(tmp_path / "x", s, metadata={"f": object()})
    with pytest.raises(TypeError, match="dict"):
        io.save(tmp_path / "x", s, metadata=["a"])
    with pytest.raises(TypeError, match="ChannelStats or a Collector"):
        io.save(tmp_path / "x", {"a": s})
    with pytest.raises(Exception):
        io.save(tmp_path / "no" / "such" / "dir", s)
    assert os.listdir(tmp_path) == []
    io.save(tmp_path / "x", s)
    io.save(tmp_path / "x", s)  # overwrite
    assert os.listdir(tmp_path) == ["x"]


def test_load_never_unpickles(tmp_path, monkeypatch):
    p = tmp_path / "c"
    io.save(p, _collector())

    def boom(*a, **k):
        raise AssertionError("unpickling during load")

    monkeypatch.setattr(pickle, "loads", boom)
    monkeypatch.setattr(pickle, "load", boom)
    monkeypatch.setattr(torch, "load", boom)
    io.load(p)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda(tmp_path):
    s = _stats(channel_bins=8)
    io.save(tmp_path / "s", s.clone().to("cuda"))
    t = io.load(tmp_path / "s", device="cuda")
    assert t.device.type == "cuda"
    assert_same_stats(s, t.to("cpu"))


# -- errors -------------------------------------------------------------------------------------
def _header(path):
    raw = open(path, "rb").read()
    n = int.from_bytes(raw[:8], "little")
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(path, header, data):
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as fh:
        fh.write(len(h).to_bytes(8, "little") + h + data)


def _resave(src, dst, edit_tensors=None, edit_meta=None):
    """Re-write a statistics file through safetensors with its tensors or metadata changed."""
    tensors = load_file(str(src))
    with safe_open(str(src), "pt") as f:
        meta = dict(f.metadata())
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    save_file(tensors, str(dst), metadata=meta)
    return dst


@pytest.fixture
def saved(tmp_path):
    p = tmp_path / "good.safetensors"
    io.save(p, _collector())
    return p


def test_missing_file(tmp_path):
    with pytest.raises(StatsFileError, match="no statistics file"):
        io.load(tmp_path / "nope")
    with pytest.raises(StatsFileError, match="directory"):
        io.load(tmp_path)
    assert issubclass(StatsFileError, ValueError)


@pytest.mark.parametrize("content", [
    b"", b"abc", random.Random(0).randbytes(4096), b"\x10" + b"\x00" * 7 + b"not json at all!",
    b"\x02" + b"\x00" * 7 + b"[]"], ids=["empty", "short", "random", "notjson", "list"])
def test_not_a_safetensors_file(tmp_path, content):
    p = tmp_path / "bad"
    p.write_bytes(content)
    with pytest.raises(StatsFileError, match="not a safetensors file"):
        io.load(p)


@pytest.mark.parametrize("keep", [0.3, 0.97])
def test_truncated_file(saved, tmp_path, keep):
    raw = saved.read_bytes()
    p = tmp_path / "cut"
    p.write_bytes(raw[:int(len(raw) * keep)])
    with pytest.raises(StatsFileError, match="truncated|corrupt"):
        io.load(p)


def test_corrupt_offsets(saved, tmp_path):
    header, data = _header(saved)
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"][1] += 8
    _write_header(tmp_path / "x", header, data)
    with pytest.raises(StatsFileError, match="corrupt"):
        io.load(tmp_path / "x")


def test_safetensors_file_from_another_program(tmp_path):
    p = tmp_path / "model.safetensors"
    save_file({"weight": torch.randn(3, 3)}, str(p))
    with pytest.raises(StatsFileError, match="not a calibfast statistics file.*no format name"):
        io.load(p)
    save_file({"weight": torch.randn(3, 3)}, str(p), metadata={"format": "pt"})
    with pytest.raises(StatsFileError, match="not a calibfast statistics file.*format 'pt'"):
        io.load(p)


def test_newer_version(saved, tmp_path):
    header, data = _header(saved)
    header["__metadata__"]["format_version"] = "99"
    _write_header(tmp_path / "v99", header, data)
    with pytest.raises(StatsFileError, match="version 99.*reads up to version 1"):
        io.load(tmp_path / "v99")
    with pytest.raises(StatsFileError, match="version 99"):
        io.read_metadata(tmp_path / "v99")


@pytest.mark.parametrize("version", ["0", "abc", None])
def test_invalid_version(saved, tmp_path, version):
    def edit(m):
        if version is None:
            del m["format_version"]
        else:
            m["format_version"] = version
    with pytest.raises(StatsFileError, match="invalid format version"):
        io.load(_resave(saved, tmp_path / "x", edit_meta=edit))


def test_missing_tensor(saved, tmp_path):
    p = _resave(saved, tmp_path / "x", edit_tensors=lambda t: t.pop("inputs/2/sum_sq"))
    with pytest.raises(StatsFileError, match="lacks the tensor 'inputs/2/sum_sq'"):
        io.load(p)
    p = _resave(saved, tmp_path / "y", edit_tensors=lambda t: t.pop("hessians/0/count"))
    with pytest.raises(StatsFileError, match="lacks the tensor 'hessians/0/count'"):
        io.load(p)


@pytest.mark.parametrize("key, value", [
    ("inputs/0/min", torch.zeros(5)),                                   # wrong length
    ("inputs/0/max", torch.zeros(4, dtype=torch.float64)),              # wrong dtype
    ("outputs/2/hist", torch.zeros(64, dtype=torch.int64)),             # wrong bin count
    ("outputs/2/channel_hist", torch.zeros(3, 8, dtype=torch.int64)),
    ("inputs/2/channel_hist_exp", torch.zeros(6, dtype=torch.int64)),
    ("hessians/0/xtx", torch.zeros(4, 5)),
])
def test_misshaped_tensor(saved, tmp_path, key, value):
    def edit(t):
        assert key in t
        t[key] = value
    with pytest.raises(StatsFileError, match=f"tensor '{key}' must be"):
        io.load(_resave(saved, tmp_path / "x", edit_tensors=edit))


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["inputs"][0].update(bins=100), "power of two"),
    (lambda c: c["inputs"][0].update(axis="x"), "integer 'axis'"),
    (lambda c: c["inputs"][0].update(num_channels=-1), "num_channels"),
    (lambda c: c["inputs"].append(dict(c["inputs"][0])), "twice"),
    (lambda c: c.update(capture="all"), "capture"),
    (lambda c: c.update(inputs={}), "list"),
])
def test_invalid_contents(saved, tmp_path, edit, match):
    def edit_meta(m):
        c = json.loads(m["contents"])
        edit(c)
        m["contents"] = json.dumps(c)
    with pytest.raises(StatsFileError, match=match):
        io.load(_resave(saved, tmp_path / "x", edit_meta=edit_meta))


def test_invalid_json_metadata_and_kind(saved, tmp_path):
    with pytest.raises(StatsFileError, match="invalid JSON"):
        io.load(_resave(saved, tmp_path / "a", edit_meta=lambda m: m.update(contents="{")))
    with pytest.raises(StatsFileError, match="unknown kind"):
        io.load(_resave(saved, tmp_path / "b", edit_meta=lambda m: m.update(kind="model")))


def test_histogram_exponent_out_of_range(tmp_path):
    s = _stats(bins=16)
    io.save(tmp_path / "s", s)

    def edit(t):
        t["hist_exp"] = torch.tensor([1000, 0])
    with pytest.raises(StatsFileError, match="exponents out of range"):
        io.load(_resave(tmp_path / "s", tmp_path / "x", edit_tensors=edit))
