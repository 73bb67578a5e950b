"""The ``calibfast`` subcommands beyond the default job: calibrate, report, select, bench.

Every error a user can make (a missing file, a model folder without weights, an unknown module
name, a corrupt statistics file...) ends in one line on stderr and exit status 2: raise
:class:`UserError` (or one of the exception types in ``USER_ERRORS``) and ``main`` prints it.
"""

import fnmatch
import importlib
import json
import os
import sys
import time


class UserError(Exception):
    """A mistake in the command's arguments or inputs: printed as one line, exit status 2."""


DEFAULT_STATS = "calibfast_stats.safetensors"
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".json", ".jsonl", ".html", ".csv", ".toml", ".cfg", ".ini")


# ---- models ---------------------------------------------------------------------------------

def load_model(spec):
    """(model, tokenizer, description) for a model spec: None (the embedded MiniLM), a local
    Hugging Face model folder, or ``module:function`` returning a module or (module, tokenizer)."""
    if spec is None:
        from ._default import DefaultModelUnavailable, load_default_model

        try:
            model, tok = load_default_model()
        except DefaultModelUnavailable as e:
            raise UserError(str(e)) from None
        return model, tok, "all-MiniLM-L6-v2 (embedded default)"
    if os.path.isdir(spec):
        if not os.path.exists(os.path.join(spec, "config.json")):
            raise UserError(f"model folder {spec!r} has no config.json (not a Hugging Face model folder)")
        weights = [f for f in os.listdir(spec) if f.endswith((".safetensors", ".bin", ".pt"))]
        if not weights:
            raise UserError(f"model folder {spec!r} has no weights (*.safetensors or *.bin)")
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:
            from transformers import AutoModel, AutoTokenizer
        except ImportError:
            raise UserError("loading a model folder needs transformers: pip install transformers") from None
        try:
            tok = AutoTokenizer.from_pretrained(spec, local_files_only=True)
            model = AutoModel.from_pretrained(spec, local_files_only=True)
        except Exception as e:  # noqa: BLE001  (transformers raises many kinds)
            raise UserError(f"could not load the model in {spec!r}: {type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}") from None
        return model.eval(), tok, os.path.basename(os.path.normpath(spec))
    if ":" in spec:
        mod_name, _, fn_name = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            raise UserError(f"cannot import {mod_name!r} (from --model {spec!r}): {e}") from None
        fn = getattr(mod, fn_name, None)
        if not callable(fn):
            raise UserError(f"{mod_name!r} has no callable {fn_name!r} (from --model {spec!r})")
        out = fn()
        model, tok = (out if isinstance(out, tuple) else (out, None))[:2]
        import torch

        if not isinstance(model, torch.nn.Module):
            raise UserError(f"{spec} returned a {type(model).__name__}, not an nn.Module")
        return model.eval(), tok, spec
    raise UserError(f"--model {spec!r}: not a folder and not module:function")


# ---- data -----------------------------------------------------------------------------------

def _paragraphs(text):
    return [p.strip() for p in text.split("\n\n") if len(p.strip()) >= 20]


def load_texts(spec, text_field="text"):
    """Texts from a data spec: None (the embedded corpus), a text file (paragraphs), a JSONL
    file (``text_field`` of each line), or a folder (paragraphs of its text files)."""
    if spec is None:
        from ._default import default_texts

        return default_texts(), "paragraphs of Python's documentation (embedded default)"
    if not os.path.exists(spec):
        raise UserError(f"data {spec!r} does not exist")
    if os.path.isdir(spec):
        texts = []
        for root, _dirs, files in sorted(os.walk(spec)):
            for f in sorted(files):
                if f.endswith(_TEXT_SUFFIXES):
                    try:
                        with open(os.path.join(root, f), encoding="utf-8") as fh:
                            texts.extend(_paragraphs(fh.read()))
                    except (UnicodeDecodeError, OSError):
                        continue
        if not texts:
            raise UserError(f"no text found in folder {spec!r} (looked at {', '.join(_TEXT_SUFFIXES)} files)")
        return texts, f"paragraphs of the text files in {spec}"
    if spec.endswith(".jsonl"):
        texts = []
        with open(spec, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise UserError(f"{spec}:{i}: not JSON ({e.msg})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    raise UserError(f"{spec}:{i}: no string field {text_field!r} (use --text-field)")
                texts.append(obj[text_field])
        if not texts:
            raise UserError(f"{spec} holds no records")
        return texts, f"field {text_field!r} of {spec}"
    try:
        with open(spec, encoding="utf-8") as fh:
            texts = _paragraphs(fh.read())
    except UnicodeDecodeError:
        raise UserError(f"{spec} is not UTF-8 text") from None
    if not texts:
        raise UserError(f"{spec} holds no paragraphs of text")
    return texts, f"paragraphs of {spec}"


def _module_filter(include, exclude):
    if not include and not exclude:
        return None
    from .hooks import DEFAULT_MODULE_TYPES

    def pick(name, module):
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        if exclude and any(fnmatch.fnmatchcase(name, p) for p in exclude):
            return False
        return isinstance(module, DEFAULT_MODULE_TYPES)

    return pick


# ---- calibrate ------------------------------------------------------------------------------

def add_calibrate_arguments(p):
    p.add_argument("--model", default=None,
                   help="a local Hugging Face model folder, or module:function returning an nn.Module "
                        "(or (module, tokenizer)); default: the embedded all-MiniLM-L6-v2")
    p.add_argument("--data", default=None,
                   help="a text file (paragraphs), a JSONL file, or a folder of text files; default: "
                        "paragraphs of Python's documentation")
    p.add_argument("--text-field", default="text", help="the field of each JSONL record (default: text)")
    p.add_argument("-o", "--output", default=DEFAULT_STATS,
                   help=f"statistics file to write (default: ./{DEFAULT_STATS})")
    p.add_argument("--capture", choices=("input", "output", "both"), default="input")
    p.add_argument("--include", nargs="+", metavar="PATTERN",
                   help="hook only modules whose name matches one of these glob patterns")
    p.add_argument("--exclude", nargs="+", metavar="PATTERN", help="do not hook modules matching these")
    p.add_argument("--bins", type=int, default=2048, help="|x| histogram bins (power of two; 0: none)")
    p.add_argument("--channel-bins", type=int, default=0, help="per-channel histogram bins (default: none)")
    p.add_argument("--samples", type=int, default=128, help="calibration samples (default: 128)")
    p.add_argument("--strategy", default="length",
                   help="sample selection: length, random, first, cluster, kmeans, kcenter (default: length)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=128, help="tokens per sample (default: 128)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32",
                   help="model dtype during calibration (default: float32)")
    p.add_argument("--hessian", action="store_true",
                   help="also collect each Linear's input XᵀX (GPTQ), saved in the statistics file")
    p.add_argument("--no-progress", action="store_true")


def run_calibrate(args, parser=None):
    import torch

    import calibfast
    from . import io as cio
    from .__main__ import format_table
    from .data import CalibrationDataset, model_embedder

    for name in ("samples", "batch_size", "max_length"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: CUDA is not available here")
    model, tok, model_desc = load_model(args.model)
    if tok is None:
        raise UserError(f"the model from {args.model!r} came without a tokenizer; return (model, tokenizer)")
    texts, data_desc = load_texts(args.data, args.text_field)
    model.to(device=device, dtype=getattr(torch, args.dtype))
    embedder = None
    if args.strategy in ("cluster", "kmeans", "kcenter"):
        embedder = model_embedder(model, tok, max_length=args.max_length, batch_size=args.batch_size)
    t0 = time.perf_counter()
    try:
        ds = CalibrationDataset(texts, tok, max_length=args.max_length, nsamples=min(args.samples, len(texts)),
                                strategy=args.strategy, seed=args.seed, embedder=embedder)
    except (ValueError, TypeError) as e:
        raise UserError(str(e).replace("calibfast: ", "")) from None
    t_select = time.perf_counter() - t0
    modules = _module_filter(args.include, args.exclude)
    from tqdm import tqdm

    t0 = time.perf_counter()
    with torch.inference_mode():
        try:
            ctx = calibfast.collect(model, capture=args.capture, modules=modules, bins=args.bins,
                                    channel_bins=args.channel_bins, hessian=args.hessian)
            with ctx as col:
                for batch in tqdm(ds.loader(batch_size=args.batch_size), desc="calibrating", unit="batch",
                                  file=sys.stderr, disable=args.no_progress):
                    model(**{k: v.to(device) for k, v in batch.items()})
        except ValueError as e:
            raise UserError(str(e).replace("calibfast: ", "")) from None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t_cal = time.perf_counter() - t0
    if not len(col):
        raise UserError("no module was hooked (check --include/--exclude)")
    meta = {"model": model_desc, "data": data_desc, "sample_ids": list(map(int, ds.ids)),
            "options": {k: v for k, v in vars(args).items() if not k.startswith("_")},
            "tokens": int(ds.num_tokens) if hasattr(ds, "num_tokens") else None}
    cio.save(args.output, col, metadata=meta)
    for title, stats in (("inputs", col.inputs), ("outputs", col.outputs)):
        if stats:
            print(format_table(stats, title=f"{title} ({len(stats)} modules)"))
            print()
    print(f"model: {model_desc}; data: {data_desc}; {len(ds)} samples ({args.strategy}, seed {args.seed}), "
          f"selected in {t_select:.2f} s, calibrated in {t_cal:.2f} s")
    print(f"statistics: {args.output}")
    return 0


# ---- report ---------------------------------------------------------------------------------

def add_report_arguments(p):
    p.add_argument("stats", help="a statistics file written by 'calibfast calibrate'")
    p.add_argument("-o", "--output", default=None, help="HTML file (default: beside the statistics file)")


def run_report(args, parser=None):
    from .report import write_report

    if not os.path.exists(args.stats):
        raise UserError(f"statistics file {args.stats!r} does not exist")
    out = write_report(args.stats, args.output)
    print(f"report: {out}")
    return 0


# ---- select ---------------------------------------------------------------------------------

def add_select_arguments(p):
    p.add_argument("data", nargs="?", default=None, help="text file, JSONL or folder (default: embedded corpus)")
    p.add_argument("-n", "--samples", type=int, default=128)
    p.add_argument("--strategy", default="kcenter", help="random, length, cluster, kmeans, kcenter")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--text-field", default="text")
    p.add_argument("--model", default=None, help="embedder model (default: the embedded MiniLM)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("-o", "--output", default=None, help="write the ids as JSON here (default: stdout)")


def run_select(args, parser=None):
    from .data import model_embedder, select

    texts, desc = load_texts(args.data, args.text_field)
    if args.samples < 0 or args.samples > len(texts):
        raise UserError(f"-n {args.samples}: the pool has {len(texts)} texts")
    lengths = emb = None
    model, tok, _ = load_model(args.model)
    if args.strategy == "length":
        lengths = [len(tok(t, truncation=True, max_length=args.max_length)["input_ids"]) for t in texts]
    elif args.strategy != "random":
        emb = model_embedder(model, tok, max_length=args.max_length)(texts)
    try:
        idx = select(emb, args.samples, strategy=args.strategy, seed=args.seed, lengths=lengths)
    except (ValueError, TypeError) as e:
        raise UserError(str(e).replace("calibfast: ", "")) from None
    ids = [int(i) for i in idx]
    doc = {"data": desc, "strategy": args.strategy, "seed": args.seed, "n": len(ids), "ids": ids}
    text = json.dumps(doc)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
        print(f"{len(ids)} ids: {args.output}")
    else:
        print(text)
    return 0


# ---- bench ----------------------------------------------------------------------------------

def add_bench_arguments(p):
    p.add_argument("--shape", default="8192x4096", help="tokens x channels (default 8192x4096)")
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--min-run-time", type=float, default=1.0)


def run_bench(args, parser=None):
    """The kernel benchmark table (calibfast against the peers, x.sum() as the floor)."""
    import torch
    import torch.utils.benchmark as tb

    import calibfast

    try:
        shape = tuple(int(d) for d in args.shape.lower().split("x"))
    except ValueError:
        raise UserError(f"--shape {args.shape!r}: expected e.g. 8192x4096") from None
    rows = []
    for dt in args.dtype:
        if not hasattr(torch, dt):
            raise UserError(f"--dtype {dt!r} is not a torch dtype")
        x = torch.randn(shape, device=args.device).to(getattr(torch, dt))
        x2 = x.reshape(-1, x.shape[-1])
        cases = {
            "calibfast stats (bins=0)": calibfast.ChannelStats(bins=0),
            "calibfast stats + 2048-bin histogram": calibfast.ChannelStats(bins=2048),
        }
        timings = {}
        for name, s in cases.items():
            s.update(x)
            timings[name] = tb.Timer("s.update(x)", globals={"s": s, "x": x},
                                     num_threads=torch.get_num_threads()).blocked_autorange(
                min_run_time=args.min_run_time).median

        def seed_way():
            a = x2.abs()
            return a.amin(0), a.amax(0), x2.amin(0), x2.amax(0)

        timings["pure torch (abs/amin/amax, dim 0)"] = tb.Timer(
            "f()", globals={"f": seed_way}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=args.min_run_time).median
        timings["x.sum() (read-once floor)"] = tb.Timer(
            "x.sum()", globals={"x": x}, num_threads=torch.get_num_threads()).blocked_autorange(
            min_run_time=args.min_run_time).median
        floor = timings["x.sum() (read-once floor)"]
        gb = x.numel() * x.element_size() / 1e9
        for name, t in timings.items():
            rows.append((name, dt, t * 1e3, gb / t, t / floor))
    print(f"{'method':40s} {'dtype':9s} {'ms':>9s} {'GB/s':>7s} {'x floor':>8s}")
    for name, dt, ms, gbs, r in rows:
        print(f"{name:40s} {dt:9s} {ms:9.3f} {gbs:7.1f} {r:7.2f}x")
    print(f"shape {args.shape}, device {args.device}, {torch.get_num_threads()} threads, cpu capability "
          f"{calibfast.cpu_capability()}; the full table with peers: python benchmarks/bench_channel_stats.py")
    return 0


COMMANDS = {
    "calibrate": ("calibrate a model (default: the embedded MiniLM) on data (default: the embedded corpus) "
                  "and write a statistics file", add_calibrate_arguments, run_calibrate),
    "report": ("write an HTML report (with plots) of a statistics file", add_report_arguments, run_report),
    "select": ("choose calibration samples from a data file and print their ids", add_select_arguments,
               run_select),
    "bench": ("time the kernels on this machine (a short table)", add_bench_arguments, run_bench),
}
