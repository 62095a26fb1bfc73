"""Multi-crop gather: images (B, C, H, W) and descriptor centres (B, N, 2) -> crops (B*N, C, s, s).

Crop ``b * N + n`` is the s x s window of image b whose top-left corner is
``(round(cy) - s // 2, round(cx) - s // 2)`` (round half up), zero where it leaves the image.
Invalid descriptors (any negative centre coordinate) give all-zero crops and no gradient.
With ``normalize=True`` the in-image pixels, taken as [-1, 1], are mapped to ImageNet-normalised
values ((x + 1) / 2 - mean) / std; out-of-image pixels stay 0 (the ImageNet mean colour).
The backward pass scatter-adds crop gradients into the image gradient (overlaps add up).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from hptransfer.constants import IMAGENET_MEAN, IMAGENET_STD
from hptransfer.ops._dispatch import use_fast


def crop_origins(centers: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Integer top-left corners (B, N) y0, x0 and validity (B, N) for crops of side ``size``."""
    valid = ~(centers < 0).any(dim=-1)
    rounded = torch.floor(centers.to(torch.float32) + 0.5).to(torch.int64)
    y0 = rounded[..., 0] - size // 2
    x0 = rounded[..., 1] - size // 2
    return y0, x0, valid


def _normalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=x.dtype).view(1, -1, 1, 1)
    return ((x + 1) * 0.5 - mean) / std


def gather_crops_reference(images: torch.Tensor, centers: torch.Tensor, size: int, normalize: bool = False,
                           out_dtype: Optional[torch.dtype] = None, channels_last: bool = False) -> torch.Tensor:
    """The research-code way, kept as the spec: a Python loop of slices, pads and a cat."""
    _check(images, centers, size)
    B, C, H, W = images.shape
    N = centers.shape[1]
    y0, x0, valid = crop_origins(centers, size)
    y0, x0, valid = y0.tolist(), x0.tolist(), valid.tolist()
    src = _normalize(images) if normalize else images
    crops = []
    for b in range(B):
        for n in range(N):
            if not valid[b][n]:
                crops.append(images.new_zeros(1, C, size, size))
                continue
            top, left = y0[b][n], x0[b][n]
            ys, ye = max(top, 0), min(top + size, H)
            xs, xe = max(left, 0), min(left + size, W)
            if ys >= ye or xs >= xe:
                crops.append(images.new_zeros(1, C, size, size))
                continue
            patch = src[b:b + 1, :, ys:ye, xs:xe]
            pad = (xs - left, left + size - xe, ys - top, top + size - ye)  # left, right, top, bottom
            crops.append(F.pad(patch, pad))
    out = torch.cat(crops, dim=0) if crops else images.new_zeros(0, C, size, size)
    if out_dtype is not None:
        out = out.to(out_dtype)
    if channels_last:
        out = out.contiguous(memory_format=torch.channels_last)
    return out


def _check(images: torch.Tensor, centers: torch.Tensor, size: int) -> None:
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
    if centers.dim() != 3 or centers.shape[-1] != 2 or centers.shape[0] != images.shape[0]:
        raise ValueError(f"centers must be (B, N, 2) with B={images.shape[0]}, got {tuple(centers.shape)}")
    if int(size) < 1:
        raise ValueError(f"crop size must be >= 1, got {size}")


def gather_crops(images: torch.Tensor, centers: torch.Tensor, size: int, impl: str = "auto",
                 normalize: bool = False, out_dtype: Optional[torch.dtype] = None,
                 channels_last: bool = False) -> torch.Tensor:
    """Crops (B*N, C, size, size) centred at ``centers`` (B, N, 2) (y, x) pixels of ``images``.

    impl: "auto" = Triton kernel on CUDA tensors, reference elsewhere; "fast" = kernel or an error
    ("fast" on a CPU tensor runs the kernel in the Triton interpreter when TRITON_INTERPRET=1).
    Differentiable with respect to ``images`` on both paths. Under deterministic mode the kernel is not
    used where a gradient is needed (its backward adds with atomics). ``centers`` on another device
    than ``images`` are moved there (a (B, N, 2) copy).
    """
    if normalize and images.shape[1] != 3:
        raise ValueError(f"normalize=True needs 3-channel images, got {images.shape[1]} channels")
    if centers.device != images.device:
        centers = centers.to(images.device)
    if use_fast("gather_crops", images, impl, atomic_backward=True):
        from hptransfer.kernels.gather_crops import gather_crops_triton
        _check(images, centers, size)
        return gather_crops_triton(images, centers, int(size), normalize, out_dtype, channels_last)
    return gather_crops_reference(images, centers, int(size), normalize, out_dtype, channels_last)
