"""calibfast.distributed.all_reduce across 2 and 3 gloo processes on the CPU.

One spawn per world size runs every scenario in sequence (a process group costs seconds to start
on a small machine); each rank checks its own state against the single-process result on the
concatenated data and writes a JSON report; the tests read the reports. The process group has a
short timeout and the spawn a deadline, so a rank stuck in a collective fails the test instead of
hanging it.
"""

import datetime
import hashlib
import json
import os
import time
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import calibfast
from calibfast import ChannelStats
from calibfast.distributed import all_reduce

BINS, CBINS, C = 64, 8, 6
PG_TIMEOUT_S = 20
DEADLINE_S = 90

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")


# -- data ---------------------------------------------------------------------------------------
def _has_data(k, world):
    return not (world == 3 and k == world - 1)  # with 3 ranks the last one sees nothing


def _random_shard(k, world):
    """Gaussian data whose range differs by shard (so the histogram ranges differ), with NaN/Inf."""
    if not _has_data(k, world):
        return None
    g = torch.Generator().manual_seed(100 + k)
    x = torch.randn(7 + 3 * k, C, generator=g) * 4.0 ** k
    x[k, k % C] = float("nan")
    x[k + 1, (k + 2) % C] = float("inf") if k % 2 else -float("inf")
    return x


def _dyadic_shard(k, world):
    """Quarters in [-8, 8] (rank 3, channel axis 1): every partial sum is exact."""
    if not _has_data(k, world):
        return None
    g = torch.Generator().manual_seed(200 + k)
    return torch.randint(-32, 33, (2 + k, C, 3), generator=g).float() / 4


def _model():
    g = torch.Generator().manual_seed(7)
    m = nn.Sequential(nn.Linear(C, 8), nn.ReLU(), nn.Linear(8, 4))
    with torch.no_grad():  # small integer weights: every activation and every sum is exact
        for lin in (m[0], m[2]):
            lin.weight.copy_(torch.randint(-1, 2, lin.weight.shape, generator=g).float())
            lin.bias.copy_(torch.randint(-2, 3, lin.bias.shape, generator=g).float())
    return m


def _model_shard(k, world):
    if not _has_data(k, world):
        return None
    g = torch.Generator().manual_seed(300 + k)
    return torch.randint(-3, 4, (3 + k, 2, C), generator=g).float()


def _concat(shard_fn, world, dim=0):
    return torch.cat([x for x in (shard_fn(k, world) for k in range(world)) if x is not None], dim)


# -- checks -------------------------------------------------------------------------------------
_STATE = ("_f", "_d", "_i", "_h", "_he", "_ch", "_che")


def _diff(got, want, exact_sums=True):
    """Names of the state tensors that differ (the exponents' scratch row 1 excluded)."""
    if got._f is None or want._f is None:
        return [] if got._f is None and want._f is None else ["initialized"]
    out = []
    for n in ("_f", "_i", "_h", "_ch"):
        if not torch.equal(getattr(got, n), getattr(want, n)):
            out.append(n)
    for n in ("_he", "_che"):
        if not torch.equal(getattr(got, n)[0], getattr(want, n)[0]):
            out.append(n)
    if exact_sums:
        if not torch.equal(got._d, want._d):
            out.append("_d")
    else:  # the CPU kernel adds up to 64 values in float32 first (README, Exactness): 1e-5 of sum |x|
        bound = 1e-5 * torch.stack([want._d[1], want._d[1], want._d[2]]) + 1e-30
        if not bool(((got._d - want._d).abs() <= bound).all()):
            out.append("_d (beyond 1e-5 of sum |x|)")
    if (got.bins, got.channel_bins) != (want.bins, want.channel_bins):
        out.append("bins")
    return out


def _digest(objs):
    h = hashlib.sha256()
    for o in objs:
        if isinstance(o, ChannelStats):
            h.update(repr((o.bins, o.channel_bins, o.num_channels)).encode())
            ts = [getattr(o, n) for n in _STATE] if o._f is not None else []
        else:  # InputHessian
            ts = [o.xtx, o.count] if o.xtx is not None else []
        for t in ts:
            h.update(t.contiguous().numpy().tobytes())
    return h.hexdigest()


def _collector_objs(c):
    return ([c.inputs[n] for n in sorted(c.inputs)] + [c.outputs[n] for n in sorted(c.outputs)]
            + [c.hessians[n] for n in sorted(c.hessians)])


# -- scenarios (run on every rank, in this order) ------------------------------------------------
def sc_random(rank, world):
    s = ChannelStats(axis=-1, bins=BINS, channel_bins=CBINS)
    x = _random_shard(rank, world)
    if x is not None:
        s.update(x[: 3])
        s.update(x[3:])  # two updates: the scratch rows differ from the reference's
    all_reduce(s)
    ref = ChannelStats(axis=-1, bins=BINS, channel_bins=CBINS).update(_concat(_random_shard, world))
    return {"diff": _diff(s, ref, exact_sums=False), "digest": _digest([s])}


def sc_dyadic(rank, world):
    s = ChannelStats(axis=1, bins=BINS, channel_bins=CBINS)
    x = _dyadic_shard(rank, world)
    if x is not None:
        s.update(x)
    all_reduce(s)
    ref = ChannelStats(axis=1, bins=BINS, channel_bins=CBINS).update(_concat(_dyadic_shard, world))
    return {"diff": _diff(s, ref), "digest": _digest([s])}


def sc_collector(rank, world):
    model = _model()
    with torch.no_grad(), calibfast.collect(model, capture="both", bins=BINS, channel_bins=CBINS,
                                            hessian=True) as col:
        x = _model_shard(rank, world)
        if x is not None:
            model(x)
    out = all_reduce(col)
    with torch.no_grad(), calibfast.collect(model, capture="both", bins=BINS, channel_bins=CBINS,
                                            hessian=True) as ref:
        model(_concat(_model_shard, world))
    diff = [f"{side}[{n}]: {d}" for side in ("inputs", "outputs")
            for n in sorted(getattr(ref, side)) for d in _diff(getattr(col, side)[n], getattr(ref, side)[n])]
    for n in sorted(ref.hessians):
        if not (torch.equal(col.hessians[n].xtx, ref.hessians[n].xtx)
                and torch.equal(col.hessians[n].count, ref.hessians[n].count)):
            diff.append(f"hessians[{n}]")
    return {"diff": diff, "same_object": out is col, "digest": _digest(_collector_objs(col))}


def sc_empty_ranks_adopt(rank, world):
    # only rank 0 has data; the others hold empty stats built with other bin counts
    if rank == 0:
        s = ChannelStats(bins=BINS, channel_bins=CBINS).update(_random_shard(0, world))
    else:
        s = ChannelStats(bins=2048, channel_bins=0)
    all_reduce(s)
    ref = ChannelStats(bins=BINS, channel_bins=CBINS).update(_random_shard(0, world))
    return {"diff": _diff(s, ref), "digest": _digest([s])}


def sc_all_empty(rank, world):
    s = ChannelStats(bins=BINS)
    all_reduce(s)
    return {"diff": [] if not s.initialized else ["initialized"], "digest": _digest([s])}


def _error_of(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return None


def sc_channel_mismatch(rank, world):
    n = C - 1 if rank == world - 1 else C
    s = ChannelStats(bins=BINS, channel_bins=CBINS).update(torch.randn(4, n))
    return {"error": _error_of(lambda: all_reduce(s))}


def sc_bins_mismatch(rank, world):
    s = ChannelStats(bins=BINS if rank else 2 * BINS).update(torch.randn(4, C))
    return {"error": _error_of(lambda: all_reduce(s))}


def sc_names_mismatch(rank, world):
    model = _model()
    modules = ["0"] if rank == world - 1 else None
    with torch.no_grad(), calibfast.collect(model, modules=modules) as col:
        model(torch.randn(2, C))
    return {"error": _error_of(lambda: all_reduce(col))}


def sc_kind_mismatch(rank, world):
    obj = ChannelStats() if rank == 0 else calibfast.Collector("input")
    return {"error": _error_of(lambda: all_reduce(obj))}


def sc_usable_after_errors(rank, world):
    s = ChannelStats(bins=BINS).update(torch.full((2, C), float(rank + 1)))
    all_reduce(s)
    want = ChannelStats(bins=BINS).update(
        torch.cat([torch.full((2, C), float(r + 1)) for r in range(world)]))
    return {"diff": _diff(s, want), "digest": _digest([s])}


SCENARIOS = [sc_random, sc_dyadic, sc_collector, sc_empty_ranks_adopt, sc_all_empty, sc_channel_mismatch,
             sc_bins_mismatch, sc_names_mismatch, sc_kind_mismatch, sc_usable_after_errors]


def _worker(rank, world, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    report = {}
    try:
        for sc in SCENARIOS:
            t0 = time.perf_counter()
            try:
                report[sc.__name__] = sc(rank, world)
            except Exception:
                report[sc.__name__] = {"crash": traceback.format_exc()}
            report[sc.__name__]["seconds"] = time.perf_counter() - t0
    finally:
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as fh:
            json.dump(report, fh)
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 3], ids=lambda w: f"world{w}")
def reports(request, tmp_path_factory):
    world = request.param
    d = tmp_path_factory.mktemp(f"dist{world}")
    ctx = mp.start_processes(_worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + DEADLINE_S
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world} ranks did not finish within {DEADLINE_S} s (a collective hung?)")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for r in range(world):
        with open(d / f"rank{r}.json") as fh:
            out.append(json.load(fh))
    return out


def _results(reports, name):
    res = [rep[name] for rep in reports]
    for r, x in enumerate(res):
        assert "crash" not in x, f"rank {r} crashed in {name}:\n{x['crash']}"
    return res


@pytest.mark.parametrize("name", ["sc_random", "sc_dyadic", "sc_collector", "sc_empty_ranks_adopt",
                                  "sc_all_empty", "sc_usable_after_errors"])
def test_every_rank_equals_one_process_on_all_the_data(reports, name):
    res = _results(reports, name)
    for r, x in enumerate(res):
        assert x["diff"] == [], f"rank {r}: {name}: differs from the single-process result in {x['diff']}"
    # and the ranks agree with each other bit for bit, sums and scratch rows included
    assert len({x["digest"] for x in res}) == 1, f"{name}: the ranks' states differ"


def test_collector_all_reduce_returns_its_argument(reports):
    assert all(x["same_object"] for x in _results(reports, "sc_collector"))


@pytest.mark.parametrize("name, words", [
    ("sc_channel_mismatch", ["channels", "rank"]),
    ("sc_bins_mismatch", ["bins=128", "bins=64"]),
    ("sc_names_mismatch", ["different modules", "only on rank 0"]),
    ("sc_kind_mismatch", ["different kinds"]),
])
def test_disagreeing_ranks_all_raise_the_same_error(reports, name, words):
    errors = [x["error"] for x in _results(reports, name)]
    assert errors[0] is not None, f"{name}: no error raised"
    assert errors[0].startswith("ValueError: calibfast.all_reduce")
    assert all(e == errors[0] for e in errors), f"{name}: the ranks raised different errors: {errors}"
    for w in words:
        assert w in errors[0]


def test_not_initialized_is_a_clear_error():
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        all_reduce(ChannelStats())


def test_wrong_type_is_rejected(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="ChannelStats or a Collector"):
            all_reduce({"a": ChannelStats()})
        # a world of one: a no-op that keeps the state
        s = ChannelStats(bins=BINS, channel_bins=CBINS).update(torch.randn(5, C))
        before = s.clone()
        all_reduce(s)
        assert all(torch.equal(getattr(s, n), getattr(before, n)) for n in ("_f", "_d", "_i", "_h", "_ch"))
        assert torch.equal(s._he[0], before._he[0]) and torch.equal(s._che[0], before._che[0])
    finally:
        dist.destroy_process_group()
