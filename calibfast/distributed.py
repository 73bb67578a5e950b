"""Merge calibration statistics across the ranks of a ``torch.distributed`` process group.

:func:`all_reduce` leaves every rank holding what a single process would hold after seeing the
data of all the ranks: min and abs-min reduced with MIN, max with MAX, the float64 sums and the
int64 counts with SUM, and the |x| histograms with their ranges aligned first (the exponents
reduced with MAX, each rank's counts re-binned to the common range with
:func:`calibfast._reference.grow_hist`, which is exact since bins nest, then SUM). The collectives
run on the device of the statistics: NCCL for CUDA tensors, gloo for CPU tensors (a group with
both, ``init_process_group("cpu:gloo,cuda:nccl")``, works for either).

Calibration under ``torchrun`` (``torchrun --nproc-per-node=8 calibrate.py``)::

    # calibrate.py
    import os
    import torch
    import torch.distributed as dist
    import calibfast
    from calibfast import io
    from calibfast.distributed import all_reduce

    dist.init_process_group("nccl")               # "gloo" for a CPU-only run
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    model = build_model().cuda().eval()           # the same model on every rank
    batches = calibration_batches()               # the same list, in the same order, on every rank

    with torch.inference_mode(), calibfast.collect(model, capture="input") as stats:
        for batch in batches[rank::world]:        # this rank's shard
            model(batch.cuda())

    all_reduce(stats)                             # every rank now holds the statistics of all batches
    if rank == 0:
        io.save("calib_stats.safetensors", stats, metadata={"model": "my-model", "data": "shard-0..7"})
    dist.destroy_process_group()

Every rank must call :func:`all_reduce` (it is a collective) with the same kind of object; a
:class:`~calibfast.Collector` must hold the same module names on every rank (their statistics
may be empty: a rank whose shard never reached a module, or that saw no data at all, is fine).

Exactness: min, max, abs-min, abs-max, every count (values, NaN, Inf, histogram bins) and the
histogram ranges come out bit for bit equal to one process that saw all the data, whatever the
sharding (the same invariant :meth:`ChannelStats.merge` has). The float64 sums (``sum``,
``sum_abs``, ``sum_sq``) are added in another order than one process would add them (rank
partials, in the collective's order), so they can differ from it in the last bits; they are exact
whenever the partial sums are (e.g. data of small integers or dyadic values).

Cost: one ``all_gather_object`` of a small header (the module names, and per statistic whether
it holds data, its channel count, bin counts and device type), then at most four tensor
collectives for all the statistics together, however many layers (one MAX of the histogram
exponents, one MIN of the float32 min/-max/abs-min, one SUM of the float64 sums, one SUM of the
int64 counts and histograms), plus the SUM of the GPTQ input Hessians (``collect(hessian=True)``)
in buckets of at most 64 MiB. Apart from the header (which only holds what the host knows
already: shapes, flags) nothing is read back to the host.

The header is checked before any data collective, so that when the ranks disagree (a different
channel count, different bin counts, different module names, states on different device types)
every rank raises the same ``ValueError`` instead of hanging. A rank whose statistic is empty
adopts the channel count and bin counts of the ranks that have data.

After the call the scratch row of the histogram exponents (``_he[1]`` / ``_che[1]``, "the exponent
before the last update", rewritten by every update) equals the range row on every rank.
"""

import torch
import torch.distributed as dist

from . import _reference
from .hooks import Collector
from .stats import ChannelStats

__all__ = ["all_reduce"]

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "hpu", "mps", "meta", "privateuseone")
_HESSIAN_BUCKET_BYTES = 64 << 20


def all_reduce(stats_or_collector, group=None):
    """Merge a :class:`~calibfast.ChannelStats` or a :class:`~calibfast.Collector` across the
    ranks of ``group`` (default: the world), in place, so that every rank ends with the statistics
    of the data all ranks saw. A collective: every rank of the group must call it. Returns its
    argument.

    Raises ``ValueError`` on every rank (before any data is exchanged) when the ranks disagree on
    what they hold: the kind of object, the module names, or for a statistic that holds data on
    several ranks, its channel count, its bin counts or its device type.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("calibfast.all_reduce: torch.distributed is not initialized "
                           "(call torch.distributed.init_process_group first)")
    obj = stats_or_collector
    if isinstance(obj, ChannelStats):
        desc = {"kind": "channel_stats", "names": None, "stats": [_header(obj)], "hessians": []}
        stats, hessians = [obj], []
    elif isinstance(obj, Collector):
        ins, outs, hes = sorted(obj.inputs), sorted(obj.outputs), sorted(obj.hessians)
        stats = [obj.inputs[n] for n in ins] + [obj.outputs[n] for n in outs]
        hessians = [obj.hessians[n] for n in hes]
        desc = {"kind": "collector", "names": (ins, outs, hes), "stats": [_header(s) for s in stats],
                "hessians": [_hess_header(h) for h in hessians]}
    else:
        raise TypeError(f"calibfast.all_reduce expects a ChannelStats or a Collector, got {type(obj).__name__}")

    world = dist.get_world_size(group)
    descs = [None] * world
    dist.all_gather_object(descs, desc, group=group)
    plan = _plan(descs, group)  # raises the same error on every rank
    if plan is not None:
        with torch.no_grad(), torch.inference_mode(False):
            _reduce(stats, hessians, plan, group)
    return obj


# -- header -----------------------------------------------------------------------------------
def _device_code(device):
    t = torch.device(device).type
    return _DEVICE_TYPES.index(t) if t in _DEVICE_TYPES else t


def _header(s):
    """(initialized, channels, bins, channel_bins, device type): host-side facts only."""
    if s._f is None:
        return (0, 0, s.bins, s.channel_bins, None)
    return (1, s.num_channels, s.bins, s.channel_bins, _device_code(s.device))


def _hess_header(h):
    if h.xtx is None:
        return (0, 0, None)
    return (1, h.xtx.shape[0], _device_code(h.xtx.device))


def _type_name(code):
    return _DEVICE_TYPES[code] if isinstance(code, int) else str(code)


def _group_device_types(group):
    """Device types the group's backend can run collectives on (None when unknown)."""
    pg = group if group is not None else dist.group.WORLD
    types = getattr(pg, "_device_types", None)
    if types:
        return {torch.device(d).type for d in types}
    try:
        config = dist.get_backend_config(group)
    except Exception:  # pragma: no cover - older torch
        return None
    out = set()
    for part in str(config).split(","):
        dev, _, backend = part.rpartition(":")
        if dev:
            out.add(dev)
        elif backend == "nccl":
            out.add("cuda")
        elif backend == "gloo":
            out.update(("cpu", "cuda"))
        else:
            return None
    return out or None


def _describe_names(names_per_rank, side):
    """Error text for ranks holding different module names on one side."""
    ref = names_per_rank[0]
    for r, names in enumerate(names_per_rank[1:], 1):
        if names != ref:
            a, b = set(ref), set(names)
            only0, onlyr = sorted(a - b)[:5], sorted(b - a)[:5]
            detail = f"rank 0 has {len(ref)}, rank {r} has {len(names)}"
            if only0:
                detail += f"; only on rank 0: {only0}"
            if onlyr:
                detail += f"; only on rank {r}: {onlyr}"
            return (f"calibfast.all_reduce: the ranks hold statistics for different modules ({side}): {detail}. "
                    "Hook the same modules on every rank (collect(model, modules=...)).")
    return None


def _plan(descs, group):
    """Check the gathered headers (identically on every rank) and decide what to reduce."""
    kinds = [d["kind"] for d in descs]
    if len(set(kinds)) != 1:
        raise ValueError(f"calibfast.all_reduce: the ranks passed different kinds of statistics: "
                         f"{dict(enumerate(kinds))}")
    if kinds[0] == "collector":
        for i, side in enumerate(("inputs", "outputs", "hessians")):
            msg = _describe_names([d["names"][i] for d in descs], side)
            if msg:
                raise ValueError(msg)
    names = descs[0]["names"]
    labels = []
    if names is None:
        labels.append("the ChannelStats")
    else:
        labels += [f"inputs[{n!r}]" for n in names[0]] + [f"outputs[{n!r}]" for n in names[1]]
    stat_plan, devs = [], set()
    for k, label in enumerate(labels):
        rows = [d["stats"][k] for d in descs]
        have = [(r, row) for r, row in enumerate(rows) if row[0]]
        if not have:
            stat_plan.append(None)
            continue
        shapes = {row[1:4] for _, row in have}
        if len(shapes) != 1:
            seen = ", ".join(f"rank {r}: {row[1]} channels, bins={row[2]}, channel_bins={row[3]}" for r, row in have)
            raise ValueError(f"calibfast.all_reduce: {label} differs across ranks ({seen}); every rank must "
                             "hook the same modules with the same histogram sizes")
        devs.update(row[4] for _, row in have)
        stat_plan.append(have[0][1][1:4])
    hess_plan = []
    hnames = names[2] if names is not None else []
    for k, n in enumerate(hnames):
        rows = [d["hessians"][k] for d in descs]
        have = [(r, row) for r, row in enumerate(rows) if row[0]]
        if not have:
            hess_plan.append(None)
            continue
        if len({row[1] for _, row in have}) != 1:
            seen = ", ".join(f"rank {r}: {row[1]}" for r, row in have)
            raise ValueError(f"calibfast.all_reduce: the input Hessian of {n!r} has different sizes across ranks "
                             f"({seen})")
        devs.update(row[2] for _, row in have)
        hess_plan.append(have[0][1][1])
    if not devs:
        return None  # nothing anywhere: every rank stays empty
    if len(devs) != 1:
        raise ValueError("calibfast.all_reduce: the statistics live on different device types across ranks or "
                         f"modules ({sorted(_type_name(c) for c in devs)}); move them to one (ChannelStats.to)")
    dev_type = _type_name(devs.pop())
    supported = _group_device_types(group)
    if supported is not None and dev_type not in supported:
        raise ValueError(f"calibfast.all_reduce: the statistics are on {dev_type} but the process group's backend "
                         f"({dist.get_backend(group)}) runs collectives on {sorted(supported)}; use NCCL for CUDA "
                         "tensors and gloo for CPU tensors, or move the statistics")
    return {"stats": stat_plan, "hessians": hess_plan, "device_type": dev_type}


# -- data ---------------------------------------------------------------------------------------
def _comm_device(stats, hessians, dev_type):
    for s in stats:
        if s._f is not None:
            return s.device
    for h in hessians:
        if h.xtx is not None:
            return h.xtx.device
    if dev_type == "cpu":
        return torch.device("cpu")
    mod = getattr(torch, dev_type, None)
    if mod is not None and hasattr(mod, "current_device"):
        return torch.device(dev_type, mod.current_device())
    return torch.device(dev_type)


def _copy_back(dsts, flat):
    """Copy the slices of ``flat`` (in order) into ``dsts``."""
    srcs = torch.split(flat, [d.numel() for d in dsts])
    srcs = [s.view(d.shape) for s, d in zip(srcs, dsts)]
    if dsts and all(d.device == flat.device for d in dsts) and hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dsts, srcs)
    else:
        for d, s in zip(dsts, srcs):
            d.copy_(s)


def _reduce(all_stats, all_hessians, plan, group):
    dev = _comm_device(all_stats, all_hessians, plan["device_type"])
    stats = []
    for s, p in zip(all_stats, plan["stats"]):
        if p is None:
            continue
        if s._f is None:  # no data on this rank: take the shape of the ranks that have some
            C, s.bins, s.channel_bins = p
            s._allocate(C, dev)
        s._epoch += 1  # its state changes below
        stats.append(s)
    hessians = []
    for h, C in zip(all_hessians, plan["hessians"]):
        if C is None:
            continue
        if h.xtx is None:
            h.xtx = torch.zeros(C, C, dtype=torch.float32, device=dev)
            h.count = torch.zeros((), dtype=torch.int64, device=dev)
        hessians.append(h)

    def on(t):
        return t if t.device == dev else t.to(dev)

    op = dist.ReduceOp

    # 1. Histogram ranges: MAX of the exponents, then every rank re-bins to the common range.
    hists = [s for s in stats if s.bins]
    chists = [s for s in stats if s.channel_bins]
    if hists or chists:
        exps = torch.cat([on(s._he[:1]) for s in hists] + [on(s._che[0]) for s in chists])
        dist.all_reduce(exps, op=op.MAX, group=group)
        new = torch.split(exps, [1] * len(hists) + [s.num_channels for s in chists])
        for s, e in zip(hists, new[:len(hists)]):
            e = e.to(s._he.device)
            _reference.grow_hist(s._h, s._he[0], e[0])
            s._he.copy_(e.expand(2))
        for s, e in zip(chists, new[len(hists):]):
            e = e.to(s._che.device)
            _reference.grow_hist(s._ch, s._che[0], e)
            s._che.copy_(e.expand(2, -1))

    # 2. min, -max, abs-min in one MIN (negation is exact).
    if stats:
        f = torch.cat([torch.cat([on(s._f[0]) for s in stats]), -torch.cat([on(s._f[1]) for s in stats]),
                       torch.cat([on(s._f[2]) for s in stats])])
        if f.numel():
            dist.all_reduce(f, op=op.MIN, group=group)
            mins, negmax, absmins = f.chunk(3)
            _copy_back([s._f[0] for s in stats], mins)
            _copy_back([s._f[1] for s in stats], -negmax)
            _copy_back([s._f[2] for s in stats], absmins)

    # 3. float64 sums.
    if stats:
        d = torch.cat([on(s._d).reshape(-1) for s in stats])
        if d.numel():
            dist.all_reduce(d, op=op.SUM, group=group)
            _copy_back([s._d for s in stats], d)

    # 4. int64 counts, histograms (now on a common range) and Hessian row counts: one SUM.
    ints = [s._i for s in stats] + [s._h for s in hists] + [s._ch for s in chists] + [h.count for h in hessians]
    if ints:
        i = torch.cat([on(t).reshape(-1) for t in ints])
        if i.numel():
            dist.all_reduce(i, op=op.SUM, group=group)
            _copy_back(ints, i)

    # 5. GPTQ input Hessians (float32 XᵀX sums), in buckets.
    buckets, cur, size = [], [], 0
    for h in hessians:
        n = h.xtx.numel() * h.xtx.element_size()
        if cur and size + n > _HESSIAN_BUCKET_BYTES:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(h.xtx)
        size += n
    if cur:
        buckets.append(cur)
    for b in buckets:
        x = torch.cat([on(t).reshape(-1) for t in b])
        if x.numel():
            dist.all_reduce(x, op=op.SUM, group=group)
            _copy_back(b, x)
