"""benchmarks/selection_experiment.py: its pieces, and the --quick run end to end."""

import csv
import math
import os
import sys

import numpy as np
import pytest
import torch

import calibfast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import selection_experiment as se  # noqa: E402


def test_merged_histograms_equal_one_pass_over_all_data():
    """The experiment's per-sample merge reproduces what one ChannelStats sees, bit for bit."""
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(50, 16, generator=g) * s for s in (0.01, 1.0, 3.0, 300.0, 0.5)]
    one = calibfast.ChannelStats(bins=256)
    hists, exps = [], []
    for p in parts:
        one.update(p)
        s = calibfast.ChannelStats(bins=256).update(p)
        hists.append(s.hist.numpy())
        exps.append(int(s.hist_exp))
    h, E = se.merge_hists(np.stack(hists), np.array(exps))
    assert E == int(one.hist_exp)
    assert h.tolist() == one.hist.tolist()
    # and the merged percentile is the one-pass percentile
    for p in (50.0, 99.0, 99.99, 100.0):
        assert se.hist_percentile(h, math.ldexp(1.0, E), p, float(one.absmax.max())) == se.percentile_amax(one, p)


def test_hist_percentile():
    h = np.zeros(8, dtype=np.int64)
    h[1], h[5] = 99, 1  # over [0, 8): 99 values in [1, 2), one in [5, 6)
    assert se.hist_percentile(h, 8.0, 99.0, 5.5) == 2.0
    assert se.hist_percentile(h, 8.0, 99.5, 5.5) == 5.5  # capped at the abs-max
    assert se.hist_percentile(np.zeros(8), 8.0, 99.0, 0.0) == 0.0


def test_summarize_verdicts():
    rows = []
    rng = np.random.default_rng(0)
    for seed in range(10):
        base = 0.9 + rng.normal(0, 0.001)
        for arm, shift in (("random", 0.0), ("length", 0.01), ("cluster", 0.0), ("kmeans", -0.01),
                           ("kcenter", 0.0005)):
            v = base + shift + (0.0 if arm != "cluster" else rng.normal(0, 0.001))
            rows.append(dict(setting="s", budget=8, seed=seed, arm=arm, cos=v, top1=v))
    summ = se.summarize(rows, ["s"], (8,), se.ARMS)
    verdict = {r["arm"]: r["verdict"] for r in summ if r["metric"] == "cos"}
    assert verdict["length"] == "win" and verdict["kmeans"] == "loss"
    assert verdict["cluster"] == "null"
    assert verdict["kcenter"] == "small+"  # a sure but tiny effect (below one random-draw std) is no win
    rec = next(r for r in summ if r["arm"] == "length" and r["metric"] == "cos")
    assert rec["p"] < 0.01 and rec["diff_low"] > 0 and abs(rec["diff"] - 0.01) < 1e-9


def test_split_evenly():
    assert se._split_evenly(10, [100, 100]) == [5, 5]
    assert se._split_evenly(10, [2, 100, 100]) == [2, 4, 4]
    assert se._split_evenly(10, [0, 3, 3]) == [0, 3, 3]


@pytest.mark.slow
def test_quick_experiment_end_to_end(tmp_path):
    threads = torch.get_num_threads()
    try:
        res = se.main(["--quick", "--out", str(tmp_path), "--no-progress"])
    finally:
        torch.set_num_threads(threads)
    for name in ("runs.csv", "summary.csv", "README.md", "selection.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    assert (tmp_path / "selection.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = se.QUICK
    with open(tmp_path / "runs.csv") as fh:
        runs = list(csv.DictReader(fh))
    assert len(runs) == len(se.ARMS) * len(cfg["budgets"]) * cfg["seeds"] * 3
    for r in runs:
        assert 0.0 < float(r["cos"]) <= 1.0 + 1e-6 and 0.0 <= float(r["top1"]) <= 1.0
        assert int(r["tokens"]) == int(r["budget"]) * cfg["length"]  # matched token budget
    meta = res["meta"]
    # the per-sample merge agrees with a direct calibfast.collect pass
    assert meta["check_amax"] < 1e-5 and meta["check_pct"] < 1e-3
    readme = (tmp_path / "README.md").read_text()
    assert "| setting | budget | random | length | cluster | kmeans | kcenter |" in readme
    assert "## Summary" in readme and "--quick" in readme
    # the quantized model is worse than float, and the harsher setting worse still
    by = {}
    for r in res["summary"]:
        if r["metric"] == "cos" and r["arm"] == "random":
            by.setdefault(r["setting"], []).append(r["gap"])
    assert all(g > 0 for gaps in by.values() for g in gaps)
    names = se.Settings(99.99).names
    assert np.mean(by[names[2]]) > np.mean(by[names[0]])
