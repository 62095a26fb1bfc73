"""Batched multi-crop gather (forward) and scatter-add (backward), one Triton launch each.

images (B, C, H, W) and descriptor centres (B, N, 2) -> crops (B*N, C, s, s). Same semantics as
``hptransfer.ops.gather_crops_reference``: top-left = floor(c + 0.5) - s // 2, zero outside the
image, invalid centres (a negative coordinate) give zero crops and no gradient, optional fused
ImageNet normalisation of in-image pixels, optional output dtype and channels_last output.
Input and output layouts are taken from strides, so NCHW and channels_last both work.

Backward: every crop pixel adds its gradient into the image gradient with an fp32 atomic add,
``sem="relaxed"`` (a sum needs no acquire/release ordering; Inductor's scatter-adds do the same;
overlapping crops add up). Atomic order makes the last bits of fp32 sums run-to-run
nondeterministic on a GPU; under ``torch.use_deterministic_algorithms(True)`` the reference
autograd path is used instead (``hptransfer.ops`` refuses this kernel there when a gradient is needed).
Both launches run under the tensors' CUDA device (``device_guard``).

Grid: axis 0 = crop (b * N + n), axis 1 = channel, axis 2 = tiles of BLOCK_Y x BLOCK_X pixels
(rows of a tile are contiguous along x, so loads and stores coalesce along the image row).
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from hptransfer.constants import IMAGENET_MEAN, IMAGENET_STD
from hptransfer.kernels._launch import device_guard

# The ImageNet statistics as compile-time constants of the kernels (Triton reads globals only when they
# are constexpr); the numbers themselves live once, in hptransfer.constants.
_MEAN_R, _MEAN_G, _MEAN_B = (tl.constexpr(v) for v in IMAGENET_MEAN)
_STD_R, _STD_G, _STD_B = (tl.constexpr(v) for v in IMAGENET_STD)


def _blocks(size: int) -> tuple[int, int]:
    block_x = min(triton.next_power_of_2(size), 64)
    block_y = max(1, min(triton.next_power_of_2(size), 2048 // block_x))
    return block_y, block_x


@triton.jit
def _channel_affine(c, NORMALIZE: tl.constexpr):
    """(scale, shift) so that normalised = x * scale + shift = ((x + 1) / 2 - mean) / std."""
    if NORMALIZE:
        mean = tl.where(c == 0, _MEAN_R, tl.where(c == 1, _MEAN_G, _MEAN_B))
        std = tl.where(c == 0, _STD_R, tl.where(c == 1, _STD_G, _STD_B))
        scale = 0.5 / std
        shift = (0.5 - mean) / std
    else:
        scale = 1.0
        shift = 0.0
    return scale, shift


@triton.jit
def _crop_tile(centers_ptr, crop, tile, H, W, TILES_X, SIZE: tl.constexpr, BLOCK_Y: tl.constexpr,
               BLOCK_X: tl.constexpr):
    """Crop-pixel indices (py, px) of this tile, their image pixels (iy, ix) and the masks
    in_crop (inside the s x s crop) and inside (also inside the image, descriptor valid)."""
    cy = tl.load(centers_ptr + crop * 2)
    cx = tl.load(centers_ptr + crop * 2 + 1)
    # An invalid centre moves the crop far outside the image, so every pixel is masked off.
    valid = (cy >= 0) & (cx >= 0)
    y0 = tl.where(valid, tl.floor(cy + 0.5).to(tl.int32) - SIZE // 2, -(1 << 30))
    x0 = tl.floor(cx + 0.5).to(tl.int32) - SIZE // 2
    py = (tile // TILES_X) * BLOCK_Y + tl.arange(0, BLOCK_Y)[:, None]
    px = (tile % TILES_X) * BLOCK_X + tl.arange(0, BLOCK_X)[None, :]
    in_crop = (py < SIZE) & (px < SIZE)
    iy = y0 + py
    ix = x0 + px
    inside = in_crop & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return py, px, in_crop, iy, ix, inside


@triton.jit
def _gather_crops_forward_kernel(img_ptr, centers_ptr, out_ptr, N, H, W, TILES_X,
                                 sib, sic, sih, siw, sob, soc, soh, sow,
                                 SIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                                 BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    crop = tl.program_id(0)
    c = tl.program_id(1)
    b = crop // N
    py, px, in_crop, iy, ix, inside = _crop_tile(centers_ptr, crop, tl.program_id(2), H, W, TILES_X,
                                                 SIZE, BLOCK_Y, BLOCK_X)
    src = img_ptr + b.to(tl.int64) * sib + c * sic + iy.to(tl.int64) * sih + ix * siw
    v = tl.load(src, mask=inside, other=0.0).to(tl.float32)
    scale, shift = _channel_affine(c, NORMALIZE)
    v = tl.where(inside, v * scale + shift, 0.0)
    dst = out_ptr + crop.to(tl.int64) * sob + c * soc + py * soh + px * sow
    tl.store(dst, v.to(out_ptr.dtype.element_ty), mask=in_crop)


@triton.jit
def _gather_crops_backward_kernel(grad_out_ptr, centers_ptr, grad_img_ptr, N, H, W, TILES_X,
                                  sgb, sgc, sgh, sgw, C,
                                  SIZE: tl.constexpr, NORMALIZE: tl.constexpr,
                                  BLOCK_Y: tl.constexpr, BLOCK_X: tl.constexpr):
    crop = tl.program_id(0)
    c = tl.program_id(1)
    b = crop // N
    py, px, in_crop, iy, ix, inside = _crop_tile(centers_ptr, crop, tl.program_id(2), H, W, TILES_X,
                                                 SIZE, BLOCK_Y, BLOCK_X)
    g = tl.load(grad_out_ptr + crop.to(tl.int64) * sgb + c * sgc + py * sgh + px * sgw, mask=inside, other=0.0)
    scale, shift = _channel_affine(c, NORMALIZE)
    g = g.to(tl.float32) * scale
    # grad_img is a contiguous fp32 (B, C, H, W) buffer
    dst = grad_img_ptr + ((b.to(tl.int64) * C + c) * H + iy) * W + ix
    tl.atomic_add(dst, g, mask=inside, sem="relaxed")  # a sum: no ordering needed (as Inductor's scatter-add)


def _launch_grid(crops: int, channels: int, size: int):
    block_y, block_x = _blocks(size)
    tiles_x = triton.cdiv(size, block_x)
    tiles = triton.cdiv(size, block_y) * tiles_x
    return (crops, channels, tiles), block_y, block_x, tiles_x


class _GatherCrops(torch.autograd.Function):
    @staticmethod
    def forward(ctx, images, centers, size, normalize, out_dtype, channels_last):
        B, C, H, W = images.shape
        N = centers.shape[1]
        if centers.device != images.device:
            raise ValueError(f"gather_crops_triton: centers on {centers.device}, images on {images.device}")
        flat_centers = centers.detach().to(torch.float32).reshape(B * N, 2).contiguous()
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((B * N, C, size, size), dtype=out_dtype or images.dtype, device=images.device,
                          memory_format=fmt)
        if out.numel():
            grid, by, bx, tiles_x = _launch_grid(B * N, C, size)
            with device_guard(images.device):
                _gather_crops_forward_kernel[grid](
                    images, flat_centers, out, N, H, W, tiles_x, *images.stride(), *out.stride(),
                    SIZE=size, NORMALIZE=normalize, BLOCK_Y=by, BLOCK_X=bx)
        ctx.save_for_backward(flat_centers)
        ctx.meta = (B, C, H, W, N, size, normalize, images.dtype)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        (flat_centers,) = ctx.saved_tensors
        B, C, H, W, N, size, normalize, in_dtype = ctx.meta
        grad_img = torch.zeros((B, C, H, W), dtype=torch.float32, device=grad_out.device)
        if grad_out.numel():
            grid, by, bx, tiles_x = _launch_grid(B * N, C, size)
            with device_guard(grad_out.device):
                _gather_crops_backward_kernel[grid](
                    grad_out, flat_centers, grad_img, N, H, W, tiles_x, *grad_out.stride(), C,
                    SIZE=size, NORMALIZE=normalize, BLOCK_Y=by, BLOCK_X=bx)
        return grad_img.to(in_dtype), None, None, None, None, None


def gather_crops_triton(images: torch.Tensor, centers: torch.Tensor, size: int, normalize: bool = False,
                        out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> torch.Tensor:
    """Crops (B*N, C, size, size) of ``images`` (B, C, H, W) at ``centers`` (B, N, 2) (y, x); differentiable."""
    return _GatherCrops.apply(images, centers, int(size), bool(normalize), out_dtype, bool(channels_last))
