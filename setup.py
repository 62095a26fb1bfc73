"""Build hptransfer: the package, hptransfer.kernels (from kernels/) and the extension hptransfer._C.

The C++ CPU part of _C is always built; the CUDA part (csrc/*.cu, macro WITH_CUDA) is added when
nvcc and a CUDA build of torch are present, or forced with HPTRANSFER_FORCE_CUDA=1.
HPTRANSFER_NO_EXT=1 gives a pure-Python install (every op then runs its PyTorch reference).
Flags take 1/true/yes/on or 0/false/no/off/empty, the run time's rule (hptransfer/_env.py); other values
are an error.
Install with ``pip install --no-build-isolation -e .`` so the extension compiles against the torch
already in the environment.
"""
import glob
import importlib.util
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # the one default; the Makefile leaves TORCH_CUDA_ARCH_LIST to it


def _load_env_module():
    """hptransfer/_env.py by path (the package is not installed yet; the file imports nothing of it):
    the build reads HPTRANSFER_* flags with the run time's rule."""
    spec = importlib.util.spec_from_file_location("_hptransfer_env", os.path.join(ROOT, "hptransfer", "_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_flag = _load_env_module().flag


def _extensions():
    if _flag("HPTRANSFER_NO_EXT"):
        print(f"hptransfer: HPTRANSFER_NO_EXT={os.environ['HPTRANSFER_NO_EXT']}, building without hptransfer._C")
        return [], {}
    # Before torch.utils.cpp_extension reads it: an nvcc on PATH in /usr/local/bin would otherwise
    # make torch guess CUDA_HOME=/usr/local, where cudart is not.
    if not os.environ.get("CUDA_HOME") and os.path.isdir("/usr/local/cuda"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # A100 and H100 machine code, plus PTX of the newest so that later GPUs JIT-compile it at load
    # instead of failing with "no kernel image is available for execution on the device".
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCH_LIST)
    nvcc = shutil.which("nvcc") or (os.path.join(CUDA_HOME or "", "bin", "nvcc") if CUDA_HOME else None)
    have_nvcc = bool(nvcc and os.path.exists(nvcc))
    with_cuda = _flag("HPTRANSFER_FORCE_CUDA") or (have_nvcc and torch.version.cuda is not None)
    cpp = sorted(glob.glob("csrc/*.cpp"))
    cu = sorted(glob.glob("csrc/*.cu")) if with_cuda else []
    cxx = ["-O3", "-std=c++20", "-fopenmp"] if os.name != "nt" else ["/O2"]
    print(f"hptransfer build: torch {torch.__version__} (CUDA {torch.version.cuda}), nvcc {nvcc if have_nvcc else 'not found'}, "
          f"WITH_CUDA={int(with_cuda)}, TORCH_CUDA_ARCH_LIST={os.environ.get('TORCH_CUDA_ARCH_LIST')}, "
          f"sources: {cpp + cu}")
    if with_cuda:
        ext = CUDAExtension(
            "hptransfer._C", cpp + cu,
            define_macros=[("WITH_CUDA", None), ("HPTRANSFER_CUDA_VERSION", f'"{torch.version.cuda}"')],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--use_fast_math", "-lineinfo", "-std=c++20"]},
            extra_link_args=["-fopenmp"],
        )
    else:
        ext = CppExtension("hptransfer._C", cpp, extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()

setup(
    name="hptransfer",
    version="0.1.0",
    description="High-performance trainer for pose-guided high-resolution appearance transfer",
    python_requires=">=3.10",
    packages=find_packages(include=["hptransfer", "hptransfer.*"]) + ["hptransfer.kernels"],
    package_dir={"hptransfer.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[],  # pinned in requirements.txt; installed by `make setup`
    # MediaPipe (pose from images) is not an extra: its protobuf<5 pin would break onnx. Install it with
    # `pip install --no-deps -r requirements-mediapipe.txt` (make setup does).
    entry_points={"console_scripts": ["hptransfer=hptransfer.cli:main"]},
    zip_safe=False,
)
