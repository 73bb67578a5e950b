"""Paired A/B timing inside one process: two (or more) variants of a kernel, call by call.

Why: on the shared 2-core VMs this project is measured on, the same build's time for one shape
moves by up to 1.5x from one process to the next (neighbours' memory traffic), so alternating
processes between two builds (`ab_builds.py`) cannot resolve a 5-10% change without many
alternations. Here every update of the variant under test is paired with an update of the
baseline made right before or after it (the order alternates), so drift common to both cancels in
the per-pair ratio (session 15, benchmarks/NOTES.md).

How: give the C++ code a temporary switch read from an environment variable at a point that runs
once per call (a task's start, a constructor), e.g.

    const char* ab = std::getenv("CALIBFAST_AB");
    const bool old_way = ab && ab[0] == '1';

build once, and run

    python benchmarks/ab_inprocess.py --values 1 0 --case 4096x4096:256:float32:randn --threads 1

Python's `os.environ[...] = v` calls putenv, so the kernel sees the new value at its next call.
Remove the switch before committing: it is a measuring device, not a feature.

Each case is SHAPExCHANNELS:CHANNEL_BINS:DTYPE:DATA with DATA "randn" or "crowded" (`ab_builds.crowd`:
one channel 64x the rest, so that most values fall in the lowest bins, as in MiniLM's activations); the global
histogram has --bins bins. --touch rewrites the input before each call (x.mul_(1): the values stay
the same), as a forward pass leaves a freshly written activation in the cache.

The output gives, per case and value, the fastest and median call, and the median (quartiles) of
the per-pair ratio "baseline time / this value's time": above 1 means faster than the baseline
(the first of --values).
"""

import argparse
import os
import time

import torch

from ab_builds import crowd


def parse_case(spec):
    try:
        shape, cb, dtype, data = spec.split(":")
        shape = tuple(int(v) for v in shape.split("x"))
        cb = int(cb)
        dt = getattr(torch, dtype)
    except (ValueError, AttributeError) as e:
        raise SystemExit(f"bad --case {spec!r} (SHAPE:CHANNEL_BINS:DTYPE:DATA, e.g. 4096x4096:256:float32:randn): {e}")
    if data not in ("randn", "crowded"):
        raise SystemExit(f"bad DATA {data!r} in --case {spec!r}: randn or crowded")
    return shape, cb, dt, data


def quartiles(v):
    v = sorted(v)
    n = len(v)
    return v[n // 4], v[n // 2], v[(3 * n) // 4]


def main(argv=None):
    """Runs the cases; returns {case: {value: [ms per call, one per round]}}."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--var", default="CALIBFAST_AB", help="environment variable the patched kernel reads")
    ap.add_argument("--values", nargs="+", default=["1", "0"], help="its values; the first is the baseline")
    ap.add_argument("--case", action="append", required=True, help="SHAPE:CHANNEL_BINS:DTYPE:DATA (repeatable)")
    ap.add_argument("--bins", type=int, default=2048, help="global histogram bins (0: statistics only)")
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads; 1 times by process time")
    ap.add_argument("--pairs", type=int, default=40, help="rounds; each calls every value once, order rotated")
    ap.add_argument("--touch", action="store_true", help="rewrite the input before each call")
    ap.add_argument("--axis", type=int, default=-1, help="the channel axis (1: NCHW)")
    args = ap.parse_args(argv)
    if len(args.values) < 2:
        raise SystemExit("--values needs at least two values (the baseline first)")

    from calibfast import ChannelStats

    torch.set_num_threads(args.threads)
    clock = time.process_time if args.threads == 1 else time.perf_counter
    results = {}
    print(f"threads {args.threads} ({'process' if args.threads == 1 else 'wall'} time), {args.var} in {args.values}, "
          f"{args.pairs} rounds, bins {args.bins}{', touch' if args.touch else ''}")
    for spec in args.case:
        shape, cb, dt, data = parse_case(spec)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=g)
        if data == "crowded":
            crowd(x)
        x = x.to(dt)
        stats = ChannelStats(axis=args.axis, bins=args.bins, channel_bins=cb)
        stats.update(x)  # the range set, the buffers allocated
        reps = max(1, int(2e6 // x.numel()))  # small tensors: several calls a sample
        times = {v: [] for v in args.values}
        for r in range(args.pairs):
            k = r % len(args.values)
            for v in args.values[k:] + args.values[:k]:
                os.environ[args.var] = v
                total = 0.0
                for _ in range(reps):
                    if args.touch:
                        x.mul_(1)
                    t0 = clock()
                    stats.update(x)
                    total += clock() - t0
                times[v].append(total / reps * 1e3)
        os.environ.pop(args.var, None)
        results[spec] = times
        base = args.values[0]
        parts = []
        for v in args.values:
            _, med, _ = quartiles(times[v])
            cell = f"{args.var}={v}: min {min(times[v]):.3f} med {med:.3f} ms"
            if v != base:
                q1, qm, q3 = quartiles([b / t for b, t in zip(times[base], times[v])])
                cell += f", paired {base}/{v} {qm:.3f} [{q1:.3f}, {q3:.3f}]"
            parts.append(cell)
        print(f"{spec}: " + " | ".join(parts))
    return results


if __name__ == "__main__":
    main()
