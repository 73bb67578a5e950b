#!/usr/bin/env python
"""Benchmark calibfast's fused per-channel statistics op against the usual ways of getting them.

One run, one table: for every shape x dtype it times

  * calibfast            ``ChannelStats(axis=-1).update(x)`` (the fused op; compiled kernel)
  * calibfast reference  the same with ``backend="reference"`` (pure-torch fallback)
  * seed pure-torch      ``x.abs().amin(0)``, ``x.abs().amax(0)``, ``x.amin(0)``, ``x.amax(0)``
  * torch.ao observer    ``PerChannelMinMaxObserver(ch_axis=1)(x)``
  * ModelOpt             ``MaxCalibrator(num_bits=8, axis=1, unsigned=False).collect(x)``
                         (skipped, with a note, when modelopt does not import)
  * x.sum()              the read-once floor

on ``x`` of shape [tokens, channels] (channels last). Before anything is timed, every method's
result is checked against calibfast's pure-torch reference (and the reference against plain
torch), so a broken kernel exits non-zero instead of producing a table.

Note that calibfast computes more than the other methods: min, max, abs-min (abs-max follows),
sum, sum |x|, sum x^2 (float64) and NaN/Inf counts, all in one read of ``x``; the others compute
min/max (or abs-max) only.

    python benchmarks/bench_channel_stats.py                       # 8192x4096, float32 + bfloat16
    python benchmarks/bench_channel_stats.py --shape 2048x4096 --dtype float32
    python benchmarks/bench_channel_stats.py --device cuda --out benchmarks/results/h100_channel_stats

Writes ``<out>.md`` (the table, with the machine header) and ``<out>.json`` (raw numbers).
"""

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import warnings

import torch
import torch.utils.benchmark as tb

HERE = os.path.dirname(os.path.abspath(__file__))

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}

# Method keys, in table order, with their labels.
METHODS = {
    "calibfast": "calibfast ChannelStats(bins=0).update: per-channel stats (fused, compiled)",
    "calibfast_reference": "calibfast backend=\"reference\" (pure torch, bins=0)",
    "seed_torch": "seed pure-torch (abs().amin/amax + amin/amax, dim 0)",
    "torch_ao": "torch.ao PerChannelMinMaxObserver(ch_axis=1)",
    "modelopt": "ModelOpt MaxCalibrator(axis=1).collect",
    "calibfast_hist": "calibfast stats + 2048-bin |x| histogram (fused, compiled)",
    "calibfast_chist": "calibfast stats + 2048-bin histogram + 256-bin per-channel histograms",
    "modelopt_hist": "ModelOpt MaxCalibrator(axis=1) + HistogramCalibrator(2048 bins) collect",
    "torch_ao_hist": "torch.ao HistogramObserver(2048 bins) forward",
    "sum_floor": "x.sum() (read-once floor)",
    "copy_floor": "y.copy_(x) (copy: reads and writes x's bytes)",
    # CUDA only: the version 2 row kernel (CALIBFAST_CUDA_ROWS=2), opt-in until measured on a GPU
    "calibfast_v2": "calibfast stats, CUDA row kernel version 2",
    "calibfast_hist_v2": "calibfast stats + 2048-bin histogram, CUDA row kernel version 2",
}
CUDA_ONLY = {"calibfast_v2", "calibfast_hist_v2"}
# Which calibfast row each method is compared with ("vs calibfast" = same work).
BASELINE = {"modelopt_hist": "calibfast_hist", "torch_ao_hist": "calibfast_hist",
            "calibfast_hist_v2": "calibfast_hist"}


class SanityError(RuntimeError):
    pass


# ---- inputs ------------------------------------------------------------------------------------
def parse_shape(s):
    try:
        dims = tuple(int(d) for d in s.lower().replace(",", "x").split("x") if d)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {s!r}; expected e.g. 8192x4096") from None
    if len(dims) < 2 or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"bad shape {s!r}; need >= 2 positive dims ([..., tokens, channels])")
    return dims


def make_input(shape, dtype, device, seed=0):
    """Activation-like data: N(0, 1) with a few outlier channels, generated in float32."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    C = shape[-1]
    scale = torch.ones(C)
    scale[torch.randperm(C, generator=g)[: max(1, C // 64)]] = 20.0
    x.mul_(scale)
    return x.to(device=device, dtype=dtype).contiguous()


def nbytes(x):
    return x.numel() * x.element_size()


# ---- the methods -------------------------------------------------------------------------------
def _import_modelopt():
    """MaxCalibrator class, or (None, reason)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from modelopt.torch.quantization.calib import MaxCalibrator
        return MaxCalibrator, None
    except Exception as e:  # ImportError, or a missing optional dependency
        return None, f"{type(e).__name__}: {e}".splitlines()[0][:200]


def make_methods(x, include=None):
    """{key: (callable, result_fn)} for ``x`` [..., C]; ``result_fn`` returns the per-channel
    tensors the method computed (for the sanity check). Also returns {key: note} for skipped
    methods."""
    import calibfast
    from torch.ao.quantization.observer import PerChannelMinMaxObserver

    include = list(METHODS) if include is None else include
    x2 = x.reshape(-1, x.shape[-1])  # [tokens, channels]: a view for a contiguous x
    methods, skipped = {}, {}

    if "calibfast" in include:
        cs = calibfast.ChannelStats(axis=-1, bins=0)
        methods["calibfast"] = (lambda: cs.update(x), lambda: cs)
    if "calibfast_reference" in include:
        cr = calibfast.ChannelStats(axis=-1, bins=0, backend="reference")
        methods["calibfast_reference"] = (lambda: cr.update(x), lambda: cr)
    if "calibfast_hist" in include:
        ch = calibfast.ChannelStats(axis=-1, bins=2048)
        methods["calibfast_hist"] = (lambda: ch.update(x), lambda: ch)
    if "calibfast_chist" in include:
        cc = calibfast.ChannelStats(axis=-1, bins=2048, channel_bins=256)
        methods["calibfast_chist"] = (lambda: cc.update(x), lambda: cc)
    if "torch_ao_hist" in include:
        from torch.ao.quantization.observer import HistogramObserver
        hobs = HistogramObserver(bins=2048).to(x.device)
        methods["torch_ao_hist"] = (lambda: hobs(x2), lambda: {"min": hobs.min_val.expand(1),
                                                                 "max": hobs.max_val.expand(1)})
    if "modelopt_hist" in include:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                from modelopt.torch.quantization.calib import HistogramCalibrator, MaxCalibrator as MC
            mcal = MC(num_bits=8, axis=1, unsigned=False)
            hcal = HistogramCalibrator(num_bits=8, axis=None, unsigned=True, num_bins=2048)

            def mo_pair():
                mcal.collect(x2)
                hcal.collect(x2)
            methods["modelopt_hist"] = (mo_pair, lambda: {"absmax": mcal.compute_amax().reshape(-1)})
        except Exception as e:  # noqa: BLE001
            skipped["modelopt_hist"] = f"modelopt histogram calibrator unavailable ({type(e).__name__}: {e})"[:200]
    if "seed_torch" in include:
        out = {}

        def seed():
            a = x2.abs()
            out["absmin"] = a.amin(dim=0)
            out["absmax"] = a.amax(dim=0)
            out["min"] = x2.amin(0)
            out["max"] = x2.amax(0)
            return out
        methods["seed_torch"] = (seed, lambda: out)
    if "torch_ao" in include:
        obs = PerChannelMinMaxObserver(ch_axis=1).to(x.device)
        methods["torch_ao"] = (lambda: obs(x2), lambda: {"min": obs.min_val, "max": obs.max_val})
    if "modelopt" in include:
        MaxCalibrator, why = _import_modelopt()
        if MaxCalibrator is None:
            skipped["modelopt"] = f"modelopt did not import ({why})"
        else:
            cal = MaxCalibrator(num_bits=8, axis=1, unsigned=False)
            methods["modelopt"] = (lambda: cal.collect(x2),
                                   lambda: {"absmax": cal.compute_amax().reshape(-1)})
    if "sum_floor" in include:
        methods["sum_floor"] = (lambda: x.sum(), None)
    if "copy_floor" in include:
        y = torch.empty_like(x)
        methods["copy_floor"] = (lambda: y.copy_(x), None)
    for key, bins in (("calibfast_v2", 0), ("calibfast_hist_v2", 2048)):
        if key in include:
            if x.device.type != "cuda":
                skipped[key] = "CUDA only"
                continue
            cv = calibfast.ChannelStats(axis=-1, bins=bins)
            methods[key] = (_rows_v2(lambda cv=cv: cv.update(x)), lambda cv=cv: cv)
    return methods, skipped


def _rows_v2(fn):
    """fn run with CALIBFAST_CUDA_ROWS=2 (read by the CUDA op on every update)."""
    def run():
        old = os.environ.get("CALIBFAST_CUDA_ROWS")
        os.environ["CALIBFAST_CUDA_ROWS"] = "2"
        try:
            fn()
        finally:
            if old is None:
                del os.environ["CALIBFAST_CUDA_ROWS"]
            else:
                os.environ["CALIBFAST_CUDA_ROWS"] = old
    return run


# ---- sanity ------------------------------------------------------------------------------------
def _same(name, got, want):
    got = got.float().cpu().reshape(-1)
    want = want.float().cpu().reshape(-1)
    if got.shape != want.shape or not torch.equal(got, want):
        bad = (got != want).nonzero().reshape(-1)[:5].tolist() if got.shape == want.shape else "shape"
        raise SanityError(f"{name}: differs from the reference (first differing channels: {bad}; "
                          f"got {got.shape}, want {want.shape})")


def _close(name, got, want, scale, rtol):
    got, want, scale = (t.double().cpu() for t in (got, want, scale))
    err = ((got - want).abs() / scale.clamp_min(1e-300)).max().item()
    if not err <= rtol:  # also catches NaN
        raise SanityError(f"{name}: max error {err:.3g} (relative to {rtol:.1g} allowed) against the reference")


def check_stats_equal(name, st, ref, sum_rtol):
    """Exact for min/max/abs-min/abs-max and the counts, sums to ``sum_rtol`` (relative to
    sum |x|: the compiled kernels add float32 chunk sums into float64)."""
    for k in ("min", "max", "absmin", "absmax"):
        _same(f"{name} {k}", getattr(st, k), getattr(ref, k))
    for k in ("count", "nan_count", "inf_count"):
        if not torch.equal(getattr(st, k).cpu(), getattr(ref, k).cpu()):
            raise SanityError(f"{name} {k}: differs from the reference")
    _close(f"{name} sum", st.sum, ref.sum, ref.sum_abs, sum_rtol)
    _close(f"{name} sum_abs", st.sum_abs, ref.sum_abs, ref.sum_abs, sum_rtol)
    _close(f"{name} sum_sq", st.sum_sq, ref.sum_sq, ref.sum_sq, sum_rtol)


def sum_rtol_for(dtype):
    return 1e-12 if dtype == torch.float64 else 2e-5


def check_nonfinite(device, dtype):
    """The compiled kernel's slow path (NaN/Inf in a chunk) against the reference, on a small
    tensor with non-finite values in a few places."""
    import calibfast
    x = make_input((300, 257), dtype, device, seed=1)
    x[3, 5] = float("nan")
    x[100, 5] = float("inf")
    x[200, 7] = -float("inf")
    x[:, 9] = float("nan")
    a = calibfast.ChannelStats(axis=-1).update(x).update(x[:37])
    r = calibfast.ChannelStats(axis=-1, backend="reference").update(x).update(x[:37])
    check_stats_equal(f"calibfast {dtype} with NaN/Inf", a, r, sum_rtol_for(dtype))


def sanity_check(x, methods):
    """Runs every method once on ``x`` and compares what it computed with calibfast's reference;
    raises SanityError on any difference. The reference itself is compared with plain torch."""
    import calibfast
    ref = calibfast.ChannelStats(axis=-1, backend="reference").update(x)
    x2 = x.reshape(-1, x.shape[-1]).float()
    truth = {"min": x2.amin(0), "max": x2.amax(0), "absmin": x2.abs().amin(0), "absmax": x2.abs().amax(0)}
    for k, v in truth.items():
        _same(f"reference {k} vs torch", getattr(ref, k), v)
    _close("reference sum vs torch", ref.sum, x2.double().sum(0), x2.double().abs().sum(0), 1e-9)
    for key, (fn, result) in methods.items():
        if key == "calibfast_reference" or result is None:
            continue
        fn()
        got = result()
        if isinstance(got, calibfast.ChannelStats):
            check_stats_equal(f"{key} {x.dtype}", got, ref, sum_rtol_for(x.dtype))
            if got.bins:
                rh = calibfast.ChannelStats(axis=-1, bins=got.bins, backend="reference").update(x)
                _same(f"{key} {x.dtype} hist", got.hist, rh.hist)
        elif key == "torch_ao_hist":
            _same(f"{key} {x.dtype} min", got["min"], ref.min.min().expand(1))
            _same(f"{key} {x.dtype} max", got["max"], ref.max.max().expand(1))
        else:
            for k, v in got.items():
                _same(f"{key} {x.dtype} {k}", v, getattr(ref, k))


# ---- timing ------------------------------------------------------------------------------------
def time_method(fn, min_run_time, warmup=2):
    """Warm up, then one blocked_autorange(min_run_time); returns the torch.utils.benchmark
    Measurement (its median is over the timed blocks)."""
    for _ in range(warmup):
        fn()
    # Timer defaults to num_threads=1: pass the process's thread count so that every method
    # (calibfast's kernel and torch's reductions alike) runs with the same threads.
    t = tb.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return t.blocked_autorange(min_run_time=min_run_time)


def machine_info(device):
    import calibfast
    cpu_model = None
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    cpu_model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu_model or platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "calibfast": calibfast.__version__,
        "cpu_capability": calibfast.cpu_capability(),
        "native_backends": calibfast.native_backends(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": shlex.join([os.path.basename(sys.executable)] + sys.argv),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info


def _fmt_ratio(r):
    return "" if r is None or not math.isfinite(r) else f"{r:.2f}x"


def render(info, rows, notes, shapes):
    multi_shape = len(shapes) > 1
    head = [
        "# calibfast per-channel statistics benchmark",
        "",
        f"- machine: {info['cpu']}, {info['cpu_count']} cores (affinity {info['affinity']}), "
        f"torch.get_num_threads() = {info['torch_threads']}",
    ]
    if info["device"] == "cuda":
        head.append(f"- GPU: {info['gpu']} (CUDA {info['cuda']})")
    head += [
        f"- torch {info['torch']}, calibfast {info['calibfast']}, cpu_capability = {info['cpu_capability']!r}, "
        f"native_backends = {info['native_backends']}",
        f"- device {info['device']}; shape{'s' if multi_shape else ''} "
        f"{', '.join('x'.join(map(str, s)) for s in shapes)} (tokens x channels, channels last); "
        f"load average at start {info['loadavg']}",
        f"- date {info['date']}",
        f"- command: `{info['command']}`",
        "",
    ]
    copy = any(r.get("of_copy") is not None for r in rows)
    cols = (["shape"] if multi_shape else []) + [
        "method", "dtype", "median ms", "IQR ms", "GB/s", "vs calibfast", "vs x.sum() floor"] + (
        ["of copy bandwidth"] if copy else [])
    align = (["---"] if multi_shape else []) + ["---", "---", "---:", "---:", "---:", "---:", "---:"] + (
        ["---:"] if copy else [])
    lines = ["| " + " | ".join(cols) + " |", "| " + " | ".join(align) + " |"]
    for r in rows:
        cells = (["x".join(map(str, r["shape"]))] if multi_shape else []) + [
            METHODS[r["method"]], r["dtype"]]
        if r.get("skipped"):
            cells += ["skipped", "", "", "", ""] + ([""] if copy else [])
        else:
            cells += [f"{r['median_s'] * 1e3:.3f}", f"{r['iqr_s'] * 1e3:.3f}", f"{r['gb_per_s']:.1f}",
                      _fmt_ratio(r["vs_calibfast"]), _fmt_ratio(r["vs_floor"])]
            if copy:
                cells.append("" if r.get("of_copy") is None else f"{100 * r['of_copy']:.0f}%")
        lines.append("| " + " | ".join(cells) + " |")
    foot = [
        "",
        "Median of torch.utils.benchmark blocked_autorange blocks (after warm-up). GB/s = bytes of x "
        "read once / median time. \"vs calibfast\" = time / the time of the calibfast row doing the same work "
        "(the stats row, or the stats + histogram row for the histogram peers: how many times slower); "
        "\"vs x.sum() floor\" = time / x.sum()'s time. calibfast computes min, max, abs-min (abs-max), "
        "sum, sum|x|, sum x^2 and NaN/Inf counts in one read; the others min/max or abs-max only. "
        "Every method's results were checked against calibfast's reference before timing."
        + (" \"of copy bandwidth\" = (bytes of x / time) / (2 x bytes of x / the copy's time): the "
           "copy reads and writes every byte, and its bandwidth counts both, as CUDA's bandwidthTest "
           "does for device-to-device copies." if copy else ""),
    ]
    if notes:
        foot.append("")
    foot += [f"- note: {n}" for n in notes]
    return "\n".join(head + lines + foot) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, action="append",
                   help="tokens x channels, e.g. 8192x4096 (repeatable; default 8192x4096)")
    p.add_argument("--dtype", nargs="+", choices=list(DTYPES), default=["float32", "bfloat16"])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--methods", nargs="+", choices=list(METHODS), default=None,
                   help="subset of methods (calibfast and sum_floor are always kept for the ratios; "
                        "default: all, the CUDA-only ones on --device cuda only)")
    p.add_argument("--min-run-time", type=float, default=2.0,
                   help="seconds of timing per method per shape/dtype (default 2)")
    p.add_argument("--rounds", type=int, default=2,
                   help="split each method's timing into this many rounds, interleaved with the "
                        "other methods (helps on noisy machines; default 2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default=None,
                   help="output prefix; writes <out>.md and <out>.json "
                        "(default benchmarks/results/<device>_channel_stats)")
    p.add_argument("--allow-no-native", action="store_true",
                   help="time even when the device has no compiled kernel (the calibfast row is then "
                        "the pure-torch fallback)")
    args = p.parse_args(argv)

    shapes = args.shape or [(8192, 4096)]
    out = args.out or os.path.join(HERE, "results", f"{args.device}_channel_stats")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.methods is None:
        args.methods = [m for m in METHODS if args.device == "cuda" or m not in CUDA_ONLY]
    keep = {"calibfast", "sum_floor"} | {BASELINE[m] for m in args.methods if m in BASELINE}
    methods_wanted = [m for m in METHODS if m in set(args.methods) | keep]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import calibfast
    for w in caught:
        if "compiled kernels did not load" in str(w.message):
            print(f"WARNING: {w.message}", file=sys.stderr)
    info = machine_info(args.device)
    notes = []
    if not info["native_backends"].get(args.device):
        msg = (f"calibfast has no compiled kernel for {args.device} (native_backends = "
               f"{info['native_backends']}); the 'calibfast' row would be the pure-torch fallback")
        if not args.allow_no_native:
            print(f"error: {msg}. Rebuild, or pass --allow-no-native.", file=sys.stderr)
            return 2
        notes.append(msg)

    # Sanity first: nothing is timed unless every method agrees with the reference.
    inputs = {}
    try:
        for dt in args.dtype:
            check_nonfinite(args.device, DTYPES[dt])
        for shape in shapes:
            for dt in args.dtype:
                x = make_input(shape, DTYPES[dt], args.device)
                ms, skipped = make_methods(x, methods_wanted)
                sanity_check(x, ms)
                inputs[(shape, dt)] = x
                for k, why in skipped.items():
                    if why not in notes:
                        notes.append(f"{METHODS[k]} skipped: {why}")
                del ms
    except SanityError as e:
        print(f"SANITY CHECK FAILED, no table produced: {e}", file=sys.stderr)
        return 1
    print("sanity check passed: every method agrees with calibfast's reference", file=sys.stderr)

    rows, raw = [], []
    for shape in shapes:
        for dt in args.dtype:
            x = inputs[(shape, dt)]
            ms, skipped = make_methods(x, methods_wanted)
            measurements = {k: [] for k in ms}
            for _ in range(max(1, args.rounds)):
                for k, (fn, _res) in ms.items():
                    print(f"  timing {'x'.join(map(str, shape))} {dt} {k} ...", file=sys.stderr, flush=True)
                    measurements[k].append(time_method(fn, args.min_run_time / max(1, args.rounds)))
            merged = {k: tb.Measurement.merge(v)[0] for k, v in measurements.items()}
            t_floor = merged["sum_floor"].median
            t_copy = merged["copy_floor"].median if "copy_floor" in merged else None
            for k in METHODS:
                if k not in methods_wanted:
                    continue
                base = {"shape": list(shape), "dtype": dt, "method": k, "label": METHODS[k]}
                if k in skipped:
                    rows.append({**base, "skipped": skipped[k]})
                    continue
                m = merged[k]
                t = m.median
                row = {**base, "median_s": t, "iqr_s": m.iqr, "mean_s": m.mean,
                       "gb_per_s": nbytes(x) / t / 1e9,
                       "vs_calibfast": t / merged[BASELINE.get(k, "calibfast")].median
                       if BASELINE.get(k, "calibfast") in merged else float("nan"),
                       "vs_calibfast_row": BASELINE.get(k, "calibfast"), "vs_floor": t / t_floor,
                       "of_copy": None if t_copy is None else t_copy / (2 * t),
                       "bytes": nbytes(x), "number_per_run": m.number_per_run,
                       "times_s": list(m.times)}
                rows.append(row)
            del ms
    # Flag what makes a table untrustworthy (the lead reads the notes, not the JSON).
    la = info["loadavg"]
    if la and info["cpu_count"] and la[0] > 0.5 * info["cpu_count"]:
        notes.append(f"load average {la[0]:.2f} at start on {info['cpu_count']} cores: other processes were "
                     "running; multi-threaded torch rows (x.sum() included) are likely inflated")
    for r in rows:
        if r["method"] != "sum_floor" and not r.get("skipped") and r["vs_floor"] < 0.9:
            notes.append(f"{r['label']} ({r['dtype']}, {'x'.join(map(str, r['shape']))}) timed faster than the "
                         "x.sum() floor: the floor measurement is unreliable (noise or thread contention)")
    table = render(info, rows, notes, shapes)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(table)
    with open(out + ".json", "w") as f:
        json.dump({"machine": info, "shapes": [list(s) for s in shapes], "dtypes": args.dtype,
                   "min_run_time": args.min_run_time, "rounds": args.rounds, "notes": notes,
                   "rows": rows}, f, indent=1)
    print(f"wrote {out}.md and {out}.json", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
