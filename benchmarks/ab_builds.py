"""A/B timing of two builds of calibfast, as session 6 measured them (benchmarks/NOTES.md, v33-v39).

Build the older commit in a clone (`git clone . /tmp/old && cd /tmp/old && git checkout REV &&
CALIBFAST_CUDA=0 python setup.py build_ext --inplace`), then alternate processes, e.g.

    for i in 1 2 3; do for d in /tmp/old "$PWD"; do
        PYTHONPATH=$d python benchmarks/ab_builds.py short $d; done; done

and read the fastest figure of each build. The script refuses to run when the calibfast it imports
does not come from BUILD_DIR (two "builds" that were one build twice is the usual A/B mistake).

Cases (times in µs unless marked):
  redo       4096 x 4096 float32: randn, -inf in channel 7 of every row, every value ~1e-25 (ms)
  short      NCHW with small maps against the same values as tokens x channels
  group      NCHW 7 x 7 / 14 x 14 maps with 8 to 64 samples (grouped rows from 40 samples, short runs
             below: compare builds with different kGroupMinRows)
  small      per-call time of small updates
  observers  calibfast.integrations.torch_ao observers against torch.ao's own
  hist       the global histogram's cost (session 7, v40: the branch-free scatter): stats alone and
             with 2048 bins, randn and "crowded" data (an outlier channel 64x the rest, so that most
             values fall in the lowest bins, as in MiniLM's activations), MiniLM's shapes and
             8192 x 4096 (ms)
  chist      the same with 256-bin per-channel histograms (rows, NCHW runs)
  fewrows    per-channel histograms of many channels and few rows (session 13, v54: each tile's
             counters added into the state from L1): 256 x 65536 (also bfloat16), 600 x 2061 and 4096 x 4096 with
             2048 + 256 bins, 300 x 1029 with 2048 + 2048 bins (ms)
  s14        session 14's A/B figures (v55-v58, Intel Xeon AVX-512 host): stats + 2048 bins on
             4096 x 4096, 8192 x 4096 and 1728 x 384 in float32 and bfloat16; 16-bit statistics
             alone (bins=0) on 8192 x 4096, 4096 x 4100, 2048 x 16384 and 1728 x 384 (ms; 1728 x 384 in us)
  bf16       16-bit rows (session 8, v42: bfloat16 16 channels a step as pairs; v44: float16 widened by
             F16C): 8192 x 4096, 2048 x 16384, 1728 x 384 and an odd width in bfloat16, 8192 x 4096,
             1728 x 384 and NCHW 4 x 2048 x 7 x 7 in float16, stats alone and with 2048 bins, and
             x.sum() as the floor (ms)
"""

import argparse
import sys
import time

import torch


def crowd(x):
    """"Crowded" data, as MiniLM's activations: channel 3 made 64x the rest, so that most values fall
    in the lowest bins of the global histogram (in place; returns x)."""
    x[..., 3] *= 64
    return x


def best(fn, n, reps):
    b = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        b = min(b, (time.perf_counter() - t0) / n)
    return b


def stats_case(shapes, bins_list, n_for, scale_ms=False):
    from calibfast import ChannelStats
    out = []
    for shape, axis, make, *label in shapes:
        x = make(shape)
        name = f"{label[0]} " if label else ""
        for bins in bins_list:
            bins, cbins = bins if isinstance(bins, tuple) else (bins, 0)
            s = ChannelStats(axis=axis, bins=bins, channel_bins=cbins).update(x)
            t = best(lambda: s.update(x), n_for(x), 5)
            out.append(f"{name}{tuple(shape)} bins={bins}" + (f"+{cbins}" if cbins else "") + ": " + (f"{t * 1e3:.2f} ms" if scale_ms else f"{t * 1e6:.0f}"))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("case", choices=["redo", "short", "group", "small", "observers", "hist", "chist", "bf16", "fewrows", "s14"])
    ap.add_argument("build_dir")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    import calibfast
    if not calibfast.__file__.startswith(a.build_dir):
        sys.exit(f"calibfast comes from {calibfast.__file__}, not {a.build_dir}: set PYTHONPATH={a.build_dir}")
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    randn = lambda shape: torch.randn(shape, generator=g)  # noqa: E731
    crowded = lambda shape: crowd(randn(shape))  # noqa: E731

    if a.case == "redo":
        def neg_inf(shape):
            x = randn(shape)
            x[:, 7] = -float("inf")
            return x
        out = stats_case([((4096, 4096), -1, randn, "randn"), ((4096, 4096), -1, neg_inf, "-inf"),
                          ((4096, 4096), -1, lambda s: randn(s) * 1e-25, "tiny")], (0, 2048), lambda x: 7,
                         scale_ms=True)
    elif a.case == "short":
        out = stats_case([((1, 2048, 7, 7), 1, randn), ((49, 2048), -1, randn), ((4, 2048, 7, 7), 1, randn),
                          ((196, 2048), -1, randn), ((2, 512, 14, 14), 1, randn), ((392, 512), -1, randn)],
                         (0, 2048), lambda x: 300)
    elif a.case == "group":
        out = stats_case([((n, 2048, 7, 7), 1, randn) for n in (8, 16, 32, 64)]
                         + [((16, 512, 14, 14), 1, randn), ((48, 512, 14, 14), 1, randn)], (0, 2048), lambda x: 100)
    elif a.case == "small":
        out = stats_case([(s, -1, randn) for s in ((16, 384), (128, 384), (16, 4096), (1, 4096))], (0,),
                         lambda x: 1000)
    elif a.case == "chist":
        out = stats_case([((1728, 384), -1, randn, "randn"), ((1728, 384), -1, crowded, "crowded"),
                          ((4, 256, 28, 28), 1, randn, "randn")], (0, (2048, 256)), lambda x: 30)
        out += stats_case([((8192, 4096), -1, randn, "randn")], (0, (2048, 256)), lambda x: 3, scale_ms=True)
    elif a.case == "s14":
        bf = lambda s: randn(s).bfloat16()  # noqa: E731
        hf = lambda s: randn(s).half()  # noqa: E731
        big = [((4096, 4096), -1, randn, "f32"), ((4096, 4096), -1, bf, "bf16"),
               ((8192, 4096), -1, randn, "f32"), ((8192, 4096), -1, bf, "bf16")]
        out = stats_case(big, (2048,), lambda x: 10, scale_ms=True)
        out += stats_case([((1728, 384), -1, randn, "f32"), ((1728, 384), -1, bf, "bf16")], (2048,),
                          lambda x: 200)
        for mk, name in ((bf, "bf16"), (hf, "f16")):
            out += stats_case([((8192, 4096), -1, mk, name), ((4096, 4100), -1, mk, name),
                               ((2048, 16384), -1, mk, name)], (0,), lambda x: 10, scale_ms=True)
            out += stats_case([((1728, 384), -1, mk, name)], (0,), lambda x: 200)
    elif a.case == "fewrows":
        out = stats_case([((256, 65536), -1, randn, "randn"), ((256, 65536), -1, lambda s: randn(s).bfloat16(), "bf16"),
                          ((600, 2061), -1, randn, "randn"),
                          ((4096, 4096), -1, randn, "randn")], ((2048, 256),), lambda x: 5, scale_ms=True)
        out += stats_case([((300, 1029), -1, randn, "randn")], ((2048, 2048),), lambda x: 20, scale_ms=True)
    elif a.case == "bf16":
        bf = lambda s: randn(s).bfloat16()  # noqa: E731
        out = stats_case([((8192, 4096), -1, bf), ((2048, 16384), -1, bf), ((1728, 384), -1, bf),
                          ((4096, 4100), -1, bf)], (0, 2048), lambda x: 5, scale_ms=True)
        hf = lambda s: randn(s).half()  # noqa: E731
        out += stats_case([((8192, 4096), -1, hf, "f16"), ((1728, 384), -1, hf, "f16"), ((4, 2048, 7, 7), 1, hf, "f16")],
                          (0, 2048), lambda x: 5, scale_ms=True)
        x = bf((8192, 4096))
        out.append(f"x.sum() (8192, 4096): {best(lambda: x.sum(), 5, 5) * 1e3:.1f} ms")
    elif a.case == "hist":
        small = [((1728, 384), -1, randn, "randn"), ((1728, 384), -1, crowded, "crowded"),
                 ((1728, 1536), -1, crowded, "crowded"), ((1728, 384), -1, lambda s: crowded(s).bfloat16(), "bf16"),
                 ((4, 2048, 7, 7), 1, randn, "randn")]
        out = stats_case(small, (0, 2048), lambda x: 100)
        out += stats_case([((8192, 4096), -1, randn, "randn"), ((8192, 4096), -1, crowded, "crowded")], (0, 2048),
                          lambda x: 5, scale_ms=True)
    else:
        from torch.ao.quantization import observer as ao
        from calibfast.integrations import torch_ao as cao
        out = []
        for shape in ((16, 384), (512, 4096)):
            x = randn(shape)
            for name, mk in (("MinMax", cao.MinMaxObserver), ("ao.MinMax", ao.MinMaxObserver),
                             ("PerChannel", lambda: cao.PerChannelMinMaxObserver(ch_axis=1)),
                             ("ao.PerChannel", lambda: ao.PerChannelMinMaxObserver(ch_axis=1))):
                o = mk()
                o(x)
                out.append(f"{shape} {name}: {best(lambda: o(x), 300 if shape[0] == 16 else 20, 5) * 1e6:.0f}")
    print(a.build_dir, f"threads={a.threads}", " | ".join(out))


if __name__ == "__main__":
    main()
