#!/usr/bin/env python
"""Time per byte of ``ChannelStats.update`` across layouts of the same number of bytes.

Linear-layer activations are ``[tokens, C]`` with the channel axis last; conv activations are
``N x C x H x W`` with the channel axis 1 (each channel a run of H x W contiguous values per
sample), or channels last. This times the update (statistics only; statistics + 2048-bin
histogram; and the same with ``--channel-bins`` per-channel histograms too) for each layout at a
fixed size, against ``x.sum()`` on the same tensor (one read), and reports each as a multiple of
the floor and of the ``4096 x 4096``-shaped tensor's time per byte: "as fast per byte as the
linear-layer layout" means a ratio of 1.

    python benchmarks/bench_layouts.py                       # 64 MiB float32, bfloat16 and float16
    python benchmarks/bench_layouts.py --mib 16 --rounds 5 --out /tmp/layouts

Every layout's statistics are first checked against calibfast's pure-torch reference on a small
tensor of the same layout. Timings: the fastest and the median of ``--rounds`` rounds, each round
running every layout once in turn (so load on a shared machine hits them alike).
"""

import argparse
import datetime
import os
import shlex
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_ranges import _cpu_name  # noqa: E402  (the benchmarks' machine line)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def layouts(values):
    """(label, shape, axis, permute-to-make) for tensors of `values` values (a multiple of 2^20)."""
    n = values
    return [
        ("tokens x 4096, axis -1 (the reference)", (n // 4096, 4096), -1, None),
        ("tokens x 64, axis -1", (n // 64, 64), -1, None),
        ("tokens x 256, axis -1", (n // 256, 256), -1, None),
        ("tokens x 1024, axis -1", (n // 1024, 1024), -1, None),
        ("tokens x 16384, axis -1", (n // 16384, 16384), -1, None),
        ("tokens x 65536, axis -1", (n // 65536, 65536), -1, None),
        ("tokens x 4096 stored channel-major (x.t()), axis -1", (4096, n // 4096), -1, "transpose"),
        ("N x 64 x 64 x 64 (NCHW), axis 1", (n // (64 * 4096), 64, 64, 64), 1, None),
        ("N x 256 x 16 x 16 (NCHW), axis 1", (n // (256 * 256), 256, 16, 16), 1, None),
        ("N x 512 x 7 x 7 (NCHW), axis 1", (n // (512 * 49), 512, 7, 7), 1, None),
        ("N x 1024 x 3 x 3 (NCHW), axis 1", (n // (1024 * 9), 1024, 3, 3), 1, None),
        ("N x 64 x 64 x 64 (channels last), axis 1", (n // (64 * 4096), 64, 64, 64), 1, "channels_last"),
    ]


def make(shape, dtype, how, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if how == "transpose":  # [C, tokens] storage seen as [tokens, C]: each channel contiguous
        x = x.t()
    if how == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def check(dtype, channel_bins):
    """Each layout against the reference on a small tensor of that layout (exits 1 on a mismatch)."""
    import calibfast
    for label, shape, axis, how in layouts(1 << 20):
        small = tuple(max(2, s // 8) if i == 0 else s for i, s in enumerate(shape))
        x = make(small, dtype, how, seed=1)
        for bins, cb in ((0, 0), (2048, 0), (2048, channel_bins)):
            a = calibfast.ChannelStats(axis=axis, bins=bins, channel_bins=cb).update(x)
            r = calibfast.ChannelStats(axis=axis, bins=bins, channel_bins=cb, backend="reference").update(x)
            for k in ("min", "max", "absmin", "count"):
                if not torch.equal(getattr(a, k), getattr(r, k)):
                    sys.exit(f"SANITY CHECK FAILED: {label} {dtype} bins={bins}: {k} differs from the reference")
            if bins and not torch.equal(a.hist, r.hist):
                sys.exit(f"SANITY CHECK FAILED: {label} {dtype}: histogram differs from the reference")
            if cb and not torch.equal(a.channel_hist, r.channel_hist):
                sys.exit(f"SANITY CHECK FAILED: {label} {dtype}: per-channel histograms differ from the reference")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mib", type=int, default=64, help="tensor size in MiB of float32 (default 64)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16", "float16"])
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--channel-bins", type=int, default=256,
                   help="per-channel histogram bins of the third measurement (0: leave it out; default 256)")
    p.add_argument("--out", default=os.path.join(HERE, "results", "cpu_layouts"),
                   help="writes <out>.md (default benchmarks/results/cpu_layouts)")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = p.parse_args(argv)
    import calibfast
    if args.threads:
        torch.set_num_threads(args.threads)
    values = (args.mib << 20) // 4
    lines = ["# Time per byte across layouts: `ChannelStats.update`", "",
             f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
             f"torch {torch.__version__}, cpu_capability {calibfast.cpu_capability()!r}",
             f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
             f"load average at start {[round(v, 2) for v in os.getloadavg()]}",
             f"- command: `{shlex.join(['python', 'benchmarks/bench_layouts.py'] + argv)}`",
             f"- {args.mib} MiB of float32 per tensor ({values} values; bfloat16 and float16: the same values, half the bytes); "
             f"{args.rounds} rounds, every layout once per round", ""]
    for dt in args.dtype:
        dtype = DTYPES[dt]
        check(dtype, args.channel_bins)
        cases = []
        keys = ["stats", "hist"] + (["chist"] if args.channel_bins else [])
        for label, shape, axis, how in layouts(values):
            x = make(shape, dtype, how)
            states = {"stats": calibfast.ChannelStats(axis=axis, bins=0),
                      "hist": calibfast.ChannelStats(axis=axis, bins=2048)}
            if args.channel_bins:
                states["chist"] = calibfast.ChannelStats(axis=axis, bins=2048, channel_bins=args.channel_bins)
            for st in states.values():
                st.update(x)
            cases.append((label, shape, x, states, {k: [] for k in ["sum"] + keys}))
        for _ in range(args.rounds):
            for label, shape, x, states, t in cases:
                for key in ["sum"] + keys:
                    fn = x.sum if key == "sum" else states[key].update
                    a = time.perf_counter()
                    fn() if key == "sum" else fn(x)
                    t[key].append(time.perf_counter() - a)
        # per value (the NCHW shapes hold a few values fewer than the others)
        ref = {k: min(cases[0][4][k]) / cases[0][2].numel() for k in keys}
        head = "| layout | shape | x.sum() ms | stats ms | × floor | × reference | stats + hist ms | × floor | × reference |"
        rule = "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"
        if args.channel_bins:
            head += f" + {args.channel_bins}-bin channel hists ms | × floor | × reference |"
            rule += " ---: | ---: | ---: |"
        lines += [f"## {dt}", "", head, rule]
        for label, shape, x, states, t in cases:
            fs = min(t["sum"])
            n = x.numel()
            row = f"| {label} | {' x '.join(map(str, shape))} | {fs * 1e3:.2f} |"
            for k in keys:
                v = min(t[k])
                row += f" {v * 1e3:.2f} | {v / fs:.2f} | {v / n / ref[k]:.2f} |"
            lines.append(row)
        lines.append("")
    lines += ["Fastest of the rounds (the medians move with this machine's load; the fastest is the "
              "kernel's own cost). × floor: over x.sum() on the same tensor; × reference: time per value "
              "over the tokens x 4096 tensor's (1.00 = as fast per byte)."]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out + ".md", "w") as f:
        f.write(text)
    print(f"wrote {args.out}.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
