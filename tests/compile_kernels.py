"""Compile every Triton kernel for NVIDIA targets (sm_80, sm_90) as its launcher would, without a GPU.

Run by tests/test_kernels_compile.py in a subprocess with TRITON_INTERPRET unset (the interpreter
replaces kernels with Python functions); on a GPU machine it runs as is (bench/gpu_check.sh), which
checks the kernels against that machine's Triton (3.6 there, 3.8 here).

The argument types are the run-time ones: each launcher (``gather_crops_triton`` forward and backward,
``heatmaps_triton_flat``) is called on CPU tensors in the dtypes, layouts, crop sizes and NORMALIZE values that
``hptransfer.ops`` / ``hptransfer.pose`` use, its launch is recorded instead of run, and the recorded
arguments go through Triton's own binder (``JITFunction.warmup``), so the signature, the constexprs and
the specialisations (ints equal to 1, 16-byte divisibility) are those of a real launch. A stand-in
driver names the target; nothing is loaded onto a device. Prints one line per compiled kernel (with the
PTX atomic instructions it uses) and ``compiled <n> kernels`` last. Catches typing and lowering errors that the interpreter, which runs the
kernels on numpy, does not.
"""
from __future__ import annotations

import re
import sys
from contextlib import contextmanager

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

from hptransfer.kernels import gather_crops as gc
from hptransfer.kernels import heatmaps as hm

ARCHES = (80, 90)
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
CL = torch.channels_last
# (what calls it, image dtype, channels_last images, NORMALIZE, crop dtype, channels_last crops, crop size)
GATHER_CASES = [
    ("local loss, bf16 autocast (generator output bf16)", BF16, True, True, BF16, True, 128),
    ("local loss, bf16 autocast, fp32 images", F32, False, True, BF16, True, 16),
    ("local loss, fp32", F32, False, True, F32, True, 8),
    ("local loss, fp16 autocast", F16, True, True, F16, True, 33),
    ("discriminator pairs, bf16 images", BF16, True, False, BF16, False, 64),
    ("metrics (fp32)", F32, False, False, F32, False, 32),
]
HEATMAP_DTYPES = (F32, BF16, F16)  # the generator's activation dtype under each precision


class _Recorder:
    """Stands in for a JITFunction in its module: ``kernel[grid](*args, **kw)`` records the launch."""

    def __init__(self, name: str, launches: list):
        self.name, self.launches = name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((self.name, grid, args, kwargs))


@contextmanager
def recording(launches: list):
    names = ("_gather_crops_forward_kernel", "_gather_crops_backward_kernel")
    saved = {n: getattr(gc, n) for n in names} | {"_heatmaps_forward_kernel": hm._heatmaps_forward_kernel}
    for n in names:
        setattr(gc, n, _Recorder(n, launches))
    hm._heatmaps_forward_kernel = _Recorder("_heatmaps_forward_kernel", launches)
    try:
        yield
    finally:
        for n in names:
            setattr(gc, n, saved[n])
        hm._heatmaps_forward_kernel = saved["_heatmaps_forward_kernel"]


def record_launches() -> list:
    """(label, kernel name, grid, args, kwargs) of every launch the cases make."""
    launches: list = []
    out: list = []
    gen = torch.Generator().manual_seed(0)
    with recording(launches):
        for label, dtype, cl_in, normalize, out_dtype, cl_out, size in GATHER_CASES:
            R = 8 * size  # crops are R/8 at resolution R
            images = torch.rand(2, 3, R, R, generator=gen).to(dtype)
            if cl_in:
                images = images.contiguous(memory_format=CL)
            images.requires_grad_()
            centers = torch.rand(2, 31, 2, generator=gen) * (R - 1)
            crops = gc.gather_crops_triton(images, centers, size, normalize, out_dtype, cl_out)
            crops.backward(torch.ones_like(crops))  # grad in the crops' dtype and layout
            out += [(label, *launch) for launch in launches]
            launches.clear()
        for dtype in HEATMAP_DTYPES:
            kp = torch.rand(2, 18, 2, generator=gen) * 255
            hm.heatmaps_triton_flat(kp, (256, 256), [(32, 32), (64, 64), (128, 128), (256, 256)],
                                    [1.0, 2.0, 4.0, 8.0], dtype)
            out += [(f"generator heatmaps, {dtype}", *launch) for launch in launches]
            launches.clear()
    return out


class _CompileOnlyDriver:
    """What ``JITFunction.warmup`` asks of the active driver, for a GPU that is not there. One device
    number per architecture keeps Triton's per-device binder caches apart."""

    def __init__(self, arch: int):
        self.arch = arch

    def get_current_device(self):
        return self.arch

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", self.arch, 32)


def main() -> int:
    launches = record_launches()
    kernels = {"_gather_crops_forward_kernel": gc._gather_crops_forward_kernel,
               "_gather_crops_backward_kernel": gc._gather_crops_backward_kernel,
               "_heatmaps_forward_kernel": hm._heatmaps_forward_kernel}
    n = 0
    for arch in ARCHES:  # the stand-in driver stays active: this process launches nothing afterwards
        driver.set_active(_CompileOnlyDriver(arch))
        for label, name, grid, args, kwargs in launches:
            compiled = kernels[name].warmup(*args, grid=grid, **kwargs)
            assert compiled.asm.get("cubin"), f"{name}: no cubin"
            sig = ",".join(f"{k}:{v}" for k, v in compiled.src.signature.items() if v != "constexpr")
            names = [p.name for p in kernels[name].params]
            consts = {names[k[0]] if isinstance(k, tuple) else k: v for k, v in compiled.src.constants.items()}
            atomics = sorted(set(re.findall(r"\b(?:atom|red)\.[a-z0-9_.]+", compiled.asm["ptx"])))
            print(f"sm_{arch} {name} [{label}] ok: {sig} | constexprs {consts} | atomics {atomics}")
            n += 1
    print(f"compiled {n} kernels (triton {triton.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
