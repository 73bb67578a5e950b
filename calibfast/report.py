"""A self-contained HTML report of saved statistics, with PNG plots (matplotlib, Agg).

    calibfast report stats.safetensors            # writes stats.html beside it
    python -c "import calibfast.report as r; r.write_report('stats.safetensors')"

Sections: per-layer ranges (min, max, abs-max), outlier channels (abs-max over the layer's median
abs-max, the worst channels listed), each layer's |x| histogram with the clip points that every
amax method picks (max, percentile, mse, entropy), and non-finite counts. Images are embedded as
data URIs, so the page is one file that opens anywhere.
"""

import base64
import html
import io as _io
import math
import os

import torch

METHODS = (("max", {}), ("percentile", {"percentile": 99.99}), ("mse", {}), ("entropy", {}))
_COLORS = {"max": "#d62728", "percentile": "#2ca02c", "mse": "#1f77b4", "entropy": "#9467bd"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig):
    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _entries(obj):
    """[(section, name, ChannelStats)] of a Collector or a ChannelStats."""
    from .hooks import Collector

    if isinstance(obj, Collector):
        out = [("input", n, s) for n, s in obj.inputs.items() if s.initialized]
        out += [("output", n, s) for n, s in obj.outputs.items() if s.initialized]
        return out
    return [("tensor", "stats", obj)] if obj.initialized else []


def clip_points(s):
    """{method: amax} for ChannelStats ``s`` (per tensor); a method that fails is left out."""
    out = {}
    for method, kw in METHODS:
        try:
            v = s.amax(method, **kw) if hasattr(s, "amax") else (s.absmax.max() if method == "max" else None)
        except (ValueError, RuntimeError, NotImplementedError):
            v = None
        if v is not None:
            v = float(v)
            if math.isfinite(v):
                out[method] = v
    return out


def _layer_summary(s):
    a = s.absmax.double().cpu()
    fin = torch.isfinite(a)
    med = float(a[fin].median()) if bool(fin.any()) else math.nan
    order = torch.argsort(torch.where(fin, a, -math.inf), descending=True)[:5].tolist()
    worst = [(i, float(a[i]), float(a[i]) / med if med > 0 else math.inf) for i in order if bool(fin[i])]
    return {
        "channels": s.num_channels,
        "min": float(s.min.min()) if s.num_channels else math.nan,
        "max": float(s.max.max()) if s.num_channels else math.nan,
        "absmax": float(a[fin].max()) if bool(fin.any()) else math.nan,
        "median_absmax": med,
        "outlier_ratio": worst[0][2] if worst else math.nan,
        "worst": worst,
        "nan": int(s.nan_count.sum()),
        "inf": int(s.inf_count.sum()),
        "values": int(s.count.sum()),
    }


def _ranges_plot(names, summaries):
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * n + 2), 4))
    xs = range(n)
    ax.bar(xs, [summaries[i]["max"] for i in range(n)], color="#1f77b4", label="max")
    ax.bar(xs, [summaries[i]["min"] for i in range(n)], color="#ff7f0e", label="min")
    ax.plot(xs, [summaries[i]["absmax"] for i in range(n)], "k_", markersize=8, label="abs-max")
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("activation value (symlog)")
    ax.set_title("Per-layer range")
    ax.legend(fontsize=7)
    return _png(fig)


def _outlier_plot(names, summaries):
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * n + 2), 3.2))
    ax.bar(range(n), [summaries[i]["outlier_ratio"] for i in range(n)], color="#d62728")
    ax.set_yscale("log")
    ax.set_xticks(list(range(n)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("worst channel abs-max / median")
    ax.set_title("Outlier channels")
    return _png(fig)


def _nonfinite_plot(names, summaries):
    plt = _plt()
    n = len(names)
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * n + 2), 2.8))
    nan = [summaries[i]["nan"] for i in range(n)]
    inf = [summaries[i]["inf"] for i in range(n)]
    ax.bar(range(n), nan, color="#7f7f7f", label="NaN")
    ax.bar(range(n), inf, bottom=nan, color="#bcbd22", label="±Inf")
    ax.set_xticks(list(range(n)))
    ax.set_xticklabels(names, rotation=90, fontsize=6)
    ax.set_ylabel("count")
    ax.set_title("Non-finite values")
    ax.legend(fontsize=7)
    return _png(fig)


def _hist_plot(name, s, clips):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(4.2, 2.6))
    h = s.hist.double().cpu()
    edges = s.hist_edges.cpu()
    nz = torch.nonzero(h).flatten()
    last = int(nz.max()) + 1 if len(nz) else len(h)
    last = min(len(h), max(last + max(4, last // 20), 8))
    ax.stairs(h[:last].numpy(), edges[:last + 1].numpy(), fill=True, color="#9ecae1")
    ax.set_yscale("log")
    for m, v in clips.items():
        ax.axvline(v, color=_COLORS[m], linewidth=1, label=f"{m} {v:.3g}")
    ax.set_title(name, fontsize=7)
    ax.set_xlabel("|x|", fontsize=7)
    ax.tick_params(labelsize=6)
    ax.legend(fontsize=5)
    return _png(fig)


def _num(v):
    if isinstance(v, float) and not math.isfinite(v):
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render_html(obj, title="calibfast statistics", metadata=None, max_histograms=200):
    """The report of a Collector or ChannelStats, as an HTML string."""
    entries = _entries(obj)
    esc = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title>",
             "<style>body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;"
             "font-size:12px}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}"
             "td:first-child,th:first-child{text-align:left}img{max-width:100%}"
             ".grid{display:flex;flex-wrap:wrap;gap:8px}.grid img{width:420px}</style></head><body>",
             f"<h1>{esc(title)}</h1>"]
    if metadata:
        parts.append("<table>" + "".join(f"<tr><td>{esc(str(k))}</td><td>{esc(str(v))[:300]}</td></tr>"
                                         for k, v in metadata.items()) + "</table>")
    if not entries:
        parts.append("<p>No statistics: nothing was collected.</p></body></html>")
        return "".join(parts)
    names = [f"{n} ({sec})" if sec != "input" else n for sec, n, _ in entries]
    summaries = [_layer_summary(s) for _, _, s in entries]
    parts.append(f"<p>{len(entries)} statistics sets, {sum(x['values'] for x in summaries):,} values.</p>")
    parts.append("<h2>Per-layer ranges</h2>")
    parts.append(f"<img alt='per-layer ranges' src='{_ranges_plot(names, summaries)}'>")
    parts.append("<h2>Outlier channels</h2>")
    parts.append(f"<img alt='outlier channels' src='{_outlier_plot(names, summaries)}'>")
    rows = []
    clips_all = []
    for name, (sec, n, s), sm in zip(names, entries, summaries):
        clips = clip_points(s) if getattr(s, "bins", 0) else {"max": sm["absmax"]}
        clips_all.append(clips)
        worst = ", ".join(f"#{i} ({r:.1f}x)" for i, _, r in sm["worst"][:3])
        rows.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in [
            name, str(sm["channels"]), _num(sm["min"]), _num(sm["max"]), _num(sm["absmax"]), worst,
            *(_num(clips.get(m, math.nan)) for m, _ in METHODS), str(sm["nan"]), str(sm["inf"])]) + "</tr>")
    head = ["layer", "channels", "min", "max", "abs-max", "worst channels (/median)",
            *(f"amax {m}" for m, _ in METHODS), "NaN", "±Inf"]
    parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>" + "".join(rows) + "</table>")
    parts.append("<h2>Histograms and clip points</h2>")
    parts.append("<p>Counts of |x| (log scale) with the amax each method picks.</p><div class='grid'>")
    for k, ((sec, n, s), name, clips) in enumerate(zip(entries, names, clips_all)):
        if k >= max_histograms:
            parts.append(f"<p>({len(entries) - max_histograms} more layers not drawn)</p>")
            break
        if getattr(s, "bins", 0) and int(s.hist.sum()) > 0:
            parts.append(f"<img alt='histogram {esc(name)}' src='{_hist_plot(name, s, clips)}'>")
    parts.append("</div><h2>Non-finite values</h2>")
    parts.append(f"<img alt='non-finite values' src='{_nonfinite_plot(names, summaries)}'>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(stats_path, out=None):
    """Reads a statistics file (calibfast.io) and writes its HTML report; returns the path."""
    from . import io as cio

    obj = cio.load(stats_path)
    try:
        meta = cio.read_metadata(stats_path)
    except Exception:  # noqa: BLE001  (the report still renders without metadata)
        meta = None
    if out is None:
        out = os.path.splitext(stats_path)[0] + ".html"
    page = render_html(obj, title=f"calibfast: {os.path.basename(stats_path)}", metadata=meta)
    with open(out, "w", encoding="utf-8") as f:
        f.write(page)
    return out
