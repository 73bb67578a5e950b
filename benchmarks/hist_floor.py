#!/usr/bin/env python
"""The floor of a histogram update on this CPU, measured, next to the floor of one read.

A |x| histogram costs one scattered increment (a load and a store to a counter) per value, and no
exact scheme needs fewer. This script measures what that increment costs on this machine when
nothing else is in the way -- indices already computed and in L1, counters in L1 -- with the C++
microbenchmark benchmarks/hist_floor.cpp (compiled here with the system C++ compiler, -O3
-march=native, one thread), and what one read of the data costs (``x.sum()``, torch's threads).
From the two it prints the lower bound of a statistics + histogram update of a tensor: the
increments alone, spread over the threads, against the read floor.

    python benchmarks/hist_floor.py                    # writes benchmarks/results/cpu_hist_floor.md
    python benchmarks/hist_floor.py --out /tmp/floor   # elsewhere

Numbers are the fastest of ``--reps`` repetitions in each of ``--runs`` runs (a floor, not a
typical time: on a shared machine identical runs differ by up to 1.5x).
"""

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "hist_floor.cpp")

ROWS = {
    "read_f32_memory": "read float32 from memory (vectorised sum over --values values)",
    "read_f32_l1": "read float32 from L1 (vectorised sum, 4096 values)",
    "bin_index_f32_l1": "bin index of float32 abs(x) (vectorised: abs, scale, clamp, convert)",
    "increment_1copy_l1": "one increment per value, 1 copy of 2048 int32 counters",
    "increment_2copies_l1": "one increment per value, 2 interleaved copies",
    "increment_2copies_tested_l1": "the same with a test per value, one index per load (calibfast's to session 6)",
    "increment_2copies_pairs_l1": "2 copies, no test (pads), two indices per 64-bit load (calibfast's)",
    "increment_4copies_l1": "one increment per value, 4 interleaved copies",
    "pattern_count_bf16_l1": "bfloat16 bit-pattern count (calibfast's 16-bit path), data in L1",
    "pattern_count_bf16_memory": "bfloat16 bit-pattern count, data from memory (--values values)",
}


def compile_bench(workdir):
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if cxx is None:
        raise SystemExit("hist_floor: no C++ compiler found (set CXX)")
    exe = os.path.join(workdir, "hist_floor")
    cmd = [cxx, "-O3", "-march=native", "-std=c++17", SOURCE, "-o", exe]
    subprocess.run(cmd, check=True)
    shown = [os.path.basename(cxx)] + cmd[1:4] + [os.path.relpath(SOURCE, os.path.dirname(HERE)), "-o", "hist_floor"]
    return exe, " ".join(shown)


def run_bench(exe, values, reps):
    out = subprocess.run([exe, str(values), str(reps)], check=True, capture_output=True, text=True).stdout
    res = {}
    for line in out.splitlines():
        name, ns = line.split()
        res[name] = float(ns)
    missing = set(ROWS) - set(res)
    if missing:
        raise SystemExit(f"hist_floor: the microbenchmark did not report {sorted(missing)}")
    return res


def sum_floor_ms(shape, dtype, reps):
    import torch

    x = torch.randn(*shape).to(getattr(torch, dtype))
    x.sum()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--values", type=int, default=1 << 24, help="values of the in-memory tests (default 2^24)")
    p.add_argument("--reps", type=int, default=15, help="repetitions; the fastest is kept (default 15)")
    p.add_argument("--runs", type=int, default=3,
                   help="runs of the microbenchmark; the fastest figure of each row is kept (default 3)")
    p.add_argument("--shape", default="8192x4096", help="tensor for the implied bounds (default 8192x4096)")
    p.add_argument("--out", help="output prefix (default benchmarks/results/cpu_hist_floor)")
    args = p.parse_args(argv)
    import torch

    shape = tuple(int(v) for v in args.shape.lower().split("x"))
    values = 1
    for v in shape:
        values *= v
    threads = torch.get_num_threads()
    with tempfile.TemporaryDirectory() as tmp:
        exe, cmd = compile_bench(tmp)
        runs = [run_bench(exe, args.values, args.reps) for _ in range(max(1, args.runs))]
        res = {k: min(r[k] for r in runs) for k in runs[0]}
    floors = {dt: sum_floor_ms(shape, dt, args.reps) for dt in ("float32", "bfloat16")}

    from bench_ranges import _cpu_name  # the benchmarks' machine line (benchmarks/ is on sys.path)

    cpu = _cpu_name()
    lines = [
        "# The histogram's floor on this CPU",
        "",
        f"- machine: {cpu}, {os.cpu_count()} cores, torch.get_num_threads() = {threads}; torch {torch.__version__}",
        f"- date {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}; "
        f"load average at start {list(round(v, 2) for v in os.getloadavg())}",
        f"- command: `python benchmarks/{os.path.basename(__file__)} {' '.join(argv if argv is not None else sys.argv[1:])}`"
        f" (microbenchmark compiled as `{cmd}`)",
        "",
        "| what (one thread) | ns per value |",
        "| --- | ---: |",
    ]
    for key, label in ROWS.items():
        lines.append(f"| {label} | {res[key]:.3f} |")
    inc = res["increment_2copies_pairs_l1"]
    lines += [
        "",
        f"Implied bounds for one update of a {args.shape} tensor on {threads} thread(s): the increments alone take "
        f"values / threads x {inc:.3f} ns (the row of calibfast's increments), whatever else the kernel does.",
        "",
        "| dtype | x.sum() floor, ms | increments alone, ms | increments / floor |",
        "| --- | ---: | ---: | ---: |",
    ]
    inc_ms = values / threads * inc * 1e-6
    for dt, fl in floors.items():
        lines.append(f"| {dt} | {fl:.3f} | {inc_ms:.3f} | {inc_ms / fl:.2f}x |")
    lines += [
        "",
        "The increments bound the histogram from below at the last column's multiple of one read, "
        "before any statistics, index computation or memory traffic; with two threads they assume "
        "the increments scale perfectly across cores.",
    ]
    text = "\n".join(lines) + "\n"
    out = args.out or os.path.join(HERE, "results", "cpu_hist_floor")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(text)
    print(text)
    print(f"wrote {out}.md")


if __name__ == "__main__":
    main()
