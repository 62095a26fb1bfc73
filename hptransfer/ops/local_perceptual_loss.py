"""Local perceptual loss (eq. 3): sum over descriptors d and VGG layers l of C(phi_l(X'_d), phi_l(X^_d)).

Conventions shared by the reference and the fast path:
- descriptors from ``hptransfer.pose.local_descriptors(kp, resolution)``; crop side resolution / 8;
- crops are ImageNet-normalised as gathered, so pixels outside the image are 0 after normalisation;
- crops smaller than ``min_crop`` are upsampled (bilinear) to ``min_crop`` before VGG;
- C is the mean over (channels, h, w) of the squared ("l2") or absolute ("l1") difference, per crop;
- per image, the sum over valid descriptors and layers (weighted by ``layer_weights``);
  the loss is the mean of that over the batch. Invalid descriptors contribute nothing.
``vgg(x, input_normalized=False)`` returns the list of feature maps of the chosen layers.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from hptransfer.ops._dispatch import use_fast
from hptransfer.ops.gather_crops import gather_crops_reference

CRITERIA = ("l1", "l2")


def criterion_per_sample(a: torch.Tensor, b: torch.Tensor, criterion: str) -> torch.Tensor:
    """(B, ...) x2 -> (B,): mean over all but the first dim of |a-b| or (a-b)^2, in fp32."""
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    d = a.float() - b.float()
    d = d.abs() if criterion == "l1" else d * d
    return d.flatten(1).mean(dim=1)


def _prepare(fake, real, kp, min_crop, count):
    from hptransfer.pose import crop_size, local_descriptors  # pose is a sibling layer
    if fake.shape != real.shape:
        raise ValueError(f"fake and real must have the same shape, got {tuple(fake.shape)} and {tuple(real.shape)}")
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
        if out_size != size:
            cf = F.interpolate(cf, size=(out_size, out_size), mode="bilinear", align_corners=False)
            cr = F.interpolate(cr, size=(out_size, out_size), mode="bilinear", align_corners=False)
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

    impl "auto"/"fast": all 2*B*N crops gathered in one batch, VGG once (the real half without
    autograd), then the fused per-crop criterion of ``hptransfer._C``; "reference": the loop.
    """
    if impl != "reference" and use_fast("local_perceptual_loss", fake, impl, backend="extension"):
        from hptransfer.ops._local_loss_fast import local_perceptual_loss_fast
        return local_perceptual_loss_fast(fake, real, kp, vgg, criterion, impl, layer_weights, min_crop, count)
    return local_perceptual_loss_reference(fake, real, kp, vgg, criterion, layer_weights, min_crop, count)
