"""Range searches over a 2048-bin histogram of |x|: calibfast against ModelOpt's HistogramCalibrator.

    python benchmarks/bench_ranges.py [--values 4194304] [--out benchmarks/results/cpu_ranges.md]

One histogram, filled by ModelOpt's HistogramCalibrator.collect() from activation-like data
(randn * exp(randn)); then on that same histogram and those bin edges:
  * ModelOpt:   HistogramCalibrator.compute_amax(method) (entropy, mse, percentile). Its mse search
                as shipped (0.47) and with its fake_tensor_quant call fixed (the value calibfast's
                compat mode reproduces; see calibfast/ranges.py);
  * compat:     calibfast.ranges.modelopt_amax(hist, bin_edges, method): ModelOpt's value, bit for bit
                (the API, then the op alone on prepared tensors);
  * native:     calibfast.ranges.hist_amax(hist, hist_max, method): calibfast's own conventions on the
                same counts (bins uniform from 0, so hist_max = the last edge).
Medians of repeated calls (warm-up first); speed-ups are ModelOpt's median over ours.
"""

import argparse
import importlib.util
import os
import platform
import statistics
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# This checkout's calibfast when none is importable (a fresh clone run without installing); an
# importable one (installed, or another build on PYTHONPATH for an A/B comparison) is left first.
if importlib.util.find_spec("calibfast") is None:
    sys.path.insert(0, ROOT)

import calibfast  # noqa: E402
from calibfast import _ops  # noqa: E402
from calibfast.ranges import hist_amax, modelopt_amax  # noqa: E402


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def median_time(fn, min_runs=5, budget_s=3.0, warmup=2):
    """Median seconds per call: at least min_runs calls, more while under budget_s (max 1000)."""
    for _ in range(warmup):
        fn()
    ts = []
    start = time.perf_counter()
    while len(ts) < min_runs or (time.perf_counter() - start < budget_s and len(ts) < 1000):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), len(ts)


def fmt_t(s):
    return f"{s * 1e3:.1f} ms" if s >= 1e-2 else (f"{s * 1e3:.3f} ms" if s >= 1e-4 else f"{s * 1e6:.1f} µs")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--values", type=int, default=1 << 22, help="values collected into the histogram")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "cpu_ranges.md"))
    args = ap.parse_args()

    warnings.filterwarnings("ignore")
    import modelopt
    from modelopt.torch.quantization import tensor_quant
    from modelopt.torch.quantization.calib import histogram as mo_hist

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    out("# calibfast range searches vs ModelOpt (CPU)")
    out()
    out(f"- command: `python {' '.join([os.path.relpath(sys.argv[0], ROOT)] + sys.argv[1:])}`")
    out(f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.2f} at start")
    out(f"- python {platform.python_version()}, torch {torch.__version__}, nvidia-modelopt {modelopt.__version__}, "
        f"calibfast {calibfast.__version__} (native {calibfast.native_backends()['cpu']}, "
        f"cpu capability {calibfast.cpu_capability()})")

    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.values, generator=g) * torch.exp(torch.randn(args.values, generator=g))
    cal = mo_hist.HistogramCalibrator(num_bits=8, unsigned=False, num_bins=2048)
    cal.collect(x)
    hist, edges = cal._calib_hist, cal._calib_bin_edges
    B = hist.numel()
    hist_max = float(edges[-1])
    out(f"- data: {args.values} values of randn * exp(randn) (seed {args.seed}); ModelOpt histogram: {B} bins over "
        f"[0, {hist_max:.4f}], {int(hist.sum())} counts")
    out()

    # ModelOpt 0.47 passes fake_tensor_quant's arguments positionally into its new `bias`
    # parameter; the fixed call is what compat mode reproduces.
    orig_ftq = mo_hist.fake_tensor_quant

    def fixed_ftq(inputs, amax, num_bits, unsigned):
        return tensor_quant.fake_tensor_quant(inputs, amax, None, num_bits, unsigned)

    def mo_mse_fixed():
        mo_hist.fake_tensor_quant = fixed_ftq
        try:
            return cal.compute_amax("mse")
        finally:
            mo_hist.fake_tensor_quant = orig_ftq

    # Prepared tensors for the ops alone: what modelopt_amax hands them.
    counts = hist.to(torch.int64)
    edges64 = edges.to(torch.float64)
    width = torch.tensor(hist_max / B, dtype=torch.float64)
    ops = {
        "entropy": (lambda: _ops.modelopt_amax_entropy(counts, edges64, 8, False, 1, 128),
                    lambda: _ops.hist_amax_entropy(counts, width, 128, False)),
        "mse": (lambda: _ops.modelopt_amax_mse(counts, edges64, 8, False, 1, 128),
                lambda: _ops.hist_amax_mse(counts, width, "int8")),
        "percentile": (lambda: _ops.modelopt_amax_percentile(counts, edges64, 99.99),
                       lambda: _ops.hist_amax_percentile(counts, width, 99.99)),
    }
    modelopt_fns = {
        "entropy": lambda: cal.compute_amax("entropy"),
        "mse": mo_mse_fixed,
        "percentile": lambda: cal.compute_amax("percentile", percentile=99.99),
    }

    def run_all():
        rows = []
        for method in ("entropy", "mse", "percentile"):
            mo_fn = modelopt_fns[method]
            mo_val = float(mo_fn())
            t_mo, n_mo = median_time(mo_fn, min_runs=3 if method == "entropy" else 7, budget_s=4.0, warmup=1)
            kw = {"percentile": 99.99} if method == "percentile" else {}
            compat_fn = lambda: modelopt_amax(hist, edges, method, **kw)  # noqa: E731
            native_fn = lambda: hist_amax(hist, hist_max, method, **kw)  # noqa: E731
            c_val = float(compat_fn())
            n_val = float(native_fn())
            t_c, _ = median_time(compat_fn)
            t_cop, _ = median_time(ops[method][0])
            t_n, _ = median_time(native_fn)
            t_nop, _ = median_time(ops[method][1])
            rows.append((method, t_mo, n_mo, t_c, t_cop, t_n, t_nop, mo_val, c_val, n_val))
        return rows

    default_threads = torch.get_num_threads()
    for threads in (1, default_threads) if default_threads > 1 else (1,):
        torch.set_num_threads(threads)
        rows = run_all()
        out(f"## torch.set_num_threads({threads}) (ModelOpt and calibfast alike)"
            + ("" if threads == 1 else "; on a shared machine a parallel region can wait a scheduler slice (~4-8 ms) "
               "for a thread whose core is busy, so compare with the load average above"))
        out()
        out("| method | ModelOpt compute_amax | calibfast compat (API) | speed-up | compat (op) | speed-up | "
            "calibfast native (API) | speed-up | native (op) | speed-up |")
        out("|---|---|---|---|---|---|---|---|---|---|")
        for method, t_mo, n_mo, t_c, t_cop, t_n, t_nop, *_ in rows:
            out(f"| {method} | {fmt_t(t_mo)} ({n_mo} runs) | {fmt_t(t_c)} | {t_mo / t_c:.0f}× | {fmt_t(t_cop)} | "
                f"{t_mo / t_cop:.0f}× | {fmt_t(t_n)} | {t_mo / t_n:.0f}× | {fmt_t(t_nop)} | {t_mo / t_nop:.0f}× |")
        out()
    torch.set_num_threads(default_threads)

    t_bug, _ = median_time(lambda: cal.compute_amax("mse"), min_runs=7, budget_s=3.0, warmup=1)
    bug_val = float(cal.compute_amax("mse"))

    out("Values (amax):")
    out()
    out("| method | ModelOpt | calibfast compat | equal | calibfast native |")
    out("|---|---|---|---|---|")
    for method, *_, mo_val, c_val, n_val in rows:
        out(f"| {method} | {mo_val:.7g} | {c_val:.7g} | {'yes' if mo_val == c_val else 'NO'} | {n_val:.7g} |")
    out()
    out(f"ModelOpt's mse row: its search with the `fake_tensor_quant` call fixed (the value compat mode "
        f"reproduces). As shipped, ModelOpt 0.47's mse takes {fmt_t(t_bug)} and returns {bug_val:.7g}, "
        f"the first candidate (centre of bin 128), whatever the data.")
    out("Native mse/entropy/percentile are calibfast's conventions (int8; bin edges as candidates; mse with "
        "values uniform within bins), so their values differ from ModelOpt's by design.")
    out(f"Load average at the end: {os.getloadavg()[0]:.2f}.")

    if args.out:
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")
        print(f"\nwritten to {os.path.relpath(args.out, ROOT)}")


if __name__ == "__main__":
    main()
