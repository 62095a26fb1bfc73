"""Crop conventions shared by the local perceptual loss's reference and batched paths: input checks,
crop sizes, and the deterministic bilinear upsampling of small crops (in the crops' memory layout)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from hptransfer.ops._dispatch import device_of
from hptransfer.pose import crop_size


@functools.lru_cache(maxsize=64)
def _interpolation_matrix(src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dst, src) weights of 1-D linear interpolation, align_corners=False: row i holds the weights
    ``F.interpolate(mode="linear")`` gives output i (made by interpolating the identity, so the two agree)."""
    eye = torch.eye(src, dtype=torch.float64).unsqueeze(0)  # channel c = one-hot input at c
    weights = F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0]  # (src, dst)
    return weights.t().contiguous().to(device=device, dtype=dtype)


def is_channels_last(t: torch.Tensor) -> bool:
    """Is ``t`` (N, C, H, W) stored channels_last (and not also plain contiguous, as size-1 cases can be)?"""
    return t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def upsample_crops(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (M, C, s, s) crops to (M, C, size, size), as
    ``F.interpolate(crops, size, mode="bilinear")`` computes it, but as two small matmuls with a fixed
    interpolation matrix A: ``A @ crop @ A^T``. Its backward is two matmuls too, so it is deterministic on
    every device (``F.interpolate``'s bilinear backward uses atomics on CUDA and raises under
    ``torch.use_deterministic_algorithms(True)``). channels_last crops give channels_last crops: the
    matmuls then run on the (M, s, s, C) view, rows then columns, with no layout copy."""
    s = crops.shape[-1]
    if crops.shape[-2] != s:
        raise ValueError(f"crops must be square, got {tuple(crops.shape)}")
    if size == s:
        return crops
    size = int(size)
    a = _interpolation_matrix(s, size, crops.device, crops.dtype if crops.is_floating_point() else torch.float32)
    if not is_channels_last(crops):
        return torch.matmul(torch.matmul(a, crops), a.t())
    M, C = crops.shape[:2]
    rows = torch.matmul(a, crops.permute(0, 2, 3, 1).reshape(M, s, s * C))  # (M, size, s * C): y interpolated
    both = torch.matmul(a, rows.reshape(M * size, s, C))  # (M * size, size, C): then x
    return both.view(M, size, size, C).permute(0, 3, 1, 2)


def prepare_crops(fake, real, centers, valid, local_min_crop):
    """Checked inputs of a local loss: (centers, valid) on the images' device, crop side R/8, VGG input side."""
    if fake.shape != real.shape:
        raise ValueError(f"fake and real must have the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
    if centers.dim() != 3 or centers.shape[-1] != 2 or valid.shape != centers.shape[:2] or centers.shape[0] != fake.shape[0]:
        raise ValueError(f"centers must be (B, N, 2) and valid (B, N) with B = {fake.shape[0]}, "
                         f"got {tuple(centers.shape)} and {tuple(valid.shape)}")
    device = device_of(fake, real, names=("fake", "real"))
    centers, valid = centers.to(device), valid.to(device)  # no-ops for a step's geometry (built on the device)
    size = crop_size(fake.shape[-1])
    out_size = max(size, int(local_min_crop or 0))
    return centers, valid, size, out_size
