#!/usr/bin/env python
"""Small CUDA drivers for the GPU tools that gpu_check.sh runs around the row kernels.

``--mode profile``: steady ``ChannelStats.update`` calls on one large tensor, for each dtype, then
bins, then row-kernel version (in that order; the version shows in the kernel's name), each inside
an NVTX range ``profile`` (the first update of each object, which sets up state, is outside), for
Nsight Compute:

    ncu --clock-control none --nvtx --nvtx-include "profile/" python benchmarks/gpu_profile.py --mode profile

``--mode check``: updates with each version on small, odd-shaped inputs (guarded tails, partial
tiles, NaN/Inf/huge values, growing ranges, both histogram placements) compared with the
pure-torch reference; exits 1 on any difference. Quick enough to run under
``compute-sanitizer --tool memcheck`` (which finds out-of-bounds accesses the comparison cannot).
"""

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _version(v):
    os.environ["CALIBFAST_CUDA_ROWS"] = str(v)


def profile(args):
    import calibfast
    import bench_channel_stats as bcs
    shape = bcs.parse_shape(args.shape)
    for dt in args.dtype:
        x = bcs.make_input(shape, DTYPES[dt], "cuda")
        for bins in args.bins:
            for v in args.versions:
                _version(v)
                s = calibfast.ChannelStats(bins=bins).update(x)  # first update: state, range
                torch.cuda.synchronize()
                for _ in range(args.updates):
                    torch.cuda.nvtx.range_push("profile")
                    s.update(x)
                    torch.cuda.nvtx.range_pop()
                torch.cuda.synchronize()
                print(f"profiled v{v} {dt} bins={bins} {args.shape}", flush=True)
    return 0


def check(args):
    from calibfast import ChannelStats
    from test_channel_stats import _special, assert_stats_match
    cases = [((1000, 8), torch.float32), ((37, 132), torch.float16), ((3, 5, 256), torch.bfloat16),
             ((129, 4100), torch.bfloat16), ((70, 516), torch.float32), ((1, 128), torch.bfloat16)]
    failures = 0
    for shape, dtype in cases:
        g = torch.Generator().manual_seed(3)
        x = torch.randn(shape, generator=g)
        x[..., ::17] *= 300.0
        x = _special(x.to(dtype)).to(args.device)
        n = x.shape[0]
        for bins in (0, 2048, 8192):
            for v in args.versions:
                _version(v)
                s = ChannelStats(bins=bins)
                ref = ChannelStats(bins=bins, backend="reference")
                for part in (x[: max(1, n // 3)] / 64, x[max(1, n // 3):], x):
                    if part.shape[0] == 0:
                        continue
                    s.update(part)
                    ref.update(part)
                try:
                    assert_stats_match(s, ref, dtype, what=f"v{v} {tuple(shape)} {dtype} bins={bins}: ")
                except AssertionError as e:
                    failures += 1
                    print(f"MISMATCH {e}", flush=True)
    if args.device == "cuda":
        torch.cuda.synchronize()
    print(f"check: {failures} mismatches over {len(cases) * 3 * len(args.versions)} cases", flush=True)
    return 1 if failures else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=["profile", "check"], required=True)
    p.add_argument("--versions", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    p.add_argument("--shape", default="16384x8192", help="profile: tokens x channels")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["bfloat16", "float32"])
    p.add_argument("--bins", type=int, nargs="+", default=[0, 2048], help="profile: histogram bins")
    p.add_argument("--updates", type=int, default=1, help="profile: steady updates per case")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="check: where (cpu only tests this script: the versions are CUDA's)")
    args = p.parse_args(argv)
    if args.mode == "check" and args.device == "cpu":
        return check(args)
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 2
    return profile(args) if args.mode == "profile" else check(args)


if __name__ == "__main__":
    sys.exit(main())
