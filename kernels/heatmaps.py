"""Fused multi-scale pose heatmaps (eq. 1) in one Triton launch.

For keypoints (B, 18, 2) (y, x) in pixels of an H x W image, writes the Gaussian maps of every
requested map size into one flat buffer and returns a (B, 18, h, w) view per size. Keypoints are
mapped to map pixels inside the kernel exactly as ``hptransfer.ops.heatmaps_reference`` does:
``u_map = (u_img + 0.5) * map / image - 0.5``; a keypoint with a negative coordinate gives zeros.
Each output element is written once; the only other memory is a tiny per-launch tile table.

Grid: axis 0 = one (batch, keypoint) map, axis 1 = tiles of BLOCK pixels over all sizes in turn.
"""
from __future__ import annotations

import functools
from typing import Sequence

import torch
import triton
import triton.language as tl

from hptransfer.kernels._launch import device_guard

BLOCK = 1024


@triton.jit
def _heatmaps_forward_kernel(kp_ptr, out_ptr, tile_size_ptr, tile_start_ptr, h_ptr, w_ptr, scale_y_ptr, scale_x_ptr,
                             inv_two_sigma2_ptr, base_ptr, BLOCK: tl.constexpr):
    bk = tl.program_id(0)  # which (batch, keypoint) map
    tile = tl.program_id(1)
    s = tl.load(tile_size_ptr + tile)  # which map size this tile belongs to
    start = tl.load(tile_start_ptr + tile)
    h = tl.load(h_ptr + s)
    w = tl.load(w_ptr + s)
    ky = tl.load(kp_ptr + bk * 2)
    kx = tl.load(kp_ptr + bk * 2 + 1)
    cy = (ky + 0.5) * tl.load(scale_y_ptr + s) - 0.5
    cx = (kx + 0.5) * tl.load(scale_x_ptr + s) - 0.5
    present = (ky >= 0) & (kx >= 0)
    k = tl.load(inv_two_sigma2_ptr + s)

    p = start + tl.arange(0, BLOCK)
    n = h * w
    inside = p < n
    yy = (p // w).to(tl.float32)
    xx = (p % w).to(tl.float32)
    d2 = (yy - cy) * (yy - cy) + (xx - cx) * (xx - cx)
    val = tl.exp(-d2 * k)
    val = tl.where(present, val, 0.0)
    base = tl.load(base_ptr + s)  # where this size starts in the flat buffer
    offs = base + bk.to(tl.int64) * n + p
    tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=inside)


@functools.lru_cache(maxsize=64)
def _plan(sizes: tuple, sigmas: tuple, image_size: tuple, batch_maps: int, device: torch.device):
    """Per-size constants and the tile table, built once per configuration (tiny H2D copies)."""
    H, W = image_size
    tile_size, tile_start, base, offset = [], [], [], 0
    for i, (h, w) in enumerate(sizes):
        n = h * w
        for start in range(0, n, BLOCK):
            tile_size.append(i)
            tile_start.append(start)
        base.append(offset)
        offset += batch_maps * n
    as_t = lambda v, dt: torch.tensor(v, dtype=dt, device=device)  # noqa: E731
    return dict(
        tile_size=as_t(tile_size, torch.int32), tile_start=as_t(tile_start, torch.int32),
        h=as_t([s[0] for s in sizes], torch.int32), w=as_t([s[1] for s in sizes], torch.int32),
        scale_y=as_t([s[0] / H for s in sizes], torch.float32), scale_x=as_t([s[1] / W for s in sizes], torch.float32),
        inv_two_sigma2=as_t([1.0 / (2.0 * sg * sg) for sg in sigmas], torch.float32),
        base=as_t(base, torch.int64), total=offset, tiles=len(tile_size),
    )


def heatmaps_triton_flat(kp: torch.Tensor, image_size: Sequence[int], sizes: Sequence[Sequence[int]],
                         sigmas: Sequence[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian maps for keypoints ``kp`` (B, 18, 2) at every ``sizes[i]`` with ``sigmas[i]`` (map pixels),
    in one launch: one flat buffer holding each (B, 18, h_i, w_i) in turn."""
    B, K, _ = kp.shape
    sizes = tuple((int(h), int(w)) for h, w in sizes)
    plan = _plan(sizes, tuple(float(s) for s in sigmas), (int(image_size[0]), int(image_size[1])), B * K, kp.device)
    kp32 = kp.detach().to(torch.float32).contiguous()
    flat = torch.empty(plan["total"], dtype=dtype, device=kp.device)
    if B * K and plan["tiles"]:
        with device_guard(kp.device):
            _heatmaps_forward_kernel[(B * K, plan["tiles"])](
                kp32, flat, plan["tile_size"], plan["tile_start"], plan["h"], plan["w"], plan["scale_y"],
                plan["scale_x"], plan["inv_two_sigma2"], plan["base"], BLOCK=BLOCK)
    return flat

