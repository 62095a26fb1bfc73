"""Local perceptual loss (eq. 3): sum over descriptors d and VGG layers l of C(phi_l(X'_d), phi_l(X^_d)).

Conventions shared by the reference and the fast path:
- descriptors from ``hptransfer.pose.local_descriptors(kp, resolution)``; crop side resolution / 8;
- crops are ImageNet-normalised as gathered, so pixels outside the image are 0 after normalisation;
- crops smaller than ``min_crop`` are upsampled (bilinear, :func:`upsample_crops`) to ``min_crop`` before VGG;
- C is the mean over (channels, h, w) of the squared ("l2") or absolute ("l1") difference, per crop;
- per image, the sum over valid descriptors and layers (weighted by ``layer_weights``);
  the loss is the mean of that over the batch. Invalid descriptors contribute nothing.
``vgg(x, input_normalized=False)`` returns the list of feature maps of the chosen layers.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hptransfer.ops._dispatch import IMPLS, device_of
from hptransfer.ops.gather_crops import gather_crops_reference
from hptransfer.ops.perceptual_distance import criterion_per_sample

@functools.lru_cache(maxsize=64)
def _interpolation_matrix(src: int, dst: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(dst, src) weights of 1-D linear interpolation, align_corners=False: row i holds the weights
    ``F.interpolate(mode="linear")`` gives output i (made by interpolating the identity, so the two agree)."""
    eye = torch.eye(src, dtype=torch.float64).unsqueeze(0)  # channel c = one-hot input at c
    weights = F.interpolate(eye, size=dst, mode="linear", align_corners=False)[0]  # (src, dst)
    return weights.t().contiguous().to(device=device, dtype=dtype)


def upsample_crops(crops: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear upsampling (align_corners=False) of (M, C, s, s) crops to (M, C, size, size), as
    ``F.interpolate(crops, size, mode="bilinear")`` computes it, but as two small matmuls with a fixed
    interpolation matrix A: ``A @ crop @ A^T``. Its backward is two matmuls too, so it is deterministic on
    every device (``F.interpolate``'s bilinear backward uses atomics on CUDA and raises under
    ``torch.use_deterministic_algorithms(True)``)."""
    s = crops.shape[-1]
    if crops.shape[-2] != s:
        raise ValueError(f"crops must be square, got {tuple(crops.shape)}")
    if size == s:
        return crops
    a = _interpolation_matrix(s, int(size), crops.device, crops.dtype if crops.is_floating_point() else torch.float32)
    return torch.matmul(torch.matmul(a, crops), a.t())


def _prepare(fake, real, kp, min_crop, count):
    from hptransfer.pose import crop_size, local_descriptors  # pose is a sibling layer
    if fake.shape != real.shape:
        raise ValueError(f"fake and real must have the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
    device = device_of(fake, real, names=("fake", "real"))
    if kp.device != device:  # keypoints from the CPU data pipeline: moved once
        kp = kp.to(device)
    resolution = fake.shape[-1]
    centers, valid = local_descriptors(kp, resolution, count)
    size = crop_size(resolution)
    out_size = max(size, int(min_crop or 0))
    return centers, valid, size, out_size


def local_perceptual_loss_reference(fake: torch.Tensor, real: torch.Tensor, kp: torch.Tensor, vgg, criterion: str,
                                    layer_weights: Optional[Sequence[float]] = None, min_crop: int = 32,
                                    count: Optional[int] = None) -> torch.Tensor:
    """The research-code way, kept as the spec: one VGG call per descriptor in a Python loop."""
    centers, valid, size, out_size = _prepare(fake, real, kp, min_crop, count)
    B, N = valid.shape
    total = fake.new_zeros(B, dtype=torch.float32)
    for d in range(N):
        # normalised in the gather: out-of-image pixels are 0 after normalisation (the ImageNet mean colour),
        # the convention of gather_crops(normalize=True) that the fast path fuses
        cf = gather_crops_reference(fake, centers[:, d:d + 1], size, normalize=True)
        cr = gather_crops_reference(real, centers[:, d:d + 1], size, normalize=True)
        cf, cr = upsample_crops(cf, out_size), upsample_crops(cr, out_size)
        feats_fake = vgg(cf, input_normalized=True)
        with torch.no_grad():
            feats_real = vgg(cr, input_normalized=True)
        weights = layer_weights or [1.0] * len(feats_fake)
        per = sum(w * criterion_per_sample(a, b, criterion) for w, a, b in zip(weights, feats_fake, feats_real))
        total = total + per * valid[:, d].to(per.dtype)
    return total.mean()


def local_perceptual_loss(fake: torch.Tensor, real: torch.Tensor, kp: torch.Tensor, vgg, criterion: str,
                          impl: str = "auto", layer_weights: Optional[Sequence[float]] = None,
                          min_crop: int = 32, count: Optional[int] = None) -> torch.Tensor:
    """Local perceptual loss of ``fake`` against ``real`` (B, 3, R, R) in [-1, 1] at the descriptors
    of the target keypoints ``kp`` (B, 18, 2) (y, x) pixels. Returns a scalar (fp32).

    impl "auto"/"fast": all 2*B*N crops gathered in one batch, VGG once per half (the real half without
    autograd), then per crop the fused distance of ``hptransfer._C``; where that cannot run, "auto"
    computes the same distance with torch on the batch (one warning; HPTRANSFER_STRICT=1 makes it an
    error) and "fast" raises. "reference": the per-descriptor loop. Precision is the caller's: the crops
    and VGG run in the autocast dtype when autocast is on, else in ``fake``'s dtype.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "reference":
        return local_perceptual_loss_reference(fake, real, kp, vgg, criterion, layer_weights, min_crop, count)
    from hptransfer.ops._local_loss_fast import local_perceptual_loss_batched
    return local_perceptual_loss_batched(fake, real, kp, vgg, criterion, impl, layer_weights, min_crop, count)
