"""benchmarks/bench_layouts.py at a tiny size: every layout checked against the reference, timed,
and written as a row with finite ratios."""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import bench_layouts  # noqa: E402


def test_tiny_run_writes_every_layout(tmp_path):
    out = tmp_path / "layouts"
    assert bench_layouts.main(["--mib", "1", "--rounds", "1", "--out", str(out)]) == 0
    md = (tmp_path / "layouts.md").read_text()
    assert "- command: `python benchmarks/bench_layouts.py --mib 1 --rounds 1" in md
    for dt in ("float32", "bfloat16", "float16"):
        assert f"## {dt}" in md
    for label, *_ in bench_layouts.layouts(1 << 18):
        rows = [line for line in md.splitlines() if line.startswith(f"| {label} |")]
        assert len(rows) == 3, label  # one per dtype
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")]
            ratios = [float(c) for c in cells[2:]]
            assert all(0 < r < 1e6 for r in ratios), row
    ref = [line for line in md.splitlines() if line.startswith("| tokens x 4096, axis -1 (the reference) |")]
    assert all(row.split("|")[6].strip() == "1.00" for row in ref)
