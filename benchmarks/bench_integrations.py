"""Calibrating a model through torch.ao's and ModelOpt's own flows, with their observers /
calibrators vs calibfast's drop-in ones (calibfast.integrations).

Model: an MLP stack of ``--layers`` Linear(width, width) with ReLU between, on ``--batches``
batches of [--seqs, --tokens, width] float32 activations (default 4 x 2048, 64 x 128 tokens), CPU.

Timed, per flow, from a freshly prepared model (preparation not timed): the calibration loop
(every batch through the model with the observers / calibrators collecting) plus computing the
ranges (``calculate_qparams`` of every observer; ModelOpt: ``load_calib_amax``). "forward only"
is the same loop through the float model without observers: what any observer costs is the
difference. Medians over ``--reps`` repetitions.

- torch.ao: ``prepare_fx`` with a QConfigMapping whose activation observer is
  ``HistogramObserver(reduce_range=True)`` (per tensor) or ``PerChannelMinMaxObserver(ch_axis=-1)``,
  torch.ao's vs ``calibfast.integrations.torch_ao``'s (weights: PerChannelMinMaxObserver, run at
  convert, not timed).
- ModelOpt: ``mtq.quantize(model, INT8_DEFAULT_CFG, forward_loop)`` (max calibration: per-tensor
  input quantizers, per-channel weight quantizers) with its MaxCalibrator vs calibfast's (in the
  config); histogram: input quantizers with ``calibrator="histogram"``, collection through the
  model, then ``load_calib_amax("entropy")`` / ``("percentile")``, ModelOpt's HistogramCalibrator
  vs calibfast's (swapped in with ``swap_calibrators``).

Also printed: how calibfast's HistogramObserver range differs from torch.ao's (scale ratio per
observer), and that min/max results are identical.

    python benchmarks/bench_integrations.py [--out benchmarks/results/cpu_integrations.md]
"""

import argparse
import copy
import datetime
import os
import platform
import statistics
import sys
import time
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.ao.quantization import QConfig, QConfigMapping  # noqa: E402
from torch.ao.quantization import observer as ao  # noqa: E402
from torch.ao.quantization.quantize_fx import prepare_fx  # noqa: E402

import calibfast  # noqa: E402
from calibfast.integrations import torch_ao as cf  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_ranges import _cpu_name  # noqa: E402  (the benchmarks' machine line)


def make_model(layers, width):
    torch.manual_seed(0)
    mods = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    return nn.Sequential(*mods).eval()


def timed(fn, reps):
    ts = []
    for _ in range(reps):
        setup = fn()  # returns the callable to time (preparation done)
        t = time.perf_counter()
        result = setup()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts), ts, result


def timed_interleaved(setups, reps):
    """{key: (median seconds, last result)}: every repetition runs each setup once, in turn, so
    that slow drifts of a shared machine hit all of them alike."""
    ts = {k: [] for k in setups}
    res = {}
    for _ in range(reps):
        for k, fn in setups.items():
            run = fn()
            t = time.perf_counter()
            res[k] = run()
            ts[k].append(time.perf_counter() - t)
    return {k: (statistics.median(v), res[k]) for k, v in ts.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="write the markdown report here too")
    args = ap.parse_args()

    lines = []

    def out(s=""):
        print(s, flush=True)
        lines.append(s)

    g = torch.Generator().manual_seed(1)
    data = [torch.randn(args.seqs, args.tokens, args.width, generator=g) * (1 + 0.25 * i)
            for i in range(args.batches)]
    model = make_model(args.layers, args.width)

    def loop(m):
        with torch.no_grad():
            for x in data:
                m(x)

    cmd = "python benchmarks/bench_integrations.py" + "".join(" " + a for a in sys.argv[1:])
    out("# calibfast drop-in observers / calibrators vs torch.ao's and ModelOpt's own (CPU)")
    out()
    out(f"- command: `{cmd}`")
    out(f"- date: {datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    out(f"- machine: {_cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, "
        f"load average {load:.2f} at start")
    import modelopt
    import modelopt.torch.quantization as mtq
    from modelopt.torch.quantization.nn import TensorQuantizer

    from calibfast.integrations import modelopt as cfm

    out(f"- python {platform.python_version()}, torch {torch.__version__}, nvidia-modelopt {modelopt.__version__}, "
        f"calibfast {calibfast.__version__} (native {calibfast.native_backends().get('cpu', False)}, "
        f"cpu capability {calibfast.cpu_capability()})")
    out(f"- model: {args.layers} x Linear({args.width}, {args.width}) with ReLU between; {args.batches} calibration "
        f"batches of [{args.seqs}, {args.tokens}, {args.width}] float32; medians of {args.reps} repetitions, each "
        "from a freshly prepared model (preparation not timed), the flows interleaved")
    out()

    rows = []

    def row(flow, peer_t, ours_t, fwd_t, note=""):
        over_peer, over_ours = peer_t - fwd_t, ours_t - fwd_t
        rows.append((flow, peer_t, ours_t, fwd_t, over_peer, over_ours, note))
        print(f"  {flow}: peer {peer_t:.3f} s, calibfast {ours_t:.3f} s, forward {fwd_t:.3f} s", flush=True)

    # forward only
    def fwd_setup():
        m = copy.deepcopy(model)  # a fresh copy, as every flow below gets
        return lambda: loop(m)

    setups = {"forward": fwd_setup}

    # -- torch.ao ---------------------------------------------------------------------------
    wobs = ao.PerChannelMinMaxObserver.with_args(dtype=torch.qint8, qscheme=torch.per_channel_symmetric)

    def ao_flow(act):
        def setup():
            qmap = QConfigMapping().set_global(QConfig(activation=act, weight=wobs))
            prepared = prepare_fx(copy.deepcopy(model), qmap, (data[0],))

            def run():
                loop(prepared)
                obs = {n: o for n, o in prepared.named_modules() if isinstance(o, ao.ObserverBase)}
                return {n: o.calculate_qparams() for n, o in obs.items()}
            return run
        return setup

    results = {}
    for label, peer_act, our_act in [
        ("torch.ao HistogramObserver (per tensor)", ao.HistogramObserver.with_args(reduce_range=True),
         cf.HistogramObserver.with_args(reduce_range=True)),
        ("torch.ao PerChannelMinMaxObserver (ch_axis=-1)", ao.PerChannelMinMaxObserver.with_args(ch_axis=-1),
         cf.PerChannelMinMaxObserver.with_args(ch_axis=-1)),
    ]:
        setups[(label, "peer")] = ao_flow(peer_act)
        setups[(label, "ours")] = ao_flow(our_act)

    # -- ModelOpt ---------------------------------------------------------------------------
    def amaxes(m):
        return {n: q._amax.clone() for n, q in m.named_modules()
                if isinstance(q, TensorQuantizer) and getattr(q, "_amax", None) is not None}

    def mo_max(ours):
        def setup():
            m = copy.deepcopy(model)
            cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
            if ours:
                cfg["quant_cfg"] += [
                    {"quantizer_name": "*weight_quantizer",
                     "cfg": {"num_bits": 8, "axis": 0, "calibrator": (cfm.MaxCalibrator, (8, 0, False), {})}},
                    {"quantizer_name": "*input_quantizer",
                     "cfg": {"num_bits": 8, "axis": None, "calibrator": (cfm.MaxCalibrator, (8, None, False), {})}}]
            return lambda: amaxes(mtq.quantize(m, cfg, loop))
        return setup

    mo_max_label = "ModelOpt mtq.quantize, max (input per tensor, weight per channel)"
    setups[(mo_max_label, "peer")] = mo_max(False)
    setups[(mo_max_label, "ours")] = mo_max(True)

    def mo_hist(ours, method):
        def setup():
            m = copy.deepcopy(model)
            cfg = copy.deepcopy(mtq.INT8_DEFAULT_CFG)
            cfg["quant_cfg"].append({"quantizer_name": "*input_quantizer",
                                     "cfg": {"num_bits": 8, "axis": None, "calibrator": "histogram"}})
            cfg["algorithm"] = None
            m = mtq.quantize(m, cfg, None)
            if ours:
                cfm.swap_calibrators(m)
            qs = {n: q for n, q in m.named_modules() if n.endswith("input_quantizer")}

            def run():
                for q in qs.values():
                    q.disable_quant()
                    q.enable_calib()
                loop(m)
                for q in qs.values():
                    q.load_calib_amax(method)
                    q.enable_quant()
                    q.disable_calib()
                return {n: float(q.amax) for n, q in qs.items()}
            return run
        return setup

    for method in ("entropy", "percentile"):
        setups[(f"ModelOpt histogram calibration + load_calib_amax('{method}')", "peer")] = mo_hist(False, method)
        setups[(f"ModelOpt histogram calibration + load_calib_amax('{method}')", "ours")] = mo_hist(True, method)

    timings = timed_interleaved(setups, args.reps)
    fwd_t = timings.pop("forward")[0]
    labels = list(dict.fromkeys(k[0] for k in timings))
    for label in labels:
        (tp, rp), (to, ro) = timings[(label, "peer")], timings[(label, "ours")]
        results[label] = (rp, ro)
        row(label, tp, to, fwd_t)
    qp, qo = results["torch.ao HistogramObserver (per tensor)"]
    assert qp.keys() == qo.keys() and len(qo) >= args.layers
    ap_, ao_ = results[mo_max_label]
    mo_max_same = ap_.keys() == ao_.keys() and all(torch.equal(ap_[k], ao_[k]) for k in ap_)
    hist_vals = {m: results[f"ModelOpt histogram calibration + load_calib_amax('{m}')"]
                 for m in ("entropy", "percentile")}

    out("## Timings (calibration loop + ranges)")
    out()
    out("| flow | peer | calibfast | speed-up | forward only | peer overhead | calibfast overhead | overhead ratio |")
    out("|---|---|---|---|---|---|---|---|")
    for flow, tp, to, tf, op, oo, note in rows:
        ratio = f"{op / oo:.1f}×" if oo > 0.01 * tf else "n/a (within noise)"
        out(f"| {flow} | {tp:.3f} s | {to:.3f} s | {tp / to:.2f}× | {tf:.3f} s | {op:.3f} s | {oo:.3f} s | {ratio} |")
    out()
    out("The speed-up is of the whole calibration (forward passes included; ModelOpt max: `mtq.quantize` "
        "as a whole, module replacement and weight calibration included); the overhead columns subtract the "
        "forward-only time of the float model, which varies by several per cent between runs on this shared "
        "machine, so small overheads are within noise: the next table times the observers alone.")
    out()

    # -- the observers / calibrators alone, on the model's captured activations -------------
    acts = [[] for _ in range(args.layers)]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    hooks = [lin.register_forward_pre_hook(lambda mod, inp, i=i: acts[i].append(inp[0].detach()))
             for i, lin in enumerate(linears)]
    loop(model)
    for h in hooks:
        h.remove()
    from modelopt.torch.quantization.calib import HistogramCalibrator as MOHist
    from modelopt.torch.quantization.calib import MaxCalibrator as MOMax

    def alone(make, feed, finish):
        def setup():
            objs = [make() for _ in acts]

            def run():
                for o, xs in zip(objs, acts):
                    for x in xs:
                        feed(o, x)
                return [finish(o) for o in objs]
            return run
        return setup

    obs_feed, obs_fin = (lambda o, x: o(x)), (lambda o: o.calculate_qparams())
    cal_feed = lambda o, x: o.collect(x)  # noqa: E731
    pairs = [
        ("torch.ao HistogramObserver(reduce_range=True)", ao.HistogramObserver, cf.HistogramObserver,
         dict(reduce_range=True), obs_feed, obs_fin),
        ("torch.ao PerChannelMinMaxObserver(ch_axis=-1)", ao.PerChannelMinMaxObserver, cf.PerChannelMinMaxObserver,
         dict(ch_axis=-1), obs_feed, obs_fin),
        ("torch.ao MinMaxObserver", ao.MinMaxObserver, cf.MinMaxObserver, {}, obs_feed, obs_fin),
        ("torch.ao MovingAverageMinMaxObserver", ao.MovingAverageMinMaxObserver, cf.MovingAverageMinMaxObserver,
         {}, obs_feed, obs_fin),
        ("ModelOpt MaxCalibrator(axis=None)", MOMax, cfm.MaxCalibrator, dict(num_bits=8, axis=None), cal_feed,
         lambda o: o.compute_amax()),
        ("ModelOpt MaxCalibrator(axis=-1)", MOMax, cfm.MaxCalibrator, dict(num_bits=8, axis=-1), cal_feed,
         lambda o: o.compute_amax()),
        ("ModelOpt HistogramCalibrator + compute_amax('entropy')", MOHist, cfm.HistogramCalibrator, {}, cal_feed,
         lambda o: o.compute_amax("entropy")),
        ("ModelOpt HistogramCalibrator + compute_amax('percentile')", MOHist, cfm.HistogramCalibrator, {}, cal_feed,
         lambda o: o.compute_amax("percentile")),
    ]
    n_calls = sum(len(xs) for xs in acts)
    out(f"## The observers / calibrators alone ({n_calls} calls on the model's captured Linear inputs, "
        f"[{args.seqs}, {args.tokens}, {args.width}] float32 each, plus computing the {len(acts)} ranges)")
    out()
    out("| observer / calibrator | peer | calibfast | speed-up |")
    out("|---|---|---|---|")
    for label, peer_cls, our_cls, kw, feed, fin in pairs:
        tp, _, _ = timed(alone(lambda: peer_cls(**kw), feed, fin), args.reps)
        to, _, _ = timed(alone(lambda: our_cls(**kw), feed, fin), args.reps)
        print(f"  alone {label}: {tp:.4f} s vs {to:.4f} s", flush=True)
        out(f"| {label} | {tp * 1e3:.1f} ms | {to * 1e3:.1f} ms | {tp / to:.1f}× |")
    out()
    del acts

    out("## Results")
    out()
    qp, qo = results["torch.ao PerChannelMinMaxObserver (ch_axis=-1)"]
    same_pc = all(torch.equal(qp[n][0], qo[n][0]) and torch.equal(qp[n][1], qo[n][1]) for n in qp)
    out(f"- torch.ao PerChannelMinMaxObserver: scales and zero points {'identical' if same_pc else 'DIFFER'} "
        f"({len(qp)} observers)")
    out(f"- ModelOpt max calibration: amax {'identical' if mo_max_same else 'DIFFER'} ({len(ap_)} quantizers)")
    out()
    out("HistogramObserver (quint8, reduce_range): torch.ao's L2 search vs calibfast's mse search on |x| "
        "(different by design; the range is [max(min, -amax), min(max, amax)]):")
    out()
    out("| observer | torch.ao scale | calibfast scale | ratio | torch.ao zero point | calibfast zero point |")
    out("|---|---|---|---|---|---|")
    qp, qo = results["torch.ao HistogramObserver (per tensor)"]
    for n in qp:
        sp, so = float(qp[n][0]), float(qo[n][0])
        out(f"| {n} | {sp:.6g} | {so:.6g} | {so / sp:.3f} | {int(qp[n][1])} | {int(qo[n][1])} |")
    out()
    out("ModelOpt histogram calibrators, input quantizers' amax (calibfast's conventions, its own power-of-two "
        "histogram, so within a bin or a few per cent of ModelOpt's, not equal):")
    out()
    out("| method | quantizer | ModelOpt | calibfast | relative difference |")
    out("|---|---|---|---|---|")
    for method, (vp, vo) in hist_vals.items():
        for n in vp:
            out(f"| {method} | {n} | {vp[n]:.5f} | {vo[n]:.5f} | {(vo[n] - vp[n]) / vp[n]:+.2%} |")
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
