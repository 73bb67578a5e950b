"""benchmarks/hist_floor.py: compiles its C++ microbenchmark, runs it at a tiny size and writes the
table with every row measured."""

import os
import re
import shutil
import sys

import pytest

if not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
    pytest.skip("no C++ compiler", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import hist_floor  # noqa: E402


def test_tiny_run_writes_every_row(tmp_path, capsys):
    out = tmp_path / "floor"
    hist_floor.main(["--values", "65536", "--reps", "2", "--runs", "2", "--shape", "64x96", "--out", str(out)])
    md = (tmp_path / "floor.md").read_text()
    assert md in capsys.readouterr().out
    assert "- command: `python benchmarks/hist_floor.py --values 65536 --reps 2 --runs 2" in md
    for label in hist_floor.ROWS.values():
        row = next(line for line in md.splitlines() if line.startswith(f"| {label} |"))
        ns = float(row.rstrip(" |").rsplit("|", 1)[1])
        assert 0 < ns < 1e4, row
    bounds = [line for line in md.splitlines() if re.match(r"\| (float32|bfloat16) \|", line)]
    assert len(bounds) == 2
    # 64 x 96 values on the torch threads at calibfast's increment cost
    inc = float(next(line for line in md.splitlines()
                     if line.startswith(f"| {hist_floor.ROWS['increment_2copies_pairs_l1']} |")).rstrip(" |").rsplit("|", 1)[1])
    import torch

    want = 64 * 96 / torch.get_num_threads() * inc * 1e-6
    got = float(bounds[0].split("|")[3])
    assert got == pytest.approx(want, rel=0.01, abs=2e-3)


def test_a_missing_row_is_an_error(tmp_path, monkeypatch):
    def fake_run(*args, **kwargs):
        class R:
            stdout = "read_f32_memory 0.1\n"
        return R()

    monkeypatch.setattr(hist_floor.subprocess, "run", fake_run)
    with pytest.raises(SystemExit, match="did not report"):
        hist_floor.run_bench("unused", 10, 1)
