"""Compile every Triton kernel ahead of time for NVIDIA targets (sm_80, sm_90) without a GPU.

Run by tests/test_kernels_compile.py in a subprocess with TRITON_INTERPRET unset (the interpreter
replaces kernels with Python functions). Catches typing and lowering errors that the interpreter,
which runs the kernels on numpy, does not: what CI on a CPU machine can check of the compiled path.
"""
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from hptransfer.kernels import gather_crops as gc
from hptransfer.kernels import heatmaps as hm

CROP = {"SIZE": "constexpr", "NORMALIZE": "constexpr", "BLOCK_Y": "constexpr", "BLOCK_X": "constexpr"}
GRID = {"N": "i32", "H": "i32", "W": "i32", "TILES_X": "i32"}
STRIDES = lambda p: {f"{p}{k}": "i64" for k in "bchw"}  # noqa: E731


def kernels(dtype: str, size: int):
    block_y, block_x = gc._blocks(size)
    crop_consts = {"SIZE": size, "NORMALIZE": True, "BLOCK_Y": block_y, "BLOCK_X": block_x}
    yield hm._heatmaps_forward_kernel, {
        "kp_ptr": "*fp32", "out_ptr": f"*{dtype}", "tile_size_ptr": "*i32", "tile_start_ptr": "*i32", "h_ptr": "*i32",
        "w_ptr": "*i32", "scale_y_ptr": "*fp32", "scale_x_ptr": "*fp32", "inv_two_sigma2_ptr": "*fp32",
        "base_ptr": "*i64", "BLOCK": "constexpr"}, {"BLOCK": hm.BLOCK}
    yield gc._gather_crops_forward_kernel, {
        "img_ptr": f"*{dtype}", "centers_ptr": "*fp32", "out_ptr": f"*{dtype}", **GRID, **STRIDES("si"),
        **STRIDES("so"), **CROP}, crop_consts
    yield gc._gather_crops_backward_kernel, {
        "grad_out_ptr": f"*{dtype}", "centers_ptr": "*fp32", "grad_img_ptr": "*fp32", **GRID, **STRIDES("sg"),
        "C": "i32", **CROP}, crop_consts


def main() -> int:
    for arch in (80, 90):
        for dtype, size in (("fp32", 8), ("bf16", 128), ("fp16", 33)):
            for fn, signature, constexprs in kernels(dtype, size):
                compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                                          target=GPUTarget("cuda", arch, 32))
                assert compiled.asm.get("cubin"), f"{fn.__name__}: no cubin"
                print(f"sm_{arch} {dtype} size {size}: {fn.__name__} ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
