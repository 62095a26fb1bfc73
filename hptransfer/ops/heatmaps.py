"""Gaussian pose heatmaps (eq. 1): the fused Triton kernel (``hptransfer.kernels.heatmaps``) and the dense
torch formula it is tested against. ``sigma`` is in pixels of the map (``pose.default_sigma``: the paper's 3.2
on the 32x32 bottleneck grid, scaled with the map). The kernel runs as the custom op
``hptransfer::heatmaps_multi`` (with a fake kernel), so a compiled generator keeps it in its graph.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from hptransfer import pose
from hptransfer.ops._dispatch import use_fast


def heatmaps_reference(kp: torch.Tensor, image_size: Sequence[int], size: Sequence[int],
                       sigma: Optional[float] = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense torch formula of eq. (1); the spec the fast kernel is tested against.

    Keypoints in image pixels are mapped to map pixels with pixel centres aligned:
    ``u_map = (u_img + 0.5) * map / image - 0.5``.
    """
    H, W = int(image_size[0]), int(image_size[1])
    h, w = int(size[0]), int(size[1])
    if sigma is None:
        sigma = pose.default_sigma(h)
    kp = kp.to(torch.float32)
    B, K, _ = kp.shape
    cy = (kp[..., 0] + 0.5) * (h / H) - 0.5
    cx = (kp[..., 1] + 0.5) * (w / W) - 0.5
    ys = torch.arange(h, device=kp.device, dtype=torch.float32).view(1, 1, h, 1)
    xs = torch.arange(w, device=kp.device, dtype=torch.float32).view(1, 1, 1, w)
    d2 = (ys - cy.view(B, K, 1, 1)) ** 2 + (xs - cx.view(B, K, 1, 1)) ** 2
    maps = torch.exp(-d2 / (2.0 * sigma * sigma))
    maps = maps * (~pose.is_missing(kp)).view(B, K, 1, 1).to(maps.dtype)
    return maps.to(dtype)


def heatmaps(kp: torch.Tensor, image_size: Sequence[int], size: Sequence[int],
             sigma: Optional[float] = None, impl: str = "auto",
             dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Gaussian pose maps (B, 18, h, w) for keypoints ``kp`` (B, 18, 2) (y, x) of an ``image_size`` image.

    ``sigma`` is in pixels of the map (default: 3.2 on a 32x32 grid, scaled with ``size``).
    ``impl``: "auto" uses the Triton kernel on CUDA tensors, "fast" requires it, "reference"
    is the dense torch formula. Missing keypoints give all-zero maps.
    """
    return heatmaps_multi(kp, image_size, [size], None if sigma is None else [sigma], impl, dtype)[0]


def heatmaps_multi(kp: torch.Tensor, image_size: Sequence[int], sizes: Sequence[Sequence[int]],
                   sigmas: Optional[Sequence[float]] = None, impl: str = "auto",
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Heatmaps at several map sizes at once (one kernel launch on the fast path)."""
    if kp.dim() != 3 or kp.shape[1] != pose.NUM_KEYPOINTS or kp.shape[2] != 2:
        raise ValueError(f"keypoints must be (B, {pose.NUM_KEYPOINTS}, 2), got {tuple(kp.shape)}")
    sizes = [(int(s[0]), int(s[1])) for s in sizes]
    if sigmas is None:
        sigmas = [pose.default_sigma(s[0]) for s in sizes]
    if len(sigmas) != len(sizes):
        raise ValueError("one sigma per map size")
    if use_fast("heatmaps", kp, impl):
        flat = _heatmaps_multi_op(kp, [int(v) for v in image_size], [v for s in sizes for v in s],
                                  [float(v) for v in sigmas], dtype)
        out, offset = [], 0
        for h, w in sizes:  # views of the one buffer, made outside the op (an op's outputs may not alias)
            n = kp.shape[0] * kp.shape[1] * h * w
            out.append(flat[offset:offset + n].view(kp.shape[0], kp.shape[1], h, w))
            offset += n
        return out
    return [heatmaps_reference(kp, image_size, s, sg, dtype) for s, sg in zip(sizes, sigmas)]


@torch.library.custom_op("hptransfer::heatmaps_multi", mutates_args=())
def _heatmaps_multi_op(kp: torch.Tensor, image_size: list[int], sizes: list[int], sigmas: list[float],
                       dtype: torch.dtype) -> torch.Tensor:
    """The Triton kernel's maps, flat: every (B, 18, h_i, w_i) of ``sizes`` = [h_0, w_0, h_1, ...] in turn."""
    from hptransfer.kernels.heatmaps import heatmaps_triton_flat  # imports Triton: only when it runs

    return heatmaps_triton_flat(kp, image_size, list(zip(sizes[::2], sizes[1::2])), sigmas, dtype)


@_heatmaps_multi_op.register_fake
def _(kp, image_size, sizes, sigmas, dtype):
    total = kp.shape[0] * kp.shape[1] * sum(h * w for h, w in zip(sizes[::2], sizes[1::2]))
    return kp.new_empty((total,), dtype=dtype)
