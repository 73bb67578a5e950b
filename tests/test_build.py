"""The build and the fallback: import works without the compiled kernels (one warning that says
why), CALIBFAST_REQUIRE_NATIVE turns that into an error, and in CI the kernels are there."""

import json
import os
import subprocess
import sys

import pytest
import torch

import calibfast

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_WITHOUT_C = """
import sys, warnings
sys.modules['calibfast._C'] = None   # makes `from . import _C` raise ImportError
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter('always')
    import calibfast
import torch
msgs = [str(x.message) for x in w if 'calibfast' in str(x.message)]
print('WARNINGS', len(msgs))
print(msgs[0] if msgs else '')
print('BACKENDS', calibfast.native_backends())
x = torch.randn(50, 7)
s = calibfast.ChannelStats().update(x)
assert torch.equal(s.max, x.amax(0)) and torch.equal(s.min, x.amin(0))
print('OK')
"""


def _run(code, **env):
    e = dict(os.environ)
    e.pop("CALIBFAST_REQUIRE_NATIVE", None)
    e.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=e, cwd=ROOT)


def test_import_without_compiled_kernels_falls_back_with_one_warning():
    r = _run(_WITHOUT_C)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "WARNINGS 1" in out, out
    assert "did not load" in out and "pure-torch" in out and torch.__version__ in out
    assert "BACKENDS {'cpu': False, 'cuda': False}" in out
    assert out.strip().endswith("OK")


def test_require_native_makes_a_missing_extension_an_error():
    r = _run(_WITHOUT_C, CALIBFAST_REQUIRE_NATIVE="1")
    assert r.returncode != 0
    assert "ImportError" in r.stderr and "did not load" in r.stderr


def test_build_info_matches_running_torch():
    info_path = os.path.join(os.path.dirname(calibfast.__file__), "_build_info.json")
    if not os.path.exists(info_path):
        pytest.skip("installed without native kernels")
    with open(info_path) as f:
        info = json.load(f)
    assert info["torch"] == torch.__version__
    assert calibfast.native_backends()["cpu"]
    assert calibfast.native_backends()["cuda"] == bool(info["cuda_kernels"])


@pytest.mark.skipif(not os.environ.get("CALIBFAST_EXPECT_CUDA_KERNELS"), reason="CALIBFAST_EXPECT_CUDA_KERNELS not set")
def test_cuda_kernels_were_compiled_and_registered():
    # CI sets this on machines with a CUDA toolkit: a CUDA compile error fails the build before
    # this, and a build that silently skipped CUDA fails here.
    assert calibfast.native_backends()["cuda"], calibfast._native.build_info
    assert calibfast._native._C.has_cuda_kernels()
