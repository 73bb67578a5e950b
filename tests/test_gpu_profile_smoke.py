"""benchmarks/gpu_profile.py, the driver gpu_check.sh runs under compute-sanitizer and ncu: its
check mode on the CPU (where the comparison logic itself runs) passes, and fails when the op is
broken (so a clean run on the GPU means something)."""

import os
import sys

import pytest
import torch

import calibfast

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import gpu_profile  # noqa: E402


def test_check_mode_passes_on_cpu(capsys):
    assert gpu_profile.main(["--mode", "check", "--device", "cpu", "--versions", "1"]) == 0
    assert "check: 0 mismatches over 18 cases" in capsys.readouterr().out


def test_check_mode_reports_a_broken_op(monkeypatch, capsys):
    real = calibfast.ChannelStats.update

    def broken(self, x):
        if self.backend != "reference":
            x = x.clone()
            x.view(-1)[0] = 1e6  # one wrong value: the maxima and the histogram differ
        return real(self, x)

    monkeypatch.setattr(calibfast.ChannelStats, "update", broken)
    assert gpu_profile.main(["--mode", "check", "--device", "cpu", "--versions", "1"]) == 1
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "check: 18 mismatches" in out


def test_profile_mode_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("has CUDA")
    assert gpu_profile.main(["--mode", "profile"]) == 2
